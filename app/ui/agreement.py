"""The Agreement tab: the model's top class against the confirmed diagnoses recorded in History,
over any filtered slice (:mod:`service.agreement`); the ``/agreement`` endpoint."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gradio as gr

from app import views
from app.ui.common import HISTORY_INPUTS, Components, Values, bind, history_filters, shown_as_errors
from service import agreement as agreement_view
from service.prediction import PredictionService

AGREEMENT_OUTPUTS = ("agreement_summary", "confusion", "per_class", "by_version", "agreement")


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
    with shown_as_errors("computing the agreement", "Check the filter"):
        f = views.history_filter(since, until, classes, min_prob, sex, site)
        a = service.agreement(f)
    return {
        "agreement_summary": views.agreement_markdown(a) + f"\n\n*Filter: {f.describe()}.*",
        # columns are the rows' models' classes (HAM10000's 7 for the shipped model)
        "confusion": {
            "headers": agreement_view.confusion_headers(a),
            "data": agreement_view.confusion_rows(a),
        },
        "per_class": agreement_view.per_class_rows(a),
        "by_version": agreement_view.version_rows(a),
        "agreement": a.to_dict(),
    }


def build_agreement_ui(service: PredictionService) -> tuple[Components, Callable]:
    """The Agreement tab over any filtered slice; the ``/agreement`` endpoint. Returns the
    components and the handler (run when the tab is selected)."""
    gr.Markdown(
        "How the model's top class agrees with the **confirmed diagnoses** recorded in History, "
        "on your own patients. Only predictions with a confirmed diagnosis count; `other` means "
        "a lesion outside the model's classes (it always counts as a miss)."
    )
    ui = history_filters()
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
    handler = bind(agreement_report, service, ui)
    run_btn.click(
        handler,
        inputs=[ui[k] for k in HISTORY_INPUTS],
        outputs=[ui[k] for k in AGREEMENT_OUTPUTS],
        api_name="agreement",
        api_description="Agreement of the model with recorded confirmed diagnoses over the "
        "filtered history (same filters as /history).",
    )
    return ui, handler
