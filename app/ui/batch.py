"""The Batch tab: many images (files or .zip archives) + an optional metadata CSV, each stored
like a single analysis (:mod:`service.batch`); the ``/batch`` endpoint."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from app import views
from app.ui.common import (
    SERIAL_CONCURRENCY,
    Components,
    Values,
    forget_uploads,
    prune,
    record_files,
    shown_as_errors,
)
from service import batch as batch_service
from service import history
from service.prediction import PredictionService

#: Input and output order of the ``/batch`` API.
BATCH_INPUTS = ("files", "metadata")
BATCH_OUTPUTS = ("summary", "table", "download")


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
        with shown_as_errors("analysing the batch", "Cannot analyse this batch"):
            items = batch_service.collect_items(paths, csv_path)
            rows = batch_service.run_batch(service, items, report)
            prune(exports)
            out = exports / f"dermfusion_batch_{uuid.uuid4().hex[:8]}.csv"
            with out.open("w", newline="", encoding="utf-8") as fh:
                codes = service.predictor.classes.codes  # a p_ column per class of the model
                history.write_csv_rows(
                    fh,
                    batch_service.csv_columns(codes),
                    (batch_service.csv_row(r, codes) for r in rows),
                )
            ids = [r.prediction_id for r in rows if r.prediction_id is not None]
            files = record_files(service)
            for pid in ids:  # a zip or the CSV holds every row's data: deleting one removes them
                files.add(pid, str(out), *(paths if service.store_images else ()), csv_path)
            thumbs = service.thumbnails(ids) if service.store_images else {}
            table = [
                views.batch_table_row(
                    r, thumbs.get(r.prediction_id) if r.prediction_id is not None else None
                )
                for r in rows
            ]
    finally:
        forget_uploads(service, [*paths, csv_path])
    return {"summary": views.batch_summary(rows), "table": table, "download": str(out)}


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
        column_widths=views.BATCH_TABLE_WIDTHS,
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

    # the previous batch's result is cleared first, so an error never shows under old rows
    run_btn.click(
        lambda: {ui["summary"]: "", ui["table"]: None, ui["download"]: None},
        outputs=[ui[k] for k in BATCH_OUTPUTS],
        queue=False,
        api_visibility="private",
    ).then(
        run,
        inputs=[ui[k] for k in BATCH_INPUTS],
        outputs=[ui[k] for k in BATCH_OUTPUTS],
        api_name="batch",
        api_description="Analyse several images (files or .zip) with an optional metadata CSV; "
        "every image is stored like a single prediction.",
        concurrency_limit=SERIAL_CONCURRENCY,
    )
    return ui
