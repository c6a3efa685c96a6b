"""Agreement of the model with confirmed diagnoses: the one computation behind the Agreement tab,
the ``/agreement`` API and ``scripts.query_history --agreement``.

Why a separate computation from :func:`model.metrics.compute_metrics`: that one scores
probabilities against labels from a dataset. Here the labels are what users recorded later, which
may be ``other`` (a lesion outside the model's 7 classes) and only cover part of the history; the
question is "how often did the model's top class agree with the confirmed diagnosis on *our*
patients". The counting reuses :func:`model.metrics.confusion_matrix`.

The classes are the model's (:func:`classes_for`): HAM10000's 7 for the shipped model and every
row made before class sets existed, else the loaded model's class set for its model version (or,
for a model not loaded here, the codes its rows use).

Definitions (rows with a confirmed diagnosis only):

- confusion matrix: rows = confirmed diagnosis (the classes + ``other``), columns = top class;
- sensitivity of class c: confirmed c and predicted c / confirmed c;
- PPV of class c: confirmed c and predicted c / predicted c (a lesion confirmed ``other`` counts
  against the class it was predicted as);
- balanced accuracy: the mean sensitivity over the classes with at least one confirmed case;
- melanoma sensitivity: the sensitivity of ``mel`` (None for a class set without it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from data_pipeline.schema import CLASSES, MELANOMA, classes_of
from db.models import OTHER
from db.queries import (
    HistoryFilter,
    classes_by_model_version,
    confirmed_pairs,
    count_by_model_version,
)
from db.session import Database
from model.metrics import confusion_matrix


def confirmed_labels(classes: Sequence[str]) -> tuple[str, ...]:
    """Rows of the confusion matrix: the confirmed diagnosis (a class, or ``other``)."""
    return tuple(classes) if OTHER in classes else (*classes, OTHER)


#: :func:`confirmed_labels` of HAM10000's classes.
CONFIRMED_LABELS: tuple[str, ...] = confirmed_labels(CLASSES)


def classes_for(
    pairs: Sequence[tuple[str, str]], model_classes: Sequence[Sequence[str]] = ()
) -> tuple[str, ...]:
    """The class codes an agreement is over: HAM10000's when every code of ``pairs`` and of
    the models' classes (``model_classes``, each in logit order) is one, else the models'
    classes in order, then any other code the pairs use."""
    codes = dict.fromkeys(c for classes in model_classes for c in classes)
    codes.update(dict.fromkeys(c for pair in pairs for c in pair if c != OTHER))
    return CLASSES if set(codes) <= set(CLASSES) else tuple(codes)


@dataclass
class Agreement:
    """Agreement over one slice of the history (JSON via :meth:`to_dict`)."""

    n_predictions: int  # rows in the slice
    n_confirmed: int  # of which have a confirmed diagnosis
    confusion: list[list[int]]  # [confirmed label][predicted class]
    sensitivity: dict[str, float | None]  # None: no confirmed case of that class
    ppv: dict[str, float | None]  # None: the class was never predicted (among confirmed rows)
    support: dict[str, int]  # confirmed cases per label (other included)
    balanced_accuracy: float | None
    accuracy: float | None  # top class == confirmed diagnosis
    melanoma_sensitivity: float | None
    by_model_version: dict[str, Agreement] = field(default_factory=dict)
    #: The predicted classes (columns), in the model's order.
    classes: tuple[str, ...] = CLASSES

    @property
    def confirmed_labels(self) -> tuple[str, ...]:
        return confirmed_labels(self.classes)

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_predictions": self.n_predictions,
            "n_confirmed": self.n_confirmed,
            "labels_confirmed": list(self.confirmed_labels),
            "labels_predicted": list(self.classes),
            "confusion_matrix": self.confusion,
            "sensitivity": self.sensitivity,
            "ppv": self.ppv,
            "support": self.support,
            "balanced_accuracy": self.balanced_accuracy,
            "accuracy": self.accuracy,
            "melanoma_sensitivity": self.melanoma_sensitivity,
            "by_model_version": {v: a.to_dict() for v, a in self.by_model_version.items()},
        }


def _ratio(a: int, b: int) -> float | None:
    return float(a) / float(b) if b else None


def compute_agreement(
    pairs: Sequence[tuple[str, str]],
    n_predictions: int | None = None,
    classes: Sequence[str] | None = None,
) -> Agreement:
    """Agreement from ``(predicted_class, confirmed_dx)`` pairs over ``classes`` (None:
    :func:`classes_for` the pairs)."""
    classes = tuple(classes_for(pairs) if classes is None else classes)
    rows = confirmed_labels(classes)
    labels = {c: i for i, c in enumerate(rows)}
    true = np.array([labels.get(c, labels[OTHER]) for _, c in pairs], dtype=np.int64)
    pred = np.array([labels[p] for p, _ in pairs], dtype=np.int64)
    cm = confusion_matrix(true, pred, len(rows))[:, : len(classes)]
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    sens = {c: _ratio(int(cm[i, i]), int(support[i])) for i, c in enumerate(classes)}
    ppv = {c: _ratio(int(cm[i, i]), int(predicted[i])) for i, c in enumerate(classes)}
    present = [s for s in sens.values() if s is not None]
    return Agreement(
        n_predictions=len(pairs) if n_predictions is None else n_predictions,
        n_confirmed=len(pairs),
        confusion=cm.tolist(),
        sensitivity=sens,
        ppv=ppv,
        support={c: int(support[i]) for i, c in enumerate(rows)},
        balanced_accuracy=float(np.mean(present)) if present else None,
        accuracy=_ratio(int(np.trace(cm[: len(classes)])), len(pairs)),
        melanoma_sensitivity=sens.get(MELANOMA),
        classes=classes,
    )


def agreement_for(db: Database, f: HistoryFilter | None = None) -> Agreement:
    """Agreement over the rows matching ``f``, overall and per model version."""
    with db.session() as session:
        rows = confirmed_pairs(session, f)
        totals = count_by_model_version(session, f)
        versions = sorted({v for _, _, v in rows})
        stored = classes_by_model_version(session, versions)
    # each version's classes: its loaded model's, else those its stored rows hold
    classes = {v: (own.codes if (own := classes_of(v)) else stored[v]) for v in versions}
    pairs = [(p, c) for p, c, _ in rows]
    out = compute_agreement(pairs, sum(totals.values()), classes_for(pairs, list(classes.values())))
    for v in versions:
        mine = [(p, c) for p, c, w in rows if w == v]
        out.by_model_version[v] = compute_agreement(
            mine, totals.get(v, 0), classes_for(mine, [classes[v]])
        )
    return out


# --- presentation (plain text / Markdown / tables: shared by the CLI and the app) ----------------


def _pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f} %"


def summary_lines(a: Agreement) -> list[str]:
    """The headline numbers, one per line (no Markdown)."""
    noun = "prediction" if a.n_predictions == 1 else "predictions"
    verb = "has" if a.n_confirmed == 1 else "have"
    lines = [f"{a.n_confirmed} of {a.n_predictions} {noun} {verb} a confirmed diagnosis."]
    if a.n_confirmed:
        lines += [
            f"Balanced accuracy (mean sensitivity over confirmed classes): "
            f"{_pct(a.balanced_accuracy)}",
            f"Top class = confirmed diagnosis: {_pct(a.accuracy)}",
        ]
        if MELANOMA in a.classes:
            lines.append(
                f"Melanoma sensitivity: {_pct(a.melanoma_sensitivity)} "
                f"({a.support.get('mel', 0)} confirmed melanoma"
                f"{'' if a.support.get('mel', 0) == 1 else 's'})"
            )
    return lines


def confusion_headers(a: Agreement) -> list[str]:
    """Headers of :func:`confusion_rows`: ``confirmed``, the predicted classes, ``total``."""
    return ["confirmed", *a.classes, "total"]


#: :func:`confusion_headers` of an agreement over HAM10000's classes.
CONFUSION_HEADERS = ["confirmed", *CLASSES, "total"]


def confusion_rows(a: Agreement) -> list[list[Any]]:
    return [
        [label, *row, sum(row)] for label, row in zip(a.confirmed_labels, a.confusion, strict=True)
    ]


PER_CLASS_HEADERS = ["class", "confirmed", "predicted", "sensitivity", "PPV"]


def per_class_rows(a: Agreement) -> list[list[Any]]:
    predicted = [sum(col) for col in zip(*a.confusion, strict=True)] if a.confusion else []
    return [
        [c, a.support[c], predicted[i] if predicted else 0, _pct(a.sensitivity[c]), _pct(a.ppv[c])]
        for i, c in enumerate(a.classes)
    ]


VERSION_HEADERS = [
    "model version",
    "predictions",
    "confirmed",
    "balanced accuracy",
    "melanoma sensitivity",
]


def version_rows(a: Agreement) -> list[list[Any]]:
    return [
        [v, s.n_predictions, s.n_confirmed, _pct(s.balanced_accuracy), _pct(s.melanoma_sensitivity)]
        for v, s in a.by_model_version.items()
    ]
