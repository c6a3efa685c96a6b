"""Train the fusion (or image-only) model on HAM10000-format folders.

python -m scripts.train --data-dir ../shared/ham10000 --out runs/fusion
python -m scripts.train --data-dir ../shared/ham10000 --extra-train ../shared/isic2017/train \\
    --external-val ../shared/isic2017/val --out runs/v2
python -m scripts.train ... --init-from model/shipped --init-member 0   # fine-tune a trained model
python -m scripts.train ... --resume          # continue a killed run from OUT/state.pt

Data-parallel on N GPUs (or N CPU processes with gloo), one machine or several:
torchrun --nproc_per_node N -m scripts.train ...        # --batch-size is per process
torchrun --nnodes 2 --nproc_per_node N --rdzv-backend c10d --rdzv-endpoint HOST:29400 \
    --rdzv-id JOB -m scripts.train ...
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from dataclasses import fields

from common.cli import run_cli
from data_pipeline.transforms import COLOR_CONSTANCY, GEOMETRIES
from model.distributed import env_rank
from model.losses import LOSSES
from model.train import TrainConfig, train

#: Help text of every TrainConfig field exposed as a flag (a test checks none is missing).
HELP: dict[str, str] = {
    "splits": "split CSV of the primary folder when it has no split column of its own (created "
    "with --seed, lesion- and patient-grouped, if absent; default for such a folder: "
    "splits/<folder>_<hash>_seed<N>.csv). A folder's official split always wins; one without a "
    "val part gets it carved from its train part, saved here. Its hash goes in the config",
    "extra_train": "extra HAM-format folders used wholly for training (e.g. isic2017/train)",
    "external_val": "HAM-format folders scored every epoch and used for selection; never trained",
    "backbone": "timm backbone name (tf_efficientnet_lite0 has offline ImageNet weights)",
    "init_from": "checkpoint folder to start from instead of ImageNet weights (fine-tuning)",
    "init_member": "with --init-from an ensemble: which member's weights to start from",
    "height": "input height in pixels",
    "width": "input width in pixels",
    "geometry": "how any aspect ratio is framed into the square input: " + ", ".join(GEOMETRIES),
    "color_constancy": "colour normalisation applied in training and inference: "
    + ", ".join(COLOR_CONSTANCY),
    "crop_jitter": "random-resized crops with scale and aspect jitter in training",
    "acquisition_aug": "gamma / JPEG / down-and-up-scaling augmentations in training",
    "epochs": "maximum number of epochs (cosine schedule length)",
    "epoch_samples": "images drawn per epoch by the weighted sampler (0: the training-set size)",
    "batch_size": "training batch size (per process under torchrun)",
    "lr": "peak learning rate of the new layers (head, metadata MLP)",
    "backbone_lr_mult": "backbone learning rate as a fraction of --lr",
    "weight_decay": "AdamW weight decay",
    "warmup_epochs": "linear learning-rate warm-up, in epochs",
    "sampler_power": "class c is drawn with share ∝ n_c^(1-power): 0 natural, 1 uniform",
    "loss": "imbalance handling: " + ", ".join(LOSSES),
    "loss_power": "weighted_ce: class weight ∝ n_c^-power",
    "la_tau": "logit_adjusted: scale of the log-prior offset (Menon et al. 2021)",
    "source_mask": "softmax over the classes each row's source can contain",
    "class_share": "class shares of the sampler from the training union's counts (union) or "
    "the primary source's (primary: an extra source without akiec / bcc / df / vasc does not "
    "shrink their share)",
    "label_smoothing": "label smoothing of the cross-entropy",
    "meta_blank_prob": "per-field probability of blanking age / sex / site to unknown",
    "patience": "early stop after this many epochs without a better selection score",
    "ema_decay": "weight EMA decay (0: off); the EMA weights are validated and shipped",
    "seed": "random seed (also for a new split file)",
    "workers": "DataLoader worker processes (0: load in the main process)",
    "threads": "torch CPU threads (0: torch's default)",
    "device": "auto, cpu, cuda or cuda:N (AMP is used on CUDA)",
    "max_train_batches": "stop each epoch after this many batches (smoke tests; 0: no limit)",
    "name": "model name in the config (default: the --out folder's name)",
}
_SPECIAL = {"data_dir", "out", "use_metadata", "pretrained", "resume", "command"}
_CHOICES = {
    "geometry": GEOMETRIES,
    "color_constancy": COLOR_CONSTANCY,
    "loss": LOSSES,
    "class_share": ("union", "primary"),
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    defaults = TrainConfig(data_dir="", out="")
    p.add_argument("--data-dir", required=True, help="the primary HAM10000-format folder")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs)")
    p.add_argument("--image-only", action="store_true", help="ablation: ignore metadata")
    p.add_argument("--no-pretrained", action="store_true", help="start from random weights")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt")
    for f in fields(TrainConfig):
        if f.name in _SPECIAL:
            continue
        default = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        text = f"{HELP[f.name]} (default: {default})"
        if isinstance(default, bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=text)
        elif isinstance(default, tuple):
            p.add_argument(flag, nargs="+", default=default, metavar="DIR", help=text)
        else:
            p.add_argument(
                flag, type=type(default), default=default, choices=_CHOICES.get(f.name), help=text
            )
    return p


def launcher() -> list[str]:
    """How this process was started, for the recorded command: torchrun's world, else python."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return ["python"]
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)) or world)
    return ["torchrun", "--nnodes", str(world // per_node), "--nproc_per_node", str(per_node)]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = vars(build_parser().parse_args(argv))
    args["use_metadata"] = not args.pop("image_only")
    args["pretrained"] = not args.pop("no_pretrained")
    args["extra_train"] = tuple(args["extra_train"])
    args["external_val"] = tuple(args["external_val"])
    args["command"] = shlex.join([*launcher(), "-m", "scripts.train", *argv])
    out = train(TrainConfig(**args))
    if env_rank() == 0:
        print(f"checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
