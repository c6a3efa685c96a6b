"""Evaluate a checkpoint on any HAM10000-format folder (metadata CSV + images).

    python -m scripts.evaluate --data-dir ../shared/ham10000 --out outputs/eval_test
    python -m scripts.evaluate --data-dir /data/external --split all --out outputs/external --tta

Writes OUT/metrics.json, OUT/predictions.csv and confusion / ROC / reliability PNGs.
--checkpoint defaults to the shipped model.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from model.evaluate import evaluate
from model.metrics import headline
from common.cli import run_cli


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint folder (default: shipped)"
    )
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--split", default="test", choices=["train", "val", "test", "all"])
    p.add_argument(
        "--splits", type=Path, default=None, help="split CSV (default: the checkpoint's)"
    )
    p.add_argument("--tta", action="store_true", help="average flips / 180° rotation")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    m = evaluate(
        args.data_dir,
        args.checkpoint,
        args.out,
        args.split,
        args.tta,
        args.splits,
        args.batch_size,
        args.device,
        progress=True,
    )
    print(f"{m['model_version']} on {m['split']} (n={m['n']}, tta={m['tta']}): {headline(m)}")
    print(f"top3 {m['top3_accuracy']:.3f}  weighted_f1 {m['weighted_f1']:.3f}")
    for c, pc in m["per_class"].items():
        auc = "  n/a" if pc["auc"] is None else f"{pc['auc']:.3f}"
        print(
            f"  {c:6s} recall {pc['recall']:.3f}  precision {pc['precision']:.3f}  "
            f"f1 {pc['f1']:.3f}  auc {auc}  n={pc['support']}"
        )
    if "warning" in m:
        print(f"warning: {m['warning']}")
    print(f"wrote {args.out}/metrics.json and plots")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
