"""ORM model of the prediction history (SQLAlchemy 2.0 typed declarative).

One row per prediction: what was asked (image hash and size, optional thumbnail, age / sex /
site), what the model answered (calibrated probabilities, top class, heatmap, metadata
contributions, warnings) and which model answered (name, version, weights hash).

The schema is created and changed only by :mod:`db.migrations`; ``tests/test_db.py`` checks that a
migrated database matches these classes, so a model change without a migration fails the tests.
"""

from __future__ import annotations

import base64
import io
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import JSON, DateTime, Float, Index, Integer, LargeBinary, String
from sqlalchemy import inspect as sa_inspect
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column
from sqlalchemy.types import TypeDecorator

from data_pipeline.schema import CLASS_NAMES


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

    __table_args__ = (Index("ix_predictions_class_created", "predicted_class", "created_at"),)

    def __repr__(self) -> str:
        return (
            f"PredictionRecord(id={self.id}, created_at={self.created_at!s}, "
            f"class={self.predicted_class}, p={self.predicted_probability:.3f})"
        )

    def _not_loaded(self, name: str) -> bool:
        """True for a column left out of the query (see ``query_predictions(images=False)``)."""
        state = sa_inspect(self)
        return state.has_identity and name in state.unloaded

    def heatmap_array(self) -> np.ndarray | None:
        """The stored heatmap as an (H, W) float32 array in [0, 1], or None."""
        if self.heatmap_png is None:
            return None
        from model.render import heatmap_from_png

        return heatmap_from_png(self.heatmap_png)

    def thumbnail_array(self) -> np.ndarray | None:
        """The stored thumbnail as an RGB uint8 array, or None (privacy flag off)."""
        if self.thumbnail is None:
            return None
        from PIL import Image

        return np.asarray(Image.open(io.BytesIO(self.thumbnail)).convert("RGB"), dtype=np.uint8)

    def to_dict(
        self, include_heatmap: bool = False, include_thumbnail: bool = False
    ) -> dict[str, Any]:
        """JSON-friendly dict. Binary fields become base64 strings when asked for
        (``heatmap_png_base64``, ``thumbnail_jpeg_base64``; None when absent)."""
        created = self.created_at
        d: dict[str, Any] = {
            "id": self.id,
            "created_at": as_utc(created).isoformat() if created is not None else None,
            "image_sha256": self.image_sha256,
            "image_width": self.image_width,
            "image_height": self.image_height,
            "age": self.age,
            "sex": self.sex,
            "site": self.site,
            "predicted_class": self.predicted_class,
            "predicted_class_name": CLASS_NAMES.get(self.predicted_class, self.predicted_class),
            "predicted_probability": self.predicted_probability,
            "probabilities": dict(self.probabilities or {}),
            "attribution_target": self.attribution_target,
            "metadata_contributions": (
                dict(self.metadata_contributions)
                if self.metadata_contributions is not None
                else None
            ),
            "warnings": list(self.warnings or []),
            "ood_distance": self.ood_distance,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "checkpoint_sha256": self.checkpoint_sha256,
            "latency_ms": self.latency_ms,
        }
        # Binary columns left out of the query (images=False) are reported as None (unknown).
        for key, attr, include in (
            ("heatmap", "heatmap_png", include_heatmap),
            ("thumbnail", "thumbnail", include_thumbnail),
        ):
            skipped = self._not_loaded(attr)
            d[f"has_{key}"] = None if skipped else getattr(self, attr) is not None
            if include:
                suffix = "png" if key == "heatmap" else "jpeg"
                d[f"{key}_{suffix}_base64"] = None if skipped else _b64(getattr(self, attr))
        return d


def _b64(data: bytes | None) -> str | None:
    return None if data is None else base64.b64encode(data).decode("ascii")
