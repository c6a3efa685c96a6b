"""Lesion-grouped, class-stratified train / val / test splits, stored as CSV.

HAM10000 holds several images of many lesions; putting images of one lesion on both sides of a
split inflates test scores (the leak in the project's seed notebooks). Splits are therefore made
over ``lesion_id`` groups with scikit-learn's :class:`StratifiedGroupKFold`, seeded, and written to
a CSV whose SHA-256 is stored in every checkpoint so a run can be repeated exactly.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

from common.errors import DataError

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: The committed HAM10000 split every shipped model was trained on (hash stored in checkpoints).
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPLITS = REPO_ROOT / "splits" / "ham10000_seed42.csv"
SPLIT_COLUMNS: tuple[str, ...] = ("image_id", "lesion_id", "dx", "split")


def _one_fold(labels: np.ndarray, groups: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Boolean mask of one fold holding about ``frac`` of the rows, grouped and stratified."""
    n_splits = max(2, round(1.0 / frac))
    if len(np.unique(groups)) < n_splits:
        raise DataError(
            f"Only {len(np.unique(groups))} lesions: too few to hold out {frac:.0%} of them."
        )
    try:
        sgkf = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        _, held = next(iter(sgkf.split(np.zeros(len(labels)), labels, groups)))
    except ValueError:
        # Every class is smaller than the number of folds (tiny datasets): stratification is
        # impossible, so fall back to a plain grouped split — lesions still never cross.
        gss = GroupShuffleSplit(n_splits=1, test_size=frac, random_state=seed)
        _, held = next(iter(gss.split(np.zeros(len(labels)), labels, groups)))
    mask = np.zeros(len(labels), dtype=bool)
    mask[held] = True
    return mask


def make_splits(
    df: pd.DataFrame, val_frac: float = 0.15, test_frac: float = 0.15, seed: int = 42
) -> pd.DataFrame:
    """Assign every row of ``df`` to train / val / test without splitting any lesion."""
    if not (0 < val_frac < 0.5 and 0 < test_frac < 0.5):
        raise DataError("val and test fractions must each be between 0 and 0.5.")
    labels = df["dx"].to_numpy()
    groups = df["lesion_id"].to_numpy()
    test = _one_fold(labels, groups, test_frac, seed)
    rest = np.flatnonzero(~test)
    val_rel = _one_fold(labels[rest], groups[rest], val_frac / (1.0 - test_frac), seed + 1)
    split = np.array(["train"] * len(df), dtype=object)
    split[test] = "test"
    split[rest[val_rel]] = "val"
    out = df[["image_id", "lesion_id", "dx"]].copy()
    out["split"] = split
    return out.reset_index(drop=True)


def save_splits(splits: pd.DataFrame, path: Path | str) -> str:
    """Write the split CSV (sorted by image_id, so the bytes are reproducible); returns its hash."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    splits.loc[:, list(SPLIT_COLUMNS)].sort_values("image_id").to_csv(path, index=False)
    return file_sha256(path)


def load_splits(path: Path | str) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise DataError(f"Split file {path} does not exist.")
    splits = pd.read_csv(path, dtype=str)
    missing = [c for c in SPLIT_COLUMNS if c not in splits.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)}.")
    bad = ~splits["split"].isin(SPLITS)
    if bad.any():
        raise DataError(f"{path}: unknown split value {splits.loc[bad, 'split'].iloc[0]!r}.")
    return splits


def file_sha256(path: Path | str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def attach_splits(df: pd.DataFrame, splits: pd.DataFrame) -> pd.DataFrame:
    """Add a ``split`` column to ``df``; every image must be in the split file."""
    merged = df.merge(splits[["image_id", "split"]], on="image_id", how="left")
    if merged["split"].isna().any():
        missing = merged.loc[merged["split"].isna(), "image_id"]
        raise DataError(
            f"{len(missing)} image(s) are not in the split file (first: {missing.iloc[0]}); "
            "make a new split file for this dataset."
        )
    return merged


def load_or_make_splits(
    df: pd.DataFrame,
    path: Path | str,
    seed: int = 42,
    val_frac: float = 0.15,
    test_frac: float = 0.15,
) -> tuple[pd.DataFrame, str]:
    """Reuse the split CSV at ``path`` if present, else create it. Returns (df+split, sha256)."""
    path = Path(path)
    if not path.is_file():
        save_splits(make_splits(df, val_frac, test_frac, seed), path)
    return attach_splits(df, load_splits(path)), file_sha256(path)


def lesions_crossing_splits(df: pd.DataFrame) -> list[str]:
    """Lesion ids found in more than one split (must be empty)."""
    per_lesion = df.groupby("lesion_id")["split"].nunique()
    return sorted(per_lesion[per_lesion > 1].index)
