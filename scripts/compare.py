"""Compare two models on the same images: a paired bootstrap of every reported metric.

    python -m scripts.evaluate --data-dir ../shared/ham10000 --split val \\
        --external ../shared/isic2017/val --by-source --out outputs/a_val
    python -m scripts.evaluate ... --checkpoint runs/candidate --out outputs/b_val
    python -m scripts.compare outputs/a_val outputs/b_val --json outputs/a_vs_b.json

Prints, per source and for the selection score, A, B, B − A with its 95 % interval and the share
of bootstrap draws in which B beat A. Images are resampled by lesion (``lesion_id`` in
predictions.csv) within each source, with the same draw for both models. Compare on val splits
when choosing a model; test is for reporting.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

from common.cli import run_cli
from model.compare import compare_predictions, format_table, load_predictions


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m scripts.compare",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("a", type=Path, help="model A: predictions.csv or its scripts.evaluate folder")
    p.add_argument("b", type=Path, help="model B: the same, on the same images")
    p.add_argument("--n-boot", type=int, default=2000, help="bootstrap draws (default: 2000)")
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    p.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = p.parse_args(argv)
    rows = compare_predictions(
        load_predictions(args.a), load_predictions(args.b), n_boot=args.n_boot, seed=args.seed
    )
    print(format_table(rows, str(args.a), str(args.b)))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "a": str(args.a),
            "b": str(args.b),
            "n_boot": args.n_boot,
            "seed": args.seed,
            "rows": [{**asdict(r), "diff": r.diff} for r in rows],
        }
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
