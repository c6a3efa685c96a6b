"""Lesion- (and patient-) grouped, class-stratified train / val / test splits, stored as CSV.

HAM10000 holds several images of many lesions; putting images of one lesion on both sides of a
split inflates test scores (the leak in the project's seed notebooks). Splits are therefore made
over ``lesion_id`` groups with scikit-learn's :class:`StratifiedGroupKFold`, seeded, and written to
a CSV whose SHA-256 is stored in every checkpoint so a run can be repeated exactly. A folder with
a ``patient_id`` column (ISIC 2020, PAD-UFES-20, an imported clinic) is grouped by lesion *and*
patient: lesions of one patient never straddle a split either (:func:`split_groups`).

Which split a folder uses (:func:`primary_split` for training, :func:`select_split` for
evaluation): a ``split`` column in its CSV (a publisher's official split, kept by the importers),
else a split file — the committed HAM10000 one when it covers the folder, else one made for the
folder and saved under ``splits/`` (named by the folder and its CSV's hash, so it is reused).
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import DataError

SPLITS: tuple[str, ...] = ("train", "val", "test")
#: The committed HAM10000 split every shipped model was trained on (hash stored in checkpoints).
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SPLITS = REPO_ROOT / "splits" / "ham10000_seed42.csv"
SPLIT_COLUMNS: tuple[str, ...] = ("image_id", "lesion_id", "dx", "split")


def _one_fold(labels: np.ndarray, groups: np.ndarray, frac: float, seed: int) -> np.ndarray:
    """Boolean mask of one fold holding about ``frac`` of the rows, grouped and stratified."""
    # (scikit-learn is ~80 MB resident: imported where splits are made, not by the app)
    from sklearn.model_selection import GroupShuffleSplit, StratifiedGroupKFold

    n_splits = max(2, round(1.0 / frac))
    if len(np.unique(groups)) < n_splits:
        raise DataError(
            f"Only {len(np.unique(groups))} independent groups (lesions, joined where one patient "
            f"has several): too few to hold out {frac:.0%} of them."
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


def split_groups(df: pd.DataFrame) -> np.ndarray:
    """The group of each row: its lesion, with lesions that share a patient joined into one
    group (connected components), so neither a lesion nor a patient straddles a split. Without
    a ``patient_id`` column (HAM10000) the groups are the lesion ids, as before."""
    lesions = df["lesion_id"].astype(str).to_numpy()
    if "patient_id" not in df.columns:
        return lesions
    patients = df["patient_id"].fillna("").astype(str).str.strip().to_numpy()
    if not (patients != "").any():
        return lesions
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        root = x
        while parent.get(root, root) != root:
            root = parent[root]
        while parent.get(x, x) != root:
            parent[x], x = root, parent[x]
        return root

    for lesion, patient in zip(lesions, patients, strict=True):
        if patient:
            a, b = find("L:" + lesion), find("P:" + patient)
            if a != b:
                parent[max(a, b)] = min(a, b)
    return np.array([find("L:" + lesion) for lesion in lesions], dtype=object)


def make_splits(
    df: pd.DataFrame, val_frac: float = 0.15, test_frac: float = 0.15, seed: int = 42
) -> pd.DataFrame:
    """Assign every row of ``df`` to train / val / test without splitting any lesion."""
    if not (0 < val_frac < 0.5 and 0 < test_frac < 0.5):
        raise DataError("val and test fractions must each be between 0 and 0.5.")
    labels = df["dx"].to_numpy()
    groups = split_groups(df)
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


#: What to do when a split file does not cover a folder, by use.
TRAIN_HINT = (
    "pass --splits with a new file name to have a grouped split made for this folder, or leave "
    "--splits at its default"
)
EVAL_HINT = "score the whole folder with --split all, or pass --splits FILE that covers it"


def covers(df: pd.DataFrame, splits: pd.DataFrame) -> bool:
    """Whether every image of ``df`` is in the split table."""
    return bool(df["image_id"].isin(splits["image_id"]).all())


def attach_splits(
    df: pd.DataFrame, splits: pd.DataFrame, name: str = "the split file", hint: str = TRAIN_HINT
) -> pd.DataFrame:
    """Set ``df``'s ``split`` column from a split table (replacing a folder's own); every image
    must be in it."""
    base = df.drop(columns="split") if "split" in df.columns else df
    merged = base.merge(splits[["image_id", "split"]], on="image_id", how="left")
    if merged["split"].isna().any():
        missing = merged.loc[merged["split"].isna(), "image_id"]
        raise DataError(
            f"{len(missing)} image(s) are not in the split file"
            f"{'' if name == 'the split file' else ' ' + name} (first: {missing.iloc[0]}); "
            f"{hint}."
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


def folder_split_path(data_dir: Path | str, csv_path: Path | str, seed: int) -> Path:
    """Where the grouped split made for a folder is saved: ``splits/<folder>_<csv hash>_seed<N>
    .csv`` in the repository (the same data always finds the same file)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(data_dir).resolve().name) or "data"
    return REPO_ROOT / "splits" / f"{name}_{file_sha256(csv_path)[:8]}_seed{seed}.csv"


def primary_split(
    df: pd.DataFrame,
    data_dir: Path | str,
    csv_path: Path | str,
    splits_path: Path | str | None = None,
    seed: int = 42,
) -> tuple[pd.DataFrame, str, Path]:
    """The train / val / test split of a primary training folder: ``(df+split, sha256, file)``.

    * the folder's own ``split`` column (a publisher's official split) always wins, whatever
      ``splits_path`` says: the file is the folder's CSV, which holds the split file's columns.
      When the official split has no validation part (ISIC 2019: training and test only), a
      grouped val part is carved out of its training part and saved — at ``splits_path`` when
      given, else :func:`folder_split_path`; its test part stays test;
    * else ``splits_path`` when given and not the committed default (made there if absent);
    * else the committed HAM10000 split when it covers the folder (HAM10000 as today);
    * else a lesion- and patient-grouped split made for the folder and saved.
    """
    explicit = splits_path is not None and Path(splits_path).resolve() != DEFAULT_SPLITS.resolve()
    own = "split" in df.columns
    if own and not (df["split"] == "train").any():
        if not explicit:
            raise DataError(
                f"{csv_path}: the official split has no train rows; pass --splits NEW.csv to "
                "have a grouped split made for this folder."
            )
        own = False  # asked for: a new grouped split of a folder whose own cannot train
    if own and (df["split"] == "val").any():
        return df, file_sha256(csv_path), Path(csv_path)
    path = Path(splits_path) if explicit and splits_path is not None else DEFAULT_SPLITS
    if not explicit and (own or (path.is_file() and not covers(df, load_splits(path)))):
        path = folder_split_path(data_dir, csv_path, seed)
    if not path.is_file():
        try:
            save_splits(_carve_val(df, seed) if own else make_splits(df, seed=seed), path)
        except OSError as exc:
            raise DataError(
                f"Cannot write the split file {path} ({exc.strerror}); pass --splits PATH."
            ) from None
    out = attach_splits(df, load_splits(path), str(path))
    if own:  # a file given for a folder with an official split must keep its test part
        official = df.set_index("image_id")["split"] == "test"
        kept = out.set_index("image_id")["split"].reindex(official.index) == "test"
        moved = official.index[official.to_numpy() != kept.to_numpy()]
        if len(moved):
            raise DataError(
                f"{path} does not keep the folder's official test part (first: {moved[0]}); "
                "pass --splits NEW.csv to have a val part carved from its train part."
            )
    return out, file_sha256(path), path


def _carve_val(df: pd.DataFrame, seed: int, val_frac: float = 0.15) -> pd.DataFrame:
    """The folder's official split with a grouped, stratified val part taken from its train
    part (for a release that publishes no validation set)."""
    out = df[["image_id", "lesion_id", "dx", "split"]].copy().reset_index(drop=True)
    train = np.flatnonzero(out["split"].to_numpy() == "train")
    part = df.iloc[train]
    held = _one_fold(part["dx"].to_numpy(), split_groups(part), val_frac, seed + 1)
    out.loc[train[held], "split"] = "val"
    return out


def select_split(
    df: pd.DataFrame,
    split: str | None,
    split_file: Path | None,
    explicit: bool = False,
    expected_sha: str | None = None,
) -> tuple[pd.DataFrame, dict]:
    """The rows of a folder to evaluate, and what was used to choose them.

    ``split``: train / val / test, ``all``, or None (automatic: the test part when the folder
    has a split, else the whole folder). The split comes from ``split_file`` when it is
    ``explicit`` (``--splits``), else from the folder's own ``split`` column, else from
    ``split_file`` (the checkpoint's) when it covers the folder. A folder with none of these is
    scored whole automatically and refused for an explicit train / val / test.
    """
    if split == "all":
        return df, {"split": "all"}
    if split is not None and split not in SPLITS:
        raise DataError(f"Unknown split {split!r}: use one of {', '.join(SPLITS)} or all.")
    wanted = split or "test"
    if not explicit and "split" in df.columns:
        return df[df["split"] == wanted], {
            "split": wanted,
            "split_file": "the folder's split column",
        }
    splits = load_splits(split_file) if split_file is not None else None
    if splits is None or (split is None and not explicit and not covers(df, splits)):
        if split is not None:
            raise DataError(
                "The checkpoint records no split file and the folder has no split column; "
                f"{EVAL_HINT}."
            )
        return df, {
            "split": "all",
            "note": "the folder has no split column and is not in the checkpoint's split file: "
            "scored whole",
        }
    assert split_file is not None
    digest = file_sha256(split_file)
    info = {"split": wanted, "split_file": str(split_file), "split_sha256": digest}
    if expected_sha and digest != expected_sha:
        info["warning"] = "split file differs from the one the checkpoint was trained with"
    df = attach_splits(df, splits, str(split_file), EVAL_HINT)
    return df[df["split"] == wanted], info
