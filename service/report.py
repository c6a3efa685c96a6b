"""The case report: one A4 page (PDF) describing one stored prediction.

Built from the stored row (:class:`db.models.PredictionRecord`), so a report made right after an
analysis and one made months later from the History tab are the same document. Drawn with
matplotlib's PDF backend (no extra dependency): the image and its heatmap side by side, the
inputs, every probability, the metadata contributions, the warnings, the model version and weights
hash, the confirmed diagnosis when there is one, the date and the disclaimer.

Stored text (a note, a model version, a file name) is drawn literally: matplotlib's mathtext is
off for the whole figure, so "paid $5 then $10" keeps its dollars and a note like ``see $\\foo$``
cannot make the report fail. Probabilities are listed highest first, as the app shows them.
"""

from __future__ import annotations

import io
import textwrap
from datetime import UTC, datetime
from typing import Any

from common.plotting import pyplot
from common.text import DISCLAIMER
from data_pipeline.schema import Metadata, row_classes
from db.models import PredictionRecord
from service.history import class_label, format_age, format_time, short_label
from service.render import (
    draw_contributions,
    draw_side_by_side,
    heatmap_from_png,
    thumbnail_from_jpeg,
)

A4_INCHES = (8.27, 11.69)
MALIGNANT_COLOUR = "#b91c1c"
BENIGN_COLOUR = "#2563eb"


def _wrap(text: str, width: int = 100) -> str:
    return "\n".join(textwrap.fill(line, width) for line in text.splitlines())


def report_filename(record: PredictionRecord) -> str:
    return f"dermfusion_case_{record.id}.pdf"


def case_report_pdf(record: PredictionRecord, now: datetime | None = None) -> bytes:
    """One-page PDF of ``record`` (which must have its image columns loaded)."""
    return case_report(record, now, "pdf")


#: Literal text everywhere (no "$...$" mathtext, no TeX); SVG keeps text as text (tests read it).
LITERAL_TEXT = {"text.parse_math": False, "text.usetex": False, "svg.fonttype": "none"}


def case_report(record: PredictionRecord, now: datetime | None = None, fmt: str = "pdf") -> bytes:
    """The case report of ``record`` in a matplotlib output format (``pdf``; ``svg``)."""
    plt = pyplot()
    # Every text object, made now or when the file is drawn (tick labels), is literal.
    with plt.rc_context(LITERAL_TEXT):
        return _draw(plt, record, now or datetime.now(UTC), fmt)


def _draw(plt: Any, record: PredictionRecord, now: datetime, fmt: str) -> bytes:
    fig = plt.figure(figsize=A4_INCHES)
    grid = fig.add_gridspec(
        5, 3, height_ratios=[0.55, 2.3, 1.2, 2.0, 1.6], width_ratios=[1, 1, 0.04], hspace=0.55
    )
    fig.subplots_adjust(left=0.24, right=0.92, top=0.95, bottom=0.07)
    fig.text(
        0.5,
        0.02,
        f"{DISCLAIMER} Outputs are probabilities from a statistical model, not a medical opinion.",
        ha="center",
        fontsize=8,
        color="#475569",
    )

    head = fig.add_subplot(grid[0, :])
    head.axis("off")
    head.text(0, 1, f"DermFusion case report — prediction #{record.id}", fontsize=15, va="top")
    head.text(
        0,
        0.35,
        f"{DISCLAIMER} Not for clinical use.\nReport made {format_time(now)} UTC; "
        f"prediction made {format_time(record.created_at)} UTC.",
        fontsize=8.5,
        color=MALIGNANT_COLOUR,
        va="top",
        linespacing=1.5,
    )

    image = thumbnail_from_jpeg(record.thumbnail)
    heat = heatmap_from_png(record.heatmap_png)
    axes = [fig.add_subplot(grid[1, i]) for i in range(3)]
    if image is not None:
        mappable = draw_side_by_side(axes, image, heat, 0.45)
        if mappable is not None:
            bar = fig.colorbar(mappable, cax=axes[2])
            bar.set_ticks([0, 1], labels=["low", "high"])
            bar.ax.tick_params(labelsize=7)
        else:
            axes[2].axis("off")
    else:
        for ax in axes:
            ax.axis("off")
        note = "No image stored (predictions made with --no-store-images keep no image)."
        if heat is not None:
            axes[1].imshow(heat, cmap="jet", vmin=0, vmax=1)
            axes[1].set_title("Grad-CAM heatmap only", fontsize=9)
        axes[0].text(0, 0.5, _wrap(note, 45), fontsize=9, va="center")

    facts = fig.add_subplot(grid[2, :])
    facts.axis("off")
    explains = (
        class_label(record.attribution_target, record.model_version)
        if record.attribution_target
        else "—"
    )
    lines = [
        f"Inputs: age {format_age(record.age) or 'unknown'}, sex {record.sex}, "
        f"body site {record.site}; image {record.image_width}×{record.image_height} px, "
        f"sha256 {record.image_sha256[:16]}…",
        f"Top class: {class_label(record.predicted_class, record.model_version)} "
        f"{100 * record.predicted_probability:.1f} %. Heatmap and contributions explain: "
        f"{explains}.",
        f"Model: {record.model_version}; weights sha256 {record.checkpoint_sha256}.",
    ]
    if record.confirmed_dx:
        note = f" — {record.confirmed_note}" if record.confirmed_note else ""
        lines.append(
            f"Confirmed diagnosis: {class_label(record.confirmed_dx)} by "
            f"{record.confirmed_source}, recorded {format_time(record.confirmed_at)} UTC{note}"
        )
    warnings = list(record.warnings or [])
    lines += [f"WARNING: {w}" for w in warnings] or ["Warnings: none."]
    facts.text(0, 1, _wrap("\n".join(lines), 88), fontsize=8.5, va="top", linespacing=1.5)

    probs = fig.add_subplot(grid[3, :2])
    stored = record.probabilities or {}
    # Highest first, as the app lists them (barh draws the first bar at the bottom).
    classes = row_classes(stored, record.model_version)  # the row's model's classes
    ranked = sorted(classes, key=lambda c: -float(stored.get(c, 0.0)))[::-1]
    values = [100 * float(stored.get(c, 0.0)) for c in ranked]
    names = [short_label(c, record.model_version) for c in ranked]
    colours = [MALIGNANT_COLOUR if c in classes.malignant else BENIGN_COLOUR for c in ranked]
    probs.barh(names, values, color=colours)
    probs.set_xlim(0, 115)
    for y, v in enumerate(values):
        probs.text(v + 1, y, "<1 %" if v < 1 else f"{v:.1f} %", va="center", fontsize=8)
    probs.set_title(
        "Calibrated probabilities (red: malignant or pre-malignant classes)", fontsize=9
    )
    probs.tick_params(labelsize=8)
    for side in ("top", "right"):
        probs.spines[side].set_visible(False)

    contrib = fig.add_subplot(grid[4, :2])
    metadata = Metadata(age=record.age, sex=record.sex, site=record.site)
    target = record.attribution_target or record.predicted_class
    draw_contributions(contrib, record.metadata_contributions, target, metadata)
    contrib.set_title("Metadata contributions", fontsize=9)

    buf = io.BytesIO()
    fig.savefig(buf, format=fmt, metadata={"Title": f"DermFusion case {record.id}"})
    plt.close(fig)
    return buf.getvalue()
