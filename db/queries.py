"""Filtered history queries. Every value reaches the database as a bound parameter.

:class:`HistoryFilter` validates and normalises user input (CLI strings or app widgets) and raises
:class:`DermError` with a readable message for anything it cannot use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime, time, timedelta
from typing import Any

from sqlalchemy import ColumnElement, Select, String, delete, func, literal_column, select
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import Session, defer
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import FunctionElement

from common.errors import DermError
from common.text import clip, echo
from data_pipeline.schema import (
    ClassSet,
    ClassSetError,
    known_codes,
    normalize_age,
    normalize_sex,
    normalize_site,
    remember_classes,
    remember_codes,
)
from db.models import (
    BATCH_ID_MAX,
    CONFIRM_SOURCES,
    NOTE_MAX,
    OTHER,
    ModelClassesRecord,
    PredictionRecord,
    as_utc,
    utcnow,
)

#: Largest page a query returns.
MAX_LIMIT = 10_000
#: Largest id any backend can hold (SQLite's 64-bit INTEGER); PostgreSQL's INTEGER column
#: stops at :data:`PG_MAX_ID`, so a larger id there is simply not found.
MAX_ID = 2**63 - 1
PG_MAX_ID = 2**31 - 1
BATCH_ID_CHARS = frozenset("0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ-_")


def parse_id(value: Any, what: str = "Prediction id") -> int:
    """A stored-row id from user input (CLI, app, API); ``DermError`` for anything else.

    Why a check: a 23-digit id reached the driver as an integer SQLite cannot bind
    (``OverflowError``) and PostgreSQL refuses ("integer out of range")."""
    if isinstance(value, bool):
        raise DermError(f"{what} {echo(value)} is not a whole number.")
    if isinstance(value, float):
        if not value.is_integer():
            raise DermError(f"{what} {echo(value)} is not a whole number.")
        value = int(value)
    if isinstance(value, str):
        text = value.strip().lstrip("#")
        if not text.isascii() or not text.lstrip("+-").isdigit():
            raise DermError(f"{what} {echo(value)} is not a whole number.")
        value = int(text)
    if not isinstance(value, int):
        raise DermError(f"{what} {echo(value)} is not a whole number.")
    if not 1 <= value <= MAX_ID:
        raise DermError(
            f"{what} {clip(str(value))} is out of range: ids are whole numbers from 1 to {MAX_ID}."
        )
    return value


def _storable_id(session: Session, prediction_id: Any) -> int | None:
    """The parsed id, or None when this backend cannot hold it (no row can have it)."""
    pid = parse_id(prediction_id)
    if session.get_bind().dialect.name == "postgresql" and pid > PG_MAX_ID:
        return None
    return pid


def normalize_batch_id(value: Any) -> str | None:
    """A batch id from user input: letters, digits, ``-`` and ``_``, at most 32 characters."""
    if _blank(value):
        return None
    text = str(value).strip()
    if len(text) > BATCH_ID_MAX or not set(text) <= BATCH_ID_CHARS:
        raise DermError(
            f"Batch id {echo(value)} is not valid: use the id a batch run printed "
            f"(letters, digits, - and _; at most {BATCH_ID_MAX} characters)."
        )
    return text


def parse_date(value: object, what: str = "date") -> date | datetime:
    """``YYYY-MM-DD`` → date; a full ISO datetime (``2026-01-01T12:00``) → datetime."""
    if isinstance(value, (date, datetime)):
        return value
    text = str(value).strip()
    try:
        if len(text) == 10:
            return date.fromisoformat(text)
        return datetime.fromisoformat(text)
    except ValueError:
        raise DermError(f"Bad {what} {echo(value)}: use YYYY-MM-DD.") from None


def _start(value: date | datetime) -> datetime:
    if isinstance(value, datetime):
        return as_utc(value)
    return datetime.combine(value, time.min, tzinfo=UTC)


class utc_day(FunctionElement[str]):
    """``YYYY-MM-DD`` of a stored (naive UTC) timestamp, as text on every engine.

    SQLite's ``date()`` returns text; PostgreSQL's returns a DATE whose text form depends on the
    session's DateStyle, so there the day is formatted explicitly with ``to_char``.
    """

    type = String()
    name = "utc_day"
    inherit_cache = True


@compiles(utc_day)
def _utc_day_default(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    return compiler.process(func.date(*element.clauses.clauses), **kw)


@compiles(utc_day, "postgresql")
def _utc_day_postgresql(element: utc_day, compiler: SQLCompiler, **kw: Any) -> str:
    # A constant format, inlined (a bound parameter would make GROUP BY see two expressions).
    fmt: ColumnElement[str] = literal_column("'YYYY-MM-DD'", String())
    return compiler.process(func.to_char(*element.clauses.clauses, fmt), **kw)


def _prob(value: Any, name: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        p = float(value)
    except (TypeError, ValueError):
        raise DermError(
            f"{name} {echo(value)} is not a number: use a probability from 0 to 1."
        ) from None
    if math.isnan(p) or not 0.0 <= p <= 1.0:
        raise DermError(f"{name} {echo(value)} is outside 0-1: use a probability from 0 to 1.")
    return p


def _blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


@dataclass
class HistoryFilter:
    """Conditions on stored predictions; all are optional and combined with AND.

    ``since`` / ``until`` are dates (whole days in UTC; ``until`` includes its whole day) or
    datetimes (exact instants, naive = UTC); strings are parsed with :func:`parse_date`.
    ``classes`` are diagnosis codes of the top class; probabilities bound the top-class
    probability; ``sex`` / ``site`` accept the same spellings as the predictor.
    """

    since: date | datetime | str | None = None
    until: date | datetime | str | None = None
    classes: list[str] = field(default_factory=list)
    min_prob: float | None = None
    max_prob: float | None = None
    sex: str | None = None
    site: str | None = None
    age_min: float | None = None
    age_max: float | None = None
    model_version: str | None = None
    #: True: only rows with a confirmed diagnosis; False: only rows without; None: all.
    confirmed: bool | None = None
    #: Only the rows one batch run stored (the id it printed / wrote in its CSV).
    batch_id: str | None = None

    def __post_init__(self) -> None:
        self.since = None if _blank(self.since) else parse_date(self.since, "since date")
        self.until = None if _blank(self.until) else parse_date(self.until, "until date")
        if self.since is not None and self.until is not None:
            start, bound = self._since_start(), self._until_bound()
            if bound is not None and (
                start > bound or (start == bound and not isinstance(self.until, datetime))
            ):
                raise DermError(
                    f"The since date {self.since} is after the until date {self.until}."
                )

        raw = [self.classes] if isinstance(self.classes, str) else list(self.classes or [])
        classes: list[str] = []
        for item in raw:
            for token in str(item).replace(",", " ").split():
                code = token.strip().lower()
                if code not in known_codes():
                    raise DermError(
                        f"Unknown diagnosis class {echo(token)}: "
                        f"expected one of {', '.join(known_codes())}."
                    )
                if code not in classes:
                    classes.append(code)
        self.classes = classes

        self.min_prob = _prob(self.min_prob, "Minimum probability")
        self.max_prob = _prob(self.max_prob, "Maximum probability")
        if (
            self.min_prob is not None
            and self.max_prob is not None
            and self.min_prob > self.max_prob
        ):
            raise DermError(
                f"Minimum probability {self.min_prob:g} is above maximum {self.max_prob:g}."
            )

        self.sex = None if _blank(self.sex) else normalize_sex(self.sex)
        self.site = None if _blank(self.site) else normalize_site(self.site)
        self.age_min = None if _blank(self.age_min) else normalize_age(self.age_min)
        self.age_max = None if _blank(self.age_max) else normalize_age(self.age_max)
        if self.age_min is not None and self.age_max is not None and self.age_min > self.age_max:
            raise DermError(f"Minimum age {self.age_min:g} is above maximum age {self.age_max:g}.")

        self.model_version = None if _blank(self.model_version) else str(self.model_version).strip()
        if self.model_version is not None and "\x00" in self.model_version:
            # PostgreSQL refuses NUL in text where SQLite would just find nothing; same answer.
            raise DermError(f"Model version {echo(self.model_version)} contains a NUL character.")
        self.batch_id = normalize_batch_id(self.batch_id)

    def _since_start(self) -> datetime:
        assert isinstance(self.since, (date, datetime))  # parsed in __post_init__
        return _start(self.since)

    def _until_bound(self) -> datetime | None:
        """Exclusive upper bound for a date, inclusive instant for a datetime (see conditions);
        None when the day is the last one a datetime can hold (9999-12-31: no upper bound)."""
        assert isinstance(self.until, (date, datetime))  # parsed in __post_init__
        if isinstance(self.until, datetime):
            return as_utc(self.until)
        try:
            return _start(self.until) + timedelta(days=1)
        except OverflowError:
            return None

    def conditions(self) -> list[ColumnElement[bool]]:
        P = PredictionRecord
        out: list[ColumnElement[bool]] = []
        if self.since is not None:
            out.append(P.created_at >= self._since_start())
        bound = self._until_bound() if self.until is not None else None
        if bound is not None:
            if isinstance(self.until, datetime):
                out.append(P.created_at <= bound)
            else:
                out.append(P.created_at < bound)
        if self.classes:
            out.append(P.predicted_class.in_(self.classes))
        if self.min_prob is not None:
            out.append(P.predicted_probability >= self.min_prob)
        if self.max_prob is not None:
            out.append(P.predicted_probability <= self.max_prob)
        if self.sex is not None:
            out.append(P.sex == self.sex)
        if self.site is not None:
            out.append(P.site == self.site)
        if self.age_min is not None:
            out.append(P.age >= self.age_min)
        if self.age_max is not None:
            out.append(P.age <= self.age_max)
        if self.model_version is not None:
            out.append(P.model_version == self.model_version)
        if self.confirmed is True:
            out.append(P.confirmed_dx.is_not(None))
        elif self.confirmed is False:
            out.append(P.confirmed_dx.is_(None))
        if self.batch_id is not None:
            out.append(P.batch_id == self.batch_id)
        return out

    def describe(self) -> str:
        """Short human-readable summary, e.g. for a table footer."""
        parts = []
        for name in FILTER_FIELDS:
            value = getattr(self, name)
            if value not in (None, []):
                shown = ",".join(value) if isinstance(value, list) else str(value)
                parts.append(f"{name}={clip(shown)}")
        return " ".join(parts) or "no filter"


#: The filters a :class:`HistoryFilter` has, in its order (the REST API's query parameters are
#: these but ``batch_id``).
FILTER_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(HistoryFilter))


def _check_page(limit: int, offset: int) -> None:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise DermError(f"Limit {echo(limit)} must be a whole number from 1 to {MAX_LIMIT}.")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise DermError(f"Offset {echo(offset)} must be a whole number ≥ 0.")


def _filtered(stmt: Select, f: HistoryFilter | None) -> Select:
    return stmt.where(*f.conditions()) if f is not None else stmt


def query_predictions(
    session: Session,
    f: HistoryFilter | None = None,
    limit: int = 100,
    offset: int = 0,
    images: bool = True,
) -> list[PredictionRecord]:
    """Matching rows, newest first (created_at desc, id desc).

    ``images=False`` leaves out the thumbnail and heatmap bytes (long listings, CSV export):
    reading those attributes then raises instead of querying again, and ``to_dict`` reports
    ``has_heatmap`` / ``has_thumbnail`` as None.
    """
    _check_page(limit, offset)
    stmt = select(PredictionRecord)
    if not images:
        stmt = stmt.options(
            defer(PredictionRecord.thumbnail, raiseload=True),
            defer(PredictionRecord.heatmap_png, raiseload=True),
        )
    stmt = _filtered(stmt, f).order_by(
        PredictionRecord.created_at.desc(), PredictionRecord.id.desc()
    )
    return list(session.scalars(stmt.limit(limit).offset(offset)))


def count_predictions(session: Session, f: HistoryFilter | None = None) -> int:
    stmt = _filtered(select(func.count(PredictionRecord.id)), f)
    return int(session.scalar(stmt) or 0)


def count_by_model_version(session: Session, f: HistoryFilter | None = None) -> dict[str, int]:
    """Matching rows per model version."""
    P = PredictionRecord
    stmt = _filtered(select(P.model_version, func.count(P.id)), f).group_by(P.model_version)
    return {str(v): int(n) for v, n in session.execute(stmt)}


def counts_per_class_per_day(
    session: Session, f: HistoryFilter | None = None
) -> list[tuple[str, str, int]]:
    """``(YYYY-MM-DD, class, n)`` per UTC day and top class, oldest day first."""
    day = utc_day(PredictionRecord.created_at).label("day")
    stmt = _filtered(
        select(day, PredictionRecord.predicted_class, func.count(PredictionRecord.id)), f
    ).group_by(day, PredictionRecord.predicted_class)
    rows = [(str(d), c, int(n)) for d, c, n in session.execute(stmt)]
    order = {c: i for i, c in enumerate(known_codes())}
    return sorted(rows, key=lambda r: (r[0], order.get(r[1], len(order)), r[1]))


def classes_by_model_version(session: Session, versions: list[str]) -> dict[str, tuple[str, ...]]:
    """Each model version's class codes, in its order: the keys of one of its rows' stored
    probabilities (a row's classes are its model's)."""
    P = PredictionRecord
    out = {}
    for v in versions:
        probs = session.scalar(select(P.probabilities).where(P.model_version == v).limit(1))
        out[v] = tuple(probs or ())
    return out


def record_model_classes(session: Session, model_version: str, classes: dict[str, Any]) -> None:
    """Store a model version's class set (:meth:`ClassSet.to_dict`) unless it is stored already
    (a version's classes never change: its weights hash is part of it)."""
    if session.get(ModelClassesRecord, model_version) is None:
        session.add(ModelClassesRecord(model_version=model_version, classes=classes))


def model_class_sets(session: Session) -> dict[str, ClassSet]:
    """``{model version: class set}`` of the ``model_classes`` table (malformed entries, which
    only a hand-edited database holds, are left out)."""
    M = ModelClassesRecord
    out = {}
    for version, d in session.execute(select(M.model_version, M.classes)):
        try:
            out[str(version)] = ClassSet.from_dict(d)
        except ClassSetError:
            continue
    return out


def stored_classes(session: Session, sets: dict[str, ClassSet] | None = None) -> tuple[str, ...]:
    """Every class code the stored rows' models have, sorted: their ``model_classes`` entries
    (``sets`` when already read), else (rows stored before migration 5) one row's
    probabilities per model version, and the stored top classes."""
    sets = model_class_sets(session) if sets is None else sets
    codes = {c for classes in sets.values() for c in classes.codes}
    versions = session.scalars(select(PredictionRecord.model_version).distinct())
    older = [str(v) for v in versions if str(v) not in sets]
    codes.update(c for found in classes_by_model_version(session, older).values() for c in found)
    codes.update(
        str(c) for c in session.scalars(select(PredictionRecord.predicted_class).distinct())
    )
    return tuple(sorted(codes))


def remember_stored_classes(session: Session) -> None:
    """Make the class sets and codes this database holds known to this process: stored rows of
    models not loaded here show their models' names, and filters and confirmed diagnoses accept
    their codes."""
    sets = model_class_sets(session)
    for version, classes in sets.items():
        remember_classes(version, classes, stored=True)
    remember_codes(stored_classes(session, sets))


def _storable_ids(session: Session, ids: list[int]) -> list[int]:
    """The ids that could name a row (:func:`_storable_id`; others match none)."""
    return [i for i in (_storable_id(session, i) for i in ids) if i is not None]


def thumbnails(session: Session, ids: list[int]) -> dict[int, bytes | None]:
    """``{id: thumbnail}`` of the given rows (one query; a table's page of thumbnails)."""
    if not ids:
        return {}
    P = PredictionRecord
    stmt = select(P.id, P.thumbnail).where(P.id.in_(_storable_ids(session, ids)))
    return {int(i): t for i, t in session.execute(stmt)}


_IN_CHUNK = 500  # ids per IN (...): far below SQLite's bound-parameter limit, one query per chunk


def existing_ids(session: Session, ids: list[int]) -> set[int]:
    """Which of these ids still have a row (one query per 500 ids: any number of ids works)."""
    storable = _storable_ids(session, ids)
    found: set[int] = set()
    for start in range(0, len(storable), _IN_CHUNK):
        chunk = storable[start : start + _IN_CHUNK]
        stmt = select(PredictionRecord.id).where(PredictionRecord.id.in_(chunk))
        found.update(int(i) for i in session.scalars(stmt))
    return found


def get_prediction(session: Session, prediction_id: Any) -> PredictionRecord | None:
    """The row with this id, or None; an id that is not a valid id is a ``DermError``."""
    pid = _storable_id(session, prediction_id)
    return None if pid is None else session.get(PredictionRecord, pid)


def output_files(session: Session, prediction_id: Any) -> list[str]:
    """The files written for a row (``scripts.predict --heatmap-dir``); [] when none or no row."""
    pid = _storable_id(session, prediction_id)
    if pid is None:
        return []
    stmt = select(PredictionRecord.output_files).where(PredictionRecord.id == pid)
    return [str(f) for f in session.scalar(stmt) or []]


def batch_members(session: Session, batch_id: str) -> dict[tuple[str, str], int]:
    """``{(file name, image sha256): id}`` of the rows a batch stored, for resuming it."""
    P = PredictionRecord
    stmt = select(P.file_name, P.image_sha256, P.id).where(
        P.batch_id == normalize_batch_id(batch_id)
    )
    return {(str(n), str(h)): int(i) for n, h, i in session.execute(stmt)}


def confirmed_dx_choices() -> tuple[str, ...]:
    """What a confirmed diagnosis may be: a model class or ``other``."""
    codes = known_codes()  # HAM10000's and those of every model loaded here
    return codes if OTHER in codes else (*codes, OTHER)


def normalize_confirmation(dx: Any, source: Any, note: Any = None) -> tuple[str, str, str | None]:
    """Validated (dx, source, note) of a confirmed diagnosis; ``DermError`` says what to fix."""
    code = "" if _blank(dx) else str(dx).strip().lower()
    if code not in confirmed_dx_choices():
        raise DermError(
            f"Unknown confirmed diagnosis {echo(dx)}: expected one of "
            f"{', '.join(confirmed_dx_choices())}."
        )
    src = "" if _blank(source) else " ".join(str(source).strip().lower().replace("_", " ").split())
    src = {"follow up": "follow-up", "followup": "follow-up", "consensus": "expert consensus"}.get(
        src, src
    )
    if not src:
        raise DermError(
            f"No confirmation source: say who confirmed it, one of {', '.join(CONFIRM_SOURCES)}."
        )
    if src not in CONFIRM_SOURCES:
        raise DermError(
            f"Unknown confirmation source {echo(source)}: expected one of "
            f"{', '.join(CONFIRM_SOURCES)}."
        )
    text = None if _blank(note) else str(note).strip()
    if text is not None and "\x00" in text:
        # PostgreSQL cannot store NUL in text, SQLite can: refused everywhere, one answer.
        raise DermError(
            "The note contains a NUL character (\\x00, often from pasted binary data); "
            "remove it and try again."
        )
    if text is not None and len(text) > NOTE_MAX:
        raise DermError(f"The note has {len(text)} characters; keep it to {NOTE_MAX}.")
    return code, src, text


def confirm_prediction(
    session: Session, prediction_id: int, dx: Any, source: Any, note: Any = None
) -> PredictionRecord:
    """Record (or replace) the confirmed diagnosis of one stored prediction."""
    code, src, text = normalize_confirmation(dx, source, note)
    record = get_prediction(session, prediction_id)
    if record is None:
        raise DermError(f"No stored prediction has id {prediction_id}.")
    record.confirmed_dx, record.confirmed_source = code, src
    record.confirmed_note, record.confirmed_at = text, utcnow()
    session.flush()
    return record


def delete_prediction(session: Session, prediction_id: Any) -> bool:
    """Delete one stored prediction (image, heatmap, everything); False when there was none.

    This removes the row; :func:`service.history.delete_record` also purges the database files
    and removes the files written for the row, and is what the app and the CLI call."""
    pid = _storable_id(session, prediction_id)
    if pid is None:
        return False
    result = session.execute(delete(PredictionRecord).where(PredictionRecord.id == pid))
    return bool(getattr(result, "rowcount", 0))


def confirmed_pairs(session: Session, f: HistoryFilter | None = None) -> list[tuple[str, str, str]]:
    """``(predicted_class, confirmed_dx, model_version)`` of every matching row that has a
    confirmed diagnosis (three short columns: cheap even over a long history)."""
    P = PredictionRecord
    stmt = _filtered(
        select(P.predicted_class, P.confirmed_dx, P.model_version).where(
            P.confirmed_dx.is_not(None)
        ),
        f,
    ).order_by(P.id)
    return [(str(p), str(c), str(v)) for p, c, v in session.execute(stmt)]


def as_filter(f: HistoryFilter | dict[str, Any] | None) -> HistoryFilter | None:
    """Accept a filter, a dict of its fields, or None."""
    if f is None or isinstance(f, HistoryFilter):
        return f
    return HistoryFilter(**f)


__all__ = [
    "MAX_ID",
    "MAX_LIMIT",
    "HistoryFilter",
    "as_filter",
    "batch_members",
    "confirm_prediction",
    "confirmed_dx_choices",
    "confirmed_pairs",
    "count_by_model_version",
    "count_predictions",
    "counts_per_class_per_day",
    "delete_prediction",
    "get_prediction",
    "normalize_batch_id",
    "normalize_confirmation",
    "output_files",
    "parse_date",
    "parse_id",
    "query_predictions",
    "thumbnails",
]
