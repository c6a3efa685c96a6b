"""The one prediction code path: request → predict (with explanations) → store one row.

The Gradio app, ``python -m scripts.predict`` (with or without ``--db``), ``scripts.benchmark`` and
the tests all call :meth:`PredictionService.predict_and_store` with a
:class:`data_pipeline.request.PredictionRequest`, validated once where the input arrived. A
database failure raises :class:`StorageError` (a :class:`DatabaseError`) that still carries the
prediction, and leaves nothing half-written (the row is one transaction).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from common.errors import DatabaseError, DermError
from data_pipeline.request import PredictionRequest
from data_pipeline.schema import known_codes
from db.models import FILE_NAME_MAX, PredictionRecord, utcnow
from db.queries import (
    HistoryFilter,
    as_filter,
    batch_members,
    classes_by_model_version,
    confirm_prediction,
    count_by_model_version,
    count_predictions,
    counts_per_class_per_day,
    existing_ids,
    get_prediction,
    normalize_batch_id,
    query_predictions,
    record_model_classes,
    remember_stored_classes,
    thumbnails,
)
from db.session import Database, error_reason
from model.heatmap import resize_heatmap
from model.lean import load_predictor
from model.predictor import Prediction, Predictor
from service.agreement import Agreement, agreement_for
from service.history import delete_record
from service.render import fit_size, heatmap_png, thumbnail_jpeg

FilterLike = HistoryFilter | dict[str, Any] | None


def file_name(name: str | None) -> str | None:
    """The original file name stored with a row: as given (a CLI path, an upload's name, a zip
    member as ``archive.zip/member``), NUL-free and cut to the stored length (keeping the end,
    where the extension is); None for the placeholder name of raw bytes."""
    if not name or name == "image":
        return None
    text = str(name).replace("\x00", "\ufffd")
    return text if len(text) <= FILE_NAME_MAX else "…" + text[-(FILE_NAME_MAX - 1) :]


class StorageError(DatabaseError):
    """The prediction was made but could not be stored; ``.prediction`` still holds it."""

    def __init__(self, message: str, prediction: Prediction | None = None) -> None:
        super().__init__(message)
        self.prediction = prediction


@dataclass
class StoredPrediction:
    id: int | None  # row id, None when nothing was stored
    prediction: Prediction
    stored: bool


class PredictionService:
    """Predictor + history database. Safe to share between threads: the predictor is thread-safe
    (see :class:`model.predictor.Predictor`), and each store uses its own session and
    transaction. How many predictions run at once is the caller's choice (the app's
    ``--concurrency``)."""

    def __init__(
        self, predictor: Predictor, db: Database | None, store_images: bool = True
    ) -> None:
        self.predictor = predictor
        self.db = db
        self.store_images = store_images
        self._recorded: set[str] = set()  # model versions whose class set the database holds
        if db is not None:
            try:  # rows of models not loaded here show their names; their codes are accepted
                with db.session() as session:
                    remember_stored_classes(session)
            except (SQLAlchemyError, DatabaseError):
                pass  # an unreadable database says so on its first use

    @classmethod
    def create(
        cls,
        checkpoint: str | Path | None = None,
        db_url: str | None = None,
        store_images: bool = True,
        runtime: str | None = None,
    ) -> PredictionService:
        """Load the checkpoint (None → shipped model) and open / migrate the database
        (``db_url`` None → ``$SKIN_DB_URL`` or ``sqlite:///predictions.db``); ``runtime``:
        see :meth:`Predictor.from_checkpoint`. Serving without PyTorch where the export allows
        (:func:`model.lean.load_predictor`)."""
        predictor = load_predictor(checkpoint, runtime=runtime)
        return cls(predictor, Database(db_url), store_images=store_images)

    # --- predicting --------------------------------------------------------------------------

    def predict_and_store(
        self, request: PredictionRequest, *, tta: bool = False, batch_id: str | None = None
    ) -> StoredPrediction:
        """Predict with explanations, then store one row (when there is a database);
        ``batch_id``: the batch run the row belongs to (see :mod:`service.batch`)."""
        return self.store(request, self.explain(request, tta=tta), batch_id=batch_id)

    def store(
        self,
        request: PredictionRequest,
        pred: Prediction,
        *,
        batch_id: str | None = None,
        output_files: list[str] | None = None,
    ) -> StoredPrediction:
        """Store one prediction of ``request`` (one transaction). ``output_files``: files already
        written for it (e.g. ``scripts.predict --heatmap-dir``), removed when the row is
        deleted. Without a database nothing is stored."""
        if self.db is None:
            return StoredPrediction(id=None, prediction=pred, stored=False)

        self._record_classes(pred)
        record = self._record(pred, request)
        record.batch_id = normalize_batch_id(batch_id)
        record.output_files = [str(f) for f in output_files] if output_files else None
        try:
            with self.db.session(write=True) as session:
                session.add(record)
                session.flush()
                row_id = int(record.id)
        except (SQLAlchemyError, DatabaseError) as exc:
            raise StorageError(
                f"Prediction made but could not be stored: {error_reason(exc)} "
                f"(database {self.db.display_url}).",
                prediction=pred,
            ) from exc
        return StoredPrediction(id=row_id, prediction=pred, stored=True)

    def _record_classes(self, pred: Prediction) -> None:
        """Store the answering model's class set once per version (table ``model_classes``), in
        its own transaction: two servers storing it at once is an IntegrityError for one of
        them, which must never fail a prediction's store."""
        version = pred.model_version
        if self.db is None or version in self._recorded:
            return
        try:
            with self.db.session(write=True) as session:
                record_model_classes(session, version, pred.classes.to_dict())
        except IntegrityError:
            pass  # another process stored it meanwhile
        except (SQLAlchemyError, DatabaseError):
            return  # the row's own store reports what is wrong with the database
        self._recorded.add(version)

    def explain(self, request: PredictionRequest, *, tta: bool = False) -> Prediction:
        """Predict with explanations without storing anything: re-explaining a result for
        another class (``request.target``) must not add a second history row; a CLI that writes
        files for a prediction before storing it (:meth:`store`) predicts here first."""
        return self.predictor.predict(request, explain=True, tta=tta)

    def _record(self, pred: Prediction, request: PredictionRequest) -> PredictionRecord:
        cfg = self.predictor.config
        # The thumbnail shows the (aspect-cropped) region the model saw, so the stored heatmap,
        # made from the Grad-CAM grid at the thumbnail's size, overlays it exactly.
        shown = pred.image if pred.image is not None else request.rgb
        heatmap = None
        if pred.heatmap_grid is not None:
            heatmap = heatmap_png(resize_heatmap(pred.heatmap_grid, fit_size(*shown.shape[:2])))
        contributions = pred.metadata_contributions
        return PredictionRecord(
            created_at=utcnow(),
            image_sha256=request.image_sha256,
            image_width=request.width,
            image_height=request.height,
            thumbnail=thumbnail_jpeg(shown) if self.store_images else None,
            age=pred.metadata.age,
            sex=pred.metadata.sex,
            site=pred.metadata.site,
            predicted_class=pred.top_class,
            predicted_probability=float(pred.top_probability),
            # the model's own classes, in its order: a row's classes are its model version's
            probabilities={c: float(p) for c, p in pred.probabilities.items()},
            heatmap_png=heatmap,
            attribution_target=pred.attribution_target,
            metadata_contributions=(
                {k: float(v) for k, v in contributions.items()} if contributions else None
            ),
            warnings=list(pred.warnings),
            ood_distance=pred.ood_distance,
            model_name=cfg.name,
            model_version=pred.model_version,
            checkpoint_sha256=cfg.weights_sha256,
            latency_ms=float(pred.latency_ms),
            file_name=file_name(request.name),
        )

    # --- history -----------------------------------------------------------------------------

    def _database(self) -> Database:
        if self.db is None:
            raise DermError("This prediction service has no history database.")
        return self.db

    def history(
        self, f: FilterLike = None, limit: int = 100, offset: int = 0, images: bool = True
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

    def thumbnails(self, ids: list[int]) -> dict[int, bytes | None]:
        """``{id: thumbnail JPEG}`` of the listed rows (for tables of long listings)."""
        with self._database().session() as session:
            return thumbnails(session, ids)

    def class_codes(self, f: FilterLike = None) -> tuple[str, ...]:
        """The class codes of the matching rows' models, for their ``p_`` columns: HAM10000's
        and every loaded model's (:func:`known_codes`), then each matching model version's,
        read from one of its rows (a row's classes are its model's), so a streamed export
        knows its columns without reading the rows twice."""
        with self._database().session() as session:
            versions = list(count_by_model_version(session, as_filter(f)))
            stored = classes_by_model_version(session, versions)
        codes = dict.fromkeys(known_codes())
        for v in versions:
            codes.update(dict.fromkeys(stored[v]))
        return tuple(codes)

    def existing(self, ids: list[int]) -> set[int]:
        """Which of these prediction ids are still stored (others were deleted, maybe by
        another process: ``query_history --delete``, another app server)."""
        with self._database().session() as session:
            return existing_ids(session, ids)

    def count(self, f: FilterLike = None) -> int:
        with self._database().session() as session:
            return count_predictions(session, as_filter(f))

    def stats(self, f: FilterLike = None) -> list[tuple[str, str, int]]:
        """``(YYYY-MM-DD, class, n)`` per UTC day and top class."""
        with self._database().session() as session:
            return counts_per_class_per_day(session, as_filter(f))

    def batch_members(self, batch_id: str) -> dict[tuple[str, str], int]:
        """``{(file name, image sha256): id}`` already stored by a batch (for resuming it)."""
        with self._database().session() as session:
            return batch_members(session, batch_id)

    def confirm(
        self, prediction_id: int, dx: Any, source: Any, note: Any = None
    ) -> PredictionRecord:
        """Record the confirmed diagnosis of a stored prediction (replacing an earlier one)."""
        with self._database().session(write=True) as session:
            return confirm_prediction(session, prediction_id, dx, source, note)

    def delete(self, prediction_id: int) -> bool:
        """Delete a stored prediction so that it is gone (row, its bytes in the database files,
        files written for it: :func:`service.history.delete_record`); False when no row had
        that id."""
        return delete_record(self._database(), prediction_id)

    def agreement(self, f: FilterLike = None) -> Agreement:
        """Model vs confirmed diagnoses over the matching rows (see :mod:`service.agreement`)."""
        return agreement_for(self._database(), as_filter(f))

    def close(self) -> None:
        if self.db is not None:
            self.db.dispose()
