"""Export checkpoint folders to ONNX (``model.onnx`` beside the weights, hash in config.json).

    python -m scripts.export                      # the shipped model (model/shipped)
    python -m scripts.export runs/fusion runs/ens # any checkpoint folders (single or ensemble)
    python -m scripts.export --int8 --data-dir ../shared/ham10000 --extra ../shared/isic2017/train

Training and ``scripts.ensemble`` export their checkpoint themselves; run this for a checkpoint
made before exports existed, or after changing its weights by hand. The app, ``scripts.predict``,
``scripts.evaluate`` and ``scripts.benchmark`` then serve it with ONNX Runtime
(``--runtime torch`` forces PyTorch).

``--int8`` also writes ``model.int8.onnx``, statically quantised and calibrated on a
class-stratified sample of *training* images (the checkpoint's HAM10000 train split of
``--data-dir`` plus any ``--extra`` training folder), served only with ``--runtime int8``: about
twice as fast on a CPU, but not accuracy-neutral (:mod:`model.quantize`; docs/benchmarks.md,
"Why float32 stays the default").
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common.cli import run_cli
from model.checkpoint import resolve_dir
from model.onnx_runtime import export_onnx
from model.quantize import PER_CLASS, quantize_int8


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m scripts.export",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument(
        "checkpoints", nargs="*", type=Path, help="checkpoint folders (default: model/shipped)"
    )
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    p.add_argument("--int8", action="store_true", help="also write the int8 export")
    p.add_argument("--data-dir", type=Path, help="--int8: HAM10000-format folder to calibrate on")
    p.add_argument(
        "--extra", type=Path, nargs="*", default=[], help="--int8: training folders, used whole"
    )
    p.add_argument(
        "--per-class", type=int, default=PER_CLASS, help="--int8: calibration images per class"
    )
    args = p.parse_args(argv)
    if args.int8 and args.data_dir is None:
        p.error("--int8 needs --data-dir (training images to calibrate on)")
    if args.threads:
        torch.set_num_threads(args.threads)
    for folder in args.checkpoints or [None]:
        path = export_onnx(resolve_dir(folder))
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
        if args.int8:
            path = quantize_int8(path.parent, args.data_dir, args.extra, args.per_class)
            print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
