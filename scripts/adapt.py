"""Adapt a trained model (default: the shipped one) to a clinic's own labelled images.

python -m scripts.adapt DIR --out runs/adapted
python -m scripts.adapt ../shared/isic2017/train --test-dir ../shared/isic2017/val \\
    --from ../dermfusion-v1/model/shipped --label-budget 25,50,100,all --draws 3 \\
    --out runs/adapt_v1_isic2017
python -m scripts.adapt DIR --from model/shipped#0 --out runs/adapted0   # one network only

DIR is any HAM10000-format or imported folder. Its own `split` column is used when it has one;
else a patient- and lesion-grouped split is made (RUN/splits.csv). The early backbone stages stay
frozen and run once per image; the last --train-blocks stages and the head are fine-tuned for a
few epochs, the best epoch on DIR's val part is kept (the parent itself included), and
temperature and the unreliable-input check are refitted there. Prints before / after figures with
95 % intervals on DIR's test part (or --test-dir) and on the HAM10000 test split (what adapting
forgot). --label-budget adds a learning curve (RUN/label_budget.{csv,json,png}).
RUN is written whole or not at all; use it with --checkpoint RUN in every other command.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import torch

from common.cli import run_cli
from model.adapt import AdaptConfig, adapt, parse_budgets

HELP: dict[str, str] = {
    "test_dir": "HAM-format folder used as the test part (never trained or selected on)",
    "ham_dir": "HAM10000 folder for the forgetting check (default: $DERMFUSION_DATA_DIR or "
    "../shared/ham10000 when present; none: skip)",
    "train_blocks": "backbone stages tuned besides the final 1x1 conv and the head (0-7)",
    "epochs": "epochs of tuning (the best on val is kept)",
    "epoch_samples": "at least this many images drawn per epoch by the weighted sampler",
    "batch_size": "training batch size",
    "lr": "peak learning rate of the head (cosine schedule after a half-epoch warm-up)",
    "backbone_lr_mult": "learning rate of the tuned backbone stages as a fraction of --lr",
    "weight_decay": "AdamW weight decay",
    "sampler_power": "class c is drawn with share ∝ n_c^(1-power)",
    "loss_power": "class weight of the cross-entropy ∝ n_c^-power",
    "label_smoothing": "label smoothing of the cross-entropy",
    "mask_absent": "loss over the classes the local training part shows only",
    "draws": "random draws per --label-budget",
    "seed": "random seed (split, draws, training)",
    "threads": "torch CPU threads (0: torch's default)",
    "n_boot": "bootstrap draws of whole lesions for the 95 %% intervals",
    "batch_eval": "images per forward pass while caching",
    "device": "cpu, cuda or cuda:N",
    "name": "model name (default: <parent name>-adapted-<DIR name>)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    d = AdaptConfig(data_dir="", out="")
    p.add_argument("data_dir", metavar="DIR", help="the clinic's labelled folder")
    p.add_argument("--out", required=True, metavar="RUN", help="new checkpoint folder")
    p.add_argument(
        "--from",
        dest="parent",
        default="",
        metavar="CHECKPOINT",
        help="checkpoint folder to adapt (default: shipped); FOLDER#K: network K of an ensemble",
    )
    p.add_argument(
        "--label-budget",
        default="",
        metavar="N,N,...",
        help="learning curve over these numbers of local training images (e.g. 25,50,100,all)",
    )
    for name, help_text in HELP.items():
        default = getattr(d, name)
        flag = "--" + name.replace("_", "-")
        text = help_text if default == "" else f"{help_text} (default: {default})"
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        else:
            p.add_argument(flag, type=type(default), default=default, help=text)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = vars(build_parser().parse_args(argv))
    budget = args.pop("label_budget")
    args["budgets"] = parse_budgets(budget) if budget else ()
    args["command"] = shlex.join(["python", "-m", "scripts.adapt", *argv])
    if args["threads"]:
        torch.set_num_threads(args["threads"])
    out, ck = adapt(AdaptConfig(**args))
    print(f"wrote {ck.version} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
