"""What several tabs share: error pop-ups, prediction ids, output files, export folders, the
history filters and the ``{name: value}`` → ``{component: value}`` binding.

Handlers are plain functions ``(service, inputs...) → {name: value}``, testable without a
server; :func:`bind` maps those names onto a tab's components (a dict keyed by component, so no
positional tuples). ``DermError`` messages become ``gr.Error`` pop-ups with a title, so a user
never sees a traceback.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from gradio.utils import get_upload_folder

from app import views
from common.errors import DermError
from common.text import echo
from data_pipeline.schema import SEXES, SITES, known_codes
from service import history
from service.prediction import PredictionService
from service.render import chart_png, display_jpeg
from service.report import case_report_pdf, report_filename

log = logging.getLogger(__name__)

Components = dict[str, Any]
Values = dict[str, Any]

#: Predictions running at once (``python -m app --concurrency``). Measured on 2 cores (README,
#: Benchmarks): 2 beats 1 (decoding, rendering and storing one request overlap the other's
#: inference) and 4 only adds contention.
PREDICT_CONCURRENCY = 2
#: Re-explaining a result and batches run one at a time, so they never crowd out /predict.
SERIAL_CONCURRENCY = 1
#: Heatmap opacity shown before the slider is moved.
DEFAULT_OPACITY = 0.45
#: CSV exports older than this many seconds are deleted at the next search.
EXPORT_MAX_AGE_S = 3600
#: Export folders are ``<tmp>/dermfusion-history-<pid>-<random>``; see :func:`clean_stale_exports`.
EXPORT_PREFIX = "dermfusion-history-"
#: Name prefix of the output images :func:`output_file` writes into Gradio's cache.
OUTPUT_PREFIX = "dermfusion-"


# --- errors --------------------------------------------------------------------------------------


def user_error(exc: Exception, title: str) -> gr.Error:
    return gr.Error(str(exc), title=title, print_exception=False)


def unexpected(exc: Exception, what: str) -> gr.Error:
    log.exception("unexpected error while %s", what)
    return gr.Error(
        f"Unexpected error while {what} ({type(exc).__name__}). Nothing is wrong with your input "
        "as far as the app can tell; the details are in the server log.",
        title="Internal error",
        print_exception=False,
    )


@contextlib.contextmanager
def shown_as_errors(what: str, title: str) -> Iterator[None]:
    """``DermError`` (bad input, database down / locked / read-only) → its own message;
    anything else → a generic message, with the traceback in the server log only."""
    try:
        yield
    except gr.Error:
        raise
    except DermError as exc:
        raise user_error(exc, title) from None
    except Exception as exc:  # never a traceback in the UI
        raise unexpected(exc, what) from None


def prediction_id(value: Any) -> int:
    """A prediction id typed by a user (``12`` or ``#12``) as an int, or a titled error."""
    if isinstance(value, str):
        value = value.strip().lstrip("#")
    if value is None or value == "":
        raise gr.Error(
            "Enter a prediction id (the # shown after each analysis), or click a History row.",
            title="No prediction chosen",
            print_exception=False,
        )
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError):
        raise gr.Error(
            f"Prediction id {echo(value)} is not a whole number.",
            title="Bad id",
            print_exception=False,
        ) from None


# --- privacy: uploads do not outlive a request with --no-store-images --------------------------


def forget_uploads(service: PredictionService, paths: Iterable[Any]) -> None:
    """With ``store_images=False`` delete the uploaded files from Gradio's upload cache as soon
    as the request is done (only files inside that cache; never a user's own file)."""
    if service.store_images:
        return
    cache = Path(gr.utils.get_upload_folder()).resolve()
    for raw in paths:
        if not raw:
            continue
        path = Path(str(raw)).resolve()
        if cache not in path.parents:
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            path.parent.rmdir()  # Gradio keeps each upload in its own folder


# --- output files --------------------------------------------------------------------------------


def output_file(rgb: np.ndarray | None, kind: str = "panel") -> str | None:
    """An output image encoded by us and written to its own file in Gradio's cache; Gradio
    serves a file already in its cache as is (and its ``delete_cache`` removes it later).

    Why not return the array: Gradio would encode it as PNG at zlib level 6, ~80 ms for the
    heatmap panel, more CPU than the prediction itself (:func:`service.render.display_jpeg`).
    And each response gets its own file name: Gradio names the files it encodes by the hash of
    their bytes and rewrites them in place, so two users getting the same picture at once
    would share one file and the second write would truncate the first one's download.

    ``kind``: ``panel`` (photo-like: JPEG) or ``chart`` (flat colours and text: PNG)."""
    if rgb is None:
        return None
    if kind == "chart":
        data, suffix = chart_png(rgb), "png"
    else:
        data, suffix = display_jpeg(rgb), "jpg"
    folder = Path(get_upload_folder())
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{OUTPUT_PREFIX}{kind}-{uuid.uuid4().hex}.{suffix}"
    path.write_bytes(data)
    return str(path)


def shown_image(
    label: str, height: int | None, elem_id: str | None = None, visible: bool = True
) -> gr.Image:
    """A read-only image output (a file written by :func:`output_file`)."""
    return gr.Image(
        label=label,
        type="numpy",
        format="png",
        interactive=False,
        height=height,
        elem_id=elem_id,
        visible=visible,
    )


# --- export folder (CSV downloads, case reports) -------------------------------------------------


def _export_folder_pid(folder: Path) -> int | None:
    match = re.match(rf"{re.escape(EXPORT_PREFIX)}(\d+)-", folder.name)
    return int(match.group(1)) if match else None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_exports(root: Path | None = None, max_age_s: float = EXPORT_MAX_AGE_S) -> int:
    """Delete export folders left behind by app processes that died without cleaning up (e.g.
    ``kill -9``): folders of processes no longer running, and unnamed ones past ``max_age_s``.
    Returns how many were removed."""
    root = Path(root or tempfile.gettempdir())
    removed = 0
    for folder in root.glob(f"{EXPORT_PREFIX}*"):
        pid = _export_folder_pid(folder)
        with contextlib.suppress(OSError):
            if pid == os.getpid() or not folder.is_dir():
                continue
            stale = (
                not _pid_alive(pid)
                if pid is not None
                else folder.stat().st_mtime < time.time() - max_age_s
            )
            if stale:
                shutil.rmtree(folder)
                removed += 1
    return removed


def prune(folder: Path, max_age_s: float = EXPORT_MAX_AGE_S) -> None:
    """Delete old CSV exports (Gradio serves its own copy from its cache)."""
    cutoff = time.time() - max_age_s
    for old in folder.glob("*.csv"):
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < cutoff:
                old.unlink()


def case_report(service: PredictionService, exports: Path, prediction_id_: Any) -> Values:
    """The one-page PDF of a stored prediction, written to the export folder (Analyse and
    History both offer it)."""
    pid = prediction_id(prediction_id_)
    with shown_as_errors("making the case report", "Cannot make the case report"):
        record = service.get(pid)
        if record is None:
            raise DermError(f"No stored prediction has id {pid}.")
        prune(exports)
        folder = exports / uuid.uuid4().hex[:8]
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / report_filename(record)
        out.write_bytes(case_report_pdf(record))
    return {"report": str(out)}


# --- the history filters (History and Agreement) -------------------------------------------------

#: Input order of the ``/history`` and ``/agreement`` APIs.
HISTORY_INPUTS = ("since", "until", "classes", "min_prob", "sex", "site")


def history_filters() -> Components:
    """Date range, top classes, minimum probability, sex and site (History and Agreement)."""
    ui: Components = {}
    with gr.Row():
        ui["since"] = gr.Textbox(
            label="From (YYYY-MM-DD)",
            value="",
            placeholder="blank = from the start",
            max_lines=1,
            min_width=140,
        )
        ui["until"] = gr.Textbox(
            label="To (YYYY-MM-DD, inclusive)",
            value=lambda: datetime.now(UTC).date().isoformat(),
            placeholder="blank = up to now",
            max_lines=1,
            min_width=140,
        )
        ui["classes"] = gr.Dropdown(
            # HAM10000's classes and the loaded model's (its predictor registered them)
            choices=[(history.class_label(c), c) for c in known_codes()],
            multiselect=True,
            label="Top class",
            value=[],
            min_width=200,
        )
    with gr.Row():
        ui["min_prob"] = gr.Slider(
            0.0, 1.0, value=0.0, step=0.05, label="Minimum top-class probability", min_width=200
        )
        ui["sex"] = gr.Dropdown(
            choices=[views.ANY, *SEXES], value=views.ANY, label="Sex", min_width=120
        )
        ui["site"] = gr.Dropdown(
            choices=[views.ANY, *SITES], value=views.ANY, label="Body site", min_width=120
        )
    return ui


# --- binding handlers to components --------------------------------------------------------------


def bind(handler: Callable[..., Values], service: PredictionService, ui: Components, *extra: Any):
    """``handler(service, *extra, *inputs) → {name: value}`` as a Gradio callback returning
    ``{component: value}``."""

    def callback(*inputs: Any) -> dict[Any, Any]:
        return {ui[name]: value for name, value in handler(service, *extra, *inputs).items()}

    callback.__name__ = handler.__name__
    return callback


def bind_plain(handler: Callable[..., Values], ui: Components):
    """Like :func:`bind` for a handler that needs no service."""

    def callback(*inputs: Any) -> dict[Any, Any]:
        return {ui[name]: value for name, value in handler(*inputs).items()}

    callback.__name__ = handler.__name__
    return callback
