"""ORM model of the prediction history (SQLAlchemy 2.0 typed declarative).

One row per prediction: what was asked (image hash and size, optional thumbnail, age / sex /
site), what the model answered (calibrated probabilities, top class, heatmap, metadata
contributions, warnings) and which model answered (name, version, weights hash).

Rows hold plain values and bytes: encoding images (thumbnail JPEG, heatmap PNG) and serialising
rows (JSON, CSV, tables) happen above, in :mod:`service.render` and :mod:`service.history`.

The schema is created and changed only by :mod:`db.migrations`; ``tests/test_db.py`` checks that a
migrated database matches these classes, so a model change without a migration fails the tests.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import JSON, DateTime, Float, Index, Integer, LargeBinary, String, Text
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

#: A confirmed diagnosis is one of the model's classes or ``other`` (a lesion outside them).
OTHER = "other"
#: Where a confirmed diagnosis comes from, most to least definitive.
CONFIRM_SOURCES: tuple[str, ...] = (
    "histopathology",
    "follow-up",
    "expert consensus",
    "clinician",
)
#: Longest note kept with a confirmed diagnosis.
NOTE_MAX = 1000
#: Longest original file name kept (longer names are cut, the end kept: it holds the extension).
FILE_NAME_MAX = 255
#: Length of a batch id (hex digits; see :func:`service.batch.new_batch_id`).
BATCH_ID_MAX = 32


def utcnow() -> datetime:
    return datetime.now(UTC)


def as_utc(value: datetime) -> datetime:
    """An aware UTC datetime; naive values are taken to be UTC already."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value.astimezone(UTC)


class UTCDateTime(TypeDecorator):
    """Stored as naive UTC on every backend (SQLite has no time zones); read back as aware UTC.

    Bound parameters go through the same conversion, so filters may use aware datetimes in any
    time zone, or naive ones meaning UTC.
    """

    impl = DateTime(timezone=False)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return as_utc(value).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return as_utc(value)


class Base(DeclarativeBase):
    pass


class PredictionRecord(Base):
    """One stored prediction (table ``predictions``)."""

    __tablename__ = "predictions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow, index=True)

    # The input image. The thumbnail is None when the service runs with store_images=False.
    image_sha256: Mapped[str] = mapped_column(String(64), index=True)
    image_width: Mapped[int] = mapped_column(Integer)
    image_height: Mapped[int] = mapped_column(Integer)
    thumbnail: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)

    # Validated, normalised metadata (sex / site use the data_pipeline.schema vocabularies).
    age: Mapped[float | None] = mapped_column(Float, nullable=True)
    sex: Mapped[str] = mapped_column(String(16), index=True)
    site: Mapped[str] = mapped_column(String(32), index=True)

    # The answer.
    predicted_class: Mapped[str] = mapped_column(String(8), index=True)
    predicted_probability: Mapped[float] = mapped_column(Float, index=True)
    probabilities: Mapped[dict[str, float]] = mapped_column(JSON)
    heatmap_png: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    attribution_target: Mapped[str | None] = mapped_column(String(8), nullable=True)
    metadata_contributions: Mapped[dict[str, float] | None] = mapped_column(JSON, nullable=True)
    warnings: Mapped[list[str]] = mapped_column(JSON, default=list)
    ood_distance: Mapped[float | None] = mapped_column(Float, nullable=True)

    # The model that answered.
    model_name: Mapped[str] = mapped_column(String(128))
    model_version: Mapped[str] = mapped_column(String(160), index=True)
    checkpoint_sha256: Mapped[str] = mapped_column(String(64))
    latency_ms: Mapped[float] = mapped_column(Float)

    # The confirmed diagnosis, recorded later (migration 2); all None until then.
    confirmed_dx: Mapped[str | None] = mapped_column(String(8), nullable=True)
    confirmed_source: Mapped[str | None] = mapped_column(String(32), nullable=True)
    confirmed_note: Mapped[str | None] = mapped_column(Text, nullable=True)
    confirmed_at: Mapped[datetime | None] = mapped_column(UTCDateTime(), nullable=True)

    # Where the image came from (migration 4): the file name as uploaded or given on the command
    # line (a zip member as ``archive.zip/member``), the batch run that stored the row (so an
    # interrupted batch can be found and resumed), and files a CLI wrote for the row
    # (``scripts.predict --heatmap-dir``), which deleting the row removes too.
    file_name: Mapped[str | None] = mapped_column(String(FILE_NAME_MAX), nullable=True)
    batch_id: Mapped[str | None] = mapped_column(String(BATCH_ID_MAX), nullable=True, index=True)
    output_files: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)

    # SQLite: AUTOINCREMENT, so the id of a deleted row is never handed out again (migration 3).
    __table_args__ = (
        Index("ix_predictions_class_created", "predicted_class", "created_at"),
        {"sqlite_autoincrement": True},
    )

    def __repr__(self) -> str:
        return (
            f"PredictionRecord(id={self.id}, created_at={self.created_at!s}, "
            f"class={self.predicted_class}, p={self.predicted_probability:.3f})"
        )

    def not_loaded(self, name: str) -> bool:
        """True for a column left out of the query (see ``query_predictions(images=False)``)."""
        state = sa_inspect(self)
        return bool(state.has_identity and name in state.unloaded)


class ModelClassesRecord(Base):
    """The class set of each model version that stored rows (table ``model_classes``,
    migration 5). A row keeps only its model's class codes (its probabilities' keys); the
    display names and which classes are malignant come from here, so a history opened without
    that model (``scripts.query_history``, another server) still shows "Common nevus", not
    "cn", and accepts its codes in filters and confirmed diagnoses."""

    __tablename__ = "model_classes"

    model_version: Mapped[str] = mapped_column(String(160), primary_key=True)
    #: :meth:`data_pipeline.schema.ClassSet.to_dict`: ``{codes, names, malignant}``.
    classes: Mapped[dict] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(UTCDateTime(), default=utcnow)
