"""Several HAM10000-format folders as one table, each row keeping the source it came from.

Roles:

* the **primary** folder keeps its split: train / val / test — HAM10000 the committed
  lesion-grouped one, an imported folder its official ``split`` column, any other folder a
  lesion- and patient-grouped split made and saved for it (:func:`data_pipeline.splits.
  primary_split`);
* an **extra training** source goes wholly to training (split ``train``) — only its ``train``
  rows when it has an official split, so its val / test stay held out;
* an **external validation** set never trains (split ``external``): it is scored every epoch and
  used, with the primary's val, to select the model — only its ``val`` rows when it has an
  official split (selection never sees a test part).

An image id found both in an external set and anywhere in training, or in an extra source and in
the primary's val / test, is refused: either would leak held-out images into training. Every source
is recorded (role, CSV hash, class counts, citation) so the checkpoint says what it learnt from.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.errors import DataError
from data_pipeline.ham10000 import (
    DOWNSAMPLED_SUFFIX,
    declared_classes,
    find_metadata_csv,
    folder_classes,
    load_metadata,
    read_manifest,
)
from data_pipeline.schema import ClassSet
from data_pipeline.splits import file_sha256, primary_split

ROLES: tuple[str, ...] = ("primary", "train", "external_val")
#: Folder names too generic to name a source on their own (``isic2017/train`` → ``isic2017-train``).
_GENERIC = {"train", "val", "valid", "validation", "test", "images", "data"}


@dataclass(frozen=True)
class Source:
    """One data folder and what it is used for; serialised into the checkpoint config."""

    name: str
    role: str
    path: str
    csv_sha256: str
    n_images: int
    class_counts: dict[str, int] = field(default_factory=dict)
    citation: str = ""
    #: the primary's split: a split CSV, or the folder's own CSV when it has a split column
    split_file: str = ""

    @property
    def classes(self) -> tuple[str, ...]:
        """The classes this source can contain (those with at least one image), in the run's
        class order (``class_counts`` holds every class of the run)."""
        return tuple(c for c, n in self.class_counts.items() if n > 0)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def source_name(path: Path | str) -> str:
    """A short, stable name for a data folder: its name, prefixed by its parent's if generic."""
    p = Path(path).resolve()
    return f"{p.parent.name}-{p.name}" if p.name.lower() in _GENERIC else p.name


def read_citation(folder: Path | str) -> str:
    """The citation of an imported folder's ``dataset.json``, else the ``Source:`` paragraph of
    the folder's README, or of its parent's (``isic2017/train`` is described by
    ``isic2017/README.md``); cited in model cards."""
    manifest = read_manifest(folder)
    if manifest and str(manifest.get("citation") or "").strip():
        return str(manifest["citation"]).strip()
    for readme in (Path(folder) / "README.md", Path(folder).resolve().parent / "README.md"):
        if readme.is_file():
            text = _source_paragraph(readme.read_text(errors="replace").splitlines())
            if text:
                return text
    return ""


def _source_paragraph(lines: list[str]) -> str:
    for i, line in enumerate(lines):
        if line.startswith("Source:"):
            para = [line.removeprefix("Source:").strip()]
            for nxt in lines[i + 1 :]:
                if not nxt.strip():
                    break
                para.append(nxt.strip())
            return " ".join(para)
    return ""


def _describe(df: pd.DataFrame, folder: Path, role: str, name: str, classes: ClassSet) -> Source:
    counts = df["dx"].value_counts()
    return Source(
        name=name,
        role=role,
        path=str(folder),
        csv_sha256=file_sha256(find_metadata_csv(folder)),
        n_images=len(df),
        class_counts={c: int(counts.get(c, 0)) for c in classes},
        citation=read_citation(folder),
    )


def _image_key(image_ids: pd.Series) -> pd.Series:
    """Image ids compared across sources (:data:`DOWNSAMPLED_SUFFIX`: one image, two ids)."""
    return image_ids.astype(str).str.removesuffix(DOWNSAMPLED_SUFFIX)


def _check_no_leak(df: pd.DataFrame) -> None:
    """Refuse image ids that would put a held-out image into training."""
    train_ids = set(_image_key(df.loc[df["split"] == "train", "image_id"]))
    held = df[df["split"] != "train"]
    leaked = held[_image_key(held["image_id"]).isin(train_ids)]
    if not leaked.empty:
        row = leaked.iloc[0]
        raise DataError(
            f"image {row['image_id']!r} of {row['source']!r} ({row['split']}) is also a training "
            f"image; {len(leaked)} held-out image(s) would leak into training."
        )
    dup = _image_key(held["image_id"]).duplicated(keep=False)
    if dup.any():
        ids = held.loc[dup, "image_id"]
        raise DataError(f"image {ids.iloc[0]!r} appears in two held-out sets.")


def load_sources(
    data_dir: Path | str,
    splits_path: Path | str,
    extra_train: Sequence[Path | str] = (),
    external_val: Sequence[Path | str] = (),
    seed: int = 42,
    classes: ClassSet | None = None,
) -> tuple[pd.DataFrame, list[Source], str]:
    """All sources in one table with ``source`` and ``split`` columns.

    Returns ``(table, sources, split_sha256)``; ``split`` is train / val / test for the primary,
    train for extra sources and ``external`` for external validation sets. Labels index
    ``classes`` (None: the primary folder's class set, see
    :func:`data_pipeline.ham10000.folder_classes`); another folder declaring a different class
    set is refused.
    """
    primary = Path(data_dir)
    classes = folder_classes(primary) if classes is None else classes
    df, split_hash, split_file = primary_split(
        load_metadata(primary, classes=classes),
        primary,
        find_metadata_csv(primary),
        splits_path,
        seed=seed,
    )
    frames = [df.assign(source=source_name(primary))]
    described = _describe(df, primary, "primary", source_name(primary), classes)
    sources = [replace(described, split_file=str(split_file))]
    for role, folders, split in (
        ("train", extra_train, "train"),
        ("external_val", external_val, "external"),
    ):
        for folder in map(Path, folders):
            name = source_name(folder)
            if any(s.name == name for s in sources):
                raise DataError(f"Two data folders are both named {name!r}: {folder}.")
            own = declared_classes(folder)
            if own is not None and own.codes != classes.codes:
                raise DataError(
                    f"{folder} declares the classes {', '.join(own.codes)}; every source of a "
                    f"run must share the primary's ({', '.join(classes.codes)})."
                )
            extra = _held_rows(load_metadata(folder, classes=classes), folder, split)
            extra = extra.assign(split=split, source=name)
            frames.append(extra)
            sources.append(_describe(extra, folder, role, name, classes))
    table = pd.concat(frames, ignore_index=True)
    _check_no_leak(table)
    return table, sources, split_hash


def _held_rows(df: pd.DataFrame, folder: Path, role_split: str) -> pd.DataFrame:
    """An extra source's rows for its role: with an official split, only its ``train`` rows
    train and only its ``val`` rows select; without one, all of it."""
    if "split" not in df.columns:
        return df
    part = "train" if role_split == "train" else "val"
    rows = df[df["split"] == part]
    if rows.empty:
        raise DataError(f"{folder} has an official split but no {part!r} rows to use here.")
    return rows


def class_masks(table: pd.DataFrame, sources: Sequence[Source]) -> np.ndarray:
    """Per row, which classes its source can contain, shape (N, n_classes), bool.

    A source that never shows akiec / bcc / df / vasc (ISIC 2017) must not teach the model that
    those classes are rare: the training loss renormalises each row over its source's classes.
    """
    codes = list(sources[0].class_counts)  # every source counts the run's classes, in order
    allowed = {s.name: np.array([c in s.classes for c in codes]) for s in sources}
    return (
        np.stack([allowed[name] for name in table["source"]])
        if len(table)
        else np.zeros((0, len(codes)), dtype=bool)
    )
