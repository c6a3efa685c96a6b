"""Evaluate a checkpoint on HAM10000-format folders (metadata CSV + images).

    python -m scripts.evaluate --data-dir ../shared/ham10000 --out outputs/eval_test
    python -m scripts.evaluate --data-dir ../shared/ham10000 --split test \\
        --external ../shared/isic2017/val --by-source --out outputs/eval_by_source
    python -m scripts.evaluate --data-dir /data/external --split all --out outputs/external --tta
    python -m scripts.evaluate --data-dir ../shared/ham10000 --external ../shared/isic2017/val \\
        --by age,sex,site,source,skin_tone --out outputs/audit      # subgroup audit

Writes OUT/metrics.json, OUT/predictions.csv and confusion / ROC / reliability PNGs.
metrics.json also holds 95 % intervals of the headline figures per source (--bootstrap N draws of
whole lesions, default 1000; 0 turns them off). --by adds each subgroup's counts and figures with
intervals (metrics.json → subgroups, subgroups.png); --save-audit stores that audit in the
checkpoint folder (subgroups.json, with the skin-tone bands of its training images), where the
app reads it.
--checkpoint defaults to the shipped model.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from common.cli import run_cli
from common.errors import DataError
from data_pipeline.transforms import GEOMETRIES
from model.checkpoint import load_config
from model.evaluate import evaluate
from model.metrics import headline
from model.onnx_runtime import RUNTIME_HELP, RUNTIMES
from model.subgroups import (
    AGE_BANDS,
    KEYS,
    SHOWN,
    parse_by,
    training_tone_counts,
    write_audit,
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", required=True, type=Path, help="HAM10000-format folder")
    p.add_argument(
        "--checkpoint", type=Path, default=None, help="checkpoint folder (default: shipped)"
    )
    p.add_argument("--out", required=True, type=Path, help="folder for metrics.json and plots")
    p.add_argument(
        "--split",
        default=None,
        choices=["train", "val", "test", "all"],
        help="rows of --data-dir to score (default: test when the folder has a split — its own "
        "split column or the checkpoint's split file — else every row; all: every row)",
    )
    p.add_argument(
        "--splits", type=Path, default=None, help="split CSV (default: the checkpoint's)"
    )
    p.add_argument(
        "--external",
        nargs="+",
        type=Path,
        default=[],
        metavar="DIR",
        help="more HAM-format folders, each scored whole as its own source",
    )
    p.add_argument(
        "--by-source",
        action="store_true",
        help="metrics per source (folder, or the CSV's `source` column)",
    )
    p.add_argument(
        "--geometry",
        choices=GEOMETRIES,
        default=None,
        help="override the checkpoint's framing policy (to measure alternatives)",
    )
    p.add_argument("--tta", action="store_true", help="average flips / 180° rotation")
    p.add_argument(
        "--by",
        default="",
        metavar="KEYS",
        help=f"subgroup audit over these comma-separated keys ({', '.join(KEYS)}); age in bands "
        f"{', '.join(label for _, label in AGE_BANDS)}; skin_tone: the ITA band of the skin "
        "around the lesion",
    )
    p.add_argument(
        "--save-audit",
        action="store_true",
        help="with --by: store the audit as CHECKPOINT/subgroups.json, with the skin-tone bands "
        "of the checkpoint's training images (read from its recorded sources)",
    )
    p.add_argument(
        "--bootstrap",
        type=int,
        default=1000,
        metavar="N",
        help="95 %% intervals of the headline metrics per source from N draws of whole lesions "
        "(default: 1000; 0: none)",
    )
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=None,
        help=RUNTIME_HELP,
    )
    return p


def print_report(m: dict, label: str) -> None:
    print(f"{label} (n={m['n']}): {headline(m)}")
    mal, flags = m["malignant"], m["flagged"]
    print(
        f"  malignant-vs-benign auc {_f(mal['auc'])}  sens@spec80 {_f(mal['sens_at_spec80'])}  "
        f"flagged {flags['any']:.1%} (low confidence {flags['low_confidence']:.1%}, "
        f"unlike training {flags['unlike_training']:.1%})"
    )
    for c, pc in m["per_class"].items():
        if pc["support"]:
            print(
                f"  {c:6s} recall {pc['recall']:.3f}  precision {pc['precision']:.3f}  "
                f"auc {_f(pc['auc'])}  n={pc['support']}"
            )


def print_intervals(intervals: dict) -> None:
    print(f"95 % intervals ({intervals['n_boot']} draws, {intervals['resampled']}):")
    for source, rows in intervals["by_source"].items():
        cells = [
            f"{k} {_f(r['value'])} [{_f(r['low'])}, {_f(r['high'])}]"
            for k, r in rows.items()
            if r["value"] is not None
        ]
        print(f"  [{source}] " + "  ".join(cells))


def print_subgroups(report: dict) -> None:
    pct = f"{100 * report['level']:g} %"
    print(f"subgroups ({pct} intervals, {report['n_boot']} draws of whole lesions per group):")
    for key, groups in report["groups"].items():
        for value, g in groups.items():
            cells = []
            for metric in SHOWN:
                f = g["figures"][metric]
                if f["value"] is not None:
                    span = "" if f["low"] is None else f" [{_f(f['low'])}, {_f(f['high'])}]"
                    cells.append(f"{metric} {_f(f['value'])}{span}")
            mel = g["class_counts"].get("mel", 0)
            print(f"  {key}={value} (n={g['n']}, mel={mel}): " + "  ".join(cells))


def _f(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    if args.save_audit and not args.by:
        raise DataError("--save-audit needs --by (the subgroups to audit).")
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
        external=args.external,
        by_source=args.by_source,
        geometry=args.geometry,
        runtime=args.runtime,
        bootstrap=args.bootstrap,
        by=parse_by(args.by) if args.by else (),
    )
    print(f"{m['model_version']} (split {m['split']}, tta={m['tta']}, runtime {m['runtime']})")
    for name, sub in m.get("by_source", {}).items():
        print_report(sub, f"[{name}]")
    scored = "whole folder" if m["split"] == "all" else f"{m['split']} part"
    print_report(m, f"[all sources, {scored}]" if m.get("by_source") else f"[{scored}]")
    if "intervals" in m:
        print_intervals(m["intervals"])
    if "subgroups" in m:
        print_subgroups(m["subgroups"])
    if args.save_audit:
        config = load_config(m["checkpoint"])
        print("estimating the skin tone of the checkpoint's training images ...", flush=True)
        tones = training_tone_counts(config.training, progress=True)
        command = shlex.join(["python", "-m", "scripts.evaluate", *argv])
        print(f"wrote {write_audit(m['checkpoint'], m, tones, command)}")
    if "note" in m:
        print(f"note: {m['note']}")
    if "warning" in m:
        print(f"warning: {m['warning']}")
    print(f"wrote {args.out}/metrics.json and plots")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
