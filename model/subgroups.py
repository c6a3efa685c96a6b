"""Subgroup audit: does the model work as well for every age band, sex, body site, source and
skin tone? (``scripts.evaluate --by age,sex,site,source,skin_tone``)

A headline figure averages over the people in a test set; HAM10000 is mostly light skin, older
adults and the back and limbs, so a model can be good on average and poor for the groups the set
barely holds. Each subgroup gets its image and lesion counts and the headline figures (balanced
accuracy, melanoma AUC and recall where the group has melanomas and non-melanomas, macro and
malignant-vs-benign AUC) with 95 % bootstrap intervals from :mod:`model.bootstrap` (whole lesions
resampled within the group), so a thin group shows as a wide interval rather than a confident
number. Groups pool every evaluated row (use ``source`` to see sources apart).

Skin tone is :mod:`data_pipeline.skin_tone`'s ITA band, estimated from each image. The audit of a
checkpoint is stored in its folder as ``subgroups.json`` (:func:`write_audit`) together with how
many of its **training** images fell in each band, which the app shows beside a prediction's own
estimated band (:func:`tone_context`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from common.errors import DataError
from common.plotting import pyplot
from data_pipeline.ham10000 import load_metadata
from data_pipeline.schema import HAM7, ClassSet
from data_pipeline.skin_tone import BAND_NAMES, UNKNOWN, SkinTone, band_counts, estimate
from data_pipeline.skin_tone import estimate_file as tone_of_file
from data_pipeline.sources import source_name
from data_pipeline.splits import REPO_ROOT, attach_splits, load_splits
from model.bootstrap import LEVEL, reported_metrics, set_intervals

KEYS: tuple[str, ...] = ("age", "sex", "site", "source", "skin_tone")
#: Upper bounds (exclusive) and labels of the age bands.
AGE_BANDS: tuple[tuple[float, str], ...] = (
    (30, "<30"),
    (45, "30-44"),
    (60, "45-59"),
    (75, "60-74"),
    (float("inf"), "≥75"),
)
#: The figures shown per subgroup (keys of :func:`model.bootstrap.reported_metrics`).
SHOWN: tuple[str, ...] = ("balanced_accuracy", "mel_auc", "mel_recall")
AUDIT_FILE = "subgroups.json"


def parse_by(keys: str | Iterable[str]) -> tuple[str, ...]:
    """``"age,sex"`` (or a list) → ``("age", "sex")``, refusing unknown keys in one line."""
    items = keys.split(",") if isinstance(keys, str) else list(keys)
    out = tuple(dict.fromkeys(k.strip().lower().replace("-", "_") for k in items if k.strip()))
    unknown = [k for k in out if k not in KEYS]
    if unknown or not out:
        what = f"unknown subgroup {unknown[0]!r}" if unknown else "no subgroup given"
        raise DataError(f"--by: {what} (use {', '.join(KEYS)}).")
    return out


def age_band(age: Any) -> str:
    """The age band of one age in years (``unknown`` for a blank)."""
    if age is None or (isinstance(age, float) and np.isnan(age)):
        return UNKNOWN
    for upper, label in AGE_BANDS:
        if float(age) < upper:
            return label
    return AGE_BANDS[-1][1]


def skin_tones(paths: Sequence[str], progress: bool = False) -> list[SkinTone]:
    """The estimated skin tone of every image file (one decode at reduced size each)."""
    iterator: Iterable[str] = paths
    if progress:
        from tqdm import tqdm

        iterator = tqdm(paths, desc="skin tone", unit="img", leave=False, dynamic_ncols=True)
    return [tone_of_file(p) for p in iterator]


def group_columns(df: pd.DataFrame, by: Sequence[str], progress: bool = False) -> pd.DataFrame:
    """One column per subgroup key (``age_band``, ``sex``, ``site``, ``source``, ``skin_tone``
    + ``ita``) for the rows of a loaded metadata table with a ``source`` column."""
    out = pd.DataFrame(index=df.index)
    if "age" in by:
        out["age_band"] = [age_band(a) for a in df["age"]]
    if "sex" in by:
        out["sex"] = df["sex"].astype(str).to_numpy()
    if "site" in by:
        out["site"] = df["localization"].astype(str).to_numpy()
    if "source" in by:
        out["source"] = df["source"].astype(str).to_numpy()
    if "skin_tone" in by:
        tones = skin_tones(df["path"].tolist(), progress)
        out["ita"] = [t.ita for t in tones]
        out["skin_tone"] = [t.band for t in tones]
    return out


#: Subgroup key → its column in :func:`group_columns`.
COLUMN = {
    "age": "age_band",
    "sex": "sex",
    "site": "site",
    "source": "source",
    "skin_tone": "skin_tone",
}


def _order(key: str, values: Iterable[str]) -> list[str]:
    present = list(dict.fromkeys(values))
    if key == "age":
        wanted = [label for _, label in AGE_BANDS] + [UNKNOWN]
    elif key == "skin_tone":
        wanted = [*BAND_NAMES, UNKNOWN]
    else:
        wanted = [*sorted(v for v in present if v != UNKNOWN), UNKNOWN]
    return [v for v in wanted if v in present]


def _figures(
    y: np.ndarray,
    probs: np.ndarray,
    lesions: np.ndarray,
    n_boot: int,
    seed: int,
    classes: ClassSet,
) -> dict[str, dict[str, float | None]]:
    if n_boot:
        return set_intervals(y, probs, lesions, n_boot, seed, classes=classes)
    return {
        k: {"value": None if np.isnan(v) else float(v), "low": None, "high": None}
        for k, v in reported_metrics(y, probs, classes).items()
    }


def subgroup_report(
    predictions: pd.DataFrame,
    by: Sequence[str],
    n_boot: int = 1000,
    seed: int = 0,
    classes: ClassSet = HAM7,
) -> dict[str, Any]:
    """Counts and headline figures (with ``n_boot`` bootstrap intervals; 0: values only) of
    every subgroup. ``predictions``: a ``predictions.csv``-shaped frame (``dx``, ``p_<class>``,
    ``lesion_id``) with the :func:`group_columns` columns."""
    codes = list(classes.codes)
    probs = predictions[[f"p_{c}" for c in codes]].to_numpy(dtype=float)
    y = predictions["dx"].map(codes.index).to_numpy()
    lesions = predictions["lesion_id"].astype(str).to_numpy()
    groups: dict[str, dict[str, Any]] = {}
    for key in by:
        column = predictions[COLUMN[key]].astype(str).to_numpy()
        groups[key] = {}
        for value in _order(key, column):
            rows = column == value
            counts = pd.Series(predictions["dx"].to_numpy()[rows]).value_counts()
            groups[key][value] = {
                "n": int(rows.sum()),
                "n_lesions": len(set(lesions[rows])),
                "class_counts": {c: int(counts.get(c, 0)) for c in codes},
                "figures": _figures(y[rows], probs[rows], lesions[rows], n_boot, seed, classes),
            }
    return {
        "by": list(by),
        "n": len(predictions),
        "n_boot": n_boot,
        "level": LEVEL,
        "resampled": "lesions within each subgroup",
        "age_bands": [label for _, label in AGE_BANDS],
        "skin_tone": "ITA band of the skin around the lesion (data_pipeline.skin_tone)",
        "groups": groups,
    }


def plot_subgroups(report: dict[str, Any], path: Path) -> None:
    """A forest plot per key: balanced accuracy and melanoma AUC of each subgroup with its
    interval, labelled with its size."""
    plt = pyplot()
    keys = [k for k in report["by"] if report["groups"].get(k)]
    sizes = [len(report["groups"][k]) for k in keys]
    fig, axes = plt.subplots(
        len(keys),
        1,
        figsize=(7.5, 1.0 + 0.32 * sum(sizes) + 0.9 * len(keys)),
        squeeze=False,
        gridspec_kw={"height_ratios": [n + 1.5 for n in sizes]},
    )
    for ax, key in zip(axes[:, 0], keys, strict=True):
        groups = report["groups"][key]
        labels = [
            f"{v} (n={g['n']}, mel={g['class_counts'].get('mel', 0)})" for v, g in groups.items()
        ]
        ys = np.arange(len(groups))[::-1]
        for offset, metric, colour in (
            (0.15, "balanced_accuracy", "tab:blue"),
            (-0.15, "mel_auc", "tab:red"),
        ):
            for yv, g in zip(ys, groups.values(), strict=True):
                f = g["figures"][metric]
                if f["value"] is None:
                    continue
                err = None
                if f["low"] is not None:
                    err = [[f["value"] - f["low"]], [f["high"] - f["value"]]]
                ax.errorbar(
                    [f["value"]], [yv + offset], xerr=err, fmt="o", color=colour, capsize=3, ms=4
                )
            ax.plot([], [], "o", color=colour, label=metric.replace("_", " "))
        ax.set_yticks(ys, labels, fontsize=8)
        ax.set_xlim(0, 1.02)
        ax.set_title(f"by {key.replace('_', ' ')}", fontsize=10)
        ax.grid(axis="x", alpha=0.3)
    axes[0, 0].legend(fontsize=8, loc="lower left")
    axes[-1, 0].set_xlabel(f"value with {100 * report['level']:g} % bootstrap interval")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --- the audit stored with a checkpoint -------------------------------------------------------


def _folder(path: str) -> Path:
    """A recorded data path: as given, else relative to the repository (configs store them as
    typed from the repository root)."""
    p = Path(path)
    return p if p.is_dir() or p.is_absolute() else REPO_ROOT / p


def training_rows(training: dict[str, Any]) -> pd.DataFrame:
    """The images a checkpoint trained on, from its recorded sources: the primary folder's train
    split (its recorded split file) and every extra training folder whole."""
    frames = []
    for s in training.get("sources", []):
        if s.get("role") not in ("primary", "train"):
            continue
        df = load_metadata(_folder(s["path"]))
        if s["role"] == "primary":
            split_file = _folder(training["split_file"]) if training.get("split_file") else None
            if split_file is None or not split_file.is_file():
                raise DataError(f"the training split file of {s['name']} was not found.")
            df = attach_splits(df, load_splits(split_file))
            df = df[df["split"] == "train"]
        frames.append(df.assign(source=s["name"]))
    if not frames:
        raise DataError("the checkpoint records no training sources.")
    return pd.concat(frames, ignore_index=True)


def training_tone_counts(training: dict[str, Any], progress: bool = False) -> dict[str, Any]:
    """How many of a checkpoint's training images fell in each skin-tone band, per source and
    in all."""
    rows = training_rows(training)
    bands = [t.band for t in skin_tones(rows["path"].tolist(), progress)]
    rows = rows.assign(band=bands)
    return {
        "n": len(rows),
        "counts": band_counts(bands),
        "by_source": {
            name: band_counts(g["band"].tolist()) for name, g in rows.groupby("source", sort=False)
        },
    }


def write_audit(
    folder: Path | str, metrics: dict[str, Any], training_tones: dict[str, Any], command: str
) -> Path:
    """Store ``metrics["subgroups"]`` (from ``scripts.evaluate --by``) and the training images'
    band counts as ``folder/subgroups.json`` (written whole, then renamed)."""
    if "subgroups" not in metrics:
        raise DataError("no subgroup audit to store: evaluate with --by first.")
    audit = {
        "model_version": metrics.get("model_version"),
        "command": command,
        "evaluated": {
            "data_dir": metrics.get("data_dir"),
            "split": metrics.get("split"),
            "external": metrics.get("external", []),
        },
        "subgroups": metrics["subgroups"],
        "training_skin_tone": training_tones,
    }
    path = Path(folder) / AUDIT_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(audit, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


def load_audit(folder: Path | str) -> dict[str, Any] | None:
    """The stored audit of a checkpoint folder, or None (none made, or unreadable)."""
    path = Path(folder) / AUDIT_FILE
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _cell(f: dict[str, Any]) -> str:
    if f["value"] is None:
        return "–"
    if f["low"] is None:
        return f"{f['value']:.2f}"
    return f"{f['value']:.2f} [{f['low']:.2f}, {f['high']:.2f}]"


def audit_markdown(audit: dict[str, Any], keys: Sequence[str] = KEYS) -> str:
    """The stored audit as Markdown tables (one per key), for the About tab and reports."""
    report = audit["subgroups"]
    pct = f"{100 * report['level']:g} %"
    ev = audit.get("evaluated", {})
    sets = ", ".join(
        [f"{source_name(str(ev.get('data_dir', '')))} ({ev.get('split')})"]
        + [source_name(str(e)) for e in ev.get("external", [])]
    )
    lines = [
        f"Measured on {sets}: {report['n']} images; {pct} intervals from "
        f"{report['n_boot']} bootstrap draws of whole lesions. A wide interval means the group is "
        "too thin to say how well the model works for it.",
    ]
    training = audit.get("training_skin_tone")
    for key in keys:
        groups = report["groups"].get(key)
        if not groups:
            continue
        head = "| " + key.replace("_", " ") + " | images | melanomas | balanced accuracy | "
        head += "melanoma AUC | melanoma recall |"
        if key == "skin_tone" and training:
            head += " training images |"
        lines += ["", head, "|" + "---|" * (head.count("|") - 1)]
        for value, g in groups.items():
            f = g["figures"]
            row = (
                f"| {value} | {g['n']} | {g['class_counts'].get('mel', 0)} | "
                f"{_cell(f['balanced_accuracy'])} | {_cell(f['mel_auc'])} | "
                f"{_cell(f['mel_recall'])} |"
            )
            if key == "skin_tone" and training:
                row += f" {training['counts'].get(value, 0)} |"
            lines.append(row)
    return "\n".join(lines)


def tone_context(rgb: np.ndarray, audit: dict[str, Any] | None) -> dict[str, Any]:
    """An image's estimated skin-tone band and how many of the model's training images fell in
    it (None where the model has no stored audit): what the Analyse tab shows."""
    tone = estimate(rgb)
    out: dict[str, Any] = {**tone.to_dict(), "training_in_band": None, "training_total": None}
    training = (audit or {}).get("training_skin_tone")
    if training:
        out["training_in_band"] = int(training["counts"].get(tone.band, 0))
        out["training_total"] = int(training["n"])
    return out


def tone_sentence(context: dict[str, Any]) -> str:
    """One line for a user: the band, the angle, and how thin the training evidence is."""
    if context["ita"] is None:
        return "Skin tone: could not be estimated (no skin visible around the lesion)."
    text = (
        f"Estimated skin tone around the lesion: **{context['band']}** "
        f"(ITA {context['ita']:.0f}°, an image estimate, not a phototype)."
    )
    if context["training_total"]:
        n, total = context["training_in_band"], context["training_total"]
        text += (
            f" {n} of the model's {total} training images ({100 * n / total:.1f} %) "
            "fell in this band"
            + ("; its figures for this band rest on little evidence." if n < 0.05 * total else ".")
        )
    return text


def skin_tone_line(rgb: np.ndarray | None, folder: Path | str | None) -> str:
    """The Analyse tab's line for one image and the model in ``folder`` ("" without an image)."""
    if rgb is None:
        return ""
    return tone_sentence(tone_context(rgb, load_audit(folder) if folder is not None else None))
