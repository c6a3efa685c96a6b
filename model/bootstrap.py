"""How far can a figure move by chance? Bootstrap resampling of whole lesions, per source.

Held-out sets here are small (HAM10000 test: 1287 images, 15 of them dermatofibromas, so one
image moves balanced accuracy by about 0.01; ISIC 2017 val: 150 images), and several images of
one lesion are not independent. Every interval this project reports comes from here: draws
resample whole lesions with replacement within each source, and each draw is scored by
:func:`model.metrics.compute_metrics`, so intervals are about the very figures ``metrics.json``
and the model card report. :mod:`model.compare` uses the same draws for paired comparisons.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pandas as pd

from common.errors import DataError
from data_pipeline.schema import HAM7, ClassSet
from model.metrics import compute_metrics

LEVEL = 0.95
Interval = dict[str, float | None]


def check_n_boot(n_boot: int) -> None:
    """Refuse a bootstrap too small to give an interval (before any expensive work)."""
    if n_boot < 10:
        raise DataError(f"bootstrap draws must be at least 10 (got {n_boot})")


def group_index(source: np.ndarray, group: np.ndarray) -> tuple[list[str], list[list[np.ndarray]]]:
    """Sources in order of appearance, and per source the row indices of each group (lesion)."""
    sources = list(dict.fromkeys(source))
    groups = []
    for s in sources:
        members = np.flatnonzero(source == s)
        codes, _ = pd.factorize(group[members])
        groups.append([members[codes == g] for g in range(codes.max() + 1)])
    return sources, groups


def draws(groups: list[list[np.ndarray]], n_boot: int, seed: int) -> Iterator[list[np.ndarray]]:
    """``n_boot`` bootstrap draws: per source, whole groups resampled with replacement."""
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        yield [np.concatenate([g[j] for j in rng.integers(0, len(g), len(g))]) for g in groups]


def reported_metrics(
    y: np.ndarray, probs: np.ndarray, classes: ClassSet = HAM7
) -> dict[str, float]:
    """The headline figures of one set (NaN where undefined): balanced accuracy, macro AUC,
    melanoma AUC / recall / sensitivity at 90 % specificity (NaN for a class set without
    melanoma), malignant-vs-benign AUC."""
    m = compute_metrics(y, probs, classes)
    mal = m["malignant"]
    mel = m.get("melanoma") or {"auc": None, "sens_at_spec90": None}
    mel_class = m["per_class"].get("mel") or {"support": 0}

    def value(x: float | None) -> float:
        return np.nan if x is None else float(x)

    return {
        "balanced_accuracy": float(m["balanced_accuracy"]),
        "macro_auc": value(m["macro_auc"]),
        "mel_auc": value(mel["auc"]),
        "mel_recall": value(mel_class["recall"] if mel_class["support"] else None),
        "mel_sens_at_spec90": value(mel["sens_at_spec90"]),
        "malignant_auc": value(mal["auc"]),
    }


def _percentile_interval(value: float, samples: list[float], level: float) -> Interval:
    d = np.asarray(samples, dtype=float)
    d = d[np.isfinite(d)]
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(d, [tail, 100 - tail]) if d.size else (np.nan, np.nan)

    def finite(x: float) -> float | None:
        return float(x) if np.isfinite(x) else None

    return {"value": finite(value), "low": finite(low), "high": finite(high)}


def set_intervals(
    y: np.ndarray,
    probs: np.ndarray,
    groups: np.ndarray | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = LEVEL,
    classes: ClassSet = HAM7,
) -> dict[str, Interval]:
    """Percentile intervals of :func:`reported_metrics` on one set, resampling ``groups``
    (lesion ids; None: each image its own group)."""
    check_n_boot(n_boot)
    y = np.asarray(y)
    probs = np.asarray(probs, dtype=float)
    group = np.arange(len(y)) if groups is None else np.asarray(groups)
    _, (index,) = group_index(np.zeros(len(y)), group)
    base = reported_metrics(y, probs, classes)
    samples: dict[str, list[float]] = {k: [] for k in base}
    for (i,) in draws([index], n_boot, seed):
        for k, v in reported_metrics(y[i], probs[i], classes).items():
            samples[k].append(v)
    return {k: _percentile_interval(v, samples[k], level) for k, v in base.items()}


def bootstrap_intervals(
    df: pd.DataFrame,
    n_boot: int = 1000,
    seed: int = 0,
    level: float = LEVEL,
    classes: ClassSet = HAM7,
) -> dict[str, dict[str, Interval]]:
    """:func:`set_intervals` of every source of a ``predictions.csv`` frame (``lesion_id``
    optional; a ``p_<code>`` column per class of ``classes``):
    ``{source: {metric: {"value", "low", "high"}}}``, None where undefined."""
    probs = df[[f"p_{c}" for c in classes]].to_numpy(dtype=float)
    y = df["dx"].map(classes.index).to_numpy()
    group = (df["lesion_id"] if "lesion_id" in df else df["image_id"]).to_numpy()
    source = df["source"].to_numpy()
    out = {}
    for s in dict.fromkeys(source):
        rows = source == s
        out[s] = set_intervals(y[rows], probs[rows], group[rows], n_boot, seed, level, classes)
    return out
