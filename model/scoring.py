"""Scoring a trained network: per-source validation, the model-selection rule, and the final
calibrate-and-score step shared by training and ensembling.

**Selection rule** (fixed before any test-split number was looked at): every validation set —
HAM10000's lesion-grouped val split and each external validation set — gets the score
``(balanced accuracy + melanoma-vs-rest AUC) / 2`` (macro AUC where a set has no melanoma), and
the selection score is the **mean over the validation sets**. A model whose class set has no
``mel`` class (e.g. a publisher's benign / malignant classes) uses the malignant-vs-benign AUC in
place of the melanoma AUC. Epochs and candidate models are
chosen by it; the test split is never used to choose anything. Balanced accuracy keeps all seven
classes honest on HAM10000; the external term rewards a model that still finds melanoma on
dermoscopy from other clinics.

**Replacing the shipped model** (added 2026-12-02, before the comparison it first decided): a
candidate with a higher selection score replaces the shipped model only if it is higher in at
least 95 % of paired bootstrap draws over the validation images (:mod:`model.compare`,
``scripts.compare``); a gain within the noise of 1287 + 150 validation images keeps the shipped
model, so the default does not churn on chance.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader

from data_pipeline.schema import HAM7, MELANOMA, ClassSet
from model.bootstrap import LEVEL, set_intervals
from model.calibration import fit_temperature, softmax
from model.checkpoint import CheckpointConfig
from model.engine import collect_logits, collect_outputs
from model.metrics import compute_metrics, headline
from model.network import Network
from model.ood import FeatureDistance, fit_ood

SELECTION_RULE = (
    "mean over validation sets (HAM10000 val + each external val) of "
    "(balanced accuracy + melanoma AUC) / 2"
)
#: The rule for a class set without ``mel``.
SELECTION_RULE_NO_MELANOMA = (
    "mean over validation sets (primary val + each external val) of "
    "(balanced accuracy + malignant-vs-benign AUC) / 2 (the class set has no melanoma class)"
)


def selection_rule(classes: ClassSet) -> str:
    """The selection rule, in words, for a model of this class set (stored in its config)."""
    return SELECTION_RULE if classes.has_melanoma else SELECTION_RULE_NO_MELANOMA


@dataclass
class EvalSets:
    """Loaders of the held-out sets: HAM10000 val / test and external validation sets by name."""

    val: DataLoader
    test: DataLoader | None = None
    external: Mapping[str, DataLoader] | None = None

    def validation(self) -> dict[str, DataLoader]:
        """Every set the selection rule averages over, primary val first."""
        return {"val": self.val, **dict(self.external or {})}


def set_score(metrics: dict) -> float:
    """One validation set's contribution to the selection score (see :func:`selection_rule`)."""
    key = "melanoma" if MELANOMA in metrics.get("classes", HAM7.codes) else "malignant"
    auc = (metrics.get(key) or {}).get("auc")
    if auc is None:
        auc = metrics["macro_auc"] or 0.0
    return 0.5 * (metrics["balanced_accuracy"] + auc)


def selection_score(per_set: Mapping[str, dict]) -> float:
    """The model-selection score: the mean of :func:`set_score` over validation sets."""
    return float(np.mean([set_score(m) for m in per_set.values()]))


def validate(
    model: Network,
    sets: EvalSets,
    device: torch.device | str,
    temperature: float = 1.0,
    classes: ClassSet = HAM7,
) -> dict[str, dict]:
    """Metrics of every validation set, keyed ``val`` and by external source name."""
    out = {}
    for name, loader in sets.validation().items():
        logits, labels = collect_logits(model, loader, device)
        out[name] = compute_metrics(labels, softmax(logits, temperature), classes)
    return out


def calibrate_and_score(
    model: Network,
    ck: CheckpointConfig,
    sets: EvalSets,
    device: torch.device | str,
    n_boot: int = 1000,
) -> FeatureDistance:
    """Fit the OOD check (on HAM10000 val) and the temperature (on all validation sets pooled),
    then score val, test and every external set into ``ck.metrics`` (in place), with 95 %
    bootstrap intervals of the headline figures under ``ck.metrics["intervals"]`` (``n_boot``
    draws of whole lesions; 0: none), which the model card shows beside each figure.

    Shared by training and ensembling, so both ship identically described checkpoints."""
    collected = {name: collect_outputs(model, ld, device) for name, ld in sets.validation().items()}
    detector, ck.ood = fit_ood(torch.from_numpy(collected["val"][2]))
    ck.temperature = fit_temperature(
        np.concatenate([z for z, _, _ in collected.values()]),
        np.concatenate([y for _, y, _ in collected.values()]),
    )
    probs = {name: (softmax(z, ck.temperature), y) for name, (z, y, _) in collected.items()}
    if sets.test is not None:
        z, y = collect_logits(model, sets.test, device)
        probs["test"] = (softmax(z, ck.temperature), y)
    scored = {name: compute_metrics(y, p, ck.classes) for name, (p, y) in probs.items()}
    test = scored.pop("test", None)
    ck.metrics = {"val": scored.pop("val"), "external": scored}
    ck.metrics["selection_score"] = selection_score({"val": ck.metrics["val"], **scored})
    if test is not None:
        ck.metrics["test"] = test
    if n_boot:
        loaders = {**sets.validation(), **({"test": sets.test} if sets.test is not None else {})}
        lesions = {name: getattr(ld.dataset, "lesion_ids", None) for name, ld in loaders.items()}
        ck.metrics["intervals"] = {
            "n_boot": n_boot,
            "level": LEVEL,
            "resampled": "lesions",
            "sets": {
                name: set_intervals(y, p, lesions[name], n_boot, classes=ck.classes)
                for name, (p, y) in probs.items()
            },
        }
    print(f"temperature {ck.temperature:.3f}", flush=True)
    for name in ("val", "test"):
        if name in ck.metrics:
            print(f"{name:5s} {headline(ck.metrics[name])}", flush=True)
    for name, m in scored.items():
        print(f"{name}: {headline(m)}", flush=True)
    return detector
