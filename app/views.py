"""Presentation helpers for the app: turn predictions, history rows and checkpoint configs into
the values Gradio components display (label dicts, Markdown, tables, CSV files).

No decisions are made here — which classes are flagged, which warnings apply, what is stored —
those come from :class:`model.predictor.Predictor` and :class:`db.service.PredictionService`.
Everything is plain Python (no Gradio import) so it can be tested without a server.
"""

from __future__ import annotations

import csv
import html
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from data_pipeline.schema import CLASS_NAMES, CLASSES, MALIGNANT
from db.queries import HistoryFilter
from model.checkpoint import SHIPPED_DIR
from model.predictor import MALIGNANT_FLAG

DISCLAIMER = "Research and education only — not a diagnosis."
ANY = "any"

HISTORY_COLUMNS = ["id", "time (UTC)", "class", "probability", "age", "sex", "site", "model"]


def class_label(code: str) -> str:
    """``Melanoma (mel)``: the full name first, the HAM10000 code for reference."""
    return f"{CLASS_NAMES.get(code, code)} ({code})"


def label_value(probabilities: dict[str, float]) -> dict[str, float]:
    """Value for ``gr.Label``: every class by full name with its calibrated probability."""
    return {class_label(c): float(probabilities.get(c, 0.0)) for c in CLASSES}


def _esc(text: Any) -> str:
    return html.escape(str(text), quote=False)


def alerts_markdown(prediction) -> str:
    """The malignancy flag and the predictor's warnings, most important first."""
    parts: list[str] = []
    flagged = list(prediction.malignant_flag)
    if flagged:
        listed = ", ".join(f"{CLASS_NAMES[c]} {prediction.probabilities[c]:.0%}" for c in flagged)
        parts.append(
            f"### ⚠️ Possible malignant lesion: {listed}\n"
            "A malignant or pre-malignant class ranks high. Have this lesion examined by a "
            "dermatologist — this tool cannot rule anything in or out."
        )
    for warning in prediction.warnings:
        parts.append(f"**⚠️ {_esc(warning)}**")
    if not flagged:
        top = prediction.top_class
        malignant = ", ".join(CLASS_NAMES[c] for c in CLASSES if c in MALIGNANT)
        parts.append(
            f"No malignant class ranks high ({malignant} are flagged when they rank first or "
            f"reach {MALIGNANT_FLAG:.0%}). Top class: {CLASS_NAMES[top]} {prediction.top_probability:.0%}."
        )
    parts.append(f"*{DISCLAIMER}*")
    return "\n\n".join(parts)


def result_markdown(stored) -> str:
    """Model version, storage outcome and attribution target of one prediction."""
    pred = stored.prediction
    if stored.stored and stored.id is not None:
        saved = f"saved to history as **#{stored.id}**"
    else:
        saved = "**not saved** to history"
    target = pred.attribution_target
    explained = (
        f"Heatmap and metadata chart explain **{CLASS_NAMES[target]}**. "
        if target in CLASS_NAMES
        else ""
    )
    return f"{explained}Model `{pred.model_version}` · {pred.latency_ms:.0f} ms · {saved}."


def _fmt_time(value: Any) -> str:
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value.strftime("%Y-%m-%d %H:%M:%S")
    return "" if value is None else str(value)


def _fmt_age(age: Any) -> str:
    if age is None:
        return ""
    return f"{age:g}" if isinstance(age, (int, float)) else str(age)


def history_table(records) -> list[list[Any]]:
    """Rows for the history ``gr.Dataframe`` (columns :data:`HISTORY_COLUMNS`)."""
    return [
        [
            r.id,
            _fmt_time(r.created_at),
            class_label(r.predicted_class),
            round(float(r.predicted_probability), 3),
            _fmt_age(r.age),
            r.sex,
            r.site,
            r.model_version,
        ]
        for r in records
    ]


def write_history_csv(records: Iterable, path: Path) -> Path:
    """Every column a researcher needs from the filtered rows (no image bytes); ``records`` may
    be any iterable, so rows can be streamed from the database a page at a time."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = [
        "id",
        "created_at",
        "predicted_class",
        "predicted_class_name",
        "predicted_probability",
        *[f"p_{c}" for c in CLASSES],
        "age",
        "sex",
        "site",
        "attribution_target",
        "metadata_contributions",
        "warnings",
        "ood_distance",
        "model_name",
        "model_version",
        "checkpoint_sha256",
        "latency_ms",
        "image_sha256",
        "image_width",
        "image_height",
    ]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        for r in records:
            d = r.to_dict()
            probs = d.pop("probabilities") or {}
            d.update({f"p_{c}": probs.get(c) for c in CLASSES})
            contribs = d.get("metadata_contributions")
            d["metadata_contributions"] = json.dumps(contribs) if contribs is not None else ""
            d["warnings"] = " | ".join(d.get("warnings") or [])
            writer.writerow(d)
    return path


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


def record_markdown(record) -> str:
    """Inputs and outcome of one stored prediction."""
    d = record.to_dict()
    age = _fmt_age(d["age"]) or "unknown"
    lines = [
        f"### Prediction #{d['id']}",
        f"- **Time:** {_fmt_time(record.created_at)} UTC",
        (
            f"- **Inputs:** age {age}, sex {d['sex']}, body site {d['site']}; image "
            f"{d['image_width']}×{d['image_height']} px (sha256 `{d['image_sha256'][:12]}…`)"
        ),
        f"- **Top class:** {class_label(d['predicted_class'])} {d['predicted_probability']:.1%}",
        f"- **Model:** `{d['model_version']}`",
    ]
    if d.get("attribution_target"):
        lines.append(f"- **Heatmap explains:** {class_label(d['attribution_target'])}")
    contribs = d.get("metadata_contributions")
    if contribs:
        shown = ", ".join(f"{k} {100 * v:+.1f} pp" for k, v in contribs.items())
        lines.append(f"- **Metadata contributions:** {shown}")
    for w in d.get("warnings") or []:
        lines.append(f"- **⚠️ {_esc(w)}**")
    if not d.get("has_thumbnail"):
        lines.append("- *No image stored (the app ran with --no-store-images).*")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# Model card


def _pct(value: Any) -> str:
    return "—" if value is None else f"{100 * float(value):.1f}%"


def _num(value: Any) -> str:
    return "—" if value is None else f"{float(value):.3f}"


def _metrics_table(metrics: dict[str, dict]) -> str:
    splits = [s for s in ("test", "val") if isinstance(metrics.get(s), dict)]
    if not splits:
        return ""
    rows = [
        ("Images (n)", "n", lambda v: "—" if v is None else str(int(v))),
        ("Accuracy", "accuracy", _pct),
        ("Balanced accuracy (mean recall)", "balanced_accuracy", _pct),
        ("Macro F1", "macro_f1", _num),
        ("Macro ROC AUC (one-vs-rest)", "macro_auc", _num),
        ("Top-3 accuracy", "top3_accuracy", _pct),
        ("Expected calibration error", "ece", _num),
    ]
    out = ["| Metric | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
    for title, key, fmt in rows:
        out.append(f"| {title} | " + " | ".join(fmt(metrics[s].get(key)) for s in splits) + " |")
    return "\n".join(out)


def _per_class_table(m: dict) -> str:
    per = m.get("per_class") or {}
    if not per:
        return ""
    out = ["| Class | Recall | Precision | AUC | n |", "|---|---|---|---|---|"]
    for c in CLASSES:
        pc = per.get(c)
        if not pc:
            continue
        out.append(
            f"| {class_label(c)} | {_pct(pc.get('recall'))} | {_pct(pc.get('precision'))} | "
            f"{_num(pc.get('auc'))} | {pc.get('support', '—')} |"
        )
    return "\n".join(out)


def model_card_markdown(config, checkpoint_folder: Path | str | None = None) -> str:
    """The About tab: a model card built from the checkpoint's own config."""
    training = dict(getattr(config, "training", {}) or {})
    metrics = dict(getattr(config, "metrics", {}) or {})
    pre = config.preprocessing
    mcfg = config.model
    inputs = "image + age, sex and body site" if mcfg.use_metadata else "image only"
    lines = [
        f"## Model card — `{config.version}`",
        (
            f"> **{DISCLAIMER}** This tool has not been clinically validated and must never be "
            "used to decide whether a lesion is examined, treated or removed."
        ),
        "### Model",
        (
            f"- **Architecture:** `{mcfg.backbone}` image branch fused with a small MLP over patient "
            f"metadata; inputs: {inputs}."
            + (
                f" An ensemble of {mcfg.members} such networks trained with different seeds "
                "(mean logits)."
                if mcfg.members > 1
                else ""
            )
        ),
        f"- **Input:** images centre-cropped to 4:3 and resized to {pre.width}×{pre.height} px.",
        (
            f"- **Calibration:** temperature scaling on the validation split (T = "
            f"{float(config.temperature):.3f}); probabilities shown are calibrated."
        ),
        (
            "- **Explanations:** Grad-CAM heatmap over the image; metadata contributions are the "
            "change in the explained class's probability when a field is set to *unknown*."
        ),
        f"- **Created:** {config.created_at}",
        "### Training data",
        (
            "- **HAM10000** (Tschandl, Rosendahl & Kittler, *Sci. Data* 5, 180161, 2018; "
            "doi:10.1038/sdata.2018.161; CC BY-NC 4.0): dermoscopic images of pigmented lesions "
            "in 7 classes with age, sex and body site."
        ),
        (
            "- **Lesion-grouped splits:** all images of one lesion fall in the same split "
            "(train / validation / test), so test scores are on lesions the model never saw."
        ),
    ]
    if training.get("split_file"):
        sha = training.get("split_sha256", "")
        lines.append(
            f"- **Split file:** `splits/{Path(training['split_file']).name}`"
            + (f" (sha256 `{sha[:12]}…`)" if sha else "")
        )
    counts = training.get("train_class_counts")
    if counts:
        lines.append(
            "- **Training images per class:** "
            + ", ".join(f"{c} {counts[c]}" for c in CLASSES if c in counts)
        )
    if training.get("best_epoch"):
        lines.append(
            f"- **Best epoch (by validation balanced accuracy):** {training['best_epoch']}"
        )
    for i, member in enumerate(training.get("members") or [], start=1):
        lines.append(
            f"- **Member {i}** (`{member.get('version')}`, seed {member.get('seed')}, best epoch "
            f"{member.get('best_epoch')}): `{member.get('command')}`"
        )

    lines.append("### Performance")
    table = _metrics_table(metrics)
    if table:
        lines += [
            (
                "Calibrated probabilities on the held-out lesion-grouped splits "
                "(balanced accuracy is the headline: HAM10000 is ~67% nevi)."
            ),
            table,
        ]
        test = metrics.get("test")
        if isinstance(test, dict) and test.get("per_class"):
            lines += ["**Per class (test split):**", _per_class_table(test)]
    else:
        lines.append(
            "*No evaluation metrics are stored in this checkpoint* (for example an untrained or "
            "test checkpoint). Evaluate it with the command below before trusting any output."
        )
    lines.append("**Reproduce:**")
    command = training.get("command")
    if command:
        what = "ensembling" if training.get("members") else "training"
        lines.append(f"- {what} (writes val/test metrics into the checkpoint): `{command}`")
    shipped = checkpoint_folder is None or Path(checkpoint_folder).resolve() == SHIPPED_DIR
    ckpt = "" if shipped else f" --checkpoint {checkpoint_folder}"
    lines.append(
        "- re-score the test split: "
        f"`python -m scripts.evaluate --data-dir ../shared/ham10000{ckpt} --split test "
        "--out outputs/eval_test`"
    )
    lines += [
        "### Limitations",
        (
            "- **Image quality and size:** trained on 200×150 px downscaled dermoscopy images; "
            "clinical (non-dermoscopic) photos, phone snapshots, other magnifications or heavy "
            "artefacts are outside what the model has seen. The app warns when an image's features "
            "are unlike the validation images, but cannot catch every such case."
        ),
        (
            "- **Population:** HAM10000 comes from Vienna (Austria) and Queensland (Australia), mostly "
            "fair-skinned patients; performance on darker skin types is unknown and likely worse."
        ),
        (
            "- **Only 7 classes:** akiec, bcc, bkl, df, mel, nv, vasc. Any other condition (e.g. "
            "invasive squamous cell carcinoma, Merkel cell carcinoma, inflammatory or infectious disease) will "
            "still be forced into one of these classes."
        ),
        (
            "- **Class imbalance:** rare classes (df, vasc, akiec) have few training examples and the "
            "least reliable scores."
        ),
        (
            "- **Metadata:** age, sex and site shift the probabilities in ways learnt from HAM10000's "
            "population; they are not medical priors."
        ),
        "- **Heatmaps** show where the network looked, not why a lesion is benign or malignant.",
        (
            f"### Disclaimer\n**{DISCLAIMER}** Outputs are probabilities from a statistical model, "
            "not a medical opinion. Anyone worried about a skin lesion should see a doctor."
        ),
    ]
    return "\n\n".join(lines)
