"""The Gradio user interface: layout and event wiring only.

Every decision — validating inputs, predicting, flagging, warning, storing, filtering history —
is made by :class:`db.service.PredictionService` (and the predictor behind it). This module turns
its results into component values (via :mod:`app.views`) and its ``DermError`` messages into
``gr.Error`` pop-ups, so a user never sees a traceback.

    demo = make_frontend(PredictionService.create(checkpoint, db_url))
    demo.launch()            # or: python -m app
"""

from __future__ import annotations

import contextlib
import csv
import logging
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from app import views
from common.errors import DermError
from data_pipeline.schema import CLASSES, SEXES, SITES, UNKNOWN
from db.service import PredictionService, StorageError, StoredPrediction
from model.render import contributions_chart, overlay_heatmap

log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
TITLE = "DermFusion — dermoscopy lesion classifier"
#: Rows shown in the History table (the CSV download holds every matching row).
HISTORY_PAGE = 200
#: Rows fetched per database query while writing the CSV download.
CSV_PAGE = 500
#: CSV exports older than this many seconds are deleted at the next search.
EXPORT_MAX_AGE_S = 3600
#: Images narrower than this are upscaled for display only (never for the model).
DISPLAY_WIDTH = 400

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


def _pass_upload_through(image: gr.Image) -> gr.Image:
    """Make ``image`` hand the uploaded file's path to our own decoder untouched.

    ``gr.Image(type="filepath")`` still opens every upload with PIL first, so a corrupt file, a
    non-image or a decompression bomb fails inside Gradio with a generic error before
    ``data_pipeline.images.load_rgb`` can explain it (and a mode conversion could hide CMYK /
    16-bit data from it). The override is per instance: subclassing a Gradio component would make
    Gradio write a ``.pyi`` stub next to this module at import time.
    """
    default = image.preprocess

    def preprocess(payload):
        if payload is None:
            return None
        url = getattr(payload, "url", None) or ""
        if getattr(payload, "path", None) and not url.startswith("data:"):
            return str(payload.path)
        try:  # base64 data URLs (some webcam / clipboard paths)
            return default(payload)
        except Exception:  # noqa: BLE001 - any decoding failure gets the same clear message
            raise gr.Error(
                "The submitted image data could not be read; save it as a file and upload it.",
                print_exception=False,
            ) from None

    image.preprocess = preprocess  # type: ignore[method-assign]
    return image


def _user_error(exc: Exception, title: str = "Cannot analyse this input") -> gr.Error:
    return gr.Error(str(exc), title=title, print_exception=False)


def _unexpected(exc: Exception, what: str) -> gr.Error:
    log.exception("unexpected error while %s", what)
    return gr.Error(
        f"Unexpected error while {what} ({type(exc).__name__}). Nothing is wrong with your input "
        "as far as the app can tell; the details are in the server log.",
        title="Internal error",
        print_exception=False,
    )


def _chart(pred) -> np.ndarray:
    return contributions_chart(
        pred.metadata_contributions, pred.attribution_target or pred.top_class
    )


def _enlarge(image: np.ndarray | None, min_width: int = DISPLAY_WIDTH) -> np.ndarray | None:
    """Upscale small images (HAM10000 is 200×150) so the heatmap is visible on screen."""
    if image is None or image.shape[1] >= min_width:
        return image
    scale = min_width / image.shape[1]
    size = (min_width, max(1, round(image.shape[0] * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


def _overlay(pred) -> np.ndarray | None:
    if pred.image is None:
        return None
    if pred.heatmap is None:
        return _enlarge(pred.image)
    return _enlarge(overlay_heatmap(pred.image, pred.heatmap))


def _prune(folder: Path, max_age_s: float = EXPORT_MAX_AGE_S) -> None:
    """Delete old CSV exports (Gradio serves its own copy from its cache)."""
    cutoff = time.time() - max_age_s
    for old in folder.glob("*.csv"):
        with contextlib.suppress(OSError):
            if old.stat().st_mtime < cutoff:
                old.unlink()


def _read_examples() -> list[list[Any]]:
    """Example rows [image, age, sex, site] from ``examples/examples.csv``."""
    index = EXAMPLES_DIR / "examples.csv"
    if not index.is_file():
        return []
    rows = []
    with index.open(newline="", encoding="utf-8") as fh:
        for r in csv.DictReader(fh):
            path = EXAMPLES_DIR / r["file"]
            if not path.is_file():
                continue
            age = (r.get("age") or "").strip()
            rows.append([str(path), age, r.get("sex") or UNKNOWN, r.get("localization") or UNKNOWN])
    return rows


def make_frontend(service: PredictionService) -> gr.Blocks:
    """Build the three-tab app around ``service`` (not launched; see :mod:`app.__main__`)."""
    config = service.predictor.config
    folder = getattr(service.predictor, "folder", None)

    # --- handlers ------------------------------------------------------------------------------

    def diagnose(image: str | None, age: Any, sex: Any, site: Any):
        if image is None or (isinstance(image, str) and not image.strip()):
            raise gr.Error(NO_IMAGE, title="No image", print_exception=False)
        name = Path(image).name if isinstance(image, str) else None
        storage_problem = None
        try:
            stored = service.predict_and_store(image, age=age, sex=sex, site=site, name=name)
        except StorageError as exc:
            if exc.prediction is None:
                raise _user_error(exc, "Could not save the prediction") from None
            storage_problem = str(exc)
            stored = StoredPrediction(id=None, prediction=exc.prediction, stored=False)
        except DermError as exc:
            raise _user_error(exc) from None
        except Exception as exc:  # noqa: BLE001 - never a traceback in the UI
            raise _unexpected(exc, "analysing the image") from None
        pred = stored.prediction
        alerts = views.alerts_markdown(pred)
        if storage_problem:
            gr.Warning(storage_problem, title="Not saved to history")
            alerts = f"**⚠️ Not saved to history:** {storage_problem}\n\n{alerts}"
        summary = {
            "prediction_id": stored.id,
            "stored": stored.stored,
            "storage_error": storage_problem,
            **pred.to_dict(),
        }
        return (
            views.label_value(pred.probabilities),
            alerts,
            _overlay(pred),
            _chart(pred),
            views.result_markdown(stored),
            summary,
        )

    # CSV exports; the folder lives as long as the handlers below that use it.
    exports = tempfile.TemporaryDirectory(prefix="dermfusion-history-")

    def all_matching(f):
        """Every matching row, newest first, a page at a time (bounded memory)."""
        offset = 0
        while True:
            page = service.history(f, limit=CSV_PAGE, offset=offset)
            yield from page
            if len(page) < CSV_PAGE:
                return
            offset += CSV_PAGE

    def search(since, until, classes, min_prob, sex, site):
        try:
            f = views.history_filter(since, until, classes, min_prob, sex, site)
            total = service.count(f)
            shown = service.history(f, limit=HISTORY_PAGE)
            _prune(Path(exports.name))
            out = Path(exports.name) / f"dermfusion_history_{uuid.uuid4().hex[:8]}.csv"
            views.write_history_csv(all_matching(f), out)
        except DermError as exc:
            raise _user_error(exc, "Cannot search the history") from None
        except Exception as exc:  # noqa: BLE001
            raise _unexpected(exc, "searching the history") from None
        if total == 0:
            summary = f"No stored predictions match ({f.describe()})."
        else:
            more = f"; newest {len(shown)} shown, all in the CSV" if len(shown) < total else ""
            summary = f"**{total}** matching predictions ({f.describe()}{more})."
        return views.history_table(shown), summary, str(out)

    def show_record(prediction_id):
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
        except (TypeError, ValueError):
            raise gr.Error(
                f"Prediction id {prediction_id!r} is not a whole number.",
                title="Bad id",
                print_exception=False,
            ) from None
        try:
            record = service.get(pid)
        except DermError as exc:
            raise _user_error(exc, "Cannot open this prediction") from None
        except Exception as exc:  # noqa: BLE001
            raise _unexpected(exc, "reading the history") from None
        if record is None:
            raise gr.Error(
                f"No stored prediction has id {pid}.", title="Not found", print_exception=False
            )
        thumb, heat = record.thumbnail_array(), record.heatmap_array()
        image = overlay_heatmap(thumb, heat) if thumb is not None and heat is not None else thumb
        image = _enlarge(image)
        return (
            str(pid),
            image,
            views.record_markdown(record),
            views.label_value(record.probabilities or {}),
        )

    def pick_row(evt: gr.SelectData):
        row = evt.row_value or []
        if not row or row[0] in (None, ""):
            raise gr.Error("That row has no prediction id.", print_exception=False)
        return show_record(row[0])

    # --- layout --------------------------------------------------------------------------------

    # delete_cache: every hour, drop uploads and results older than a day from Gradio's cache.
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 86400)) as demo:
        gr.Markdown(f"# {TITLE}")
        gr.Markdown(
            f"**{views.DISCLAIMER}** The model estimates probabilities for 7 lesion classes of the "
            "HAM10000 dataset; it cannot tell whether a lesion is harmless. See a doctor about any "
            "lesion that worries you.",
            elem_id="disclaimer",
        )
        with gr.Tabs():
            with gr.Tab("Diagnose", id="diagnose"):
                with gr.Row(equal_height=False):
                    with gr.Column(scale=1):
                        image = _pass_upload_through(
                            gr.Image(
                                label="Dermoscopy image",
                                type="filepath",
                                image_mode=None,
                                sources=["upload", "webcam", "clipboard"],
                                height=300,
                            )
                        )
                        with gr.Row():
                            # A Textbox, not gr.Number: Gradio 6 shows and submits an empty
                            # Number as 0, which would silently record "age 0" for "unknown".
                            age = gr.Textbox(
                                label="Age (years, optional)",
                                value="",
                                max_lines=1,
                                placeholder="blank = unknown",
                                info="0–120",
                            )
                            sex = gr.Dropdown(
                                choices=list(SEXES),
                                value=UNKNOWN,
                                label="Sex",
                                allow_custom_value=True,
                            )
                            site = gr.Dropdown(
                                choices=list(SITES),
                                value=UNKNOWN,
                                label="Body site",
                                allow_custom_value=True,
                            )
                        with gr.Row():
                            clear = gr.ClearButton(value="Clear")
                            submit = gr.Button("Analyse", variant="primary")
                        examples = _read_examples()
                        if examples:
                            gr.Examples(
                                examples=examples,
                                inputs=[image, age, sex, site],
                                label="Examples (HAM10000 test-split images, CC BY-NC 4.0; "
                                "ground truth in app/examples/README.md)",
                                examples_per_page=8,
                            )
                    with gr.Column(scale=1):
                        alerts = gr.Markdown(
                            "Results appear here after you press **Analyse**.",
                            elem_id="alerts",
                            label="Alerts",
                        )
                        label = gr.Label(
                            label="Calibrated probabilities",
                            num_top_classes=len(CLASSES),
                            elem_id="probabilities",
                        )
                        info = gr.Markdown(label="Model and storage", elem_id="result-info")
                        overlay = gr.Image(
                            label="Grad-CAM heatmap (where the model looked)",
                            type="numpy",
                            format="png",
                            interactive=False,
                            height=320,
                            elem_id="heatmap",
                        )
                        chart = gr.Image(
                            label="Metadata contributions",
                            type="numpy",
                            format="png",
                            interactive=False,
                            height=240,
                            elem_id="contributions",
                        )
                        with gr.Accordion("Full result (JSON, as returned by the API)", open=False):
                            result_json = gr.JSON(label="Result")
                outputs = [label, alerts, overlay, chart, info, result_json]
                submit.click(
                    diagnose,
                    inputs=[image, age, sex, site],
                    outputs=outputs,
                    api_name="predict",
                    api_description="Classify a dermoscopy image (+ optional age, sex, body site) "
                    "and store the prediction in the history database.",
                )
                clear.add([image, age, label, overlay, chart, info, result_json])
                clear.click(
                    lambda: (UNKNOWN, UNKNOWN, "Results appear here after you press **Analyse**."),
                    outputs=[sex, site, alerts],
                    api_visibility="private",
                )

            with gr.Tab("History", id="history") as history_tab:
                gr.Markdown(
                    "Past predictions stored by this app, newest first. Filter, click a row (or "
                    "type its id) to see it, or download the matching rows as CSV."
                )
                with gr.Row():
                    since = gr.Textbox(label="From (YYYY-MM-DD)", placeholder="2025-01-01")
                    until = gr.Textbox(label="To (YYYY-MM-DD, inclusive)", placeholder="2025-12-31")
                    classes = gr.Dropdown(
                        choices=[(views.class_label(c), c) for c in CLASSES],
                        multiselect=True,
                        label="Top class",
                        value=[],
                    )
                with gr.Row():
                    min_prob = gr.Slider(
                        0.0, 1.0, value=0.0, step=0.05, label="Minimum top-class probability"
                    )
                    h_sex = gr.Dropdown(choices=[views.ANY, *SEXES], value=views.ANY, label="Sex")
                    h_site = gr.Dropdown(
                        choices=[views.ANY, *SITES], value=views.ANY, label="Body site"
                    )
                with gr.Row():
                    search_btn = gr.Button("Search", variant="primary")
                    download = gr.DownloadButton("Download CSV", value=None, variant="secondary")
                summary = gr.Markdown(label="Summary", elem_id="history-summary")
                table = gr.Dataframe(
                    headers=views.HISTORY_COLUMNS,
                    datatype=["number", "str", "str", "number", "str", "str", "str", "str"],
                    interactive=False,
                    label="Predictions (click a row to open it)",
                    elem_id="history-table",
                    max_height=420,
                    wrap=True,
                )
                with gr.Row():
                    pick_id = gr.Textbox(
                        label="Prediction id",
                        value="",
                        max_lines=1,
                        placeholder="e.g. 12",
                        scale=1,
                    )
                    show_btn = gr.Button("Show prediction", scale=1)
                with gr.Row(equal_height=False):
                    detail_image = gr.Image(
                        label="Stored image with heatmap",
                        type="numpy",
                        format="png",
                        interactive=False,
                        height=300,
                    )
                    with gr.Column():
                        detail_md = gr.Markdown(label="Stored prediction", elem_id="history-detail")
                        detail_label = gr.Label(
                            label="Stored probabilities", num_top_classes=len(CLASSES)
                        )
                filters = [since, until, classes, min_prob, h_sex, h_site]
                listing = [table, summary, download]
                detail = [pick_id, detail_image, detail_md, detail_label]
                search_btn.click(search, inputs=filters, outputs=listing, api_name="history")
                history_tab.select(
                    search, inputs=filters, outputs=listing, api_visibility="private"
                )
                show_btn.click(show_record, inputs=pick_id, outputs=detail, api_name="history_item")
                pick_id.submit(
                    show_record, inputs=pick_id, outputs=detail, api_visibility="private"
                )
                table.select(pick_row, outputs=detail, api_visibility="private")

            with gr.Tab("About", id="about"):
                gr.Markdown(views.model_card_markdown(config, folder), elem_id="model-card")
    return demo
