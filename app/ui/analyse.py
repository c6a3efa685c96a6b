"""The Analyse tab: one image (+ optional age, sex, site) → probabilities, alerts, heatmap,
metadata chart, stored as one history row; the ``/predict`` endpoint.

:class:`data_pipeline.request.PredictionRequest` validates,
:class:`service.prediction.PredictionService` predicts and stores; nothing is decided here.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import gradio as gr

from app import views
from app.ui.common import (
    DEFAULT_OPACITY,
    EXACT_CHOICE,
    EXAMPLES_DIR,
    PREDICT_CONCURRENCY,
    SERIAL_CONCURRENCY,
    Components,
    Values,
    bind,
    bind_plain,
    case_report,
    choice_dropdown,
    forget_uploads,
    output_file,
    record_files,
    shown_as_errors,
    shown_image,
)
from common.errors import DermError
from data_pipeline.images import read_image
from data_pipeline.request import PredictionRequest
from data_pipeline.schema import HAM7, SEXES, SITES, UNKNOWN, ClassSet
from model.subgroups import skin_tone_line
from service import history
from service.prediction import PredictionService, StorageError, StoredPrediction
from service.render import contributions_chart, side_by_side

NO_IMAGE = (
    "No image was submitted: upload a dermoscopy image (JPEG, PNG, TIFF, ...), take one with the "
    "webcam or paste one from the clipboard, then press Analyse."
)
RESULTS_PLACEHOLDER = (
    '<div class="alert alert-info">Results appear here after you press <b>Analyse</b>.</div>'
)
TOP_CLASS = "top"  # the "explain" choice meaning: the predicted class

#: Output order of the ``/predict`` API (docs/guide/app.md's client snippet unpacks it in this
#: order).
PREDICT_OUTPUTS = ("probabilities", "alerts", "heatmap", "chart", "info", "result")
#: Input order of ``/predict``: the last two have defaults and may be left out by API clients.
PREDICT_INPUTS = ("image", "age", "sex", "site", "target", "opacity")


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
    explain_class: Any = TOP_CLASS,
    opacity: Any = DEFAULT_OPACITY,
) -> Values:
    """Validate, predict, store; a storage failure still shows the prediction, with a warning.
    ``explain_class``: the class the heatmap and metadata chart explain (``top``: the top
    class); ``opacity``: of the heatmap overlay, 0-1."""
    if image is None or (isinstance(image, str) and not image.strip()):
        raise gr.Error(NO_IMAGE, title="No image", print_exception=False)
    storage_problem = None
    try:
        with shown_as_errors("analysing the image", "Cannot analyse this input"):
            request = PredictionRequest.build(
                image, age, sex, site, _target(explain_class), name=Path(image).name
            )
            try:
                stored = service.predict_and_store(request)
            except StorageError as exc:
                if exc.prediction is None:
                    raise
                storage_problem = str(exc)
                stored = StoredPrediction(id=None, prediction=exc.prediction, stored=False)
    finally:
        forget_uploads(service, [image])
    pred = stored.prediction
    if storage_problem:
        gr.Warning(storage_problem, title="Not saved to history")
    values = _explanation_values(pred, _opacity(opacity))
    values["view"]["id"] = stored.id
    if service.store_images:  # else the upload is gone already (forget_uploads)
        record_files(service).add(stored.id, image)
    record_files(service).add(stored.id, values["heatmap"], values["chart"])
    return {
        "probabilities": views.probabilities_html(pred.probabilities, pred.model_version),
        "alerts": views.alerts_html(pred, storage_problem),
        "info": views.result_markdown(stored)
        + "\n\n"
        + skin_tone_line(pred.image, getattr(service.predictor, "folder", None)),
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
    explain_class: Any,
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
    with shown_as_errors("explaining the image", "Cannot explain this class"):
        request = PredictionRequest.build(
            image, age, sex, site, _target(explain_class), name=Path(image).name
        )
        pred = service.explain(request)
    values = _explanation_values(pred, _opacity(opacity))
    pid = values["view"]["id"] = view.get("id")
    record_files(service).add(pid, values["heatmap"], values["chart"])
    name = pred.classes.name(values["view"]["target"] or "")
    saved = f"saved to history as **#{pid}**" if pid is not None else "**not saved** to history"
    values["explained"] = (
        f"Heatmap and metadata chart now explain **{name}** (not stored again); the prediction "
        f"is {saved}."
    )
    return values


def redraw_heatmap(service: PredictionService, view: dict[str, Any] | None, opacity: Any) -> Values:
    """The heatmap at another opacity (no new prediction)."""
    if not view or view.get("image") is None:
        return {"heatmap": gr.skip()}
    alpha = _opacity(opacity)
    panel = output_file(side_by_side(view["image"], view.get("heatmap"), alpha))
    record_files(service).add(view.get("id"), panel)
    return {"heatmap": panel}


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


def _analyse_inputs(classes: ClassSet = HAM7) -> Components:
    ui: Components = {}
    ui["image"] = _pass_upload_through(
        gr.Image(
            label="Dermoscopy image",
            type="filepath",
            image_mode=None,
            sources=["upload", "webcam", "clipboard"],
            height=280,
            elem_id="input-image",
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
        # a typed value nothing matches is refused by PredictionRequest with its message
        ui["sex"] = choice_dropdown(list(SEXES), UNKNOWN, "Sex")
        ui["site"] = choice_dropdown(list(SITES), UNKNOWN, "Body site")
    ui["target"] = gr.Dropdown(
        choices=[("Top class (default)", TOP_CLASS)]
        + [(f"{classes.name(c)} ({c})", c) for c in classes],  # the model's classes
        value=TOP_CLASS,
        label="Class to explain (heatmap and metadata chart)",
        elem_classes=[EXACT_CHOICE],
    )
    return ui


def _analyse_outputs() -> Components:
    """The outputs of ``/predict``, in the API's order, plus the view state."""
    ui: Components = {}
    ui["alerts"] = gr.HTML(RESULTS_PLACEHOLDER, elem_id="alerts", label="Alerts")
    ui["probabilities"] = gr.HTML(
        label="Calibrated probabilities", elem_id="probabilities", show_label=True
    )
    ui["heatmap"] = shown_image("Where the model looked (Grad-CAM)", None, "heatmap")
    ui["opacity"] = gr.Slider(0.0, 1.0, value=DEFAULT_OPACITY, step=0.05, label="Heatmap opacity")
    ui["chart"] = shown_image("What the metadata contributed", None, "contributions")
    ui["info"] = gr.Markdown(elem_id="result-info")
    with gr.Row():
        ui["report_btn"] = gr.Button("Case report (PDF)", size="sm")
        ui["report"] = gr.File(label="Case report", visible=False)
    with gr.Accordion("Full result (JSON, as returned by the API)", open=False):
        ui["result"] = gr.JSON(label="Result")
    ui["view"] = gr.State(None)
    return ui


def _confirmations(examples: list[dict[str, Any]]) -> str:
    kinds = sorted({e["confirmed_by"] for e in examples if e["confirmed_by"]})
    return " / ".join(kinds) or "expert"


def _examples_gallery(inputs: Components) -> Any:
    """The example gallery; returns its pick event (None without examples)."""
    examples = _read_examples()
    if not examples:
        return None
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

    return gallery.select(
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
            inputs = _analyse_inputs(service.predictor.classes)
            with gr.Row():
                clear = gr.ClearButton(value="Clear")
                submit = gr.Button("Analyse", variant="primary")
            picked = _examples_gallery(inputs)
        with gr.Column(scale=1, min_width=320):
            outputs = _analyse_outputs()
    ui = {**inputs, **outputs}
    # the opacity slider sits with the heatmap but is an input of /predict too
    predict_inputs = [ui[k] for k in PREDICT_INPUTS]

    def cleared() -> dict[Any, Any]:
        """No result: it would describe another image than the one in the form."""
        return {
            **{outputs[k]: None for k in ("heatmap", "chart", "result", "view")},
            outputs["probabilities"]: "",
            outputs["alerts"]: RESULTS_PLACEHOLDER,
            outputs["info"]: "",
            outputs["report"]: gr.File(value=None, visible=False),
        }

    result_outputs = [*(outputs[k] for k in PREDICT_OUTPUTS), outputs["view"], outputs["report"]]
    # the previous result is cleared first, so an error never shows above an older result
    submit.click(cleared, outputs=result_outputs, queue=False, api_visibility="private").then(
        bind(analyse, service, ui),
        inputs=predict_inputs,
        outputs=[*(outputs[k] for k in PREDICT_OUTPUTS), outputs["view"]],
        api_name="predict",
        api_description="Classify a dermoscopy image (+ optional age, sex, body site, class to "
        "explain, heatmap opacity) and store the prediction in the history database.",
        concurrency_limit=concurrency,
    )
    inputs["image"].upload(
        bind_plain(check_upload, ui),
        inputs=inputs["image"],
        outputs=inputs["image"],
        api_visibility="private",
    )
    # a new image: the result (and its case report) of the previous one goes
    inputs["image"].upload(cleared, outputs=result_outputs, queue=False, api_visibility="private")
    if picked is not None:
        picked.then(cleared, outputs=result_outputs, queue=False, api_visibility="private")
    inputs["target"].input(
        bind(explain_again, service, {**ui, "explained": outputs["info"]}),
        inputs=[*predict_inputs, outputs["view"]],
        outputs=[outputs["heatmap"], outputs["chart"], outputs["view"], outputs["info"]],
        api_visibility="private",
        concurrency_limit=SERIAL_CONCURRENCY,
    )
    outputs["opacity"].release(
        bind(redraw_heatmap, service, ui),
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
