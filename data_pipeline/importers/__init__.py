"""Importers: a dataset as its publisher distributes it → one canonical dataset folder.

``import_dataset(src, fmt, out)`` is what ``python -m scripts.import_data`` runs; the folder it
writes (see :mod:`data_pipeline.importers.core`) is read by training, evaluation, batch and
adapt like any HAM10000-format folder.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from common.errors import DataError
from data_pipeline.importers.clinics import read_derm7pt, read_pad_ufes_20, read_ph2
from data_pipeline.importers.core import CLASS_SETS, Spec, check_out, write_dataset
from data_pipeline.importers.generic import read_csv_mapped
from data_pipeline.importers.isic import (
    read_isic2017,
    read_isic2018,
    read_isic2019,
    read_isic2020,
    read_isic_archive,
)

#: ``--format`` name → reader of that publisher's layout.
READERS: dict[str, Callable[[Path], Spec]] = {
    "isic2017": read_isic2017,
    "isic2018": read_isic2018,
    "isic2019": read_isic2019,
    "isic2020": read_isic2020,
    "isic-archive": read_isic_archive,
    "derm7pt": read_derm7pt,
    "ph2": read_ph2,
    "pad-ufes-20": read_pad_ufes_20,
}
FORMATS: tuple[str, ...] = (*READERS, "csv")

__all__ = ["CLASS_SETS", "FORMATS", "import_dataset", "read_spec"]


def read_spec(src: Path | str, fmt: str, mapping: Path | str | None = None) -> Spec:
    """Read ``src`` in publisher format ``fmt`` (refused in one line when the layout is wrong)."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(f"Source folder {src} does not exist.")
    if fmt == "csv":
        return read_csv_mapped(src, Path(mapping) if mapping else None)
    if fmt not in READERS:
        raise DataError(f"Unknown format {fmt!r}: use one of {', '.join(FORMATS)}.")
    if mapping:
        raise DataError("--mapping is only used with --format csv.")
    return READERS[fmt](src)


def import_dataset(
    src: Path | str,
    fmt: str,
    out: Path | str,
    classes: str = "ham7",
    mapping: Path | str | None = None,
    command: str = "",
    echo: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Convert ``src`` into the canonical folder ``out``; returns its ``dataset.json``."""
    out = check_out(out)  # before reading a large release
    spec = read_spec(src, fmt, mapping)
    return write_dataset(spec, out, fmt, classes, command=command, echo=echo)
