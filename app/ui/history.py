"""The History tab: filters, table, CSV download, one record's detail, its confirmed
diagnosis, case report and deletion; the ``/history``, ``/history_item``, ``/confirm``,
``/report`` and ``/delete`` endpoints.

:class:`service.prediction.PredictionService` reads, confirms and deletes;
:mod:`service.history` serialises rows; nothing is validated twice here.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import gradio as gr

from app import views
from app.ui.common import (
    DEFAULT_OPACITY,
    HISTORY_INPUTS,
    Components,
    Values,
    bind,
    case_report,
    history_filters,
    output_file,
    prediction_id,
    prune,
    shown_as_errors,
    shown_image,
)
from data_pipeline.schema import Metadata
from db.models import CONFIRM_SOURCES, PredictionRecord
from db.queries import HistoryFilter, confirmed_dx_choices
from service import history
from service.prediction import PredictionService
from service.render import contributions_chart, heatmap_from_png, side_by_side, thumbnail_from_jpeg

#: Rows shown in the History table (the CSV download holds every matching row).
HISTORY_PAGE = 200
#: Rows fetched per database query while writing the CSV download.
CSV_PAGE = 500

#: Input and output order of the ``/history``, ``/history_item``, ``/confirm`` and ``/delete`` APIs.
HISTORY_OUTPUTS = ("table", "summary", "download")
DETAIL_OUTPUTS = ("pick_id", "detail_image", "detail", "detail_probabilities", "detail_chart")
CONFIRM_INPUTS = ("pick_id", "confirm_dx", "confirm_source", "confirm_note")
CONFIRM_OUTPUTS = ("status", *DETAIL_OUTPUTS)
DELETE_OUTPUTS = ("status", *DETAIL_OUTPUTS)


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
    with shown_as_errors("searching the history", "Check the filter"):
        f = views.history_filter(since, until, classes, min_prob, sex, site)
        total = service.count(f)
        shown = service.history(f, limit=HISTORY_PAGE, images=False)
        thumbs = service.thumbnails([r.id for r in shown]) if service.store_images else {}
        prune(exports)
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
        "detail_probabilities": views.probabilities_html(
            record.probabilities or {}, record.model_version
        ),
        "detail_chart": output_file(
            contributions_chart(record.metadata_contributions, target, metadata), "chart"
        ),
    }


def show_record(service: PredictionService, prediction_id_: Any) -> Values:
    """One stored prediction: original and heatmap, details, probabilities, metadata chart."""
    pid = prediction_id(prediction_id_)
    with shown_as_errors("reading the history", "Cannot open this prediction"):
        record = service.get(pid)
    if record is None:
        raise gr.Error(
            f"No stored prediction has id {pid}.", title="Not found", print_exception=False
        )
    return _detail_values(record)


def confirm_record(
    service: PredictionService, prediction_id_: Any, dx: Any, source: Any, note: Any = None
) -> Values:
    """Record the confirmed diagnosis of a stored prediction; returns its refreshed detail."""
    pid = prediction_id(prediction_id_)
    with shown_as_errors("recording the diagnosis", "Cannot record this diagnosis"):
        service.confirm(pid, dx, source, note)
        record = service.get(pid)
    assert record is not None
    values = _detail_values(record)
    values["status"] = (
        f"Prediction #{pid}: confirmed diagnosis **{history.class_label(str(record.confirmed_dx))}"
        f"** ({record.confirmed_source}) recorded."
    )
    return values


def delete_record(service: PredictionService, prediction_id_: Any) -> Values:
    """Delete a stored prediction (image, heatmap, inputs, everything)."""
    pid = prediction_id(prediction_id_)
    with shown_as_errors("deleting the prediction", "Cannot delete this prediction"):
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
    ui["detail_image"] = shown_image("Stored image and heatmap", None, "history-image", False)
    with gr.Row(equal_height=False):
        with gr.Column(min_width=300):
            ui["detail"] = gr.Markdown(elem_id="history-detail")
        with gr.Column(min_width=300):
            ui["detail_probabilities"] = gr.HTML(elem_id="history-probabilities")
            ui["detail_chart"] = shown_image("Metadata contributions", None, "history-chart", False)
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


def build_history_ui(service: PredictionService, exports: Path) -> tuple[Components, Callable]:
    """The History tab: filters, table, CSV download, one row's detail and its actions; the
    ``/history``, ``/history_item``, ``/confirm``, ``/report`` and ``/delete`` endpoints.
    Returns the components and the search handler (run when the tab is selected)."""
    gr.Markdown(
        "Past predictions stored by this app, newest first. Filter, click a row (or type its "
        "id) to open it; record its confirmed diagnosis, download its case report or delete it."
    )
    filters = history_filters()
    listing, search_btn = _history_listing()
    detail, show_btn = _history_detail()
    actions, buttons = _history_actions()
    ui = {**filters, **listing, **detail, **actions}
    search = bind(search_history, service, ui, exports)
    filter_inputs = [filters[k] for k in HISTORY_INPUTS]
    listing_outputs = [listing[k] for k in HISTORY_OUTPUTS]
    search_btn.click(search, inputs=filter_inputs, outputs=listing_outputs, api_name="history")
    show = bind(show_record, service, ui)
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
        bind(confirm_record, service, ui),
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
        bind(case_report, service, {"report": report_file}, exports),
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
        bind(delete_record, service, ui),
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
