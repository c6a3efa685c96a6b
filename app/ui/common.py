"""What several tabs share: error pop-ups, prediction ids, output files, export folders, the
history filters and the ``{name: value}`` → ``{component: value}`` binding.

Handlers are plain functions ``(service, inputs...) → {name: value}``, testable without a
server; :func:`bind` maps those names onto a tab's components (a dict keyed by component, so no
positional tuples). ``DermError`` messages become ``gr.Error`` pop-ups with a title, so a user
never sees a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from gradio import processing_utils
from gradio.utils import get_upload_folder
from gradio_client import utils as client_utils

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

#: Predictions running at once (``python -m app --concurrency``). Measured on 2 cores
#: (docs/benchmarks.md): 2 beats 1 (decoding, rendering and storing one request overlap the other's
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
#: Example images (HAM10000 test split, CC BY-NC 4.0) shown in the Analyse tab's gallery.
EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"


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


def parse_prediction_id(value: Any) -> int:
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


class RecordFiles:
    """The files this app wrote or received for each stored prediction, so that deleting the
    prediction deletes them too: uploads (in Gradio's upload cache), the result and history
    panels (:func:`output_file`), case-report PDFs and CSVs (in the export folder, plus the copy
    Gradio serves from its cache). The row and its bytes in the database are the service's
    (:meth:`service.prediction.PredictionService.delete`).

    In memory, per running app: files of an earlier run are gone already (Gradio empties its
    cache when the server stops). A record deleted by another process (``query_history
    --delete``, another app server on the same database) keeps this app's files until the next
    History search here (:meth:`remove_deleted`), Gradio's cache clean-up
    (:data:`app.ui.demo.CACHE_LIFETIME`) or a restart, whichever comes first."""

    #: Entries whose files are all gone (Gradio's clean-up) are dropped every this many adds.
    SWEEP_EVERY = 512

    def __init__(self) -> None:
        self._paths: dict[int, set[str]] = {}
        self._listings: set[str] = set()
        self._lock = threading.Lock()
        self._adds = 0

    def add(self, prediction_id: int | None, *paths: str | None) -> None:
        """Remember ``paths`` (and the copy Gradio will serve of each) as files of one record."""
        if prediction_id is None:
            return
        found = {f for p in paths if p for f in _with_served_copy(p)}
        if not found:
            return
        with self._lock:
            self._paths.setdefault(int(prediction_id), set()).update(found)
            self._adds += 1
            if self._adds % self.SWEEP_EVERY == 0:
                self._sweep()

    def add_listing(self, path: str) -> None:
        """A download listing many records (the History CSV): removed when any record is."""
        with self._lock:
            self._listings.update(_with_served_copy(path))

    def paths(self, prediction_id: int) -> set[str]:
        with self._lock:
            return set(self._paths.get(int(prediction_id), ())) | set(self._listings)

    def remove(self, prediction_id: int) -> list[str]:
        """Delete every file remembered for ``prediction_id`` and every listing; returns the
        paths deleted. Files that are shared with the example gallery are kept (public images)."""
        with self._lock:
            paths = self._paths.pop(int(prediction_id), set()) | self._listings
            self._listings = set()
        removed = []
        cache = Path(get_upload_folder()).resolve()
        for name in sorted(paths):
            path = Path(name)
            if _is_example_copy(path):
                continue
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(name)
            parent = path.parent.resolve()
            if cache in parent.parents or parent.parent.name.startswith(EXPORT_PREFIX):
                with contextlib.suppress(OSError):
                    parent.rmdir()  # Gradio's per-file folder / a report's folder, when empty
        return removed

    def remove_deleted(self, service: PredictionService) -> list[str]:
        """:meth:`remove` the files of every remembered record the database no longer holds
        (deleted by another process); returns the paths deleted."""
        with self._lock:
            ids = list(self._paths)
        gone = set(ids) - service.existing(ids)
        return [path for pid in sorted(gone) for path in self.remove(pid)]

    def _sweep(self) -> None:
        for pid in [p for p, files in self._paths.items() if not any(map(os.path.exists, files))]:
            del self._paths[pid]


_REGISTRIES: weakref.WeakKeyDictionary[PredictionService, RecordFiles] = weakref.WeakKeyDictionary()
_REGISTRIES_LOCK = threading.Lock()


def record_files(service: PredictionService) -> RecordFiles:
    """The :class:`RecordFiles` of ``service`` (one per service: two apps on two databases in
    one process never delete each other's files)."""
    with _REGISTRIES_LOCK:
        files = _REGISTRIES.get(service)
        if files is None:
            files = _REGISTRIES[service] = RecordFiles()
        return files


def served_copy(path: str | Path) -> Path | None:
    """Where Gradio serves ``path`` from: the file itself when it is in Gradio's cache, else
    the copy Gradio makes there (``<cache>/<sha256 of the bytes>/<name>``, see
    ``gradio.processing_utils.save_file_to_cache``); None when ``path`` is unreadable."""
    path = Path(path)
    cache = Path(get_upload_folder()).resolve()
    resolved = path.resolve()
    if cache in resolved.parents:
        return resolved
    try:
        digest = processing_utils.hash_file(resolved)
    except OSError:
        return None
    return cache / digest / client_utils.strip_invalid_filename_characters(path.name)


def _with_served_copy(path: str) -> set[str]:
    copy = served_copy(path)
    return {str(Path(path)), *([str(copy)] if copy is not None else [])}


@functools.cache
def _example_copies(cache: str) -> frozenset[Path]:
    """Gradio's cached copies (in ``cache``) of the example images: the gallery shows them and a
    record made from an example shares that file, which is public data and must stay served."""
    found = set()
    for example in EXAMPLES_DIR.glob("*"):
        if example.suffix.lower() in (".jpg", ".jpeg", ".png"):
            copy = served_copy(example)
            if copy is not None:
                found.add(copy)
    return frozenset(found)


def _is_example_copy(path: Path) -> bool:
    return path.resolve() in _example_copies(str(get_upload_folder()))


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


def case_report(service: PredictionService, exports: Path, prediction_id: Any) -> Values:
    """The one-page PDF of a stored prediction, written to the export folder (Analyse and
    History both offer it) and remembered for deletion (:class:`RecordFiles`)."""
    pid = parse_prediction_id(prediction_id)
    with shown_as_errors("making the case report", "Cannot make the case report"):
        record = service.get(pid)
        if record is None:
            raise DermError(f"No stored prediction has id {pid}.")
        prune(exports)
        folder = exports / uuid.uuid4().hex[:8]
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / report_filename(record)
        out.write_bytes(case_report_pdf(record))
    record_files(service).add(pid, str(out))
    return {"report": str(out)}


# --- dropdowns: an exact match wins -------------------------------------------------------------

#: CSS class of the dropdowns whose Enter key :data:`EXACT_CHOICE_JS` corrects.
EXACT_CHOICE = "exact-choice"
#: Gradio 6's dropdown filters its options by substring and Enter takes the first one left, so
#: "male" + Enter picks "female". This page script (run once on load) makes Enter pick the
#: option whose label (or the code in its brackets, ``Melanoma (mel)``) equals the typed text;
#: with no exact match and several options left Enter picks nothing (the list stays open),
#: and a text matching no option is kept as typed, for the service to refuse with a message.
#: Arrow keys then Enter still pick the highlighted option.
EXACT_CHOICE_JS = r"""
() => {
  if (window.dermfusionExactChoice) return;
  window.dermfusionExactChoice = true;
  const norm = (s) => (s || "").replace(/\u2713/g, "").trim().toLowerCase();
  document.addEventListener("keydown", (e) => {
    const input = e.target;
    if (!(input instanceof HTMLInputElement)) return;
    const box = input.closest(".%(cls)s");
    if (!box) return;
    if (["ArrowDown", "ArrowUp", "Home", "End"].includes(e.key)) {
      input.dataset.arrowed = "1";
      return;
    }
    if (e.key !== "Enter") { delete input.dataset.arrowed; return; }
    if (input.dataset.arrowed) return;
    const typed = norm(input.value);
    if (!typed) return;
    const options = [...box.querySelectorAll("li[role=option]")];
    const code = (label) => (label.match(/\(([^()]*)\)\s*$/) || [])[1];
    const exact = options.find((li) => {
      const label = norm(li.getAttribute("aria-label") || li.textContent);
      return label === typed || norm(code(label)) === typed;
    });
    if (exact) {
      e.preventDefault();
      e.stopImmediatePropagation();
      exact.dispatchEvent(new MouseEvent("mousedown", { bubbles: true, cancelable: true }));
      input.blur();
    } else if (options.length > 1) {
      e.preventDefault();
      e.stopImmediatePropagation();
    }
  }, true);
}
""".replace("%(cls)s", EXACT_CHOICE)


def choice_dropdown(
    choices: list[Any], value: Any, label: str, min_width: int = 120
) -> gr.Dropdown:
    """A single-choice dropdown where typing works as a person expects: Enter picks the exact
    match (:data:`EXACT_CHOICE_JS`) and a typed value is kept as typed (``allow_custom_value``),
    so one that matches no option is refused by the service with its message, never silently
    replaced by another option."""
    return gr.Dropdown(
        choices=choices,
        value=value,
        label=label,
        allow_custom_value=True,
        min_width=min_width,
        elem_classes=[EXACT_CHOICE],
    )


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
        # blank, not today's date: a value computed per page load would be a public API
        # endpoint of its own (/lambda_N), and a page left open past midnight would hide new rows
        ui["until"] = gr.Textbox(
            label="To (YYYY-MM-DD, inclusive)",
            value="",
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
        # a typed value nothing matches is refused by HistoryFilter with its message
        ui["sex"] = choice_dropdown([views.ANY, *SEXES], views.ANY, "Sex")
        ui["site"] = choice_dropdown([views.ANY, *SITES], views.ANY, "Body site")
    return ui


# --- binding handlers to components --------------------------------------------------------------


def _named_like(callback: Callable, handler: Callable, bound: int) -> Callable:
    """Give ``callback`` the name and the parameters of ``handler`` less its first ``bound``
    ones, so the API shows ``image, age, sex, ...`` instead of ``param_0, param_1, ...``
    (Gradio names an endpoint's parameters after its function's signature)."""
    params = list(inspect.signature(handler).parameters.values())[bound:]
    callback.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [p.replace(annotation=inspect.Parameter.empty) for p in params]
    )
    callback.__name__ = handler.__name__
    callback.__doc__ = handler.__doc__
    return callback


def bind(handler: Callable[..., Values], service: PredictionService, ui: Components, *extra: Any):
    """``handler(service, *extra, *inputs) → {name: value}`` as a Gradio callback returning
    ``{component: value}``, with the handler's own parameter names."""

    def callback(*inputs: Any) -> dict[Any, Any]:
        return {ui[name]: value for name, value in handler(service, *extra, *inputs).items()}

    return _named_like(callback, handler, 1 + len(extra))


def bind_plain(handler: Callable[..., Values], ui: Components):
    """Like :func:`bind` for a handler that needs no service."""

    def callback(*inputs: Any) -> dict[Any, Any]:
        return {ui[name]: value for name, value in handler(*inputs).items()}

    return _named_like(callback, handler, 0)
