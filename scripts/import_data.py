"""Convert a dataset, laid out as its publisher distributes it, into a canonical dataset folder.

    python -m scripts.import_data ~/Downloads/release_v0 --format derm7pt --out data/derm7pt
    python -m scripts.import_data ~/Downloads/PH2Dataset --format ph2 --classes native \\
        --out data/ph2-native
    python -m scripts.import_data exports/clinic --format csv --mapping clinic.yaml \\
        --out data/clinic

The folder (HAM10000_metadata.csv + images/ + dataset.json) is read by scripts.train,
scripts.evaluate, batch prediction and scripts.adapt like any HAM10000 folder. The label and
site mappings applied and everything dropped are printed and recorded in dataset.json.
Formats: isic2017, isic2018, isic2019, isic2020, isic-archive, derm7pt, ph2, pad-ufes-20, csv.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from common.cli import run_cli
from data_pipeline.importers import CLASS_SETS, FORMATS, import_dataset


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("src", type=Path, help="the dataset folder as downloaded (unzipped)")
    p.add_argument("--format", required=True, choices=FORMATS, help="publisher layout of SRC")
    p.add_argument("--out", required=True, type=Path, help="new canonical folder (must not exist)")
    p.add_argument(
        "--classes",
        choices=CLASS_SETS,
        default="ham7",
        help="ham7: map onto HAM10000's 7 classes (default); native: keep the publisher's classes",
    )
    p.add_argument("--mapping", type=Path, help="with --format csv: JSON/YAML mapping file")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser().parse_args(argv)
    import_dataset(
        args.src,
        args.format,
        args.out,
        classes=args.classes,
        mapping=args.mapping,
        command=shlex.join(["python", "-m", "scripts.import_data", *argv]),
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
