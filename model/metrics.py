"""Classification metrics for imbalanced, possibly incomplete label sets.

Balanced accuracy (mean per-class recall) is the headline metric: plain accuracy on HAM10000 is
dominated by nevi (67 %). Classes absent from a set are reported with support 0 and excluded from
macro AUC, so an external set without, say, akiec evaluates without crashing.

The classes are the model's :class:`data_pipeline.schema.ClassSet`: melanoma-vs-rest figures are
reported when it has ``mel``, malignant-vs-benign ones from its malignant codes. A plain sequence
of codes means HAM10000's codes (malignancy as in :data:`data_pipeline.schema.HAM7`).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

from data_pipeline.schema import HAM7, ClassSet


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> dict:
    """Top-label confidence vs accuracy in equal-width bins (the one binning that ECE and the
    reliability diagram share)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    bins = np.linspace(0.0, 1.0, n_bins + 1)
    out: dict[str, list] = {"bin_lower": [], "confidence": [], "accuracy": [], "count": []}
    for lo, hi in itertools.pairwise(bins):
        in_bin = (conf > lo) & (conf <= hi)
        out["bin_lower"].append(float(lo))
        out["count"].append(int(in_bin.sum()))
        out["confidence"].append(float(conf[in_bin].mean()) if in_bin.any() else None)
        out["accuracy"].append(float(correct[in_bin].mean()) if in_bin.any() else None)
    return out


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: the count-weighted gap between confidence and accuracy over the bins."""
    bins = reliability_bins(probs, y_true, n_bins)
    n = max(len(y_true), 1)
    gaps = [
        count / n * abs(acc - conf)
        for count, acc, conf in zip(
            bins["count"], bins["accuracy"], bins["confidence"], strict=False
        )
        if count
    ]
    return float(sum(gaps))


def sensitivity_at_specificity(
    positive: np.ndarray, score: np.ndarray, specificity: float
) -> float:
    """The highest sensitivity of any threshold on ``score`` whose specificity is at least the
    target, read off the ROC curve (as dermatology reader studies report it)."""
    from sklearn.metrics import roc_curve  # (~80 MB resident: not in a serving process)

    fpr, tpr, _ = roc_curve(positive, score)
    return _sensitivity_on_curve(fpr, tpr, specificity)


def _sensitivity_on_curve(fpr: np.ndarray, tpr: np.ndarray, specificity: float) -> float:
    ok = fpr <= 1.0 - specificity + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


def binary_auc(positive: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC of a one-vs-rest score as the Mann-Whitney statistic (ties count one half): the
    value of ``sklearn.metrics.roc_auc_score``, computed fast enough to run thousands of times
    in a bootstrap. Both classes must be present."""
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    # 1-based ranks, tied scores sharing their average rank
    _, tie, counts = np.unique(np.asarray(score), return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[tie.ravel()]
    return float((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def binary_metrics(positive: np.ndarray, score: np.ndarray) -> dict:
    """AUC and sensitivity at 80 % / 90 % specificity of a one-vs-rest score (None if one-sided)."""
    positive = np.asarray(positive, dtype=bool)
    out: dict = {"n_pos": int(positive.sum()), "n_neg": int((~positive).sum())}
    if positive.all() or not positive.any():
        return {**out, "auc": None, "sens_at_spec80": None, "sens_at_spec90": None}
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(positive, score)  # once for both operating points
    return {
        **out,
        "auc": binary_auc(positive, score),
        "sens_at_spec80": _sensitivity_on_curve(fpr, tpr, 0.80),
        "sens_at_spec90": _sensitivity_on_curve(fpr, tpr, 0.90),
    }


def as_class_set(classes: ClassSet | Sequence[str]) -> ClassSet:
    """``classes`` as a class set: a plain code sequence takes HAM10000's names and malignancy."""
    if isinstance(classes, ClassSet):
        return classes
    codes = tuple(classes)
    return ClassSet.build(codes, HAM7.names_by_code, HAM7.malignant & set(codes))


def clinical_metrics(
    y_true: np.ndarray, probs: np.ndarray, classes: ClassSet | Sequence[str]
) -> dict:
    """Melanoma-vs-rest (when the class set has ``mel``) and malignant-vs-benign scores (HAM10000:
    mel + bcc + akiec): what a screening use cares about, whatever the confusions among the other
    classes."""
    cs = as_class_set(classes)
    idx = {c: i for i, c in enumerate(cs.codes)}
    malignant = [idx[c] for c in cs.malignant_codes]
    out = {}
    if cs.has_melanoma:
        out["melanoma"] = binary_metrics(y_true == idx["mel"], probs[:, idx["mel"]])
    out["malignant"] = binary_metrics(np.isin(y_true, malignant), probs[:, malignant].sum(axis=1))
    return out


def _safe_div(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def compute_metrics(
    labels: Sequence[int] | np.ndarray, probs: np.ndarray, classes: ClassSet | Sequence[str]
) -> dict:
    """All metrics reported by evaluation and stored in checkpoints (JSON-serialisable)."""
    y_true = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(classes)
    if probs.shape != (len(y_true), k):
        raise ValueError(f"probs shape {probs.shape} does not match {len(y_true)} labels × {k}")
    y_pred = probs.argmax(axis=1)
    cm = confusion_matrix(y_true, y_pred, k)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    tp = np.diag(cm)
    present = support > 0

    per_class: dict[str, dict] = {}
    f1s = np.zeros(k)
    aucs: dict[str, float | None] = {}
    for c, name in enumerate(classes):
        precision = _safe_div(tp[c], predicted[c])
        recall = _safe_div(tp[c], support[c])
        f1 = _safe_div(2 * precision * recall, precision + recall)
        f1s[c] = f1
        auc = None
        if present[c] and support[c] < len(y_true):
            auc = binary_auc(y_true == c, probs[:, c])
        aucs[name] = auc
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": int(support[c]),
            "auc": auc,
        }
    top3 = np.argsort(-probs, axis=1)[:, :3]
    in_top3 = (top3 == y_true[:, None]).any(axis=1)
    valid_aucs = [a for a in aucs.values() if a is not None]
    return {
        "n": len(y_true),
        "classes": list(classes),
        "classes_present": [c for c, p in zip(classes, present, strict=False) if p],
        "accuracy": _safe_div(tp.sum(), len(y_true)),
        "balanced_accuracy": float(np.mean(tp[present] / support[present]))
        if present.any()
        else 0.0,
        "macro_f1": float(f1s[present].mean()) if present.any() else 0.0,
        "weighted_f1": _safe_div(float((f1s * support).sum()), float(support.sum())),
        "macro_auc": float(np.mean(valid_aucs)) if valid_aucs else None,
        "top3_accuracy": float(in_top3.mean()) if len(y_true) else 0.0,
        "ece": expected_calibration_error(probs, y_true),
        "nll": float(-np.mean(np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, 1)))),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
        **clinical_metrics(y_true, probs, classes),
    }


def headline(m: dict) -> str:
    """One line for logs."""
    line = (
        f"acc {m['accuracy']:.3f}  bal_acc {m['balanced_accuracy']:.3f}  "
        f"macro_f1 {m['macro_f1']:.3f}  macro_auc {_fmt(m['macro_auc'])}  ece {m['ece']:.3f}"
    )
    mel = m.get("melanoma", {})
    if mel.get("auc") is not None:
        line += f"  mel_auc {_fmt(mel['auc'])}  mel_sens@spec90 {_fmt(mel['sens_at_spec90'])}"
    return line


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"
