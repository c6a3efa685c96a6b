"""Train the fusion (or image-only) model on a HAM10000-format folder.

python -m scripts.train --data-dir ../shared/ham10000 --out runs/fusion
python -m scripts.train --data-dir ../shared/ham10000 --out runs/image_only --image-only
python -m scripts.train ... --resume          # continue a killed run
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import fields

from model.train import TrainConfig, train
from common.cli import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    defaults = TrainConfig(data_dir="", out="")
    p.add_argument("--data-dir", required=True, help="HAM10000-format folder (CSV + images)")
    p.add_argument("--out", required=True, help="run folder (checkpoints, logs)")
    p.add_argument("--image-only", action="store_true", help="ablation: ignore metadata")
    p.add_argument("--no-pretrained", action="store_true", help="start from random weights")
    p.add_argument("--resume", action="store_true", help="continue from OUT/state.pt")
    for f in fields(TrainConfig):
        if f.name in {"data_dir", "out", "use_metadata", "pretrained", "resume"}:
            continue
        default = getattr(defaults, f.name)
        p.add_argument(
            "--" + f.name.replace("_", "-"),
            type=type(default),
            default=default,
            help=f"(default: {default})",
        )
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    args["use_metadata"] = not args.pop("image_only")
    args["pretrained"] = not args.pop("no_pretrained")
    out = train(TrainConfig(**args))
    print(f"checkpoint written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
