"""The Gradio user interface: one ``build_*_ui()`` per tab, wired to module-level handlers.

Every decision — validating inputs, predicting, flagging, warning, storing, filtering history —
is made below the UI: :class:`data_pipeline.request.PredictionRequest` validates,
:class:`service.prediction.PredictionService` predicts and stores, :mod:`service.history`
serialises rows. Handlers here are plain functions ``(service, inputs...) → {name: value}``,
testable without a server; :func:`_bind` maps those names onto the tab's components (a dict keyed
by component, so no positional tuples). ``DermError`` messages become ``gr.Error`` pop-ups, so a
user never sees a traceback.

    demo = make_frontend(PredictionService.create(checkpoint, db_url))
    demo.launch()            # or: python -m app
"""

from __future__ import annotations

import atexit
import contextlib
import csv
import logging
import os
import re
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gradio as gr

from app import views
from common.errors import DermError
from common.text import DISCLAIMER, echo
from data_pipeline.request import PredictionRequest
from data_pipeline.schema import CLASSES, SEXES, SITES, UNKNOWN
from db.models import PredictionRecord
from db.queries import HistoryFilter
from service import history
from service.prediction import PredictionService, StorageError, StoredPrediction
from service.render import (
    contributions_chart,
    enlarge,
    heatmap_from_png,
    overlay_heatmap,
    thumbnail_from_jpeg,
)

log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
TITLE = "DermFusion — dermoscopy lesion classifier"
#: Rows shown in the History table (the CSV download holds every matching row).
HISTORY_PAGE = 200
#: Rows fetched per database query while writing the CSV download.
CSV_PAGE = 500
#: CSV exports older than this many seconds are deleted at the next search.
EXPORT_MAX_AGE_S = 3600
#: Export folders are ``<tmp>/dermfusion-history-<pid>-<random>``; see :func:`clean_stale_exports`.
EXPORT_PREFIX = "dermfusion-history-"
#: Analyses run one at a time (the model is serialised anyway); history reads may overlap.
PREDICT_CONCURRENCY = 1
DEFAULT_CONCURRENCY = 4
#: Requests waiting in the queue before new ones are refused.
QUEUE_SIZE = 64

CSS = """
#disclaimer { border: 2px solid #b45309; border-radius: 8px; padding: 4px 14px;
              background: #fffbeb; color: #78350f; }
#disclaimer p { margin: 6px 0; }
#alerts { border-left: 6px solid #b91c1c; padding-left: 12px; }
"""

NO_IMAGE = (
    "No image was submitted: upload a dermoscopy image (JPEG, PNG, TIFF, ...), take one with the "
    "webcam or paste one from the clipboard, then press Analyse."
)
RESULTS_PLACEHOLDER = "Results appear here after you press **Analyse**."

Components = dict[str, Any]
Values = dict[str, Any]


# --- errors --------------------------------------------------------------------------------------


def _user_error(exc: Exception, title: str) -> gr.Error:
    return gr.Error(str(exc), title=title, print_exception=False)


def _unexpected(exc: Exception, what: str) -> gr.Error:
    log.exception("unexpected error while %s", what)
    return gr.Error(
        f"Unexpected error while {what} ({type(exc).__name__}). Nothing is wrong with your input "
        "as far as the app can tell; the details are in the server log.",
        title="Internal error",
        print_exception=False,
    )


@contextlib.contextmanager
def _shown_as_errors(what: str, title: str) -> Iterator[None]:
    """``DermError`` (bad input, database down / locked / read-only) → its own message;
    anything else → a generic message, with the traceback in the server log only."""
    try:
        yield
    except gr.Error:
        raise
    except DermError as exc:
        raise _user_error(exc, title) from None
    except Exception as exc:  # never a traceback in the UI
        raise _unexpected(exc, what) from None


# --- Diagnose ------------------------------------------------------------------------------------


def diagnose(
    service: PredictionService, image: str | None, age: Any, sex: Any, site: Any
) -> Values:
    """Validate, predict, store; a storage failure still shows the prediction, with a warning."""
    if image is None or (isinstance(image, str) and not image.strip()):
        raise gr.Error(NO_IMAGE, title="No image", print_exception=False)
    storage_problem = None
    with _shown_as_errors("analysing the image", "Cannot analyse this input"):
        request = PredictionRequest.build(image, age, sex, site, name=Path(image).name)
        try:
            stored = service.predict_and_store(request)
        except StorageError as exc:
            if exc.prediction is None:
                raise
            storage_problem = str(exc)
            stored = StoredPrediction(id=None, prediction=exc.prediction, stored=False)
    pred = stored.prediction
    alerts = views.alerts_markdown(pred)
    if storage_problem:
        gr.Warning(storage_problem, title="Not saved to history")
        alerts = f"**⚠️ Not saved to history:** {storage_problem}\n\n{alerts}"
    shown = pred.image
    if shown is not None and pred.heatmap is not None:
        shown = overlay_heatmap(shown, pred.heatmap)
    return {
        "probabilities": views.label_value(pred.probabilities),
        "alerts": alerts,
        "heatmap": enlarge(shown),
        "chart": contributions_chart(
            pred.metadata_contributions, pred.attribution_target or pred.top_class
        ),
        "info": views.result_markdown(stored),
        "result": {
            "prediction_id": stored.id,
            "stored": stored.stored,
            "storage_error": storage_problem,
            **pred.to_dict(),
        },
    }


def _read_examples() -> list[list[Any]]:
    """Example rows [image, age, sex, site] from ``examples/examples.csv``."""
    index = EXAMPLES_DIR / "examples.csv"
    if not index.is_file():
        return []
    rows = []
    with index.open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            path = EXAMPLES_DIR / r["file"]
            if path.is_file():
                age = (r.get("age") or "").strip()
                sex, site = r.get("sex") or UNKNOWN, r.get("localization") or UNKNOWN
                rows.append([str(path), age, sex, site])
    return rows


def _pass_upload_through(image: gr.Image) -> gr.Image:
    """Make ``image`` hand the uploaded file's path to our own decoder untouched.

    ``gr.Image(type="filepath")`` still opens every upload with PIL first, so a corrupt file, a
    non-image or a decompression bomb fails inside Gradio with a generic error before
    ``data_pipeline.images`` can explain it (and a mode conversion could hide CMYK / 16-bit data
    from it). The override is per instance: subclassing a Gradio component would make Gradio
    write a ``.pyi`` stub next to this module at import time.
    """
    default = image.preprocess

    def preprocess(payload: Any) -> Any:
        if payload is None:
            return None
        url = getattr(payload, "url", None) or ""
        if getattr(payload, "path", None) and not url.startswith("data:"):
            return str(payload.path)
        try:  # base64 data URLs (some webcam / clipboard paths)
            return default(payload)
        except Exception:  # any decoding failure gets the same clear message
            raise gr.Error(
                "The submitted image data could not be read; save it as a file and upload it.",
                print_exception=False,
            ) from None

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image


def _diagnose_inputs() -> Components:
    ui: Components = {}
    ui["image"] = _pass_upload_through(
        gr.Image(
            label="Dermoscopy image",
            type="filepath",
            image_mode=None,
            sources=["upload", "webcam", "clipboard"],
            height=300,
        )
    )
    with gr.Row():
        # A Textbox, not gr.Number: Gradio 6 shows and submits an empty Number as 0, which
        # would silently record "age 0" for "unknown".
        ui["age"] = gr.Textbox(
            label="Age (years, optional)",
            value="",
            max_lines=1,
            placeholder="blank = unknown",
            info="0–120",
        )
        ui["sex"] = gr.Dropdown(
            choices=list(SEXES), value=UNKNOWN, label="Sex", allow_custom_value=True
        )
        ui["site"] = gr.Dropdown(
            choices=list(SITES), value=UNKNOWN, label="Body site", allow_custom_value=True
        )
    return ui


def _shown_image(label: str, height: int, elem_id: str | None = None) -> gr.Image:
    """A read-only image output (an RGB array, served as PNG)."""
    return gr.Image(
        label=label, type="numpy", format="png", interactive=False, height=height, elem_id=elem_id
    )


def _diagnose_outputs() -> Components:
    """The six outputs of ``/predict``, in the API's order."""
    ui: Components = {}
    ui["alerts"] = gr.Markdown(RESULTS_PLACEHOLDER, elem_id="alerts", label="Alerts")
    ui["probabilities"] = gr.Label(
        label="Calibrated probabilities", num_top_classes=len(CLASSES), elem_id="probabilities"
    )
    ui["info"] = gr.Markdown(label="Model and storage", elem_id="result-info")
    ui["heatmap"] = _shown_image("Grad-CAM heatmap (where the model looked)", 320, "heatmap")
    ui["chart"] = _shown_image("Metadata contributions", 240, "contributions")
    with gr.Accordion("Full result (JSON, as returned by the API)", open=False):
        ui["result"] = gr.JSON(label="Result")
    return ui


#: Output order of the ``/predict`` API (the README's client snippet unpacks it in this order).
PREDICT_OUTPUTS = ("probabilities", "alerts", "heatmap", "chart", "info", "result")


def build_diagnose_ui(service: PredictionService) -> Components:
    """The Diagnose tab: inputs, examples, results; the ``/predict`` endpoint."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=1):
            inputs = _diagnose_inputs()
            with gr.Row():
                clear = gr.ClearButton(value="Clear")
                submit = gr.Button("Analyse", variant="primary")
            examples = _read_examples()
            if examples:
                gr.Examples(
                    examples=examples,
                    inputs=list(inputs.values()),
                    label="Examples (HAM10000 test-split images, CC BY-NC 4.0; "
                    "ground truth in app/examples/README.md)",
                    examples_per_page=8,
                )
        with gr.Column(scale=1):
            outputs = _diagnose_outputs()
    submit.click(
        _bind(diagnose, service, outputs),
        inputs=list(inputs.values()),
        outputs=[outputs[k] for k in PREDICT_OUTPUTS],
        api_name="predict",
        api_description="Classify a dermoscopy image (+ optional age, sex, body site) "
        "and store the prediction in the history database.",
        concurrency_limit=PREDICT_CONCURRENCY,
    )
    clear.add([inputs["image"], inputs["age"], *(outputs[k] for k in PREDICT_OUTPUTS)])
    clear.click(
        lambda: {
            inputs["sex"]: UNKNOWN,
            inputs["site"]: UNKNOWN,
            outputs["alerts"]: RESULTS_PLACEHOLDER,
        },
        outputs=[inputs["sex"], inputs["site"], outputs["alerts"]],
        api_visibility="private",
    )
    return {**inputs, **outputs}


# --- History -------------------------------------------------------------------------------------


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


def _prune(folder: Path, max_age_s: float = EXPORT_MAX_AGE_S) -> None:
    """Delete old CSV exports (Gradio serves its own copy from its cache)."""
    cutoff = time.time() - max_age_s
    for old in folder.glob("*.csv"):
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < cutoff:
                old.unlink()


def _all_matching(service: PredictionService, f: HistoryFilter) -> Iterator[PredictionRecord]:
    """Every matching row, newest first, a page at a time (bounded memory)."""
    offset = 0
    while True:
        page = service.history(f, limit=CSV_PAGE, offset=offset, images=False)
        yield from page
        if len(page) < CSV_PAGE:
            return
        offset += CSV_PAGE


def search_history(
    service: PredictionService,
    exports: Path,
    since: Any,
    until: Any,
    classes: Any,
    min_prob: Any,
    sex: Any,
    site: Any,
) -> Values:
    """The filtered table (newest :data:`HISTORY_PAGE` rows), a summary and the full CSV."""
    with _shown_as_errors("searching the history", "Cannot search the history"):
        f = views.history_filter(since, until, classes, min_prob, sex, site)
        total = service.count(f)
        shown = service.history(f, limit=HISTORY_PAGE, images=False)
        _prune(exports)
        out = exports / f"dermfusion_history_{uuid.uuid4().hex[:8]}.csv"
        history.write_csv(_all_matching(service, f), out)
    if total == 0:
        summary = f"No stored predictions match ({f.describe()})."
    else:
        more = f"; newest {len(shown)} shown, all in the CSV" if len(shown) < total else ""
        summary = f"**{total}** matching predictions ({f.describe()}{more})."
    return {
        "table": [history.table_row(r) for r in shown],
        "summary": summary,
        "download": str(out),
    }


def show_record(service: PredictionService, prediction_id: Any) -> Values:
    """One stored prediction: its image with the heatmap, its details and probabilities."""
    if isinstance(prediction_id, str):
        prediction_id = prediction_id.strip().lstrip("#")
    if prediction_id is None or prediction_id == "":
        raise gr.Error(
            "Enter a prediction id (the # shown after each analysis).",
            title="No id",
            print_exception=False,
        )
    try:
        pid = int(prediction_id)
    except (TypeError, ValueError, OverflowError):
        raise gr.Error(
            f"Prediction id {echo(prediction_id)} is not a whole number.",
            title="Bad id",
            print_exception=False,
        ) from None
    with _shown_as_errors("reading the history", "Cannot open this prediction"):
        record = service.get(pid)
    if record is None:
        raise gr.Error(
            f"No stored prediction has id {pid}.", title="Not found", print_exception=False
        )
    image = thumbnail_from_jpeg(record.thumbnail)
    heat = heatmap_from_png(record.heatmap_png)
    if image is not None and heat is not None:
        image = overlay_heatmap(image, heat)
    return {
        "pick_id": str(pid),
        "detail_image": enlarge(image),
        "detail": history.detail_markdown(record),
        "detail_probabilities": views.label_value(record.probabilities or {}),
    }


def _history_filters() -> Components:
    ui: Components = {}
    with gr.Row():
        ui["since"] = gr.Textbox(label="From (YYYY-MM-DD)", placeholder="2025-01-01")
        ui["until"] = gr.Textbox(label="To (YYYY-MM-DD, inclusive)", placeholder="2025-12-31")
        ui["classes"] = gr.Dropdown(
            choices=[(history.class_label(c), c) for c in CLASSES],
            multiselect=True,
            label="Top class",
            value=[],
        )
    with gr.Row():
        ui["min_prob"] = gr.Slider(
            0.0, 1.0, value=0.0, step=0.05, label="Minimum top-class probability"
        )
        ui["sex"] = gr.Dropdown(choices=[views.ANY, *SEXES], value=views.ANY, label="Sex")
        ui["site"] = gr.Dropdown(choices=[views.ANY, *SITES], value=views.ANY, label="Body site")
    return ui


def _history_listing() -> tuple[Components, gr.Button]:
    ui: Components = {}
    with gr.Row():
        search_btn = gr.Button("Search", variant="primary")
        ui["download"] = gr.DownloadButton("Download CSV", value=None, variant="secondary")
    ui["summary"] = gr.Markdown(label="Summary", elem_id="history-summary")
    ui["table"] = gr.Dataframe(
        headers=history.TABLE_COLUMNS,
        datatype=history.TABLE_TYPES,
        interactive=False,
        label="Predictions (click a row to open it)",
        elem_id="history-table",
        max_height=420,
        wrap=True,
    )
    return ui, search_btn


def _history_detail() -> tuple[Components, gr.Button]:
    ui: Components = {}
    with gr.Row():
        ui["pick_id"] = gr.Textbox(
            label="Prediction id", value="", max_lines=1, placeholder="e.g. 12", scale=1
        )
        show_btn = gr.Button("Show prediction", scale=1)
    with gr.Row(equal_height=False):
        ui["detail_image"] = _shown_image("Stored image with heatmap", 300)
        with gr.Column():
            ui["detail"] = gr.Markdown(label="Stored prediction", elem_id="history-detail")
            ui["detail_probabilities"] = gr.Label(
                label="Stored probabilities", num_top_classes=len(CLASSES)
            )
    return ui, show_btn


#: Input and output order of the ``/history`` and ``/history_item`` APIs.
HISTORY_INPUTS = ("since", "until", "classes", "min_prob", "sex", "site")
HISTORY_OUTPUTS = ("table", "summary", "download")
DETAIL_OUTPUTS = ("pick_id", "detail_image", "detail", "detail_probabilities")


def build_history_ui(service: PredictionService, exports: Path) -> tuple[Components, Callable]:
    """The History tab: filters, table, CSV download and one row's detail; the ``/history``
    and ``/history_item`` endpoints. Returns the components and the search handler (run when
    the tab is selected)."""
    gr.Markdown(
        "Past predictions stored by this app, newest first. Filter, click a row (or type its "
        "id) to see it, or download the matching rows as CSV."
    )
    filters = _history_filters()
    listing, search_btn = _history_listing()
    detail, show_btn = _history_detail()
    search = _bind(search_history, service, listing, exports)
    filter_inputs = [filters[k] for k in HISTORY_INPUTS]
    listing_outputs = [listing[k] for k in HISTORY_OUTPUTS]
    search_btn.click(search, inputs=filter_inputs, outputs=listing_outputs, api_name="history")
    show = _bind(show_record, service, detail)
    detail_outputs = [detail[k] for k in DETAIL_OUTPUTS]
    show_btn.click(show, inputs=detail["pick_id"], outputs=detail_outputs, api_name="history_item")
    detail["pick_id"].submit(
        show, inputs=detail["pick_id"], outputs=detail_outputs, api_visibility="private"
    )

    def pick_row(evt: gr.SelectData) -> Values:
        row = evt.row_value or []
        if not row or row[0] in (None, ""):
            raise gr.Error("That row has no prediction id.", print_exception=False)
        return show(row[0])

    listing["table"].select(pick_row, outputs=detail_outputs, api_visibility="private")
    return {**filters, **listing, **detail}, search


# --- About and the whole app ----------------------------------------------------------------------


def build_about_ui(service: PredictionService) -> Components:
    """The About tab: the model card, built from the checkpoint's own config."""
    predictor = service.predictor
    card = views.model_card_markdown(predictor.config, getattr(predictor, "folder", None))
    return {"model_card": gr.Markdown(card, elem_id="model-card")}


def _bind(handler: Callable[..., Values], service: PredictionService, ui: Components, *extra: Any):
    """``handler(service, *extra, *inputs) → {name: value}`` as a Gradio callback returning
    ``{component: value}``."""

    def callback(*inputs: Any) -> dict[Any, Any]:
        return {ui[name]: value for name, value in handler(service, *extra, *inputs).items()}

    callback.__name__ = handler.__name__
    return callback


def make_frontend(service: PredictionService) -> gr.Blocks:
    """Build the three-tab app around ``service`` (not launched; see :mod:`app.__main__`)."""
    clean_stale_exports()
    # CSV exports; the folder lives as long as the app (and is removed by the next app start
    # if this process is killed).
    exports = Path(tempfile.mkdtemp(prefix=f"{EXPORT_PREFIX}{os.getpid()}-"))
    # delete_cache: every hour, drop uploads and results older than a day from Gradio's cache.
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"# {TITLE}")
        gr.Markdown(
            f"**{DISCLAIMER}** The model estimates probabilities for {len(CLASSES)} lesion "
            f"classes, learnt from {views.training_dataset_name(service.predictor.config)}; it "
            "cannot tell whether a lesion is harmless. See a doctor about any lesion that "
            "worries you.",
            elem_id="disclaimer",
        )
        with gr.Tabs():
            with gr.Tab("Diagnose", id="diagnose"):
                build_diagnose_ui(service)
            with gr.Tab("History", id="history") as history_tab:
                ui, search = build_history_ui(service, exports)
                history_tab.select(
                    search,
                    inputs=[ui[k] for k in HISTORY_INPUTS],
                    outputs=[ui[k] for k in HISTORY_OUTPUTS],
                    api_visibility="private",
                )
            with gr.Tab("About", id="about"):
                build_about_ui(service)
    demo.queue(default_concurrency_limit=DEFAULT_CONCURRENCY, max_size=QUEUE_SIZE)
    atexit.register(shutil.rmtree, exports, ignore_errors=True)
    return demo
