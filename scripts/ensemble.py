"""Combine trained fusion checkpoints (different seeds, same recipe and split) into one.

    python -m scripts.ensemble runs/fusion runs/fusion_s43 --data-dir ../shared/ham10000 \\
        --out runs/fusion_ens
    python -m scripts.ensemble runs/v2_s42 runs/v2_s43 --data-dir ../shared/ham10000 \\
        --external-val ../shared/isic2017/val --geometry squash --out runs/v2_ens
    python -m scripts.ensemble model/shipped#0 runs/v2_s43 ...   # network 0 of an ensemble

The result is an ordinary self-describing checkpoint (mean logits of the members, temperature and
OOD check fitted on val, val + test metrics in config.json), usable by every CLI and the app via
--checkpoint. Weights are stored as float16 unless --float32.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import torch

from common.cli import run_cli
from data_pipeline.transforms import GEOMETRIES
from model.ensemble import build_ensemble


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "members",
        nargs="+",
        type=Path,
        help="member checkpoint folders (≥ 2 networks); FOLDER#K: only network K of an ensemble",
    )
    p.add_argument("--data-dir", required=True, type=Path, help="HAM10000-format folder")
    p.add_argument("--out", required=True, type=Path, help="output checkpoint folder")
    p.add_argument("--name", default="", help="model name (default: <member name>-ensembleN)")
    p.add_argument("--float32", action="store_true", help="store float32 weights (2x larger)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--external-val",
        nargs="+",
        type=Path,
        default=[],
        metavar="DIR",
        help="external validation folders the members were selected on (scored, calibrated on)",
    )
    p.add_argument(
        "--geometry",
        choices=GEOMETRIES,
        default=None,
        help="inference framing policy to ship (default: the members')",
    )
    p.add_argument(
        "--class-weights",
        choices=("mean", "fit"),
        default="mean",
        help="mean: equal logits; fit (two networks): per-class weights fitted on validation",
    )
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out, ck = build_ensemble(
        args.members,
        args.data_dir,
        args.out,
        name=args.name,
        dtype=None if args.float32 else torch.float16,
        device=args.device,
        external_val=args.external_val,
        geometry=args.geometry,
        command=shlex.join(["python", "-m", "scripts.ensemble", *argv]),
        class_weights=args.class_weights,
    )
    print(f"wrote {ck.version} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
