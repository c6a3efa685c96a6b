"""Presentation helpers for the app: turn predictions and checkpoint configs into the values Gradio
components display (label dicts, Markdown). History rows are serialised by :mod:`service.history`.

No decisions are made here — which classes are flagged, which warnings apply, what is stored —
those come from :class:`model.predictor.Predictor` and
:class:`service.prediction.PredictionService`. Everything is plain Python (no Gradio import) so it
can be tested without a server.

The model card describes the model from its checkpoint config: input geometry and colour
handling from ``preprocessing``, the datasets and their citations from ``training["sources"]``,
the out-of-distribution threshold from ``ood``. Checkpoints written before those keys existed fall
back to :data:`LEGACY_SOURCES` / :data:`KNOWN_DATASETS`, the facts of the HAM10000 training those
checkpoints had.
"""

from __future__ import annotations

import base64
import html
import math
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal

from common.text import DISCLAIMER
from data_pipeline.schema import ClassSet, row_classes
from db.models import PredictionRecord, as_utc
from db.queries import HistoryFilter
from model.checkpoint import SHIPPED_DIR, CheckpointConfig
from model.ood import LOW_CONFIDENCE
from model.predictor import MALIGNANT_FLAG, Prediction, ordinal
from service.agreement import Agreement, summary_lines
from service.batch import BatchRow
from service.history import class_label, escape_markdown, short_label
from service.prediction import StoredPrediction
from service.render import small_thumbnail_jpeg

ANY = "any"

#: What is known about a dataset beyond what a checkpoint records (display facts only).
KNOWN_DATASETS: dict[str, dict[str, str]] = {
    "HAM10000": {
        "description": "dermoscopic images of pigmented lesions with age, sex and body site",
        "image_size": "200×150 px",
        "population": "Vienna (Austria) and Queensland (Australia), mostly fair-skinned patients",
    },
}
#: ``training["sources"]`` of checkpoints written before sources were recorded.
LEGACY_SOURCES: list[dict[str, Any]] = [
    {
        "name": "HAM10000",
        "role": "train",
        "citation": (
            "Tschandl, Rosendahl & Kittler, *Sci. Data* 5, 180161, 2018; "
            "doi:10.1038/sdata.2018.161; CC BY-NC 4.0"
        ),
    }
]


def label_value(
    probabilities: dict[str, float], classes: ClassSet | None = None
) -> dict[str, float]:
    """Value for ``gr.Label``: every class by full name with its calibrated probability
    (``classes``: the model's; None: those of the probabilities' keys, see ``row_classes``)."""
    classes = classes or row_classes(probabilities)
    return {f"{classes.name(c)} ({c})": float(probabilities.get(c, 0.0)) for c in classes}


def alerts_markdown(prediction: Prediction) -> str:
    """The malignancy flag and the predictor's warnings, most important first."""
    parts: list[str] = []
    flagged = list(prediction.malignant_flag)
    if flagged:
        names = prediction.classes
        listed = ", ".join(f"{names.name(c)} {prediction.probabilities[c]:.0%}" for c in flagged)
        parts.append(
            f"### ⚠️ Possible malignant lesion: {listed}\n"
            "A malignant or pre-malignant class ranks high. Have this lesion examined by a "
            "dermatologist — this tool cannot rule anything in or out."
        )
    for warning in prediction.warnings:
        parts.append(f"**⚠️ {escape_markdown(warning)}**")
    if not flagged:
        top = prediction.top_class
        classes = prediction.classes
        malignant = ", ".join(classes.name(c) for c in classes.malignant_codes) or "none"
        parts.append(
            f"No malignant class ranks high ({malignant} are flagged when they rank first or "
            f"reach {MALIGNANT_FLAG:.0%}). Top class: {classes.name(top)} "
            f"{prediction.top_probability:.0%}."
        )
    parts.append(f"*{DISCLAIMER}*")
    return "\n\n".join(parts)


MALIGNANT_COLOUR = "#b91c1c"
BENIGN_COLOUR = "#2563eb"


def percent(p: float, threshold: float | None = None) -> str:
    """``<1 %`` below one percent, else a whole percentage (``34 %``). Compared with a
    ``threshold``, a value that rounding would put on the threshold's other side gets one
    decimal, rounded towards its own side: 49.96 % below 50 % reads ``49.9 %``, never ``50 %``;
    likewise 99.96 % reads ``99.9 %``, never ``100 %``."""
    if p < 0.01:
        return "<1 %"
    whole = f"{100 * p:.0f} %"
    limit = 1.0 if threshold is None else threshold  # nothing below 1 reads "100 %" either
    if p < limit <= float(whole[:-2]) / 100:
        return f"{math.floor(1000 * p) / 10:.1f} %"
    return whole


def probabilities_html(probabilities: dict[str, float], model_version: str | None = None) -> str:
    """A horizontal bar chart in HTML (it reflows at phone width): every class of the model
    (``model_version``'s; a stored row's classes are its probabilities' keys), largest first,
    malignant / pre-malignant classes in red; the top class is bold, not repeated elsewhere."""
    classes = row_classes(probabilities, model_version)
    ranked = sorted(classes, key=lambda c: -float(probabilities.get(c, 0.0)))
    rows = []
    for i, c in enumerate(ranked):
        p = float(probabilities.get(c, 0.0))
        colour = MALIGNANT_COLOUR if c in classes.malignant else BENIGN_COLOUR
        weight = "700" if i == 0 else "400"
        rows.append(
            f'<div class="prob-row" data-class="{c}" style="font-weight:{weight}">'
            f'<span class="prob-name">{html.escape(class_label(c, model_version))}</span>'
            f'<span class="prob-track"><span class="prob-bar" '
            f'style="width:{max(0.5, 100 * p):.1f}%;background:{colour}"></span></span>'
            f'<span class="prob-value">{html.escape(percent(p))}</span></div>'
        )
    legend = (
        f'<div class="prob-legend"><span style="color:{MALIGNANT_COLOUR}">■</span> malignant or '
        f'pre-malignant class &nbsp; <span style="color:{BENIGN_COLOUR}">■</span> benign class'
        " · calibrated probabilities</div>"
    )
    return f'<div class="prob-chart">{"".join(rows)}{legend}</div>'


def _alert(level: str, title: str, text: str) -> str:
    return (
        f'<div class="alert alert-{level}"><strong>{html.escape(title)}</strong> '
        f"{html.escape(text)}</div>"
    )


def alerts_html(prediction: Prediction, storage_problem: str | None = None) -> str:
    """One short coloured line per alert: red for the malignant flag, amber for low confidence
    and images unlike the training dermoscopy, neutral otherwise."""
    parts: list[str] = []
    if storage_problem:
        parts.append(_alert("warn", "Not saved to history:", storage_problem))
    flagged = list(prediction.malignant_flag)
    if flagged:
        listed = ", ".join(
            f"{prediction.classes.name(c)} {percent(prediction.probabilities[c])}" for c in flagged
        )
        parts.append(
            _alert(
                "danger",
                "Possible malignant lesion:",
                f"{listed}. Have it examined by a dermatologist.",
            )
        )
    if prediction.top_probability < LOW_CONFIDENCE:
        parts.append(
            _alert(
                "warn",
                "Low confidence:",
                f"the top class has only {percent(prediction.top_probability, LOW_CONFIDENCE)} "
                f"(below {LOW_CONFIDENCE:.0%}).",
            )
        )
    d, t = prediction.ood_distance, prediction.ood_threshold
    if d is not None and t is not None and d > t:
        parts.append(
            _alert(
                "warn",
                "Unlike the training dermoscopy:",
                f"feature distance {d:.3f} is above the limit {t:.3f}; treat the result "
                "with extra caution.",
            )
        )
    known = ("Low confidence", "Unreliable: this image is unlike")
    for w in prediction.warnings:
        if not w.startswith(known) and "feature distance" not in w:
            parts.append(_alert("warn", "Warning:", w))
    if not flagged:
        parts.append(
            _alert(
                "info",
                "No malignant class ranks high.",
                f"(Flagged when melanoma, basal cell carcinoma or actinic keratosis ranks first "
                f"or reaches {MALIGNANT_FLAG:.0%}.)",
            )
        )
    if d is not None and t is not None and d <= t:
        parts.append(
            _alert(
                "info",
                "Image check:",
                f"feature distance {d:.3f} is within the limit {t:.3f} for dermoscopy images "
                "like the training set.",
            )
        )
    parts.append(f'<div class="alert-footer"><em>{html.escape(DISCLAIMER)}</em></div>')
    return "\n".join(parts)


def result_markdown(stored: StoredPrediction) -> str:
    """Model version, storage outcome and attribution target of one prediction."""
    pred = stored.prediction
    if stored.stored and stored.id is not None:
        saved = f"saved to history as **#{stored.id}**"
    else:
        saved = "**not saved** to history"
    target = pred.attribution_target
    explained = (
        f"Heatmap and metadata chart explain **{pred.classes.name(target)}**. "
        if target is not None and target in pred.classes
        else ""
    )
    return f"{explained}Model `{pred.model_version}` · {pred.latency_ms:.0f} ms · {saved}."


# --------------------------------------------------------------------------------------------
# History and batch tables


def plural(n: int, word: str, many: str | None = None) -> str:
    """``1 prediction`` / ``2 predictions``."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def readable_time(value: datetime | None, now: datetime | None = None) -> str:
    """``today 14:05``, ``yesterday 09:12`` or ``3 Mar 2026 14:05`` (UTC)."""
    if value is None:
        return ""
    value = as_utc(value)
    today = (now or datetime.now(UTC)).date()
    clock = value.strftime("%H:%M")
    days = (today - value.date()).days
    if days == 0:
        return f"today {clock}"
    if days == 1:
        return f"yesterday {clock}"
    return f"{value.day} {value.strftime('%b %Y')} {clock}"


def thumbnail_markdown(jpeg: bytes | None, alt: str) -> str:
    """A small inline image for a table cell (empty when no image was stored)."""
    small = small_thumbnail_jpeg(jpeg)
    if small is None:
        return "—"
    # the alt text is a file name or an id: only letters, digits and a few marks survive, so a
    # name like "x](javascript:...) <img ...>.jpg" cannot close the image syntax or add markup
    alt = re.sub(r"[^\w #.,-]+", "_", alt)[:80]
    return f"![{alt}](data:image/jpeg;base64,{base64.b64encode(small).decode('ascii')})"


def flags_text(malignant: Sequence[str], n_warnings: int) -> str:
    """``malignant: mel · 1 warning`` (plain text: emoji are missing from many fonts)."""
    parts = []
    if malignant:
        parts.append("malignant: " + ", ".join(malignant))
    if n_warnings:
        parts.append(plural(n_warnings, "warning"))
    return " · ".join(parts) or "—"


def record_flags(r: PredictionRecord) -> list[str]:
    """Malignant classes flagged for a stored row (the predictor's rule, from its probabilities)."""
    probs = r.probabilities or {}
    classes = row_classes(probs, r.model_version)  # the row's model's classes
    return [
        c
        for c in classes.malignant_codes
        if probs.get(c, 0.0) >= MALIGNANT_FLAG or c == r.predicted_class
    ]


HISTORY_TABLE_COLUMNS = [
    "image",
    "id",
    "time (UTC)",
    "top class",
    "probability",
    "flags",
    "confirmed",
    "age",
    "sex",
    "site",
    "model",
]
#: Column widths of the History table: wide enough for each header on one line (a wrapped
#: "confirmed" was a letter per line) and for the usual values.
HISTORY_TABLE_WIDTHS: list[str | int] = [
    "76px",
    "56px",
    "120px",
    "170px",
    "120px",
    "130px",
    "140px",
    "56px",
    "80px",
    "110px",
    "150px",
]
HISTORY_TABLE_TYPES: list[Literal["str", "number", "markdown"]] = [
    "markdown",
    "number",
    "str",
    "str",
    "str",
    "str",
    "str",
    "str",
    "str",
    "str",
    "str",
]


def history_table_row(
    r: PredictionRecord, thumbnail: bytes | None, now: datetime | None = None
) -> list[Any]:
    """One History-tab row: thumbnail, id, time, class, probability %, flags, confirmed label
    (``r`` may come from a listing without image bytes; the thumbnail is passed separately)."""
    return [
        thumbnail_markdown(thumbnail, f"#{r.id}"),
        r.id,
        readable_time(r.created_at, now),
        short_label(r.predicted_class, r.model_version),
        f"{100 * float(r.predicted_probability):.1f} %",
        flags_text(record_flags(r), len(r.warnings or [])),
        short_label(r.confirmed_dx),
        "" if r.age is None else f"{r.age:g}",
        r.sex,
        r.site,
        r.model_version,
    ]


BATCH_TABLE_COLUMNS = ["image", "file", "id", "top class", "probability", "flags", "error"]
BATCH_TABLE_WIDTHS: list[str | int] = ["76px", "190px", "60px", "200px", "110px", "150px", "320px"]
BATCH_TABLE_TYPES: list[Literal["str", "number", "markdown"]] = [
    "markdown",
    "str",
    "str",
    "str",
    "str",
    "str",
    "str",
]


def batch_table_row(row: BatchRow, thumbnail: bytes | None) -> list[Any]:
    if not row.ok:
        return ["—", row.name, "", "", "", "not analysed", row.error or ""]
    return [
        thumbnail_markdown(thumbnail, row.name),
        row.name,
        "" if row.prediction_id is None else f"#{row.prediction_id}",
        short_label(row.top_class),
        percent(row.probability or 0.0),
        flags_text(row.malignant_flag, len(row.warnings)),
        "",
    ]


def batch_summary(rows: Sequence[BatchRow]) -> str:
    ok = [r for r in rows if r.ok]
    failed = len(rows) - len(ok)
    flagged = sum(1 for r in ok if r.malignant_flag)
    text = f"**{plural(len(ok), 'image')} analysed and stored**"
    if failed:
        text += f", **{plural(failed, 'file')} could not be analysed** (see the error column)"
    text += f"; {plural(flagged, 'image')} with a malignant flag. *{DISCLAIMER}*"
    errors = [r for r in rows if not r.ok]
    for r in errors[:10]:
        error = r.error or ""
        if not error.startswith(r.name):  # most messages already name the file
            error = f"{r.name}: {error}"
        text += f"\n- {escape_markdown(error)}"
    if len(errors) > 10:
        text += f"\n- … and {plural(len(errors) - 10, 'more file')} (see the table and the CSV)"
    return text


def agreement_markdown(a: Agreement) -> str:
    lines = summary_lines(a)
    if not a.n_confirmed:
        lines.append(
            "Record confirmed diagnoses in the History tab (select a row, then "
            "*Record confirmed diagnosis*) to see how the model does on your patients."
        )
    elif a.n_confirmed < 30:
        lines.append(
            f"Only {plural(a.n_confirmed, 'confirmed case')}: these percentages are very uncertain."
        )
    head, *rest = lines
    return "\n".join([f"**{head}**", *(f"- {x}" for x in rest)])


def history_filter(
    since: Any, until: Any, classes: Any, min_prob: Any, sex: Any, site: Any
) -> HistoryFilter:
    """The History form as a :class:`db.queries.HistoryFilter` (which validates every field and
    raises ``DermError`` with a readable message). ``any`` / blank / 0 mean "no condition"."""

    def chosen(value: Any) -> Any:
        return None if value is None or str(value).strip().lower() in ("", ANY) else value

    return HistoryFilter(
        since=since,
        until=until,
        classes=list(classes or []),
        min_prob=None if min_prob in (None, "", 0, 0.0) else min_prob,
        sex=chosen(sex),
        site=chosen(site),
    )


# --------------------------------------------------------------------------------------------
# Model card: facts read from the checkpoint config


def training_sources(config: CheckpointConfig) -> list[dict[str, Any]]:
    """``training["sources"]``, or :data:`LEGACY_SOURCES` for configs that predate it."""
    sources = (getattr(config, "training", None) or {}).get("sources")
    return [dict(s) for s in sources] if sources else [dict(s) for s in LEGACY_SOURCES]


def training_dataset_name(config: CheckpointConfig) -> str:
    """The name(s) of the training dataset(s), e.g. ``HAM10000``: the primary source (whose
    split the model was trained on) and any extra training source, never an external one."""
    names = [
        s.get("name", "?")
        for s in training_sources(config)
        if s.get("role", "train") in ("primary", "train")
    ]
    return " + ".join(names) or "training"


def _config_value(section: Any, key: str) -> Any:
    """``section.key`` or ``section[key]`` (dataclass or dict), None when absent."""
    if isinstance(section, dict):
        return section.get(key)
    return getattr(section, key, None)


def _aspect(ratio: float) -> str:
    """1.333… → ``4:3``."""
    frac = Fraction(ratio).limit_denominator(20)
    return f"{frac.numerator}:{frac.denominator}"


def _describe_setting(value: Any) -> str:
    """A ``preprocessing`` setting (string, flag or dict) as words."""
    if isinstance(value, dict):
        return ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in value.items())
    if value is True:
        return "on"
    return str(value)


#: How each framing policy of :mod:`data_pipeline.transforms` reads in words.
GEOMETRY_WORDS: dict[str, str] = {
    "squash": "the whole image resized to a square (nothing is cut off)",
    "pad": "padded to a square with black borders",
    "crop": "centre-cropped to a square",
}
COLOUR_WORDS: dict[str, str] = {"shades_of_gray": "Shades of Gray colour constancy"}


def input_description(config: CheckpointConfig) -> str:
    """How images are prepared, from ``preprocessing`` (geometry, colour constancy, size)."""
    pre = config.preprocessing
    geometry = _config_value(pre, "geometry")
    size = f"{pre.width}×{pre.height} px"
    if not geometry or geometry == "crop_aspect":
        text = f"images centre-cropped to {_aspect(float(pre.source_aspect))} and resized to {size}"
    elif isinstance(geometry, str) and geometry in GEOMETRY_WORDS:
        text = f"{GEOMETRY_WORDS[geometry]}, {size}"
    else:
        text = f"{_describe_setting(geometry)}; resized to {size}"
    colour = _config_value(pre, "color_constancy")
    if colour and colour != "none":
        if isinstance(colour, str) and colour in COLOUR_WORDS:
            p = _config_value(pre, "minkowski_p")
            words = COLOUR_WORDS[colour] + (f" (Minkowski p={float(p):g})" if p else "")
            text += f"; {words}, applied identically in training and inference"
        else:
            text += f"; colour constancy: {_describe_setting(colour)}"
    return text + "."


def _source_line(source: dict[str, Any]) -> str:
    name = source.get("name", "dataset")
    known = {k.lower(): v for k, v in KNOWN_DATASETS.items()}.get(str(name).lower(), {})
    cite = f" ({source['citation']})" if source.get("citation") else ""
    role = {
        "primary": "training, with its lesion-grouped validation and test splits",
        "train": "training",
        "external_val": "external validation (never trained on)",
    }.get(source.get("role", "train"), str(source.get("role")))
    facts = [known["description"]] if "description" in known else []
    if source.get("n_images"):
        facts.append(f"{source['n_images']} images")
    classes = source.get("classes") or [
        c for c, n in (source.get("class_counts") or {}).items() if n
    ]
    if classes:
        facts.append(f"classes {', '.join(classes)}")
    return f"- **{name}**{cite}, {role}" + (f": {'; '.join(facts)}." if facts else ".")


def _architecture_lines(config: CheckpointConfig) -> list[str]:
    mcfg = config.model
    inputs = "image + age, sex and body site" if mcfg.use_metadata else "image only"
    ensemble = (
        f" An ensemble of {mcfg.members} separately trained such networks (mean logits)."
        if mcfg.members > 1
        else ""
    )
    return [
        "### Model",
        f"- **Architecture:** `{mcfg.backbone}` image branch fused with a small MLP over patient "
        f"metadata; inputs: {inputs}.{ensemble}",
        f"- **Input:** {input_description(config)}",
        f"- **Calibration:** temperature scaling on the validation set(s) (T = "
        f"{float(config.temperature):.3f}); probabilities shown are calibrated.",
        "- **Explanations:** Grad-CAM heatmap over the image; metadata contributions are the "
        "change in the explained class's probability when a field is set to *unknown*.",
        f"- **Created:** {config.created_at}",
    ]


def _training_lines(config: CheckpointConfig) -> list[str]:
    training = dict(getattr(config, "training", {}) or {})
    lines = ["### Training data", *(_source_line(s) for s in training_sources(config))]
    lines.append(
        "- **Lesion-grouped splits:** all images of one lesion fall in the same split "
        "(train / validation / test), so test scores are on lesions the model never saw."
    )
    if training.get("split_file"):
        sha = training.get("split_sha256", "")
        lines.append(
            f"- **Split file:** `splits/{Path(training['split_file']).name}`"
            + (f" (sha256 `{sha[:12]}…`)" if sha else "")
        )
    counts = training.get("train_class_counts")
    if counts:
        lines.append(
            "- **Training images per class:** " + ", ".join(f"{c} {n}" for c, n in counts.items())
        )
    rule = training.get("selection_rule", "validation balanced accuracy")
    if training.get("best_epoch"):
        lines.append(f"- **Best epoch (by {rule}):** {training['best_epoch']}")
    elif training.get("selection_rule"):
        lines.append(f"- **Selection rule (validation only, never test):** {rule}")
    for i, member in enumerate(training.get("members") or [], start=1):
        lines.append(
            f"- **Member {i}** (`{member.get('version')}`, seed {member.get('seed')}, best epoch "
            f"{member.get('best_epoch')}): `{member.get('command')}`"
        )
    return lines


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100 * float(value):.1f}%"


def _num(value: Any) -> str:
    return "—" if value is None else f"{float(value):.3f}"


def _count(value: Any) -> str:
    return "—" if value is None else str(int(value))


METRIC_ROWS: list[tuple[str, str, Callable[[Any], str]]] = [
    ("Images (n)", "n", _count),
    ("Accuracy", "accuracy", _pct),
    ("Balanced accuracy (mean recall)", "balanced_accuracy", _pct),
    ("Macro F1", "macro_f1", _num),
    ("Macro ROC AUC (one-vs-rest)", "macro_auc", _num),
    ("Top-3 accuracy", "top3_accuracy", _pct),
    ("Expected calibration error", "ece", _num),
]


def _metrics_table(metrics: dict[str, dict[str, Any]]) -> str:
    splits = [s for s in ("test", "val") if isinstance(metrics.get(s), dict)]
    if not splits:
        return ""
    out = ["| Metric | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for title, key, fmt in METRIC_ROWS:
        out.append(f"| {title} | " + " | ".join(fmt(metrics[s].get(key)) for s in splits) + " |")
    return "\n".join(out)


def _per_class_table(m: dict[str, Any]) -> str:
    per = m.get("per_class") or {}
    if not per:
        return ""
    out = ["| Class | Recall | Precision | AUC | n |", "|---|---|---|---|---|"]
    for c in m.get("classes") or per:
        pc = per.get(c)
        if pc:
            out.append(
                f"| {class_label(c)} | {_pct(pc.get('recall'))} | {_pct(pc.get('precision'))} | "
                f"{_num(pc.get('auc'))} | {pc.get('support', '—')} |"
            )
    return "\n".join(out)


def _with_interval(value: Any, interval: Any, fmt: Callable[[Any], str]) -> str:
    """``74.2% [67.9–80.2]`` where a 95 % interval is stored, else the value alone."""
    text = fmt(value)
    if value is None or not isinstance(interval, dict):
        return text
    low, high = interval.get("low"), interval.get("high")
    if low is None or high is None:
        return text
    return f"{text} [{fmt(low).rstrip('%')}–{fmt(high)}]"


def _by_source_lines(metrics: dict[str, Any]) -> list[str]:
    """Melanoma and malignant-vs-benign scores per held-out set, external sets included, each
    with its 95 % bootstrap interval where the checkpoint stores one."""
    sets = {f"HAM10000 {key}": (key, metrics.get(key)) for key in ("test", "val")}
    sets.update(
        {f"{name} (external)": (name, m) for name, m in (metrics.get("external") or {}).items()}
    )
    rows = [
        (name, key, m)
        for name, (key, m) in sets.items()
        if isinstance(m, dict) and isinstance(m.get("melanoma"), dict)
    ]
    if not rows:
        return []
    found = metrics.get("intervals")
    stored: dict[str, Any] = found if isinstance(found, dict) else {}
    table = [
        "| Set | n | Balanced acc. | Melanoma AUC | Melanoma sens. at 90 % spec. | "
        "Malignant-vs-benign AUC |",
        "|---|---|---|---|---|---|",
    ]
    for name, key, m in rows:
        mel, mal = m["melanoma"], m.get("malignant") or {}
        ci = (stored.get("sets") or {}).get(key) or {}
        table.append(
            f"| {name} | {_count(m.get('n'))} "
            f"| {_with_interval(m.get('balanced_accuracy'), ci.get('balanced_accuracy'), _pct)} "
            f"| {_with_interval(mel.get('auc'), ci.get('mel_auc'), _num)} "
            f"| {_with_interval(mel.get('sens_at_spec90'), ci.get('mel_sens_at_spec90'), _pct)} "
            f"| {_with_interval(mal.get('auc'), ci.get('malignant_auc'), _num)} |"
        )
    title = "**By source — what a screening use cares about"
    if stored.get("sets"):
        title += (
            f" (in brackets: 95 % bootstrap interval, {stored.get('n_boot')} draws of whole "
            "lesions — how far each figure could move on another sample of the same size)"
        )
    # one Markdown block: the card joins its parts with blank lines, which would break a table
    return [title + ":**", "\n".join(table)]


def _performance_lines(config: CheckpointConfig, checkpoint_folder: Path | str | None) -> list[str]:
    metrics = dict(getattr(config, "metrics", {}) or {})
    training = dict(getattr(config, "training", {}) or {})
    lines = ["### Performance"]
    table = _metrics_table(metrics)
    if table:
        lines += [
            "Calibrated probabilities on the held-out lesion-grouped splits "
            "(balanced accuracy is the headline: the classes are very unequal in size).",
            table,
        ]
        test = metrics.get("test")
        if isinstance(test, dict) and test.get("per_class"):
            lines += ["**Per class (test split):**", _per_class_table(test)]
        lines += _by_source_lines(metrics)
    else:
        lines.append(
            "*No evaluation metrics are stored in this checkpoint* (for example an untrained or "
            "test checkpoint). Evaluate it with the command below before trusting any output."
        )
    lines.append("**Reproduce:**")
    if training.get("command"):
        what = "ensembling" if training.get("members") else "training"
        lines.append(
            f"- {what} (writes val/test metrics into the checkpoint): `{training['command']}`"
        )
    shipped = checkpoint_folder is None or Path(checkpoint_folder).resolve() == SHIPPED_DIR
    ckpt = "" if shipped else f" --checkpoint {checkpoint_folder}"
    lines.append(
        "- re-score the test split: "
        f"`python -m scripts.evaluate --data-dir ../shared/ham10000{ckpt} --split test "
        "--out outputs/eval_test`"
    )
    return lines


def _size_text(size: Any) -> str:
    """``[200, 150]`` / ``"200x150"`` → ``200×150 px``."""
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return f"{int(size[0])}×{int(size[1])} px"
    return str(size).replace("x", "×") + ("" if "px" in str(size) else " px")


def source_image_sizes(config: CheckpointConfig) -> list[str]:
    """Sizes of the training images: ``preprocessing.geometry["source_size"]``, else each train
    source's ``image_size``, else what is known about the dataset by name."""
    geometry = _config_value(config.preprocessing, "geometry")
    if isinstance(geometry, dict) and geometry.get("source_size"):
        return [_size_text(geometry["source_size"])]
    sizes = []
    for source in training_sources(config):
        if source.get("role", "train") != "train":
            continue
        size = source.get("image_size") or KNOWN_DATASETS.get(source.get("name", ""), {}).get(
            "image_size"
        )
        if size and _size_text(size) not in sizes:
            sizes.append(_size_text(size))
    return sizes


def _limitation_lines(config: CheckpointConfig) -> list[str]:
    train = [s for s in training_sources(config) if s.get("role", "train") == "train"]
    known = [KNOWN_DATASETS.get(s.get("name", ""), {}) for s in train]
    sizes = source_image_sizes(config)
    trained_on = f"{' / '.join(sizes)} downscaled " if sizes else ""
    classes = list(config.classes.codes)
    ood = getattr(config, "ood", None) or {}
    ood_note = (
        f" (the {ordinal(float(ood['percentile']))} percentile of validation images is the limit)"
        if ood.get("percentile") is not None
        else ""
    )
    lines = [
        "### Limitations",
        f"- **Image quality and size:** trained on {trained_on}dermoscopy images; clinical "
        "(non-dermoscopic) photos, phone snapshots, other magnifications or heavy artefacts are "
        "outside what the model has seen. The app warns when an image's features are unlike the "
        f"validation images{ood_note}, but cannot catch every such case.",
    ]
    for source, facts in zip(train, known, strict=True):
        if "population" in facts:
            lines.append(
                f"- **Population:** {source['name']} comes from {facts['population']}; "
                "performance on darker skin types is unknown and likely worse."
            )
    lines += [
        f"- **Only {len(classes)} classes:** {', '.join(classes)}. Any other condition (e.g. "
        "invasive squamous cell carcinoma, Merkel cell carcinoma, inflammatory or infectious "
        "disease) will still be forced into one of these classes.",
        "- **Class imbalance:** rare classes have few training examples and the least reliable "
        "scores.",
        "- **Metadata:** age, sex and site shift the probabilities in ways learnt from the "
        "training population; they are not medical priors.",
        "- **Heatmaps** show where the network looked, not why a lesion is benign or malignant.",
    ]
    return lines


#: How the About tab names each runtime (see model.onnx_runtime.RUNTIMES).
RUNTIME_NAMES = {
    "onnx": "ONNX Runtime, float32 (the same probabilities as PyTorch to 1e-4)",
    "torch": "PyTorch, float32 (the reference)",
    "int8": "ONNX Runtime, **int8** (`--runtime int8`): faster on a CPU, but 3–4 % of images get "
    "another top class than from the float32 model that every metric below describes "
    "(docs/benchmarks.md); its predictions are stored as model version `…+int8`",
}


def model_card_markdown(
    config: CheckpointConfig, checkpoint_folder: Path | str | None = None, runtime: str = "onnx"
) -> str:
    """The About tab: a model card built from the checkpoint's own config, and the runtime
    serving it."""
    lines = [
        f"## Model card — `{config.version}`",
        f"> **{DISCLAIMER}** This tool has not been clinically validated and must never be "
        "used to decide whether a lesion is examined, treated or removed.",
        f"**Served with:** {RUNTIME_NAMES.get(runtime, runtime)}.",
        *_architecture_lines(config),
        *_training_lines(config),
        *_performance_lines(config, checkpoint_folder),
        *_limitation_lines(config),
        f"### Disclaimer\n**{DISCLAIMER}** Outputs are probabilities from a statistical model, "
        "not a medical opinion. Anyone worried about a skin lesion should see a doctor.",
    ]
    return "\n\n".join(lines)
