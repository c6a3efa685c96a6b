"""Inspect a HAM10000-format folder: counts per class and split, metadata gaps, a sample grid.

    python -m scripts.inspect_data --data-dir ../shared/ham10000
    python -m scripts.inspect_data --data-dir /data/HAM10000   # with HAM10000_images_part_1/2

Every image is decoded once, so a corrupt file is found here rather than mid-training. The split
shown is the one training would use: ``--splits`` if given, else the folder's own ``split``
column (an imported official split), else the project's committed split file when it covers this
dataset, else a fresh lesion- (and patient-) grouped split (``--write-splits`` saves it).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from common.cli import run_cli
from common.errors import DataError
from data_pipeline.ham10000 import folder_classes, load_metadata, verify_images
from data_pipeline.report import class_split_table, metadata_summary, sample_grid
from data_pipeline.splits import (
    DEFAULT_SPLITS,
    attach_splits,
    file_sha256,
    lesions_crossing_splits,
    load_splits,
    make_splits,
    save_splits,
)


def choose_splits(df, splits_path: Path | None, seed: int):
    """(df with split column, description of where the split came from)."""
    if splits_path is not None:
        return attach_splits(
            df, load_splits(splits_path)
        ), f"{splits_path} (sha256 {file_sha256(splits_path)[:12]})"
    if "split" in df.columns:
        return df, "the folder's official split (its split column)"
    if DEFAULT_SPLITS.is_file():
        committed = load_splits(DEFAULT_SPLITS)
        if set(df["image_id"]) <= set(committed["image_id"]):
            return attach_splits(
                df, committed
            ), f"{DEFAULT_SPLITS.name} (committed, sha256 {file_sha256(DEFAULT_SPLITS)[:12]})"
    return attach_splits(df, make_splits(df, seed=seed)), f"new grouped split, seed {seed}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data-dir", required=True, type=Path)
    p.add_argument("--splits", type=Path, help="split CSV to use instead of the default")
    p.add_argument("--write-splits", type=Path, help="save the split used to this CSV")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--out", type=Path, default=Path("outputs/inspect"), help="folder for the PNG grid"
    )
    p.add_argument("--no-verify", action="store_true", help="skip decoding every image")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    args = p.parse_args(argv)

    df = load_metadata(args.data_dir)
    if not args.no_verify:
        verify_images(df)
    df, source = choose_splits(df, args.splits, args.seed)
    crossing = lesions_crossing_splits(df)
    if crossing:
        raise DataError(f"{len(crossing)} lesion(s) appear in several splits, e.g. {crossing[0]}.")
    if args.write_splits:
        save_splits(df, args.write_splits)
    classes = folder_classes(args.data_dir)  # the folder's own class set
    table = class_split_table(df, classes)
    summary = metadata_summary(df)
    grid = sample_grid(df, args.out / "sample_grid.png", classes=classes)

    if args.json:
        print(
            json.dumps(
                {
                    **summary,
                    "split_source": source,
                    "lesions_crossing_splits": len(crossing),
                    "per_class_split": {f"{s}/{k}": col.to_dict() for (s, k), col in table.items()},
                    "sample_grid": str(grid),
                },
                indent=2,
            )
        )
        return 0
    print(f"Dataset {args.data_dir}: {summary['images']} images, {summary['lesions']} lesions")
    print(f"Split: {source}; lesions shared between splits: {len(crossing)}\n")
    print("Images / lesions per class and split:")
    print(table.to_string())
    print()
    age = (
        f"{summary['age_min']:g}-{summary['age_max']:g} years (median {summary['age_median']:g})"
        if summary["age_min"] is not None
        else "no ages"
    )
    print(f"Age range: {age}")
    print(
        f"Missing age: {summary['age_missing']}   unknown sex: {summary['sex_unknown']}   "
        f"unknown site: {summary['site_unknown']}"
    )
    print(f"Sample grid written to {grid}")
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
