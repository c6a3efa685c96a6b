"""Batch analysis: many images (files and / or .zip archives) with an optional metadata CSV.

Every image goes through the one prediction path,
:meth:`service.prediction.PredictionService.predict_and_store`, exactly as a single upload does
(validated by :class:`data_pipeline.request.PredictionRequest`, explained, stored). A file that
cannot be used — not an image, corrupt, bad metadata in its CSV row — becomes a row with its error
and the batch goes on.

The CSV has a column naming the image (``image``, or HAM10000's ``image_id``; ``file`` /
``filename`` work too) and optional ``age``, ``sex`` and ``site`` (HAM10000's ``localization``).
An image is matched by its file name with or without extension.
"""

from __future__ import annotations

import csv
import io
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from common.errors import DermError
from common.text import echo
from data_pipeline.request import PredictionRequest
from data_pipeline.schema import CLASSES
from service.prediction import PredictionService

#: Most images one batch may hold (a larger batch would hold the single analysis queue too long).
MAX_IMAGES = 500
#: Largest member of a .zip that is read (an image bigger than this is reported, not read).
MAX_MEMBER_BYTES = 50 * 1024 * 1024
IMAGE_COLUMNS = ("image", "image_id", "file", "filename", "name")
SITE_COLUMNS = ("site", "localization", "body_site")

Progress = Callable[[int, int, str], None]


@dataclass
class BatchItem:
    """One image of a batch: its name and where its bytes are (a path, or bytes from a zip)."""

    name: str
    source: Path | bytes
    metadata: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # set when the item could not even be read


@dataclass
class BatchRow:
    """The outcome for one image."""

    name: str
    prediction_id: int | None = None
    top_class: str | None = None
    probability: float | None = None
    probabilities: dict[str, float] = field(default_factory=dict)
    malignant_flag: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    age: float | None = None
    sex: str | None = None
    site: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def _is_zip(path: Path) -> bool:
    return path.suffix.lower() == ".zip" or zipfile.is_zipfile(path)


def _zip_items(path: Path) -> Iterable[BatchItem]:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        yield BatchItem(path.name, b"", error=f"{path.name} is not a readable .zip file ({exc}).")
        return
    with archive:
        for info in archive.infolist():
            name = PurePosixPath(info.filename)
            if info.is_dir() or "__MACOSX" in name.parts or name.name.startswith("."):
                continue
            if name.suffix.lower() == ".csv":
                continue
            shown = f"{path.name}/{info.filename}"
            if info.file_size > MAX_MEMBER_BYTES:
                yield BatchItem(
                    shown, b"", error=f"{shown} is over {MAX_MEMBER_BYTES // 2**20} MB."
                )
                continue
            yield BatchItem(shown, archive.read(info))


def _zip_csv(path: Path) -> bytes | None:
    """The first .csv inside a zip (a zip may carry its own metadata)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.filename.lower().endswith(".csv") and "__MACOSX" not in info.filename:
                    return archive.read(info)
    except (zipfile.BadZipFile, OSError):
        return None
    return None


def _key(name: str) -> str:
    stem = PurePosixPath(name.replace("\\", "/")).name
    return stem.rsplit(".", 1)[0].lower() if "." in stem else stem.lower()


def read_metadata_csv(data: bytes, name: str = "metadata CSV") -> dict[str, dict[str, Any]]:
    """``{image key: {age, sex, site}}`` from a CSV; ``DermError`` names what is wrong."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise DermError(f"{name} is not UTF-8 text; save it as a UTF-8 CSV.") from None
    reader = csv.DictReader(io.StringIO(text))
    columns = {c.strip().lower(): c for c in reader.fieldnames or []}
    image_col = next((columns[c] for c in IMAGE_COLUMNS if c in columns), None)
    if image_col is None:
        raise DermError(
            f"{name} has no image column: name one of {', '.join(IMAGE_COLUMNS)} "
            f"(found {echo(list(columns))})."
        )
    site_col = next((columns[c] for c in SITE_COLUMNS if c in columns), None)
    out: dict[str, dict[str, Any]] = {}
    for row in reader:
        image = (row.get(image_col) or "").strip()
        if not image:
            continue
        out[_key(image)] = {
            "age": row.get(columns["age"]) if "age" in columns else None,
            "sex": row.get(columns["sex"]) if "sex" in columns else None,
            "site": row.get(site_col) if site_col else None,
        }
    return out


def collect_items(
    files: Iterable[str | Path], metadata_csv: str | Path | None = None
) -> list[BatchItem]:
    """The images of the uploaded files (zips expanded, in upload order) with their metadata."""
    items: list[BatchItem] = []
    table: dict[str, dict[str, Any]] = {}
    for raw in files:
        path = Path(raw)
        if path.suffix.lower() == ".csv":
            table.update(read_metadata_csv(path.read_bytes(), path.name))
        elif _is_zip(path):
            inner = _zip_csv(path)
            if inner is not None:
                table.update(read_metadata_csv(inner, f"the CSV inside {path.name}"))
            items.extend(_zip_items(path))
        else:
            items.append(BatchItem(path.name, path))
    if metadata_csv:
        path = Path(metadata_csv)
        table.update(read_metadata_csv(path.read_bytes(), path.name))
    if not items:
        raise DermError("The batch holds no images: upload image files or a .zip of images.")
    if len(items) > MAX_IMAGES:
        raise DermError(
            f"The batch holds {len(items)} images; split it into batches of at most {MAX_IMAGES}."
        )
    for item in items:
        item.metadata = table.get(_key(item.name), {})
    return items


def run_batch(
    service: PredictionService, items: list[BatchItem], progress: Progress | None = None
) -> list[BatchRow]:
    """Predict, explain and store each item; a failing item becomes a row with its error."""
    rows: list[BatchRow] = []
    for i, item in enumerate(items):
        if progress is not None:
            progress(i, len(items), item.name)
        rows.append(_one(service, item))
    if progress is not None:
        progress(len(items), len(items), "done")
    return rows


def _one(service: PredictionService, item: BatchItem) -> BatchRow:
    row = BatchRow(item.name)
    if item.error is not None:
        row.error = item.error
        return row
    try:
        request = PredictionRequest.build(
            item.source,
            item.metadata.get("age"),
            item.metadata.get("sex"),
            item.metadata.get("site"),
            name=item.name,
        )
        stored = service.predict_and_store(request)
    except DermError as exc:
        row.error = str(exc)
        return row
    pred = stored.prediction
    row.prediction_id = stored.id
    row.top_class, row.probability = pred.top_class, float(pred.top_probability)
    row.probabilities = {c: float(pred.probabilities[c]) for c in CLASSES}
    row.malignant_flag, row.warnings = list(pred.malignant_flag), list(pred.warnings)
    row.age, row.sex, row.site = pred.metadata.age, pred.metadata.sex, pred.metadata.site
    return row


CSV_COLUMNS = [
    "image",
    "prediction_id",
    "top_class",
    "top_probability",
    *[f"p_{c}" for c in CLASSES],
    "malignant_flag",
    "warnings",
    "age",
    "sex",
    "site",
    "error",
]


def csv_row(r: BatchRow) -> list[Any]:
    return [
        r.name,
        r.prediction_id,
        r.top_class,
        r.probability,
        *[r.probabilities.get(c) for c in CLASSES],
        " ".join(r.malignant_flag),
        " | ".join(r.warnings),
        r.age,
        r.sex,
        r.site,
        r.error,
    ]
