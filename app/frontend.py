"""The Gradio user interface: one ``build_*_ui()`` per tab, wired to module-level handlers.

Tabs: **Analyse** (one image), **Batch** (many images, optional metadata CSV), **History**
(browse, confirm a diagnosis, case report, delete), **Agreement** (model vs confirmed diagnoses)
and **About** (model card and evaluation plots).

Every decision — validating inputs, predicting, flagging, warning, storing, filtering history,
agreement — is made below the UI: :class:`data_pipeline.request.PredictionRequest` validates,
:class:`service.prediction.PredictionService` predicts, stores, confirms and deletes,
:mod:`service.batch` runs batches through that same service, :mod:`service.agreement` computes
agreement, :mod:`service.report` draws the case report, :mod:`service.history` serialises rows.
Handlers here are plain functions ``(service, inputs...) → {name: value}``, testable without a
server; :func:`_bind` maps those names onto the tab's components (a dict keyed by component, so no
positional tuples). ``DermError`` messages become ``gr.Error`` pop-ups with a title, so a user
never sees a traceback.

Stable API names: ``/predict``, ``/batch``, ``/history``, ``/history_item``, ``/confirm``,
``/report``, ``/delete``, ``/agreement``.

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
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from gradio.utils import get_upload_folder

from app import views
from common.errors import DermError
from common.text import DISCLAIMER, echo
from data_pipeline.images import read_image
from data_pipeline.request import PredictionRequest
from data_pipeline.schema import CLASS_NAMES, CLASSES, SEXES, SITES, UNKNOWN, Metadata
from db.models import CONFIRM_SOURCES, PredictionRecord
from db.queries import HistoryFilter, confirmed_dx_choices
from service import agreement as agreement_view
from service import batch as batch_service
from service import history
from service.prediction import PredictionService, StorageError, StoredPrediction
from service.render import (
    chart_png,
    contributions_chart,
    display_jpeg,
    heatmap_from_png,
    side_by_side,
    thumbnail_from_jpeg,
)
from service.report import case_report_pdf, report_filename

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
#: Predictions running at once (``python -m app --concurrency``). Measured on 2 cores (README,
#: Benchmarks): 2 beats 1 (decoding, rendering and storing one request overlap the other's
#: inference) and 4 only adds contention.
PREDICT_CONCURRENCY = 2
#: Re-explaining a result and batches run one at a time, so they never crowd out /predict.
SERIAL_CONCURRENCY = 1
#: Events without a limit of their own (history reads, reports) may overlap this much.
DEFAULT_CONCURRENCY = 4
#: Requests allowed to wait, all events together (``--max-queue``): 50 users pressing Analyse at
#: once all get an answer; beyond it new requests are refused with :data:`BUSY_MESSAGE`.
QUEUE_SIZE = 64
BUSY_MESSAGE = "The demo is busy, try again in a moment."
#: Seconds between the queue-position updates sent to waiting users. Gradio's default ("auto")
#: sends every waiting user an update each time any job finishes: with 50 users waiting that is
#: 50 messages per prediction, CPU the 2-core server needs for the predictions themselves.
STATUS_UPDATE_S = 1.0
#: Gradio's cache clean-up (every N s, files older than M s): hourly / a day when images are
#: stored; with --no-store-images every minute, and each request deletes its own uploads at once.
CACHE_LIFETIME = (3600, 86400)
CACHE_LIFETIME_NO_IMAGES = (60, 60)
#: Heatmap opacity shown before the slider is moved.
DEFAULT_OPACITY = 0.45
#: Evaluation plots shown in the About tab: (file in the checkpoint folder, caption).
EVALUATION_PLOTS = (
    ("eval_confusion_matrix.png", "Confusion matrix (test split)"),
    ("eval_roc.png", "ROC curves, one vs rest (test split)"),
    ("eval_reliability.png", "Reliability diagram (test split)"),
)

CSS = """
#disclaimer { border: 2px solid #b45309; border-radius: 8px; padding: 4px 14px;
              background: #fffbeb; color: #78350f; }
#disclaimer p { margin: 6px 0; }
.alert { border-radius: 6px; padding: 8px 12px; margin: 6px 0; line-height: 1.35;
         border-left: 6px solid; }
.alert-danger { background: #fef2f2; border-color: #b91c1c; color: #7f1d1d; }
.alert-warn { background: #fffbeb; border-color: #d97706; color: #78350f; }
.alert-info { background: #f1f5f9; border-color: #94a3b8; color: #1e293b; }
.alert-footer { color: #475569; font-size: 0.9em; margin-top: 4px; }
.prob-chart { display: flex; flex-direction: column; gap: 5px; padding: 4px 2px; }
.prob-row { display: grid; grid-template-columns: minmax(0, 15em) 1fr 3.6em;
            align-items: center; gap: 8px; font-size: 0.92em; }
.prob-name { overflow-wrap: anywhere; }
.prob-track { background: #e2e8f0; border-radius: 4px; height: 14px; overflow: hidden; }
.prob-bar { display: block; height: 100%; border-radius: 4px; }
.prob-value { text-align: right; font-variant-numeric: tabular-nums; }
.prob-legend { font-size: 0.8em; color: #475569; margin-top: 4px; }
#history-table img, #batch-table img { max-height: 48px; max-width: 64px; border-radius: 4px; }
#examples .caption-label { font-size: 0.75em; }
@media (max-width: 600px) {
  .prob-row { grid-template-columns: minmax(0, 9.5em) 1fr 3.2em; font-size: 0.85em; }
  .gradio-container { padding-left: 6px !important; padding-right: 6px !important; }
}
"""

NO_IMAGE = (
    "No image was submitted: upload a dermoscopy image (JPEG, PNG, TIFF, ...), take one with the "
    "webcam or paste one from the clipboard, then press Analyse."
)
RESULTS_PLACEHOLDER = (
    '<div class="alert alert-info">Results appear here after you press <b>Analyse</b>.</div>'
)
TOP_CLASS = "top"  # the "explain" choice meaning: the predicted class

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


def _prediction_id(value: Any) -> int:
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


def _forget_uploads(service: PredictionService, paths: Iterable[Any]) -> None:
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


#: Name prefix of the output images :func:`output_file` writes into Gradio's cache.
OUTPUT_PREFIX = "dermfusion-"


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


# --- Analyse -------------------------------------------------------------------------------------


def _target(value: Any) -> str | None:
    return None if value in (None, "", TOP_CLASS) else str(value)


def _opacity(value: Any) -> float:
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        return DEFAULT_OPACITY
    return min(1.0, max(0.0, alpha))


def _explanation_values(pred: Any, alpha: float) -> Values:
    """Heatmap (original | overlay | colour scale), metadata chart and the view state."""
    target = pred.attribution_target or pred.top_class
    return {
        "heatmap": output_file(side_by_side(pred.image, pred.heatmap, alpha)),
        "chart": output_file(
            contributions_chart(pred.metadata_contributions, target, pred.metadata), "chart"
        ),
        "view": {"image": pred.image, "heatmap": pred.heatmap, "target": target},
    }


def analyse(
    service: PredictionService,
    image: str | None,
    age: Any,
    sex: Any,
    site: Any,
    target: Any = TOP_CLASS,
    opacity: Any = DEFAULT_OPACITY,
) -> Values:
    """Validate, predict, store; a storage failure still shows the prediction, with a warning."""
    if image is None or (isinstance(image, str) and not image.strip()):
        raise gr.Error(NO_IMAGE, title="No image", print_exception=False)
    storage_problem = None
    try:
        with _shown_as_errors("analysing the image", "Cannot analyse this input"):
            request = PredictionRequest.build(
                image, age, sex, site, _target(target), name=Path(image).name
            )
            try:
                stored = service.predict_and_store(request)
            except StorageError as exc:
                if exc.prediction is None:
                    raise
                storage_problem = str(exc)
                stored = StoredPrediction(id=None, prediction=exc.prediction, stored=False)
    finally:
        _forget_uploads(service, [image])
    pred = stored.prediction
    if storage_problem:
        gr.Warning(storage_problem, title="Not saved to history")
    values = _explanation_values(pred, _opacity(opacity))
    values["view"]["id"] = stored.id
    return {
        "probabilities": views.probabilities_html(pred.probabilities),
        "alerts": views.alerts_html(pred, storage_problem),
        "info": views.result_markdown(stored),
        "result": {
            "prediction_id": stored.id,
            "stored": stored.stored,
            "storage_error": storage_problem,
            **pred.to_dict(),
        },
        **values,
    }


#: Kept for callers of the old name.
diagnose = analyse


def explain_again(
    service: PredictionService,
    image: str | None,
    age: Any,
    sex: Any,
    site: Any,
    target: Any,
    opacity: Any,
    view: dict[str, Any] | None,
) -> Values:
    """Explain the current result for another class, without storing a second row."""
    if not view or not image or not Path(image).is_file():
        if view and image:  # --no-store-images: the upload was deleted after the analysis
            gr.Warning(
                "The uploaded image is no longer kept; press Analyse again to explain this class.",
                title="Analyse again",
            )
        return {k: gr.skip() for k in ("heatmap", "chart", "view", "explained")}
    with _shown_as_errors("explaining the image", "Cannot explain this class"):
        request = PredictionRequest.build(
            image, age, sex, site, _target(target), name=Path(image).name
        )
        pred = service.explain(request)
    values = _explanation_values(pred, _opacity(opacity))
    values["view"]["id"] = view.get("id")
    name = CLASS_NAMES.get(values["view"]["target"], "")
    values["explained"] = f"Heatmap and metadata chart now explain **{name}** (not re-stored)."
    return values


def redraw_heatmap(view: dict[str, Any] | None, opacity: Any) -> Values:
    """The heatmap at another opacity (no new prediction)."""
    if not view or view.get("image") is None:
        return {"heatmap": gr.skip()}
    alpha = _opacity(opacity)
    return {"heatmap": output_file(side_by_side(view["image"], view.get("heatmap"), alpha))}


def check_upload(image: str | None) -> Values:
    """Flag a file that is not a usable image as soon as it is uploaded (and clear it)."""
    if not image:
        return {"image": gr.skip()}
    try:
        read_image(image, Path(image).name)
    except DermError as exc:
        gr.Warning(str(exc), title="This file cannot be analysed", duration=None)
        return {"image": None}
    return {"image": gr.skip()}


def _read_examples() -> list[dict[str, Any]]:
    """Example images with their inputs and confirmed diagnosis (``examples/examples.csv``)."""
    index = EXAMPLES_DIR / "examples.csv"
    if not index.is_file():
        return []
    kinds = {"histo": "histopathology", "follow_up": "follow-up", "consensus": "consensus"}
    rows = []
    with index.open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            path = EXAMPLES_DIR / r["file"]
            if path.is_file():
                dx = r.get("dx") or ""
                how = kinds.get(r.get("dx_type") or "", r.get("dx_type") or "")
                rows.append(
                    {
                        "image": str(path),
                        "age": (r.get("age") or "").strip(),
                        "sex": r.get("sex") or UNKNOWN,
                        "site": r.get("localization") or UNKNOWN,
                        "caption": history.SHORT_NAMES.get(dx, dx),
                        "confirmed_by": how,
                    }
                )
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


def _analyse_inputs() -> Components:
    ui: Components = {}
    ui["image"] = _pass_upload_through(
        gr.Image(
            label="Dermoscopy image",
            type="filepath",
            image_mode=None,
            sources=["upload", "webcam", "clipboard"],
            height=280,
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
            min_width=120,
        )
        ui["sex"] = gr.Dropdown(
            choices=list(SEXES), value=UNKNOWN, label="Sex", allow_custom_value=True, min_width=120
        )
        ui["site"] = gr.Dropdown(
            choices=list(SITES),
            value=UNKNOWN,
            label="Body site",
            allow_custom_value=True,
            min_width=120,
        )
    ui["target"] = gr.Dropdown(
        choices=[("Top class (default)", TOP_CLASS)]
        + [(history.class_label(c), c) for c in CLASSES],
        value=TOP_CLASS,
        label="Class to explain (heatmap and metadata chart)",
    )
    return ui


def _shown_image(
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


def _analyse_outputs() -> Components:
    """The outputs of ``/predict``, in the API's order, plus the view state."""
    ui: Components = {}
    ui["alerts"] = gr.HTML(RESULTS_PLACEHOLDER, elem_id="alerts", label="Alerts")
    ui["probabilities"] = gr.HTML(
        label="Calibrated probabilities", elem_id="probabilities", show_label=True
    )
    ui["heatmap"] = _shown_image("Where the model looked (Grad-CAM)", None, "heatmap")
    ui["opacity"] = gr.Slider(0.0, 1.0, value=DEFAULT_OPACITY, step=0.05, label="Heatmap opacity")
    ui["chart"] = _shown_image("What the metadata contributed", None, "contributions")
    ui["info"] = gr.Markdown(elem_id="result-info")
    with gr.Row():
        ui["report_btn"] = gr.Button("Case report (PDF)", size="sm")
        ui["report"] = gr.File(label="Case report", visible=False)
    with gr.Accordion("Full result (JSON, as returned by the API)", open=False):
        ui["result"] = gr.JSON(label="Result")
    ui["view"] = gr.State(None)
    return ui


#: Output order of the ``/predict`` API (the README's client snippet unpacks it in this order).
PREDICT_OUTPUTS = ("probabilities", "alerts", "heatmap", "chart", "info", "result")
#: Input order of ``/predict``: the last two have defaults and may be left out by API clients.
PREDICT_INPUTS = ("image", "age", "sex", "site", "target", "opacity")


def _confirmations(examples: list[dict[str, Any]]) -> str:
    kinds = sorted({e["confirmed_by"] for e in examples if e["confirmed_by"]})
    return " / ".join(kinds) or "expert"


def _examples_gallery(inputs: Components) -> None:
    examples = _read_examples()
    if not examples:
        return
    gallery = gr.Gallery(
        value=[(e["image"], e["caption"]) for e in examples],
        label="Examples: HAM10000 test-split images (CC BY-NC 4.0), captioned with their "
        f"{_confirmations(examples)}-confirmed diagnosis; click one to load it",
        columns=4,
        height="auto",
        allow_preview=False,
        object_fit="cover",
        elem_id="examples",
        buttons=[],
    )

    def pick(evt: gr.SelectData) -> dict[Any, Any]:
        e = examples[int(evt.index)]
        return {inputs[k]: e[k] for k in ("image", "age", "sex", "site")}

    gallery.select(
        pick,
        outputs=[inputs[k] for k in ("image", "age", "sex", "site")],
        api_visibility="private",
    )


def build_analyse_ui(
    service: PredictionService, exports: Path, concurrency: int = PREDICT_CONCURRENCY
) -> Components:
    """The Analyse tab: inputs, example gallery, results; the ``/predict`` endpoint."""
    with gr.Row(equal_height=False):
        with gr.Column(scale=1, min_width=320):
            inputs = _analyse_inputs()
            with gr.Row():
                clear = gr.ClearButton(value="Clear")
                submit = gr.Button("Analyse", variant="primary")
            _examples_gallery(inputs)
        with gr.Column(scale=1, min_width=320):
            outputs = _analyse_outputs()
    ui = {**inputs, **outputs}
    # the opacity slider sits with the heatmap but is an input of /predict too
    predict_inputs = [ui[k] for k in PREDICT_INPUTS]
    submit.click(
        _bind(analyse, service, ui),
        inputs=predict_inputs,
        outputs=[*(outputs[k] for k in PREDICT_OUTPUTS), outputs["view"]],
        api_name="predict",
        api_description="Classify a dermoscopy image (+ optional age, sex, body site, class to "
        "explain, heatmap opacity) and store the prediction in the history database.",
        concurrency_limit=concurrency,
    )
    inputs["image"].upload(
        _bind_plain(check_upload, ui),
        inputs=inputs["image"],
        outputs=inputs["image"],
        api_visibility="private",
    )
    inputs["target"].input(
        _bind(explain_again, service, {**ui, "explained": outputs["info"]}),
        inputs=[*predict_inputs, outputs["view"]],
        outputs=[outputs["heatmap"], outputs["chart"], outputs["view"], outputs["info"]],
        api_visibility="private",
        concurrency_limit=SERIAL_CONCURRENCY,
    )
    outputs["opacity"].release(
        _bind_plain(redraw_heatmap, ui),
        inputs=[outputs["view"], outputs["opacity"]],
        outputs=outputs["heatmap"],
        api_visibility="private",
    )

    def report_of_view(view: dict[str, Any] | None) -> dict[Any, Any]:
        if not view or view.get("id") is None:
            raise gr.Error(
                "Analyse an image first (the report describes a stored prediction).",
                title="No stored prediction",
                print_exception=False,
            )
        path = case_report(service, exports, view["id"])["report"]
        return {outputs["report"]: gr.File(value=path, visible=True)}

    outputs["report_btn"].click(
        report_of_view, inputs=outputs["view"], outputs=outputs["report"], api_visibility="private"
    )
    clear.add([inputs["image"], inputs["age"], *(outputs[k] for k in PREDICT_OUTPUTS)])
    clear.add([outputs["report"]])
    clear.click(
        lambda: {
            inputs["sex"]: UNKNOWN,
            inputs["site"]: UNKNOWN,
            inputs["target"]: TOP_CLASS,
            outputs["alerts"]: RESULTS_PLACEHOLDER,
            outputs["view"]: None,
        },
        outputs=[
            inputs["sex"],
            inputs["site"],
            inputs["target"],
            outputs["alerts"],
            outputs["view"],
        ],
        api_visibility="private",
    )
    return ui


# --- case report ---------------------------------------------------------------------------------


def case_report(service: PredictionService, exports: Path, prediction_id: Any) -> Values:
    """The one-page PDF of a stored prediction, written to the export folder."""
    pid = _prediction_id(prediction_id)
    with _shown_as_errors("making the case report", "Cannot make the case report"):
        record = service.get(pid)
        if record is None:
            raise DermError(f"No stored prediction has id {pid}.")
        _prune(exports)
        folder = exports / uuid.uuid4().hex[:8]
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / report_filename(record)
        out.write_bytes(case_report_pdf(record))
    return {"report": str(out)}


# --- Batch ---------------------------------------------------------------------------------------


def batch_analysis(
    service: PredictionService,
    exports: Path,
    files: Any,
    metadata_csv: Any = None,
    progress: Callable[..., Any] | None = None,
) -> Values:
    """Analyse every image of the uploaded files / zips through the single-image service path."""
    paths = [str(getattr(f, "name", f)) for f in (files or []) if f]
    csv_path = str(getattr(metadata_csv, "name", metadata_csv)) if metadata_csv else None
    if not paths:
        raise gr.Error(
            "No files: upload images, or a .zip of images (optionally with a CSV of image, age, "
            "sex, site).",
            title="Nothing to analyse",
            print_exception=False,
        )

    def report(i: int, n: int, name: str) -> None:
        if progress is not None:
            progress((i, n), desc=f"{name} ({i}/{n})" if i < n else "done", unit="images")

    try:
        with _shown_as_errors("analysing the batch", "Cannot analyse this batch"):
            items = batch_service.collect_items(paths, csv_path)
            rows = batch_service.run_batch(service, items, report)
            _prune(exports)
            out = exports / f"dermfusion_batch_{uuid.uuid4().hex[:8]}.csv"
            with out.open("w", newline="", encoding="utf-8") as fh:
                history.write_csv_rows(
                    fh, batch_service.CSV_COLUMNS, (batch_service.csv_row(r) for r in rows)
                )
            ids = [r.prediction_id for r in rows if r.prediction_id is not None]
            thumbs = service.thumbnails(ids) if service.store_images else {}
            table = [
                views.batch_table_row(
                    r, thumbs.get(r.prediction_id) if r.prediction_id is not None else None
                )
                for r in rows
            ]
    finally:
        _forget_uploads(service, [*paths, csv_path])
    return {"summary": views.batch_summary(rows), "table": table, "download": str(out)}


#: Input and output order of the ``/batch`` API.
BATCH_INPUTS = ("files", "metadata")
BATCH_OUTPUTS = ("summary", "table", "download")


def build_batch_ui(service: PredictionService, exports: Path) -> Components:
    """The Batch tab: many images (files or .zip) + optional CSV; the ``/batch`` endpoint."""
    gr.Markdown(
        "Analyse many images at once. Each is predicted, explained and stored exactly like a "
        "single analysis. Optional CSV columns: `image, age, sex, site` (HAM10000's "
        "`image_id, age, sex, localization` work too). A file that cannot be analysed is "
        "reported on its row; the rest go on."
    )
    ui: Components = {}
    with gr.Row():
        ui["files"] = gr.File(
            label="Images or .zip archives",
            file_count="multiple",
            file_types=["image", ".zip", ".tif", ".tiff"],
            min_width=280,
            elem_id="batch-files",
        )
        ui["metadata"] = gr.File(
            label="Metadata CSV (optional)",
            file_types=[".csv"],
            min_width=280,
            elem_id="batch-csv",
        )
    run_btn = gr.Button("Analyse batch", variant="primary")
    ui["summary"] = gr.Markdown(elem_id="batch-summary")
    ui["table"] = gr.Dataframe(
        headers=views.BATCH_TABLE_COLUMNS,
        datatype=views.BATCH_TABLE_TYPES,
        interactive=False,
        label="Results (open a row's # in the History tab for its heatmap and report)",
        elem_id="batch-table",
        max_height=520,
        wrap=True,
    )
    ui["download"] = gr.File(label="Results as CSV", height=60)

    def run(files: Any, metadata: Any, progress: Any = gr.Progress()) -> dict[Any, Any]:
        values = batch_analysis(service, exports, files, metadata, progress)
        return {ui[k]: v for k, v in values.items()}

    run_btn.click(
        run,
        inputs=[ui[k] for k in BATCH_INPUTS],
        outputs=[ui[k] for k in BATCH_OUTPUTS],
        api_name="batch",
        api_description="Analyse several images (files or .zip) with an optional metadata CSV; "
        "every image is stored like a single prediction.",
        concurrency_limit=SERIAL_CONCURRENCY,
    )
    return ui


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
    """The filtered table (newest :data:`HISTORY_PAGE` rows), a summary and the full CSV.

    A bad filter raises a titled error saying what to fix; the table keeps what it showed."""
    with _shown_as_errors("searching the history", "Check the filter"):
        f = views.history_filter(since, until, classes, min_prob, sex, site)
        total = service.count(f)
        shown = service.history(f, limit=HISTORY_PAGE, images=False)
        thumbs = service.thumbnails([r.id for r in shown]) if service.store_images else {}
        _prune(exports)
        out = exports / f"dermfusion_history_{uuid.uuid4().hex[:8]}.csv"
        history.write_csv(_all_matching(service, f), out)
    now = datetime.now(UTC)
    if total == 0:
        summary = f"No stored predictions match ({f.describe()})."
    else:
        more = f"; newest {len(shown)} shown, all in the CSV" if len(shown) < total else ""
        summary = f"**{views.plural(total, 'matching prediction')}** ({f.describe()}{more})."
    rows = [views.history_table_row(r, thumbs.get(r.id), now) for r in shown]
    return {"table": rows, "summary": summary, "download": str(out)}


def _detail_values(record: PredictionRecord) -> Values:
    image = thumbnail_from_jpeg(record.thumbnail)
    heat = heatmap_from_png(record.heatmap_png)
    metadata = Metadata(age=record.age, sex=record.sex, site=record.site)
    target = record.attribution_target or record.predicted_class
    return {
        "pick_id": str(record.id),
        "detail_image": output_file(side_by_side(image, heat, DEFAULT_OPACITY)),
        "detail": history.detail_markdown(record),
        "detail_probabilities": views.probabilities_html(record.probabilities or {}),
        "detail_chart": output_file(
            contributions_chart(record.metadata_contributions, target, metadata), "chart"
        ),
    }


def show_record(service: PredictionService, prediction_id: Any) -> Values:
    """One stored prediction: original and heatmap, details, probabilities, metadata chart."""
    pid = _prediction_id(prediction_id)
    with _shown_as_errors("reading the history", "Cannot open this prediction"):
        record = service.get(pid)
    if record is None:
        raise gr.Error(
            f"No stored prediction has id {pid}.", title="Not found", print_exception=False
        )
    return _detail_values(record)


def confirm_record(
    service: PredictionService, prediction_id: Any, dx: Any, source: Any, note: Any = None
) -> Values:
    """Record the confirmed diagnosis of a stored prediction; returns its refreshed detail."""
    pid = _prediction_id(prediction_id)
    with _shown_as_errors("recording the diagnosis", "Cannot record this diagnosis"):
        service.confirm(pid, dx, source, note)
        record = service.get(pid)
    assert record is not None
    values = _detail_values(record)
    values["status"] = (
        f"Prediction #{pid}: confirmed diagnosis **{history.class_label(str(record.confirmed_dx))}"
        f"** ({record.confirmed_source}) recorded."
    )
    return values


def delete_record(service: PredictionService, prediction_id: Any) -> Values:
    """Delete a stored prediction (image, heatmap, inputs, everything)."""
    pid = _prediction_id(prediction_id)
    with _shown_as_errors("deleting the prediction", "Cannot delete this prediction"):
        deleted = service.delete(pid)
    if not deleted:
        raise gr.Error(
            f"No stored prediction has id {pid}.", title="Not found", print_exception=False
        )
    return {
        "status": f"Prediction #{pid} was deleted.",
        "pick_id": "",
        "detail_image": None,
        "detail": "",
        "detail_probabilities": "",
        "detail_chart": None,
    }


def _history_filters(prefix: str = "") -> Components:
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
            choices=[(history.class_label(c), c) for c in CLASSES],
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


def _history_listing() -> tuple[Components, gr.Button]:
    ui: Components = {}
    with gr.Row():
        search_btn = gr.Button("Search", variant="primary")
        ui["download"] = gr.DownloadButton("Download CSV", value=None, variant="secondary")
    ui["summary"] = gr.Markdown(elem_id="history-summary")
    ui["table"] = gr.Dataframe(
        headers=views.HISTORY_TABLE_COLUMNS,
        datatype=views.HISTORY_TABLE_TYPES,
        interactive=False,
        label="Predictions (click anywhere in a row to open it)",
        elem_id="history-table",
        max_height=460,
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
    ui["status"] = gr.Markdown(elem_id="history-status")
    ui["detail_image"] = _shown_image("Stored image and heatmap", None, "history-image", False)
    with gr.Row(equal_height=False):
        with gr.Column(min_width=300):
            ui["detail"] = gr.Markdown(elem_id="history-detail")
        with gr.Column(min_width=300):
            ui["detail_probabilities"] = gr.HTML(elem_id="history-probabilities")
            ui["detail_chart"] = _shown_image(
                "Metadata contributions", None, "history-chart", False
            )
    return ui, show_btn


def _history_actions() -> tuple[Components, dict[str, gr.Button]]:
    ui: Components = {}
    buttons: dict[str, gr.Button] = {}
    with gr.Accordion("Record confirmed diagnosis", open=True, elem_id="confirm-box"):
        with gr.Row():
            ui["confirm_dx"] = gr.Dropdown(
                choices=[(history.class_label(c), c) for c in confirmed_dx_choices()],
                label="Confirmed diagnosis",
                value=None,
                allow_custom_value=True,  # checked by the service, with a clear message
                min_width=200,
            )
            ui["confirm_source"] = gr.Dropdown(
                choices=list(CONFIRM_SOURCES),
                label="Confirmed by",
                value=None,
                min_width=160,
                allow_custom_value=True,
            )
        ui["confirm_note"] = gr.Textbox(label="Note (optional)", max_lines=2)
        buttons["confirm"] = gr.Button("Record confirmed diagnosis", variant="primary")
    with gr.Row():
        buttons["report"] = gr.Button("Case report (PDF)")
        buttons["delete"] = gr.Button("Delete this prediction…", variant="stop")
    ui["report"] = gr.File(label="Case report", elem_id="history-report", visible=False)
    with gr.Row(visible=False) as ui["delete_row"]:
        gr.Markdown(
            "**Delete this prediction for good?** Its image, heatmap and inputs are removed "
            "from the history database. This cannot be undone."
        )
        buttons["delete_yes"] = gr.Button("Yes, delete it", variant="stop")
        buttons["delete_no"] = gr.Button("Cancel")
    return ui, buttons


#: Input and output order of the ``/history``, ``/history_item``, ``/confirm`` and ``/delete`` APIs.
HISTORY_INPUTS = ("since", "until", "classes", "min_prob", "sex", "site")
HISTORY_OUTPUTS = ("table", "summary", "download")
DETAIL_OUTPUTS = ("pick_id", "detail_image", "detail", "detail_probabilities", "detail_chart")
CONFIRM_INPUTS = ("pick_id", "confirm_dx", "confirm_source", "confirm_note")
CONFIRM_OUTPUTS = ("status", *DETAIL_OUTPUTS)
DELETE_OUTPUTS = ("status", *DETAIL_OUTPUTS)


def build_history_ui(service: PredictionService, exports: Path) -> tuple[Components, Callable]:
    """The History tab: filters, table, CSV download, one row's detail and its actions; the
    ``/history``, ``/history_item``, ``/confirm``, ``/report`` and ``/delete`` endpoints.
    Returns the components and the search handler (run when the tab is selected)."""
    gr.Markdown(
        "Past predictions stored by this app, newest first. Filter, click a row (or type its "
        "id) to open it; record its confirmed diagnosis, download its case report or delete it."
    )
    filters = _history_filters()
    listing, search_btn = _history_listing()
    detail, show_btn = _history_detail()
    actions, buttons = _history_actions()
    ui = {**filters, **listing, **detail, **actions}
    search = _bind(search_history, service, ui, exports)
    filter_inputs = [filters[k] for k in HISTORY_INPUTS]
    listing_outputs = [listing[k] for k in HISTORY_OUTPUTS]
    search_btn.click(search, inputs=filter_inputs, outputs=listing_outputs, api_name="history")
    show = _bind(show_record, service, ui)
    detail_outputs = [ui[k] for k in DETAIL_OUTPUTS]
    # the detail images stay hidden until a row is opened (no empty placeholders); visibility
    # is changed by private follow-up events so the API returns plain values
    images = [ui["detail_image"], ui["detail_chart"]]

    def reveal(shown: bool) -> Callable[[], dict[Any, Any]]:
        return lambda: {c: gr.Image(visible=shown) for c in images}

    show_btn.click(
        show, inputs=detail["pick_id"], outputs=detail_outputs, api_name="history_item"
    ).success(reveal(True), outputs=images, api_visibility="private")
    detail["pick_id"].submit(
        show, inputs=detail["pick_id"], outputs=detail_outputs, api_visibility="private"
    ).success(reveal(True), outputs=images, api_visibility="private")

    def pick_row(evt: gr.SelectData) -> dict[Any, Any]:
        row = evt.row_value or []
        if len(row) < 2 or row[1] in (None, ""):
            raise gr.Error("That row has no prediction id.", print_exception=False)
        return {**show(row[1]), ui["status"]: "", ui["delete_row"]: gr.Row(visible=False)}

    listing["table"].select(
        pick_row,
        outputs=[*detail_outputs, ui["status"], ui["delete_row"]],
        api_visibility="private",
    ).success(reveal(True), outputs=images, api_visibility="private")
    buttons["confirm"].click(
        _bind(confirm_record, service, ui),
        inputs=[ui[k] for k in CONFIRM_INPUTS],
        outputs=[ui[k] for k in CONFIRM_OUTPUTS],
        api_name="confirm",
        api_description="Record the confirmed diagnosis of a stored prediction: id, diagnosis "
        f"({', '.join(confirmed_dx_choices())}), source ({', '.join(CONFIRM_SOURCES)}), note.",
    ).success(reveal(True), outputs=images, api_visibility="private").then(
        search, inputs=filter_inputs, outputs=listing_outputs, api_visibility="private"
    )
    # /report returns the PDF through a hidden file; the visible one appears once there is one
    report_file = gr.File(visible=False)
    buttons["report"].click(
        _bind(case_report, service, {"report": report_file}, exports),
        inputs=detail["pick_id"],
        outputs=report_file,
        api_name="report",
        api_description="A one-page PDF case report of a stored prediction (by id).",
    ).success(
        lambda path: {actions["report"]: gr.File(value=path, visible=True)},
        inputs=report_file,
        outputs=actions["report"],
        api_visibility="private",
    )
    buttons["delete"].click(
        lambda pid: {ui["delete_row"]: gr.Row(visible=bool(str(pid or "").strip()))},
        inputs=detail["pick_id"],
        outputs=ui["delete_row"],
        api_visibility="private",
    )
    buttons["delete_no"].click(
        lambda: {ui["delete_row"]: gr.Row(visible=False)},
        outputs=ui["delete_row"],
        api_visibility="private",
    )
    buttons["delete_yes"].click(
        _bind(delete_record, service, ui),
        inputs=detail["pick_id"],
        outputs=[ui[k] for k in DELETE_OUTPUTS],
        api_name="delete",
        api_description="Delete a stored prediction (by id) from the history database.",
    ).then(
        lambda: {
            ui["delete_row"]: gr.Row(visible=False),
            actions["report"]: gr.File(value=None, visible=False),
            **{c: gr.Image(visible=False) for c in images},
        },
        outputs=[ui["delete_row"], actions["report"], *images],
        api_visibility="private",
    ).then(search, inputs=filter_inputs, outputs=listing_outputs, api_visibility="private")
    return ui, search


# --- Agreement -----------------------------------------------------------------------------------


def agreement_report(
    service: PredictionService,
    since: Any,
    until: Any,
    classes: Any,
    min_prob: Any,
    sex: Any,
    site: Any,
) -> Values:
    """Model vs confirmed diagnoses over the filtered history (:mod:`service.agreement`)."""
    with _shown_as_errors("computing the agreement", "Check the filter"):
        f = views.history_filter(since, until, classes, min_prob, sex, site)
        a = service.agreement(f)
    return {
        "agreement_summary": views.agreement_markdown(a) + f"\n\n*Filter: {f.describe()}.*",
        "confusion": agreement_view.confusion_rows(a),
        "per_class": agreement_view.per_class_rows(a),
        "by_version": agreement_view.version_rows(a),
        "agreement": a.to_dict(),
    }


AGREEMENT_OUTPUTS = ("agreement_summary", "confusion", "per_class", "by_version", "agreement")


def build_agreement_ui(service: PredictionService) -> tuple[Components, Callable]:
    """The Agreement tab over any filtered slice; the ``/agreement`` endpoint."""
    gr.Markdown(
        "How the model's top class agrees with the **confirmed diagnoses** recorded in History, "
        "on your own patients. Only predictions with a confirmed diagnosis count; `other` means "
        "a lesion outside the model's 7 classes (it always counts as a miss)."
    )
    ui = _history_filters()
    run_btn = gr.Button("Compute agreement", variant="primary")
    ui["agreement_summary"] = gr.Markdown(elem_id="agreement-summary")
    ui["confusion"] = gr.Dataframe(
        headers=agreement_view.CONFUSION_HEADERS,
        interactive=False,
        label="Confusion matrix: rows = confirmed diagnosis, columns = the model's top class",
        elem_id="agreement-confusion",
    )
    ui["per_class"] = gr.Dataframe(
        headers=agreement_view.PER_CLASS_HEADERS, interactive=False, label="Per class"
    )
    ui["by_version"] = gr.Dataframe(
        headers=agreement_view.VERSION_HEADERS, interactive=False, label="By model version"
    )
    with gr.Accordion("Agreement as JSON (as returned by the API)", open=False):
        ui["agreement"] = gr.JSON()
    handler = _bind(agreement_report, service, ui)
    run_btn.click(
        handler,
        inputs=[ui[k] for k in HISTORY_INPUTS],
        outputs=[ui[k] for k in AGREEMENT_OUTPUTS],
        api_name="agreement",
        api_description="Agreement of the model with recorded confirmed diagnoses over the "
        "filtered history (same filters as /history).",
    )
    return ui, handler


# --- About and the whole app ----------------------------------------------------------------------


def evaluation_plots(folder: Path | str | None) -> list[tuple[str, str]]:
    """The checkpoint's evaluation plots (``eval_*.png`` next to its weights) with captions."""
    if folder is None:
        return []
    return [
        (str(Path(folder) / name), caption)
        for name, caption in EVALUATION_PLOTS
        if (Path(folder) / name).is_file()
    ]


def build_about_ui(service: PredictionService) -> Components:
    """The About tab: the model card (from the checkpoint's own config) and its evaluation
    plots."""
    predictor = service.predictor
    folder = getattr(predictor, "folder", None)
    ui: Components = {}
    plots = evaluation_plots(folder)
    if plots:
        ui["plots"] = gr.Gallery(
            value=plots,
            label="Evaluation of this model on the held-out HAM10000 test split "
            "(python -m scripts.evaluate)",
            columns=3,
            height="auto",
            object_fit="contain",
            elem_id="evaluation-plots",
        )
    card = views.model_card_markdown(predictor.config, folder, predictor.runtime)
    ui["model_card"] = gr.Markdown(card, elem_id="model-card")
    return ui


def _bind(handler: Callable[..., Values], service: PredictionService, ui: Components, *extra: Any):
    """``handler(service, *extra, *inputs) → {name: value}`` as a Gradio callback returning
    ``{component: value}``."""

    def callback(*inputs: Any) -> dict[Any, Any]:
        return {ui[name]: value for name, value in handler(service, *extra, *inputs).items()}

    callback.__name__ = handler.__name__
    return callback


def _bind_plain(handler: Callable[..., Values], ui: Components):
    """Like :func:`_bind` for a handler that needs no service."""

    def callback(*inputs: Any) -> dict[Any, Any]:
        return {ui[name]: value for name, value in handler(*inputs).items()}

    callback.__name__ = handler.__name__
    return callback


def make_frontend(
    service: PredictionService,
    concurrency: int = PREDICT_CONCURRENCY,
    max_queue: int = QUEUE_SIZE,
) -> gr.Blocks:
    """Build the five-tab app around ``service`` (not launched; see :mod:`app.__main__`), with
    its queue: ``concurrency`` predictions at once, at most ``max_queue`` requests waiting and a
    clear "busy" refusal beyond."""
    clean_stale_exports()
    # CSV exports and case reports; the folder lives as long as the app (and is removed by the
    # next app start if this process is killed).
    exports = Path(tempfile.mkdtemp(prefix=f"{EXPORT_PREFIX}{os.getpid()}-"))
    # delete_cache: drop uploads and results from Gradio's cache (see CACHE_LIFETIME*).
    lifetime = CACHE_LIFETIME if service.store_images else CACHE_LIFETIME_NO_IMAGES
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=lifetime) as demo:
        gr.Markdown(f"# {TITLE}")
        gr.Markdown(
            f"**{DISCLAIMER}** The model estimates probabilities for {len(CLASSES)} lesion "
            f"classes, learnt from {views.training_dataset_name(service.predictor.config)}; it "
            "cannot tell whether a lesion is harmless. See a doctor about any lesion that "
            "worries you.",
            elem_id="disclaimer",
        )
        with gr.Tabs():
            with gr.Tab("Analyse", id="analyse"):
                build_analyse_ui(service, exports, concurrency)
            with gr.Tab("Batch", id="batch"):
                build_batch_ui(service, exports)
            with gr.Tab("History", id="history") as history_tab:
                ui, search = build_history_ui(service, exports)
                history_tab.select(
                    search,
                    inputs=[ui[k] for k in HISTORY_INPUTS],
                    outputs=[ui[k] for k in HISTORY_OUTPUTS],
                    api_visibility="private",
                )
            with gr.Tab("Agreement", id="agreement") as agreement_tab:
                aui, agree = build_agreement_ui(service)
                agreement_tab.select(
                    agree,
                    inputs=[aui[k] for k in HISTORY_INPUTS],
                    outputs=[aui[k] for k in AGREEMENT_OUTPUTS],
                    api_visibility="private",
                )
            with gr.Tab("About", id="about"):
                build_about_ui(service)
    demo.queue(
        default_concurrency_limit=DEFAULT_CONCURRENCY,
        max_size=max_queue,
        status_update_rate=STATUS_UPDATE_S,
    )
    _word_busy_refusal(demo._queue)
    atexit.register(shutil.rmtree, exports, ignore_errors=True)
    return demo


def _word_busy_refusal(queue: Any) -> None:
    """Replace Gradio's "Queue is full. Max size is N and size is N." (the HTTP 503 detail)
    with :data:`BUSY_MESSAGE`. The browser shows its own "This application is currently busy.
    Please try again." for the same 503 and ``gradio_client`` raises ``QueueError``; the
    refusal itself is Gradio's ``max_size``, this only words it for API users."""
    push = getattr(queue, "push", None)
    if push is None:
        return

    async def busy_aware_push(*args: Any, **kwargs: Any) -> Any:
        ok, detail, state = await push(*args, **kwargs)
        if state == "queue_full":
            detail = BUSY_MESSAGE
        return ok, detail, state

    queue.push = busy_aware_push
