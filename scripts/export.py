"""Export checkpoint folders to ONNX (``model.onnx`` beside the weights, hash in config.json).

    python -m scripts.export                      # the shipped model (model/shipped)
    python -m scripts.export runs/fusion runs/ens # any checkpoint folders (single or ensemble)

Training and ``scripts.ensemble`` export their checkpoint themselves; run this for a checkpoint
made before exports existed, or after changing its weights by hand. The app, ``scripts.predict``,
``scripts.evaluate`` and ``scripts.benchmark`` then serve it with ONNX Runtime
(``--runtime torch`` forces PyTorch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from common.cli import run_cli
from model.checkpoint import resolve_dir
from model.onnx_runtime import export_onnx


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
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for folder in args.checkpoints or [None]:
        path = export_onnx(resolve_dir(folder))
        print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
