"""The one serializer of a history row, used by the app and ``scripts.query_history``.

A stored :class:`db.models.PredictionRecord` becomes:

- a JSON-friendly dict (:func:`record_dict`), optionally with the image bytes as base64;
- a table row (:data:`TABLE_COLUMNS`, :func:`table_row`) for the app's table and the CLI's text;
- a CSV row (:data:`CSV_COLUMNS`, :func:`csv_row`, :func:`write_csv`), every column a
  researcher needs and no image bytes;
- a detail view (:func:`detail_entries`), rendered as plain text (:func:`detail_text`) or as
  Markdown with every stored value escaped (:func:`detail_markdown`).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import re
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

from common.csv_cells import safe_row
from common.errors import DermError
from data_pipeline.schema import CLASSES, FIELDS, class_name, known_codes
from db.models import OTHER, PredictionRecord, as_utc
from db.queries import delete_prediction, output_files, parse_id
from db.session import Database


def class_label(code: str, model_version: str | None = None) -> str:
    """``Melanoma (mel)``: the full name first, the code for reference. The name is that of the
    row's model (``model_version``) when it is loaded (:func:`data_pipeline.schema.class_name`)."""
    if code == OTHER and code not in known_codes():
        return "Other (not one of the model's classes)"
    return f"{class_name(code, model_version)} ({code})"


#: Short class names for tight places (table cells, gallery captions).
SHORT_NAMES: dict[str, str] = {
    "akiec": "Actinic keratosis",
    "bcc": "Basal cell carcinoma",
    "bkl": "Benign keratosis",
    "df": "Dermatofibroma",
    "mel": "Melanoma",
    "nv": "Nevus",
    "vasc": "Vascular lesion",
    "other": "Other",
}


def short_label(code: str | None, model_version: str | None = None) -> str:
    """``Nevus (nv)``: a short name and the code (another class set's: its own name)."""
    if not code:
        return ""
    own = class_name(code, model_version)
    short = SHORT_NAMES.get(code, own) if own == class_name(code) else own
    return f"{short} ({code})"


def format_time(value: datetime | None) -> str:
    """``YYYY-MM-DD HH:MM:SS`` in UTC."""
    if value is None:
        return ""
    return as_utc(value).astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S")


def format_age(age: float | None) -> str:
    return "" if age is None else f"{age:g}"


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")


# --- JSON ----------------------------------------------------------------------------------------


def record_dict(
    r: PredictionRecord, include_heatmap: bool = False, include_thumbnail: bool = False
) -> dict[str, Any]:
    """JSON-friendly dict. Binary fields become base64 strings when asked for
    (``heatmap_png_base64``, ``thumbnail_jpeg_base64``; None when absent). Columns left out of
    the query (``images=False``) are reported as None (unknown) in ``has_heatmap`` /
    ``has_thumbnail``."""
    d: dict[str, Any] = {
        "id": r.id,
        "created_at": as_utc(r.created_at).isoformat() if r.created_at is not None else None,
        "image_sha256": r.image_sha256,
        "image_width": r.image_width,
        "image_height": r.image_height,
        "age": r.age,
        "sex": r.sex,
        "site": r.site,
        "predicted_class": r.predicted_class,
        "predicted_class_name": class_name(r.predicted_class, r.model_version),
        "predicted_probability": r.predicted_probability,
        "probabilities": dict(r.probabilities or {}),
        "attribution_target": r.attribution_target,
        "metadata_contributions": (
            dict(r.metadata_contributions) if r.metadata_contributions is not None else None
        ),
        "warnings": list(r.warnings or []),
        "ood_distance": r.ood_distance,
        "model_name": r.model_name,
        "model_version": r.model_version,
        "checkpoint_sha256": r.checkpoint_sha256,
        "latency_ms": r.latency_ms,
        "confirmed_dx": r.confirmed_dx,
        "confirmed_source": r.confirmed_source,
        "confirmed_note": r.confirmed_note,
        "confirmed_at": as_utc(r.confirmed_at).isoformat() if r.confirmed_at is not None else None,
        "file_name": r.file_name,
        "batch_id": r.batch_id,
        "output_files": list(r.output_files) if r.output_files is not None else None,
    }
    for key, attr, suffix, include in (
        ("heatmap", "heatmap_png", "png", include_heatmap),
        ("thumbnail", "thumbnail", "jpeg", include_thumbnail),
    ):
        skipped = r.not_loaded(attr)
        d[f"has_{key}"] = None if skipped else getattr(r, attr) is not None
        if include:
            d[f"{key}_{suffix}_base64"] = None if skipped else _b64(getattr(r, attr))
    return d


# --- table ---------------------------------------------------------------------------------------

TABLE_COLUMNS = [
    "id",
    "time (UTC)",
    "class",
    "probability",
    "age",
    "sex",
    "site",
    "model",
    "warnings",
    "confirmed",
]
#: Gradio ``Dataframe`` datatypes of :data:`TABLE_COLUMNS`.
TABLE_TYPES: list[Literal["number", "str"]] = [
    "number",
    "str",
    "str",
    "number",
    "str",
    "str",
    "str",
    "str",
    "number",
    "str",
]


def table_row(r: PredictionRecord) -> list[Any]:
    return [
        r.id,
        format_time(r.created_at),
        class_label(r.predicted_class, r.model_version),
        round(float(r.predicted_probability), 3),
        format_age(r.age),
        r.sex,
        r.site,
        r.model_version,
        len(r.warnings or []),
        r.confirmed_dx or "",
    ]


def _is_number(text: str) -> bool:
    if text == "":
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain aligned text columns; numeric columns right-aligned."""
    cells = [[str(c) for c in headers]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [bool(rows) and all(_is_number(r[i]) for r in cells[1:]) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric, strict=True)
        ).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


# --- CSV -----------------------------------------------------------------------------------------


def csv_columns(codes: Sequence[str] = CLASSES) -> list[str]:
    """The CSV header with a ``p_<code>`` column per class of ``codes`` (rows of a model of
    another class set leave the others empty); :data:`CSV_COLUMNS` is HAM10000's."""
    return [*_CSV_HEAD, *[f"p_{c}" for c in codes], *_CSV_TAIL]


_CSV_HEAD = [
    "id",
    "created_at",
    "predicted_class",
    "predicted_class_name",
    "predicted_probability",
]
_CSV_TAIL = [
    "age",
    "sex",
    "site",
    "attribution_target",
    *[f"contribution_{f}" for f in FIELDS],
    "warnings",
    "ood_distance",
    "model_name",
    "model_version",
    "checkpoint_sha256",
    "latency_ms",
    "image_sha256",
    "image_width",
    "image_height",
    "confirmed_dx",
    "confirmed_source",
    "confirmed_note",
    "confirmed_at",
    "file_name",
    "batch_id",
]
CSV_COLUMNS = csv_columns()


def csv_row(r: PredictionRecord, codes: Sequence[str] = CLASSES) -> list[Any]:
    """One row in :func:`csv_columns` order of the same ``codes`` (None for missing values)."""
    d = record_dict(r)
    probs = d.pop("probabilities")
    contribs = d.pop("metadata_contributions") or {}
    d.update({f"p_{c}": probs.get(c) for c in codes})
    d.update({f"contribution_{f}": contribs.get(f) for f in FIELDS})
    d["warnings"] = " | ".join(d["warnings"])
    return [d[c] for c in csv_columns(codes)]


def csv_codes(records: Iterable[PredictionRecord]) -> tuple[str, ...]:
    """The ``p_`` columns for these rows: HAM10000's codes and every loaded model's
    (:func:`known_codes`), then any other code the rows' probabilities hold."""
    codes = dict.fromkeys(known_codes())
    for r in records:
        codes.update(dict.fromkeys(r.probabilities or {}))
    return tuple(codes)


def write_csv_rows(
    fh: TextIO, headers: Sequence[str], rows: Iterable[Sequence[Any]], lineterminator: str = "\n"
) -> None:
    """The one CSV writer of the project's exports: formula-looking text cells are neutralised
    (:func:`common.csv_cells.safe_cell`), None becomes an empty cell."""
    writer = csv.writer(fh, lineterminator=lineterminator)
    writer.writerow(safe_row(headers))
    writer.writerows(["" if v is None else v for v in safe_row(row)] for row in rows)


def to_csv(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """CSV text (header first, no trailing newline), e.g. for printing."""
    buf = io.StringIO()
    write_csv_rows(buf, headers, rows)
    return buf.getvalue().rstrip("\n")


def write_csv(
    records: Iterable[PredictionRecord], path: Path, codes: Sequence[str] | None = None
) -> Path:
    """The rows as a CSV file; ``records`` may be streamed a page at a time. A ``p_`` column
    per code in ``codes``: by default each class of HAM10000 and of every model loaded here
    (:func:`known_codes`); pass the rows' own codes when they may come from models with other
    class sets, whose probabilities would else be left out (streamed rows:
    :meth:`service.prediction.PredictionService.class_codes`; rows in memory: :func:`csv_codes`).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    codes = tuple(codes) if codes is not None else known_codes()
    with path.open("w", newline="", encoding="utf-8") as fh:
        rows = (csv_row(r, codes) for r in records)
        write_csv_rows(fh, csv_columns(codes), rows, lineterminator="\r\n")
    return path


# --- detail --------------------------------------------------------------------------------------


def detail_entries(r: PredictionRecord) -> list[tuple[str, str]]:
    """(label, value) lines describing one stored prediction, most important first."""
    image = f"{r.image_width}×{r.image_height} px (sha256 {r.image_sha256[:12]}…)"
    if r.thumbnail is None:
        image += "; No image stored (the prediction was made with --no-store-images)"
    entries = [
        ("Time", f"{format_time(r.created_at)} UTC"),
        *([("File", r.file_name)] if r.file_name else []),
        *([("Batch", r.batch_id)] if r.batch_id else []),
        ("Inputs", f"age {format_age(r.age) or 'unknown'}, sex {r.sex}, body site {r.site}"),
        ("Image", image),
        (
            "Top class",
            f"{class_label(r.predicted_class, r.model_version)} {r.predicted_probability:.1%}",
        ),
    ]
    ranked = sorted((r.probabilities or {}).items(), key=lambda kv: -kv[1])
    entries.append(("Probabilities", ", ".join(f"{c} {p:.1%}" for c, p in ranked)))
    explains = (
        f" (explains {class_label(r.attribution_target, r.model_version)})"
        if r.attribution_target
        else ""
    )
    entries.append(("Heatmap", ("stored" if r.heatmap_png is not None else "none") + explains))
    if r.metadata_contributions:
        shown = ", ".join(f"{k} {100 * v:+.1f} pp" for k, v in r.metadata_contributions.items())
        entries.append(("Metadata contributions", shown))
    entries += [("Warning", w) for w in r.warnings or []]
    if r.confirmed_dx:
        note = f"; note: {r.confirmed_note}" if r.confirmed_note else ""
        entries.append(
            (
                "Confirmed diagnosis",
                f"{class_label(r.confirmed_dx)} by {r.confirmed_source}, recorded "
                f"{format_time(r.confirmed_at)} UTC{note}",
            )
        )
    if r.output_files:
        entries.append(("Files written", ", ".join(r.output_files)))
    entries.append(("Model", f"{r.model_version} (weights sha256 {r.checkpoint_sha256[:12]}…)"))
    entries.append(("Latency", f"{r.latency_ms:.0f} ms"))
    return entries


def detail_text(r: PredictionRecord) -> str:
    lines = [f"prediction {r.id}"]
    lines += [f"  {label.lower()}: {value}" for label, value in detail_entries(r)]
    return "\n".join(lines)


#: Markdown punctuation, plus ``$`` (LaTeX math delimiters), ``:`` and ``@`` (GFM's autolinks of
#: ``http://…`` and ``name@host``): each is shown as itself once backslash-escaped.
_MARKDOWN_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+!|~>$:@-])")
_WWW = re.compile(r"(?i)\b(www)\.")


def escape_markdown(text: Any) -> str:
    """``text`` shown literally by a Markdown renderer: HTML escaped, Markdown punctuation
    backslash-escaped, never a link or math (stored values such as notes are not trusted)."""
    escaped = _MARKDOWN_SPECIAL.sub(r"\\\1", html.escape(str(text), quote=False))
    return _WWW.sub(r"\1\\.", escaped)


def detail_markdown(r: PredictionRecord) -> str:
    lines = [f"### Prediction #{r.id}"]
    for label, value in detail_entries(r):
        if label == "Warning":
            lines.append(f"- **⚠️ {escape_markdown(value)}**")
        else:
            lines.append(f"- **{label}:** {escape_markdown(value)}")
    return "\n".join(lines)


# --- delete --------------------------------------------------------------------------------------


def delete_record(db: Database, prediction_id: Any) -> bool:
    """Delete one stored prediction so that it is gone: the row (image, heatmap, thumbnail,
    note), its bytes in the database files (:meth:`db.session.Database.purge`) and the files a
    CLI wrote for it and recorded (``scripts.predict --heatmap-dir``). False when no row had the
    id. The app, the CLI and the API all delete through here.

    Files the app made for display (report PDFs, cached panels, uploads) are the app's to remove.
    A recorded file that is already gone is fine; one that cannot be removed is a ``DermError``
    naming it (after the row is deleted), because the user was told the record is gone."""
    pid = parse_id(prediction_id)
    with db.session(write=True) as session:
        files = output_files(session, pid)
        if not delete_prediction(session, pid):
            return False
    db.purge()
    left: list[str] = []
    for name in files:
        path = Path(name)
        try:
            if path.is_symlink() or path.is_file():
                path.unlink()
        except OSError as exc:
            left.append(f"{name} ({exc.strerror})")
    if left:
        raise DermError(
            f"Prediction {pid} was deleted, but these files written for it could not be "
            f"removed: {', '.join(left)}."
        )
    return True
