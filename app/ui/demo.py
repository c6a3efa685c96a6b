"""The whole app: :func:`build_demo` composes the five tabs and configures the queue.

Stable API names: ``/predict``, ``/batch``, ``/history``, ``/history_item``, ``/confirm``,
``/report``, ``/delete``, ``/agreement``.

    demo = build_demo(PredictionService.create(checkpoint, db_url))
    demo.launch()            # or: python -m app
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import gradio as gr

from app import views
from app.ui.about import build_about_ui
from app.ui.agreement import AGREEMENT_OUTPUTS, build_agreement_ui
from app.ui.analyse import build_analyse_ui
from app.ui.batch import build_batch_ui
from app.ui.common import (
    EXACT_CHOICE_JS,
    EXPORT_PREFIX,
    HISTORY_INPUTS,
    PREDICT_CONCURRENCY,
    clean_stale_exports,
)
from app.ui.history import SEARCH_INPUTS, SEARCH_OUTPUTS, build_history_ui
from common.text import DISCLAIMER
from service.prediction import PredictionService

TITLE = "DermFusion — dermoscopy lesion classifier"

# --- the queue -----------------------------------------------------------------------------------

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


def build_demo(
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
            f"**{DISCLAIMER}** The model estimates probabilities for "
            f"{len(service.predictor.classes)} lesion "
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
                    inputs=[ui[k] for k in SEARCH_INPUTS],
                    outputs=[ui[k] for k in SEARCH_OUTPUTS],
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
        demo.load(None, js=EXACT_CHOICE_JS, api_visibility="private")
    demo.queue(
        default_concurrency_limit=DEFAULT_CONCURRENCY,
        max_size=max_queue,
        status_update_rate=STATUS_UPDATE_S,
    )
    _word_busy_refusal(demo._queue)
    atexit.register(shutil.rmtree, exports, ignore_errors=True)
    return demo


#: The historical name (``app.frontend.make_frontend``).
make_frontend = build_demo


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
