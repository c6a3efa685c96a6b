"""The History tab: filters, table, CSV download, one record's detail, its confirmed
diagnosis, case report and deletion; the ``/history``, ``/history_item``, ``/confirm``,
``/report`` and ``/delete`` endpoints.

:class:`service.prediction.PredictionService` reads, confirms and deletes;
:mod:`service.history` serialises rows; nothing is validated twice here.
"""

from __future__ import annotations

import inspect
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
    choice_dropdown,
    history_filters,
    output_file,
    parse_prediction_id,
    prune,
    record_files,
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
#: Inputs of the History tab's search: the filters and the page (``/history``'s last parameter).
SEARCH_INPUTS = (*HISTORY_INPUTS, "page")
#: Outputs of a search: ``/history``'s three values and the page shown (a state, not in the API).
SEARCH_OUTPUTS = (*HISTORY_OUTPUTS, "shown_page")
#: What one opened record shows; ``detail_id`` (a state, not in the API) names the record the
#: detail describes and is set by the same event, so :func:`build_history_ui`'s check of the id
#: box can tell the opening writing its own id there from another id typed in.
DETAIL_OUTPUTS = (
    "pick_id",
    "detail_image",
    "detail",
    "detail_probabilities",
    "detail_chart",
    "detail_id",
)
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


def _page_number(value: Any) -> int:
    """The page asked for (1 = newest); blank or nonsense → 1."""
    try:
        return max(1, int(float(value)))
    except (TypeError, ValueError, OverflowError):
        return 1


def search_history(
    service: PredictionService,
    exports: Path,
    since: Any,
    until: Any,
    classes: Any,
    min_prob: Any,
    sex: Any,
    site: Any,
    page: Any = 1,
) -> Values:
    """One page of the filtered table (:data:`HISTORY_PAGE` rows, page 1 = newest), a summary
    and the CSV of every matching row. A page past the end shows the last page.

    A bad filter raises a titled error saying what to fix; the table keeps what it showed."""
    with shown_as_errors("searching the history", "Check the filter"):
        f = views.history_filter(since, until, classes, min_prob, sex, site)
        total = service.count(f)
        pages = max(1, -(-total // HISTORY_PAGE))
        shown_page = min(_page_number(page), pages)
        offset = (shown_page - 1) * HISTORY_PAGE
        shown = service.history(f, limit=HISTORY_PAGE, offset=offset, images=False)
        thumbs = service.thumbnails([r.id for r in shown]) if service.store_images else {}
        prune(exports)
        record_files(service).remove_deleted(service)  # deleted by another process meanwhile
        out = exports / f"dermfusion_history_{uuid.uuid4().hex[:8]}.csv"
        # a p_ column per class of the matching rows' models (not only the loaded one's)
        history.write_csv(_all_matching(service, f), out, service.class_codes(f))
        record_files(service).add_listing(str(out))
    now = datetime.now(UTC)
    if total == 0:
        summary = f"No stored predictions match ({f.describe()})."
    else:
        where = ""
        if pages > 1:
            where = (
                f"; page {shown_page} of {pages}: rows {offset + 1}–{offset + len(shown)}, "
                "newest first, all in the CSV"
            )
        summary = f"**{views.plural(total, 'matching prediction')}** ({f.describe()}{where})."
    rows = [views.history_table_row(r, thumbs.get(r.id), now) for r in shown]
    return {"table": rows, "summary": summary, "download": str(out), "shown_page": shown_page}


def _detail_values(service: PredictionService, record: PredictionRecord) -> Values:
    image = thumbnail_from_jpeg(record.thumbnail)
    heat = heatmap_from_png(record.heatmap_png)
    metadata = Metadata(age=record.age, sex=record.sex, site=record.site)
    target = record.attribution_target or record.predicted_class
    panel = output_file(side_by_side(image, heat, DEFAULT_OPACITY))
    chart = output_file(
        contributions_chart(record.metadata_contributions, target, metadata), "chart"
    )
    record_files(service).add(record.id, panel, chart)
    return {
        "pick_id": str(record.id),
        "detail_id": record.id,
        "detail_image": panel,
        "detail": history.detail_markdown(record),
        "detail_probabilities": views.probabilities_html(
            record.probabilities or {}, record.model_version
        ),
        "detail_chart": chart,
    }


def _get(service: PredictionService, pid: int) -> PredictionRecord:
    with shown_as_errors("reading the history", "Cannot open this prediction"):
        record = service.get(pid)
    if record is None:
        raise gr.Error(
            f"No stored prediction has id {pid}.", title="Not found", print_exception=False
        )
    return record


def show_record(service: PredictionService, prediction_id: Any) -> Values:
    """One stored prediction: original and heatmap, details, probabilities, metadata chart."""
    return _detail_values(service, _get(service, parse_prediction_id(prediction_id)))


def confirmation_form(service: PredictionService, prediction_id: Any) -> Values:
    """The confirm form as stored for this prediction: its confirmed diagnosis, source and
    note, or an empty form when it has none (never the values of the record shown before)."""
    record = _get(service, parse_prediction_id(prediction_id))
    return {
        "confirm_dx": record.confirmed_dx,
        "confirm_source": record.confirmed_source,
        "confirm_note": record.confirmed_note or "",
    }


def _label_to_value(value: Any, choices: list[tuple[str, str]]) -> Any:
    """A typed display label (``Melanoma (mel)``) as its code; anything else unchanged (the
    service validates it)."""
    text = str(value or "").strip().lower()
    return next((code for label, code in choices if label.lower() == text), value)


def _dx_choices() -> list[tuple[str, str]]:
    return [(history.class_label(c), c) for c in confirmed_dx_choices()]


def confirm_record(
    service: PredictionService, prediction_id: Any, dx: Any, source: Any, note: Any = None
) -> Values:
    """Record the confirmed diagnosis of a stored prediction; returns its refreshed detail.
    An empty form is refused (it would otherwise keep or clear a value nobody chose)."""
    pid = parse_prediction_id(prediction_id)
    if not str(dx or "").strip() or not str(source or "").strip():
        raise gr.Error(
            "Choose the confirmed diagnosis and who confirmed it, then press Record.",
            title="Nothing recorded",
            print_exception=False,
        )
    with shown_as_errors("recording the diagnosis", "Cannot record this diagnosis"):
        service.confirm(pid, _label_to_value(dx, _dx_choices()), source, note)
        record = service.get(pid)
    if record is None:  # deleted meanwhile (another user)
        raise gr.Error(
            f"No stored prediction has id {pid}.", title="Not found", print_exception=False
        )
    values = _detail_values(service, record)
    values["status"] = (
        f"Prediction #{pid}: confirmed diagnosis **{history.class_label(str(record.confirmed_dx))}"
        f"** ({record.confirmed_source}) recorded."
    )
    return values


#: What deleting removes, word for word what :func:`delete_record` and the service do.
DELETE_WHAT = (
    "From the history database: the row with its stored image, heatmap and thumbnail, its "
    "inputs (age, sex, body site), probabilities, confirmed diagnosis and note; their bytes "
    "are overwritten in the database files too. From this server: the uploaded original, the "
    "heatmap and chart images and case-report PDFs made for it, and the History CSV downloads "
    "made so far. Not touched: files already downloaded to a computer, and backups."
)


def delete_question(prediction_id: Any) -> str:
    """The confirmation dialog's text for one prediction."""
    pid = str(prediction_id or "").strip().lstrip("#")
    return f"**Delete prediction #{pid} for good?** {DELETE_WHAT} This cannot be undone."


def delete_record(service: PredictionService, prediction_id: Any) -> Values:
    """Delete a stored prediction (:data:`DELETE_WHAT`): the service removes the row and its
    bytes, this app the files it wrote or received for it (:class:`app.ui.common.RecordFiles`).
    """
    pid = parse_prediction_id(prediction_id)
    try:
        with shown_as_errors("deleting the prediction", "Cannot delete this prediction"):
            deleted = service.delete(pid)
    finally:  # gone from the database (or never there): its files go as well
        record_files(service).remove(pid)
    if not deleted:
        raise gr.Error(
            f"No stored prediction has id {pid}.", title="Not found", print_exception=False
        )
    return {
        "status": f"Prediction #{pid} was deleted.",
        "pick_id": "",
        "detail_id": None,
        "detail_image": None,
        "detail": "",
        "detail_probabilities": "",
        "detail_chart": None,
    }


def _history_listing() -> tuple[Components, dict[str, gr.Button]]:
    ui: Components = {}
    buttons: dict[str, gr.Button] = {}
    with gr.Row(equal_height=True):
        buttons["search"] = gr.Button("Search", variant="primary", scale=2)
        ui["download"] = gr.DownloadButton("Download CSV", value=None, variant="secondary", scale=2)
    ui["summary"] = gr.Markdown(elem_id="history-summary")
    ui["table"] = gr.Dataframe(
        headers=views.HISTORY_TABLE_COLUMNS,
        datatype=views.HISTORY_TABLE_TYPES,
        column_widths=views.HISTORY_TABLE_WIDTHS,
        interactive=False,
        label="Predictions (click anywhere in a row to open it)",
        elem_id="history-table",
        max_height=780,
        wrap=True,
    )
    # one compact line under the table: ‹ Newer [page] Older › (the summary names the page)
    with gr.Row(equal_height=True, elem_id="history-pages"):
        buttons["newer"] = gr.Button("‹ Newer", size="sm", scale=1, min_width=80)
        ui["page"] = gr.Number(
            value=1,
            precision=0,
            label="Page (1 = newest)",
            show_label=False,
            container=False,
            scale=1,
            min_width=80,
            elem_id="history-page",
        )
        buttons["older"] = gr.Button("Older ›", size="sm", scale=1, min_width=80)
    ui["shown_page"] = gr.State(1)
    return ui, buttons


def _history_detail() -> tuple[Components, gr.Button]:
    ui: Components = {}
    with gr.Row():
        ui["pick_id"] = gr.Textbox(
            label="Prediction id", value="", max_lines=1, placeholder="e.g. 12", scale=1
        )
        show_btn = gr.Button("Show prediction", scale=1)
    ui["status"] = gr.Markdown(elem_id="history-status")
    # the record the form and buttons act on, set only by the page's own events (see
    # _shown_only; API calls name their id themselves), and the record the detail shows
    ui["shown_id"] = gr.State(None)
    ui["detail_id"] = gr.State(None)
    ui["detail_image"] = shown_image("Stored image and heatmap", None, "history-image", False)
    with gr.Row(equal_height=False):
        with gr.Column(min_width=300):
            ui["detail"] = gr.Markdown(elem_id="history-detail", latex_delimiters=[])
        with gr.Column(min_width=300):
            ui["detail_probabilities"] = gr.HTML(elem_id="history-probabilities")
            ui["detail_chart"] = shown_image("Metadata contributions", None, "history-chart", False)
    return ui, show_btn


def _history_actions() -> tuple[Components, dict[str, gr.Button]]:
    ui: Components = {}
    buttons: dict[str, gr.Button] = {}
    with gr.Accordion("Record confirmed diagnosis", open=True, elem_id="confirm-box"):
        with gr.Row():
            # checked by the service, with a clear message
            ui["confirm_dx"] = choice_dropdown(_dx_choices(), None, "Confirmed diagnosis", 200)
            ui["confirm_source"] = choice_dropdown(list(CONFIRM_SOURCES), None, "Confirmed by", 160)
        ui["confirm_note"] = gr.Textbox(label="Note (optional)", max_lines=2)
        buttons["confirm"] = gr.Button(
            "Record confirmed diagnosis", variant="primary", interactive=False
        )
    with gr.Row():
        buttons["report"] = gr.Button("Case report (PDF)", interactive=False)
        buttons["delete"] = gr.Button("Delete this prediction…", variant="stop", interactive=False)
    ui["report"] = gr.File(label="Case report", elem_id="history-report", visible=False)
    with gr.Row(visible=False, elem_id="delete-dialog") as ui["delete_row"]:
        ui["delete_question"] = gr.Markdown(delete_question(""))
        buttons["delete_yes"] = gr.Button("Yes, delete it", variant="stop")
        buttons["delete_no"] = gr.Button("Cancel")
    return ui, buttons


def _shown_only(callback: Callable) -> Callable:
    """``callback(prediction_id, ...)`` refused unless ``prediction_id`` is the record the page
    shows (its last input, a state the API does not see: API calls name their id themselves).
    Another id in the box clears the detail and disables the buttons already; this also
    covers a click sent before that clearing arrived, and callers that set the id themselves."""

    def guarded(*inputs: Any) -> Any:
        *values, shown = inputs
        if shown is not None and parse_prediction_id(values[0]) != shown:
            raise gr.Error(
                f"The form shows prediction #{shown}, not #{str(values[0]).strip()}: press "
                "Show prediction to open that one first.",
                title="Open it first",
                print_exception=False,
            )
        return callback(*values)

    params = list(inspect.signature(callback).parameters.values())
    shown = inspect.Parameter("shown", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None)
    guarded.__signature__ = inspect.Signature([*params, shown])  # type: ignore[attr-defined]
    guarded.__name__ = callback.__name__
    return guarded


def build_history_ui(service: PredictionService, exports: Path) -> tuple[Components, Callable]:
    """The History tab: filters, table pages, CSV download, one row's detail and its actions;
    the ``/history``, ``/history_item``, ``/confirm``, ``/report`` and ``/delete`` endpoints.
    Returns the components and the search handler (run when the tab is selected).

    The detail, the confirm form and the action buttons always describe one record: opening a
    record (by id or by clicking a row) loads its stored confirmation, typing another id clears
    them until that record is opened, and the buttons are disabled while nothing is open."""
    gr.Markdown(
        "Past predictions stored by this app, newest first. Filter, click a row (or type its "
        "id) to open it; record its confirmed diagnosis, download its case report or delete it."
    )
    filters = history_filters()
    listing, list_buttons = _history_listing()
    detail, show_btn = _history_detail()
    actions, buttons = _history_actions()
    ui = {**filters, **listing, **detail, **actions}
    private: dict[str, Any] = {"api_visibility": "private"}

    # --- the listing, a page at a time ---------------------------------------------------------
    search = bind(search_history, service, ui, exports)
    search_inputs = [ui[k] for k in SEARCH_INPUTS]
    search_outputs = [ui[k] for k in SEARCH_OUTPUTS]

    def sync_page(shown: Any) -> dict[Any, Any]:
        return {listing["page"]: shown}

    def refresh(event: Any) -> Any:
        return event.then(search, inputs=search_inputs, outputs=search_outputs, **private).then(
            sync_page, inputs=listing["shown_page"], outputs=listing["page"], **private
        )

    list_buttons["search"].click(
        lambda: {listing["page"]: 1}, outputs=listing["page"], queue=False, **private
    ).then(search, inputs=search_inputs, outputs=search_outputs, api_name="history").then(
        sync_page, inputs=listing["shown_page"], outputs=listing["page"], **private
    )
    listing["page"].submit(search, inputs=search_inputs, outputs=search_outputs, **private).then(
        sync_page, inputs=listing["shown_page"], outputs=listing["page"], **private
    )
    for name, step in (("newer", -1), ("older", 1)):
        refresh(
            list_buttons[name].click(
                lambda page, step=step: {listing["page"]: max(1, _page_number(page) + step)},
                inputs=listing["page"],
                outputs=listing["page"],
                queue=False,
                **private,
            )
        )

    # --- one record: detail, form and actions together -------------------------------------------
    show = bind(show_record, service, ui)
    detail_outputs = [ui[k] for k in DETAIL_OUTPUTS]
    # the detail images stay hidden until a row is opened (no empty placeholders); visibility
    # and the form are set by private follow-up events so the API returns plain values
    images = [ui["detail_image"], ui["detail_chart"]]
    form = [ui["confirm_dx"], ui["confirm_source"], ui["confirm_note"]]
    action_buttons = [buttons["confirm"], buttons["report"], buttons["delete"]]
    hidden_dialog = {ui["delete_row"]: gr.Row(visible=False), ui["report"]: gr.File(visible=False)}

    def opened(prediction_id: Any) -> dict[Any, Any]:
        values = confirmation_form(service, prediction_id)
        return {
            ui["shown_id"]: parse_prediction_id(prediction_id),
            **{ui[k]: v for k, v in values.items()},
            **{c: gr.Image(visible=True) for c in images},
            **{b: gr.Button(interactive=True) for b in action_buttons},
            **hidden_dialog,
        }

    opened_outputs = [
        ui["shown_id"],
        *form,
        *images,
        *action_buttons,
        ui["delete_row"],
        ui["report"],
    ]

    def closed() -> dict[Any, Any]:
        """Nothing open: no detail, an empty form, no actions."""
        return {
            ui["shown_id"]: None,
            ui["detail_id"]: None,
            **{c: gr.Image(value=None, visible=False) for c in images},
            ui["detail"]: "",
            ui["detail_probabilities"]: "",
            ui["confirm_dx"]: None,
            ui["confirm_source"]: None,
            ui["confirm_note"]: "",
            **{b: gr.Button(interactive=False) for b in action_buttons},
            **hidden_dialog,
        }

    closed_outputs = [
        ui["shown_id"],
        ui["detail_id"],
        *images,
        ui["detail"],
        ui["detail_probabilities"],
        *form,
        *action_buttons,
        ui["delete_row"],
        ui["report"],
    ]

    def open_fresh(event: Any) -> None:
        event.success(
            lambda: {ui["status"]: ""}, outputs=ui["status"], queue=False, **private
        ).success(opened, inputs=detail["pick_id"], outputs=opened_outputs, **private)

    open_fresh(
        show_btn.click(
            show, inputs=detail["pick_id"], outputs=detail_outputs, api_name="history_item"
        )
    )
    open_fresh(
        detail["pick_id"].submit(show, inputs=detail["pick_id"], outputs=detail_outputs, **private)
    )

    def box_changed(prediction_id: Any, detail_id: Any) -> dict[Any, Any]:
        """Another id in the box (typed, pasted, filled in by the browser): what is shown no
        longer belongs to it, so close it. The box also changes when a record is opened (its
        own id is written there); ``detail_id`` is set by that same event, so it matches and
        nothing closes. (Listening to ``.input`` instead raced: Gradio's Textbox sends an
        ``input`` event after every keydown, Enter included, which could arrive after Enter's
        own ``submit`` had opened the record and close it again.)"""
        # (an empty dict is not "no change" to Gradio, but one output left as it is is)
        unchanged = {ui["status"]: gr.skip()}
        if detail_id is None:  # nothing open (or just deleted: keep its status line)
            return unchanged
        try:
            same = parse_prediction_id(prediction_id) == detail_id
        except gr.Error:
            same = False
        return unchanged if same else {**closed(), ui["status"]: ""}

    detail["pick_id"].change(
        box_changed,
        inputs=[detail["pick_id"], ui["detail_id"]],
        outputs=[*closed_outputs, ui["status"]],
        queue=False,
        trigger_mode="always_last",
        **private,
    )

    def pick_row(evt: gr.SelectData) -> dict[Any, Any]:
        row = evt.row_value or []
        if len(row) < 2 or row[1] in (None, ""):
            raise gr.Error("That row has no prediction id.", print_exception=False)
        return show(row[1])

    open_fresh(listing["table"].select(pick_row, outputs=detail_outputs, **private))

    # --- actions ---------------------------------------------------------------------------------
    refresh(
        buttons["confirm"]
        .click(
            _shown_only(bind(confirm_record, service, ui)),
            inputs=[*(ui[k] for k in CONFIRM_INPUTS), ui["shown_id"]],
            outputs=[ui[k] for k in CONFIRM_OUTPUTS],
            api_name="confirm",
            api_description="Record the confirmed diagnosis of a stored prediction: id, "
            f"diagnosis ({', '.join(confirmed_dx_choices())}), source "
            f"({', '.join(CONFIRM_SOURCES)}), note.",
        )
        .success(opened, inputs=detail["pick_id"], outputs=opened_outputs, **private)
    )
    # /report returns the PDF through a hidden file; the visible one appears once there is one
    report_file = gr.File(visible=False)
    buttons["report"].click(
        _shown_only(bind(case_report, service, {"report": report_file}, exports)),
        inputs=[detail["pick_id"], ui["shown_id"]],
        outputs=report_file,
        api_name="report",
        api_description="A one-page PDF case report of a stored prediction (by id).",
    ).success(
        lambda path: {actions["report"]: gr.File(value=path, visible=True)},
        inputs=report_file,
        outputs=actions["report"],
        **private,
    )
    buttons["delete"].click(
        lambda pid: {
            ui["delete_row"]: gr.Row(visible=bool(str(pid or "").strip())),
            ui["delete_question"]: delete_question(pid),
        },
        inputs=detail["pick_id"],
        outputs=[ui["delete_row"], ui["delete_question"]],
        queue=False,
        **private,
    )
    buttons["delete_no"].click(
        lambda: {ui["delete_row"]: gr.Row(visible=False)},
        outputs=ui["delete_row"],
        queue=False,
        **private,
    )
    refresh(
        buttons["delete_yes"]
        .click(
            _shown_only(bind(delete_record, service, ui)),
            inputs=[detail["pick_id"], ui["shown_id"]],
            outputs=[ui[k] for k in DELETE_OUTPUTS],
            api_name="delete",
            api_description="Delete a stored prediction (by id): " + DELETE_WHAT,
        )
        .success(closed, outputs=closed_outputs, **private)
    )
    return ui, search
