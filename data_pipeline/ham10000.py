"""Reading a HAM10000-format folder: the metadata CSV plus images in either layout.

Accepted layouts (``image_id`` + ``.jpg``/``.jpeg``/``.png`` is looked up in each):

* flat: ``DIR/images/ISIC_0024306.jpg`` (or the images directly in ``DIR``),
* original Kaggle / Harvard Dataverse: ``DIR/HAM10000_images_part_1/`` and ``..._part_2/``.

A folder written by :mod:`data_pipeline.importers` is the same format plus optional columns —
``patient_id`` (grouped splits keep a patient's images together), ``split`` (the publisher's
official train / val / test), ``source_label`` (the publisher's own diagnosis) — and a
``dataset.json`` manifest (:func:`read_manifest`) whose ``classes`` name the folder's class set
when it is not HAM10000's (an import with ``--classes native``).

Every problem is reported as a :class:`DataError` naming the file, CSV line or column.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.errors import DataError, DermError
from data_pipeline.images import load_rgb
from data_pipeline.schema import HAM7, ClassSet, Metadata

METADATA_FILENAME = "HAM10000_metadata.csv"
#: The dataset manifest an import writes beside the CSV; its ``classes`` list
#: (``[{code, name, malignant}]``, label order) declares a class set other than HAM10000's.
MANIFEST_FILENAME = "dataset.json"
#: ISIC 2019 files some ISIC images as ``ISIC_xxxxxxx_downsampled``: the same image as
#: ``ISIC_xxxxxxx`` of ISIC 2017 / 2018 (the importers find either; the leak check compares both).
DOWNSAMPLED_SUFFIX = "_downsampled"
REQUIRED_COLUMNS: tuple[str, ...] = ("lesion_id", "image_id", "dx")
#: Optional columns of an imported folder, read as strings ('' when blank).
OPTIONAL_COLUMNS: tuple[str, ...] = ("patient_id", "split", "source_label")
SPLIT_VALUES: tuple[str, ...] = ("train", "val", "test")
#: Missing metadata columns are allowed (treated as unknown) so external sets without them work.
METADATA_COLUMNS: tuple[str, ...] = ("age", "sex", "localization")
IMAGE_DIRS: tuple[str, ...] = ("images", "HAM10000_images_part_1", "HAM10000_images_part_2", ".")
IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png")


def find_metadata_csv(data_dir: Path) -> Path:
    """``DIR/HAM10000_metadata.csv``, or the only CSV in ``DIR``."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"Data folder {data_dir} does not exist.")
    preferred = data_dir / METADATA_FILENAME
    if preferred.is_file():
        return preferred
    csvs = sorted(p for p in data_dir.glob("*.csv") if p.name != "splits.csv")
    if len(csvs) == 1:
        return csvs[0]
    raise DataError(
        f"No {METADATA_FILENAME} in {data_dir}"
        + (f" (found several CSVs: {', '.join(p.name for p in csvs)})" if csvs else "")
        + "."
    )


def declared_classes(data_dir: Path | str) -> ClassSet | None:
    """The class set a folder's ``dataset.json`` declares (``classes: [{code, name,
    malignant}]`` in label order), None when it declares none."""
    entries = (read_manifest(data_dir) or {}).get("classes")
    if not entries:
        return None
    try:
        return ClassSet.from_entries(entries)
    except DermError as exc:
        raise DataError(f"{Path(data_dir) / MANIFEST_FILENAME}: {exc}") from None


def folder_classes(data_dir: Path | str) -> ClassSet:
    """A folder's class set: its ``dataset.json`` ``classes`` list, else HAM10000's 7."""
    return declared_classes(data_dir) or HAM7


def read_manifest(data_dir: Path | str) -> dict[str, Any] | None:
    """The folder's ``dataset.json`` (None for a plain HAM10000 folder)."""
    path = Path(data_dir) / MANIFEST_FILENAME
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not valid JSON ({exc}).") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{path}: expected a JSON object.")
    return manifest


def index_images(data_dir: Path) -> dict[str, Path]:
    """Map image stem -> path over the supported layouts (first layout wins on duplicates)."""
    index: dict[str, Path] = {}
    for sub in IMAGE_DIRS:
        folder = (Path(data_dir) / sub).resolve()
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if path.suffix.lower() in IMAGE_SUFFIXES and path.stem not in index:
                index[path.stem] = path
    return index


def _csv_line(row_index: int) -> int:
    """1-based line number in the CSV file (line 1 is the header)."""
    return int(row_index) + 2


def load_metadata(
    data_dir: Path | str, csv_path: Path | str | None = None, classes: ClassSet | None = None
) -> pd.DataFrame:
    """Load and validate the metadata table; adds ``path``, ``label`` and normalised metadata.

    ``label`` is the index of ``dx`` in ``classes`` (a model's or a training run's class set;
    None: the folder's own, :func:`folder_classes`); a dx outside it is refused.

    Returned columns: ``lesion_id, image_id, dx, label, age, sex, localization, path`` (+ any
    others from the CSV). ``age`` is float with NaN for unknown; ``sex`` / ``localization`` use the
    schema vocabularies with ``unknown`` for blanks.
    """
    data_dir = Path(data_dir)
    csv = Path(csv_path) if csv_path else find_metadata_csv(data_dir)
    try:
        df = pd.read_csv(
            csv, dtype={c: str for c in ("lesion_id", "image_id", "dx", *OPTIONAL_COLUMNS)}
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv}: not a readable CSV ({exc}).") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise DataError(
            f"{csv}: missing required column(s) {', '.join(missing)} "
            f"(found: {', '.join(map(str, df.columns))})."
        )
    if df.empty:
        raise DataError(f"{csv}: has a header but no rows.")
    for col in REQUIRED_COLUMNS:
        blank = df[col].isna() | (df[col].astype(str).str.strip() == "")
        if blank.any():
            i = int(blank.to_numpy().nonzero()[0][0])
            raise DataError(f"{csv}, line {_csv_line(i)}: column {col!r} is empty.")
        df[col] = df[col].astype(str).str.strip()
    df["dx"] = df["dx"].str.lower()
    cs = folder_classes(data_dir) if classes is None else classes
    bad_dx = ~df["dx"].isin(cs.codes)
    if bad_dx.any():
        i = int(bad_dx.to_numpy().nonzero()[0][0])
        hint = ""
        own = declared_classes(data_dir)
        if cs == HAM7 and own is None:
            hint = f"; another class set needs a {MANIFEST_FILENAME} 'classes' list"
        elif classes is not None and own is not None and set(own.codes) != set(cs.codes):
            hint = (
                f"; the folder's own classes are {', '.join(own.codes)} ({MANIFEST_FILENAME}): "
                "use a model trained on them"
                + (", or import the data again with --classes ham7" if cs == HAM7 else "")
            )
        raise DataError(
            f"{csv}, line {_csv_line(i)}: unknown dx {df['dx'].iloc[i]!r} "
            f"(expected one of {', '.join(cs.codes)}); {int(bad_dx.sum())} row(s) affected"
            f"{hint}."
        )
    _check_optional_columns(df, csv)
    dup = df["image_id"].duplicated()
    if dup.any():
        i = int(dup.to_numpy().nonzero()[0][0])
        raise DataError(
            f"{csv}, line {_csv_line(i)}: image_id {df['image_id'].iloc[i]!r} appears twice."
        )
    for col in METADATA_COLUMNS:
        if col not in df.columns:
            df[col] = None
    ages, sexes, sites = [], [], []
    for i, (age, sex, site) in enumerate(
        zip(df["age"], df["sex"], df["localization"], strict=False)
    ):
        try:
            meta = Metadata.parse(age, sex, site)
        except DermError as exc:
            raise DataError(f"{csv}, line {_csv_line(i)}: {exc}") from None
        ages.append(meta.age)
        sexes.append(meta.sex)
        sites.append(meta.site)
    df["age"] = pd.Series(ages, dtype="float64", index=df.index)
    df["sex"], df["localization"] = sexes, sites
    df["label"] = df["dx"].map({c: i for i, c in enumerate(cs.codes)}).astype(int)

    index = index_images(data_dir)
    paths = df["image_id"].map(index)
    if paths.isna().any():
        absent = df.loc[paths.isna(), "image_id"].tolist()
        i = int(paths.isna().to_numpy().nonzero()[0][0])
        raise DataError(
            f"{csv}, line {_csv_line(i)}: image {absent[0]!r} not found under {data_dir} "
            f"(looked in {', '.join(IMAGE_DIRS)} for {'/'.join(IMAGE_SUFFIXES)}); "
            f"{len(absent)} image(s) missing in all."
        )
    df["path"] = paths.map(str)
    return df.reset_index(drop=True)


def _check_optional_columns(df: pd.DataFrame, csv: Path) -> None:
    """``patient_id`` / ``split`` / ``source_label`` as stripped strings; a ``split`` column (an
    imported folder's official split) must hold train / val / test on every row."""
    for col in OPTIONAL_COLUMNS:
        if col in df.columns:
            df[col] = df[col].fillna("").astype(str).str.strip()
    if "split" in df.columns:
        bad = ~df["split"].isin(SPLIT_VALUES)
        if bad.any():
            i = int(bad.to_numpy().nonzero()[0][0])
            raise DataError(
                f"{csv}, line {_csv_line(i)}: split {df['split'].iloc[i]!r} is not one of "
                f"{', '.join(SPLIT_VALUES)}; {int(bad.sum())} row(s) affected."
            )


def verify_images(df: pd.DataFrame) -> None:
    """Decode every image once; raises :class:`DataError` naming the first bad file."""
    for path in df["path"]:
        try:
            load_rgb(Path(path))
        except DermError as exc:
            raise DataError(str(exc)) from None


def metadata_matrix(df: pd.DataFrame) -> np.ndarray:
    """Encoded metadata for every row, shape (N, META_DIM), in row order."""
    return np.stack(
        [
            Metadata(None if pd.isna(a) else float(a), s, site).encode()
            for a, s, site in zip(df["age"], df["sex"], df["localization"], strict=False)
        ]
    )
