"""Batch analysis: many images (files and / or .zip archives) with an optional metadata CSV.

Every image goes through the one prediction path,
:meth:`service.prediction.PredictionService.predict_and_store`, exactly as a single upload does
(validated by :class:`data_pipeline.request.PredictionRequest`, explained, stored). A file that
cannot be used — not an image, corrupt, bad metadata in its CSV row — becomes a row with its error
and the batch goes on.

The CSV has a column naming the image (``image``, or HAM10000's ``image_id``; ``file`` /
``filename`` work too) and optional ``age``, ``sex`` and ``site`` (HAM10000's ``localization``).
An image is matched by its file name with or without extension.

Zips are streamed: their members are listed from the central directory (the count is checked
before anything is inflated) and each is inflated only when its turn comes, in chunks, within
:data:`MAX_MEMBER_BYTES` per member and :data:`MAX_TOTAL_BYTES` for the batch; a corrupt member
(bad CRC, bad deflate data) is an error on its own row. Each run has a batch id stored on its
rows, so a batch can be listed (``HistoryFilter(batch_id=...)``) and an interrupted one resumed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import uuid
import zipfile
import zlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from common.errors import DermError
from common.text import echo
from data_pipeline.request import PredictionRequest
from data_pipeline.schema import CLASSES
from db.queries import normalize_batch_id
from model.predictor import MALIGNANT_FLAG
from service.prediction import PredictionService, file_name

#: Most images one batch may hold (a larger batch would hold the single analysis queue too long).
MAX_IMAGES = 500
#: Largest member of a .zip that is read (an image bigger than this is reported, not read).
MAX_MEMBER_BYTES = 50 * 1024 * 1024
#: Most bytes the members of a batch's zips may inflate to, together (500 images of 2 MB). A
#: 20 MB zip within the upload limit can hold 19 GB of zeros; members past the budget are
#: reported on their rows, not read.
MAX_TOTAL_BYTES = 1024 * 1024 * 1024
#: Largest metadata CSV read from inside a zip.
MAX_CSV_BYTES = 20 * 1024 * 1024
#: Zip members are inflated this many bytes at a time, so no limit is overrun by more than this.
READ_CHUNK = 1024 * 1024
IMAGE_COLUMNS = ("image", "image_id", "file", "filename", "name")
SITE_COLUMNS = ("site", "localization", "body_site")

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ZipMember:
    """One member of an uploaded zip, read only when its turn comes (:func:`run_batch`)."""

    archive: Path
    info: zipfile.ZipInfo


@dataclass
class BatchItem:
    """One image of a batch: its name and where its bytes are (a path, bytes, or a zip member
    that is inflated when the item is analysed)."""

    name: str
    source: Path | bytes | ZipMember
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
    #: The batch run that stored the row (see :func:`run_batch`).
    batch_id: str | None = None
    #: True when a resumed batch found the image already stored (nothing was predicted again).
    resumed: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None


def new_batch_id() -> str:
    """A fresh batch id (12 hex digits), stored on every row the batch stores."""
    return uuid.uuid4().hex[:12]


class InflateBudget:
    """What is left of :data:`MAX_TOTAL_BYTES` for one batch; every inflated byte counts."""

    def __init__(self, total: int = MAX_TOTAL_BYTES) -> None:
        self.total = total
        self.left = total

    def over(self, shown: str) -> DermError:
        return DermError(
            f"{shown} was not read: the batch's zip members inflate to more than "
            f"{self.total // 2**20} MB together; split the zip into smaller batches."
        )


def read_member(
    archive: zipfile.ZipFile,
    info: zipfile.ZipInfo,
    shown: str,
    limit: int = MAX_MEMBER_BYTES,
    budget: InflateBudget | None = None,
) -> bytes:
    """The member's bytes, inflated :data:`READ_CHUNK` at a time so neither ``limit`` nor the
    batch's ``budget`` is exceeded whatever the member's header claims. ``DermError`` (naming
    ``shown``) for a member over a limit, corrupt (bad CRC, bad deflate data) or encrypted."""
    too_big = DermError(f"{shown} is over {limit // 2**20} MB.")
    if info.file_size > limit:
        raise too_big
    if budget is not None and info.file_size > budget.left:
        raise budget.over(shown)
    parts: list[bytes] = []
    size = 0
    try:
        with archive.open(info) as fh:
            while chunk := fh.read(READ_CHUNK):
                size += len(chunk)
                if size > limit:
                    raise too_big
                if budget is not None and size > budget.left:
                    raise budget.over(shown)
                parts.append(chunk)
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as exc:
        raise DermError(f"{shown} is corrupt inside its .zip ({exc}).") from None
    except (NotImplementedError, RuntimeError) as exc:  # unknown compression, encrypted
        raise DermError(f"{shown} cannot be read from its .zip ({exc}).") from None
    finally:
        if budget is not None:
            budget.left = max(0, budget.left - size)
    return b"".join(parts)


def _is_zip(path: Path) -> bool:
    return path.suffix.lower() == ".zip" or zipfile.is_zipfile(path)


def _zip_items(path: Path) -> Iterable[BatchItem]:
    """The image members of a zip, from its central directory only (nothing is inflated)."""
    try:
        with zipfile.ZipFile(path) as archive:
            infos = archive.infolist()
    except (zipfile.BadZipFile, OSError) as exc:
        yield BatchItem(path.name, b"", error=f"{path.name} is not a readable .zip file ({exc}).")
        return
    for info in infos:
        name = PurePosixPath(info.filename)
        if info.is_dir() or "__MACOSX" in name.parts or name.name.startswith("."):
            continue
        if name.suffix.lower() == ".csv":
            continue
        shown = f"{path.name}/{info.filename}"
        if info.file_size > MAX_MEMBER_BYTES:
            yield BatchItem(shown, b"", error=f"{shown} is over {MAX_MEMBER_BYTES // 2**20} MB.")
            continue
        yield BatchItem(shown, ZipMember(path, info))


def _zip_csv(path: Path) -> bytes | None:
    """The first .csv inside a zip (a zip may carry its own metadata)."""
    try:
        with zipfile.ZipFile(path) as archive:
            for info in archive.infolist():
                if info.filename.lower().endswith(".csv") and "__MACOSX" not in info.filename:
                    return read_member(archive, info, f"{path.name}/{info.filename}", MAX_CSV_BYTES)
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
    service: PredictionService,
    items: list[BatchItem],
    progress: Progress | None = None,
    *,
    batch_id: str | None = None,
) -> list[BatchRow]:
    """Predict, explain and store each item; a failing item becomes a row with its error.

    Every stored row carries the batch id (a new one, or ``batch_id``). Given the id of an
    earlier, interrupted run, an image that run already stored (same file name, same bytes) is
    not predicted again: its row points at the stored prediction (``resumed``). Zip members are
    inflated one at a time, within :data:`MAX_TOTAL_BYTES` for the whole batch."""
    batch = normalize_batch_id(batch_id) or new_batch_id()
    done = service.batch_members(batch) if batch_id and service.db is not None else {}
    budget = InflateBudget()
    rows: list[BatchRow] = []
    with ExitStack() as stack:
        archives: dict[Path, zipfile.ZipFile] = {}

        def opened(path: Path) -> zipfile.ZipFile:
            if path not in archives:
                archives[path] = stack.enter_context(zipfile.ZipFile(path))
            return archives[path]

        for i, item in enumerate(items):
            if progress is not None:
                progress(i, len(items), item.name)
            row = _one(service, item, batch, done, budget, opened)
            row.batch_id = batch
            rows.append(row)
    if progress is not None:
        progress(len(items), len(items), "done")
    return rows


def _source(
    item: BatchItem, budget: InflateBudget, opened: Callable[[Path], zipfile.ZipFile]
) -> Path | bytes:
    if not isinstance(item.source, ZipMember):
        return item.source
    try:
        archive = opened(item.source.archive)
    except (zipfile.BadZipFile, OSError) as exc:
        raise DermError(f"{item.name}: its .zip cannot be read ({exc}).") from None
    return read_member(archive, item.source.info, item.name, budget=budget)


def _one(
    service: PredictionService,
    item: BatchItem,
    batch: str,
    done: dict[tuple[str, str], int],
    budget: InflateBudget,
    opened: Callable[[Path], zipfile.ZipFile],
) -> BatchRow:
    row = BatchRow(item.name)
    if item.error is not None:
        row.error = item.error
        return row
    try:
        source = _source(item, budget, opened)
        if done:
            stored_id = done.get((str(file_name(item.name)), _sha256(source)))
            if stored_id is not None:
                return _stored_row(service, row, stored_id)
        request = PredictionRequest.build(
            source,
            item.metadata.get("age"),
            item.metadata.get("sex"),
            item.metadata.get("site"),
            name=item.name,
        )
        del source  # a 50 MB member is not kept while the model runs
        stored = service.predict_and_store(request, batch_id=batch)
    except DermError as exc:
        row.error = str(exc)
        return row
    pred = stored.prediction
    row.prediction_id = stored.id
    row.top_class, row.probability = pred.top_class, float(pred.top_probability)
    row.probabilities = {c: float(p) for c, p in pred.probabilities.items()}
    row.malignant_flag, row.warnings = list(pred.malignant_flag), list(pred.warnings)
    row.age, row.sex, row.site = pred.metadata.age, pred.metadata.sex, pred.metadata.site
    return row


def _sha256(source: Path | bytes) -> str:
    """The hash the service stores for this source (of the file's bytes)."""
    try:
        data = source.read_bytes() if isinstance(source, Path) else source
    except OSError:
        return ""  # unreadable: not skipped; the request reports why
    return hashlib.sha256(data).hexdigest()


def _stored_row(service: PredictionService, row: BatchRow, stored_id: int) -> BatchRow:
    """The row of an image an earlier run of the batch already stored."""
    record = service.get(stored_id)
    row.resumed = True
    row.prediction_id = stored_id
    if record is None:  # deleted since: say so rather than analyse it twice silently
        row.error = f"{row.name} was stored as #{stored_id} by this batch and has been deleted."
        return row
    row.top_class, row.probability = record.predicted_class, record.predicted_probability
    classes = service.predictor.classes
    row.probabilities = {c: float((record.probabilities or {}).get(c, 0.0)) for c in classes}
    row.warnings = list(record.warnings or [])
    row.age, row.sex, row.site = record.age, record.sex, record.site
    ranked = sorted(row.probabilities.items(), key=lambda kv: -kv[1])
    row.malignant_flag = [  # as Prediction.malignant_flag, from the stored probabilities
        c
        for c, p in ranked
        if c in classes.malignant and (p >= MALIGNANT_FLAG or c == row.top_class)
    ]
    return row


def csv_columns(codes: Sequence[str] = CLASSES) -> list[str]:
    """The batch CSV's header for a model predicting ``codes`` (its class set, in order)."""
    return [
        "image",
        "prediction_id",
        "top_class",
        "top_probability",
        *[f"p_{c}" for c in codes],
        "malignant_flag",
        "warnings",
        "age",
        "sex",
        "site",
        "error",
        "batch_id",
    ]


#: The header for a HAM10000-class model (the shipped one); see :func:`csv_columns`.
CSV_COLUMNS = csv_columns()


def csv_row(r: BatchRow, codes: Sequence[str] = CLASSES) -> list[Any]:
    """One row under :func:`csv_columns` of the same ``codes``."""
    return [
        r.name,
        r.prediction_id,
        r.top_class,
        r.probability,
        *[r.probabilities.get(c) for c in codes],
        " ".join(r.malignant_flag),
        " | ".join(r.warnings),
        r.age,
        r.sex,
        r.site,
        r.error,
        r.batch_id,
    ]
