"""The About tab: the model card (from the checkpoint's own config) and its evaluation plots."""

from __future__ import annotations

from pathlib import Path

import gradio as gr

from app import views
from app.ui.common import Components
from common.version import __version__
from model.subgroups import audit_markdown, load_audit
from service.prediction import PredictionService

#: Evaluation plots shown in the About tab: (file in the checkpoint folder, caption).
EVALUATION_PLOTS = (
    ("eval_confusion_matrix.png", "Confusion matrix (test split)"),
    ("eval_roc.png", "ROC curves, one vs rest (test split)"),
    ("eval_reliability.png", "Reliability diagram (test split)"),
)


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
    # relative links: they stay under the app's root path behind a reverse proxy
    ui["version"] = gr.Markdown(
        f"DermFusion {__version__} · [REST API](api/v1/docs) · [health](healthz)",
        elem_id="software-version",
    )
    audit = load_audit(folder) if folder is not None else None
    if audit is not None:
        ui["subgroups"] = gr.Markdown(
            "### Audit by subgroup (python -m scripts.evaluate --by)\n\n" + audit_markdown(audit),
            elem_id="subgroup-audit",
        )
    return ui
