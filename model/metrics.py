"""Classification metrics for imbalanced, possibly incomplete label sets.

Balanced accuracy (mean per-class recall) is the headline metric: plain accuracy on HAM10000 is
dominated by nevi (67 %). Classes absent from a set are reported with support 0 and excluded from
macro AUC, so an external set without, say, akiec evaluates without crashing.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import roc_auc_score


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    cm = np.zeros((n_classes, n_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true), np.asarray(y_pred)), 1)
    return cm


def expected_calibration_error(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    bins = np.linspace(0.0, 1.0, n_bins + 1)
    ece = 0.0
    for lo, hi in zip(bins[:-1], bins[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - conf[in_bin].mean())
    return float(ece)


def reliability_bins(probs: np.ndarray, y_true: np.ndarray, n_bins: int = 15) -> dict:
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == y_true
    bins = np.linspace(0.0, 1.0, n_bins + 1)
    out = {"bin_lower": [], "confidence": [], "accuracy": [], "count": []}
    for lo, hi in zip(bins[:-1], bins[1:]):
        in_bin = (conf > lo) & (conf <= hi)
        out["bin_lower"].append(float(lo))
        out["count"].append(int(in_bin.sum()))
        out["confidence"].append(float(conf[in_bin].mean()) if in_bin.any() else None)
        out["accuracy"].append(float(correct[in_bin].mean()) if in_bin.any() else None)
    return out


def _safe_div(a: float, b: float) -> float:
    return float(a / b) if b else 0.0


def compute_metrics(y_true: Sequence[int], probs: np.ndarray, classes: Sequence[str]) -> dict:
    """All metrics reported by evaluation and stored in checkpoints (JSON-serialisable)."""
    y_true = np.asarray(y_true, dtype=np.int64)
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
            auc = float(roc_auc_score(y_true == c, probs[:, c]))
        aucs[name] = auc
        per_class[name] = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": int(support[c]),
            "auc": auc,
        }
    top3 = np.argsort(-probs, axis=1)[:, :3]
    valid_aucs = [a for a in aucs.values() if a is not None]
    return {
        "n": int(len(y_true)),
        "classes": list(classes),
        "classes_present": [c for c, p in zip(classes, present) if p],
        "accuracy": _safe_div(tp.sum(), len(y_true)),
        "balanced_accuracy": float(np.mean(tp[present] / support[present]))
        if present.any()
        else 0.0,
        "macro_f1": float(f1s[present].mean()) if present.any() else 0.0,
        "weighted_f1": _safe_div(float((f1s * support).sum()), float(support.sum())),
        "macro_auc": float(np.mean(valid_aucs)) if valid_aucs else None,
        "top3_accuracy": float(np.mean([t in row for t, row in zip(y_true, top3)])),
        "ece": expected_calibration_error(probs, y_true),
        "nll": float(-np.mean(np.log(np.clip(probs[np.arange(len(y_true)), y_true], 1e-12, 1)))),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }


def headline(m: dict) -> str:
    """One line for logs."""
    auc = m["macro_auc"]
    return (
        f"acc {m['accuracy']:.3f}  bal_acc {m['balanced_accuracy']:.3f}  "
        f"macro_f1 {m['macro_f1']:.3f}  macro_auc {auc if auc is None else round(auc, 3)}  "
        f"ece {m['ece']:.3f}"
    )
