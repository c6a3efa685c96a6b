"""The one prediction code path: validate → predict (with explanations) → store one row.

The Gradio app, ``python -m scripts.predict --db`` and the tests all call
:meth:`PredictionService.predict_and_store`, so what is validated, predicted and stored is the
same everywhere. Invalid input raises the predictor's :class:`DermError` before anything is
written; a database failure raises :class:`StorageError` and leaves nothing half-written (the row
is one transaction).
"""

from __future__ import annotations

import hashlib
import io
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy.exc import SQLAlchemyError

from common.errors import DermError
from data_pipeline.images import ImageSource, load_rgb
from data_pipeline.schema import CLASSES, Metadata, normalize_target
from db.models import PredictionRecord, utcnow
from db.queries import (
    HistoryFilter,
    as_filter,
    count_predictions,
    counts_per_class_per_day,
    get_prediction,
    query_predictions,
)
from db.session import Database
from model.predictor import Prediction, Predictor

#: Longest side of stored thumbnails and heatmaps, in pixels.
THUMBNAIL_SIDE = 256
THUMBNAIL_QUALITY = 85


class StorageError(DermError):
    """The prediction was made but could not be stored; ``.prediction`` still holds it."""

    def __init__(self, message: str, prediction: Prediction | None = None) -> None:
        super().__init__(message)
        self.prediction = prediction


@dataclass
class StoredPrediction:
    id: int | None  # row id, None when nothing was stored
    prediction: Prediction
    stored: bool


def fit_size(height: int, width: int, max_side: int = THUMBNAIL_SIDE) -> tuple[int, int]:
    """(h, w) scaled so the longest side is at most ``max_side`` (never enlarged)."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def thumbnail_jpeg(rgb: np.ndarray, max_side: int = THUMBNAIL_SIDE) -> bytes:
    h, w = fit_size(*rgb.shape[:2], max_side)
    img = Image.fromarray(rgb).resize((w, h), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    return buf.getvalue()


def small_heatmap_png(heatmap: np.ndarray, max_side: int = THUMBNAIL_SIDE) -> bytes:
    """The heatmap at thumbnail size as an 8-bit grayscale PNG (Grad-CAM is coarse anyway)."""
    import cv2

    from model.render import heatmap_png

    h, w = fit_size(*heatmap.shape[:2], max_side)
    if (h, w) != heatmap.shape[:2]:
        heatmap = cv2.resize(heatmap.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    return heatmap_png(heatmap)


def image_sha256(source: ImageSource, rgb: np.ndarray) -> str:
    """SHA-256 of the uploaded bytes (bytes or a file path), else of the decoded RGB pixels."""
    if isinstance(source, (bytes, bytearray)):
        return hashlib.sha256(bytes(source)).hexdigest()
    if isinstance(source, (str, Path)):
        h = hashlib.sha256()
        with open(source, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    return hashlib.sha256(np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()).hexdigest()


class PredictionService:
    """Predictor + history database. Safe to share between threads: inference is serialised by a
    lock, and each store uses its own session and transaction."""

    def __init__(self, predictor: Predictor, db: Database | None, store_images: bool = True):
        self.predictor = predictor
        self.db = db
        self.store_images = store_images
        self._lock = threading.Lock()

    @classmethod
    def create(
        cls,
        checkpoint: str | Path | None = None,
        db_url: str | None = None,
        store_images: bool = True,
    ) -> PredictionService:
        """Load the checkpoint (None → shipped model) and open / migrate the database
        (``db_url`` None → ``$SKIN_DB_URL`` or ``sqlite:///predictions.db``)."""
        predictor = Predictor.from_checkpoint(checkpoint)
        return cls(predictor, Database(db_url), store_images=store_images)

    # --- predicting --------------------------------------------------------------------------

    def predict_and_store(
        self,
        image: ImageSource,
        age: Any = None,
        sex: Any = None,
        site: Any = None,
        target: str | None = None,
        *,
        tta: bool = False,
        name: str | None = None,
    ) -> StoredPrediction:
        """Validate, predict with explanations, store one row; see the module docstring.

        ``name`` labels the image in error messages (defaults to the path, or "image").
        """
        # Validation (raises DermError subclasses; nothing has been written yet).
        Metadata.parse(age, sex, site)
        target = normalize_target(target)
        rgb = load_rgb(image, name)

        with self._lock:
            pred = self.predictor.predict(
                rgb, age=age, sex=sex, site=site, explain=True, target=target, tta=tta
            )
        if self.db is None:
            return StoredPrediction(id=None, prediction=pred, stored=False)

        record = self._record(pred, rgb, image_sha256(image, rgb))
        try:
            with self.db.session() as session:
                session.add(record)
                session.flush()
                row_id = int(record.id)
        except SQLAlchemyError as exc:
            reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
            raise StorageError(
                f"Prediction made but could not be stored: {reason} "
                f"(database {self.db.display_url}).",
                prediction=pred,
            ) from exc
        return StoredPrediction(id=row_id, prediction=pred, stored=True)

    def _record(self, pred: Prediction, original: np.ndarray, digest: str) -> PredictionRecord:
        cfg = self.predictor.config
        shown = pred.image if pred.image is not None else original
        return PredictionRecord(
            created_at=utcnow(),
            image_sha256=digest,
            image_width=int(original.shape[1]),
            image_height=int(original.shape[0]),
            # The thumbnail shows the (aspect-cropped) region the model saw, so the stored heatmap
            # overlays it exactly.
            thumbnail=thumbnail_jpeg(shown) if self.store_images else None,
            age=pred.metadata.age,
            sex=pred.metadata.sex,
            site=pred.metadata.site,
            predicted_class=pred.top_class,
            predicted_probability=float(pred.top_probability),
            probabilities={c: float(pred.probabilities[c]) for c in CLASSES},
            heatmap_png=small_heatmap_png(pred.heatmap) if pred.heatmap is not None else None,
            attribution_target=pred.attribution_target,
            metadata_contributions=(
                {k: float(v) for k, v in pred.metadata_contributions.items()}
                if pred.metadata_contributions is not None
                else None
            ),
            warnings=list(pred.warnings),
            ood_distance=pred.ood_distance,
            model_name=cfg.name,
            model_version=pred.model_version,
            checkpoint_sha256=cfg.weights_sha256,
            latency_ms=float(pred.latency_ms),
        )

    # --- history -----------------------------------------------------------------------------

    def _database(self) -> Database:
        if self.db is None:
            raise DermError("This prediction service has no history database.")
        return self.db

    def history(
        self,
        f: HistoryFilter | dict[str, Any] | None = None,
        limit: int = 100,
        offset: int = 0,
        images: bool = True,
    ) -> list[PredictionRecord]:
        """Matching rows, newest first, as detached ORM objects with every column loaded
        (``images=False``: without thumbnail / heatmap bytes, for long listings)."""
        with self._database().session() as session:
            return query_predictions(
                session, as_filter(f), limit=limit, offset=offset, images=images
            )

    def get(self, prediction_id: int) -> PredictionRecord | None:
        with self._database().session() as session:
            return get_prediction(session, prediction_id)

    def count(self, f: HistoryFilter | dict[str, Any] | None = None) -> int:
        with self._database().session() as session:
            return count_predictions(session, as_filter(f))

    def stats(self, f: HistoryFilter | dict[str, Any] | None = None) -> list[tuple[str, str, int]]:
        """``(YYYY-MM-DD, class, n)`` per UTC day and top class."""
        with self._database().session() as session:
            return counts_per_class_per_day(session, as_filter(f))

    def close(self) -> None:
        if self.db is not None:
            self.db.dispose()
