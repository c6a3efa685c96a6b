"""Seed ensembles: N trained fusion checkpoints → one self-describing checkpoint.

The members must share architecture, preprocessing, metadata vocabulary and split file (so val is
untouched by all of them and test stays held out). The ensemble is then treated exactly like a
freshly trained model: temperature and OOD check are fitted on val, val and test are scored, and
everything is written with :func:`model.checkpoint.save_checkpoint`. Weights are stored as float16
by default (an ensemble of two Lite0 members would not fit the 30 MB budget in float32); the model
is rounded *before* it is measured, so the stored metrics describe exactly the stored weights.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from common.errors import DataError
from data_pipeline.ham10000 import load_metadata
from data_pipeline.schema import CLASSES, ClassSet
from data_pipeline.sources import source_name
from data_pipeline.transforms import Preprocessing
from model.calibration import softmax
from model.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    load_checkpoint,
    resolve_dir,
    round_weights,
    save_checkpoint,
)
from model.engine import collect_logits, eval_loader
from model.evaluate import select_rows
from model.metrics import compute_metrics
from model.network import FusionEnsemble, FusionNet, Network
from model.onnx_runtime import export_onnx
from model.scoring import EvalSets, calibrate_and_score, selection_score


def _check_compatible(configs: list[CheckpointConfig], folders: list[Path]) -> None:
    """Same architecture, preprocessing, vocabulary, primary source and split file. Members
    may differ in their *extra* training sources (a HAM10000-only specialist beside a
    multi-source generalist), but none may have trained on a set another holds out."""
    first = configs[0]
    for cfg, folder in zip(configs[1:], folders[1:], strict=False):
        for what, a, b in (
            ("architecture", replace(first.model, members=1), replace(cfg.model, members=1)),
            ("preprocessing", first.preprocessing, cfg.preprocessing),
            ("primary source", _data(first, "primary"), _data(cfg, "primary")),
            ("class set", first.classes, cfg.classes),
            ("metadata vocabulary", first.vocabulary, cfg.vocabulary),
            ("split file", first.training.get("split_sha256"), cfg.training.get("split_sha256")),
        ):
            if a != b:
                raise CheckpointError(
                    f"{folder} differs from {folders[0]} in its {what}; ensemble members must "
                    "be trained with the same recipe on the same split."
                )
    trained = {h for cfg in configs for _, role, h in _data(cfg) if role == "train"}
    held = {h for cfg in configs for _, role, h in _data(cfg) if role == "external_val"}
    if trained & held:
        raise CheckpointError(
            "One member trained on a folder that another holds out as external validation; "
            "their ensemble could not be validated on it."
        )


#: The values a member's weight for one class may take (two members: the other gets 1 - w).
WEIGHT_GRID: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)

#: Member logits and labels of each validation set: {set: ([logits of member i], labels)}.
MemberLogits = dict[str, tuple[list[np.ndarray], np.ndarray]]


def _combined(logits: list[np.ndarray], weights: np.ndarray) -> np.ndarray:
    return np.sum([z * weights[i] for i, z in enumerate(logits)], axis=0)


def _weights_score(
    sets: MemberLogits,
    weights: np.ndarray,
    rows: dict | None = None,
    classes: ClassSet | Sequence[str] = CLASSES,
) -> float:
    per_set = {}
    for name, (logits, y) in sets.items():
        keep = slice(None) if rows is None else rows[name]
        z = _combined([m[keep] for m in logits], weights)
        per_set[name] = compute_metrics(y[keep], softmax(z), classes)
    return selection_score(per_set)


def fit_class_weights(
    sets: MemberLogits,
    grid: Sequence[float] = WEIGHT_GRID,
    rows: dict | None = None,
    classes: ClassSet | Sequence[str] = CLASSES,
) -> np.ndarray:
    """Per-class weights of two members, fitted to the selection score on validation only.

    Coordinate ascent from the plain mean: for each class in turn, member 0's weight takes the
    grid value that scores best (member 1 gets the rest), two passes. ``rows``: per set, the
    rows to fit on (cross-fitting); ``classes``: the members' class set (logit order). Returns
    shape (2, n_classes), columns summing to 1."""
    n_members = len(next(iter(sets.values()))[0])
    if n_members != 2:
        raise CheckpointError(f"Per-class weights are fitted for two networks, not {n_members}.")
    n_classes = next(iter(sets.values()))[0][0].shape[1]
    w = np.full(n_classes, 0.5)
    best = _weights_score(sets, np.stack([w, 1 - w]), rows, classes)
    for _ in range(2):
        for c in range(n_classes):
            for value in grid:
                trial = w.copy()
                trial[c] = value
                score = _weights_score(sets, np.stack([trial, 1 - trial]), rows, classes)
                if score > best + 1e-9:
                    best, w = score, trial
    return np.stack([w, 1 - w])


def crossfit_score(
    sets: MemberLogits,
    lesions: dict[str, Sequence[str]],
    folds: int = 2,
    classes: ClassSet | Sequence[str] = CLASSES,
) -> float:
    """An honest validation score for fitted weights: each lesion's logits are combined with
    weights fitted on the *other* folds (lesions assigned by a stable hash), then the selection
    score is computed over all rows — comparable with any other candidate's val score."""
    fold_of = {
        name: np.array([int(hashlib.sha256(str(x).encode()).hexdigest(), 16) % folds for x in ids])
        for name, ids in lesions.items()
    }
    combined = {name: np.zeros_like(logits[0]) for name, (logits, _) in sets.items()}
    for k in range(folds):
        w = fit_class_weights(sets, rows={n: f != k for n, f in fold_of.items()}, classes=classes)
        for name, (logits, _) in sets.items():
            held = fold_of[name] == k
            combined[name][held] = _combined([m[held] for m in logits], w)
    return selection_score(
        {n: compute_metrics(sets[n][1], softmax(z), classes) for n, z in combined.items()}
    )


def _member_logits(nets: list[FusionNet], sets: EvalSets, device: str) -> MemberLogits:
    out: MemberLogits = {}
    for name, loader in sets.validation().items():
        collected = [collect_logits(net, loader, device) for net in nets]
        out[name] = ([z for z, _ in collected], collected[0][1])
    return out


def ensemble_config(
    model: FusionEnsemble,
    configs: list[CheckpointConfig],
    name: str,
    dtype: torch.dtype | None,
    command: str,
    pre: Preprocessing,
    members: list[dict],
) -> CheckpointConfig:
    """The new checkpoint's description: the members' recipe and data, and how it was combined.
    ``members`` are the records of the networks used (:func:`member_records`, per network)."""
    first = configs[0]
    inherited = ("split_file", "split_sha256", "sources", "train_class_counts", "selection_rule")
    return CheckpointConfig(
        name=name or f"{first.name}-ensemble{len(model.nets)}",
        model=model.cfg,
        preprocessing=pre,
        classes=first.classes,
        vocabulary=first.vocabulary,
        training={
            "command": command,
            "members": members,
            "weights_dtype": str(dtype or torch.float32).removeprefix("torch."),
            **{k: first.training[k] for k in inherited if k in first.training},
            "sources": _all_sources(configs),
        },
    )


def member_records(cfg: CheckpointConfig) -> list[dict]:
    """How each network of a checkpoint was made: one record for a trained run, the stored
    records of its members for an ensemble (whose members then join the new ensemble)."""
    if cfg.training.get("members"):
        return list(cfg.training["members"])
    return [
        {
            "version": cfg.version,
            "command": cfg.training.get("command"),
            "best_epoch": cfg.training.get("best_epoch"),
            "seed": cfg.training.get("config", {}).get("seed"),
            "selection_score": cfg.metrics.get("selection_score"),
            "val": {
                k: cfg.metrics.get("val", {}).get(k) for k in ("balanced_accuracy", "macro_auc")
            },
        }
    ]


def _networks(net: Network) -> list[FusionNet]:
    return net.nets if isinstance(net, FusionEnsemble) else [net]


_PICK = re.compile(r"^(?P<folder>.+)#(?P<index>\d+)$")


def _split_member(spec: Path | str) -> tuple[Path | str, int | None]:
    """``FOLDER#K`` names network K (0-based) of the ensemble in FOLDER, so one member of a
    shipped ensemble can join a new one without the others; a plain folder means all of it."""
    m = _PICK.match(str(spec))
    if m is None or Path(spec).exists():
        return spec, None
    return m["folder"], int(m["index"])


def _load_member(
    spec: Path | str, device: str
) -> tuple[Path, CheckpointConfig, list[FusionNet], list[dict]]:
    """A member argument → its folder, config, networks and how each network was made."""
    folder_spec, index = _split_member(spec)
    folder = resolve_dir(folder_spec)
    net, cfg = load_checkpoint(folder, device=device)
    nets, records = _networks(net), member_records(cfg)
    if index is None:
        return folder, cfg, nets, records
    if index >= len(nets):
        raise CheckpointError(
            f"{spec}: {folder} holds {len(nets)} network(s); pick one of 0..{len(nets) - 1}."
        )
    return folder, cfg, [nets[index]], [records[index]] if len(records) == len(nets) else records


def _data(cfg: CheckpointConfig, role: str | None = None) -> list[tuple[str, str, str]]:
    """(name, role, CSV hash) of every source a checkpoint learnt from or was selected on."""
    return [
        (s["name"], s["role"], s["csv_sha256"])
        for s in cfg.training.get("sources", [])
        if role is None or s["role"] == role
    ]


def _all_sources(configs: list[CheckpointConfig]) -> list[dict]:
    """Every member's sources, each once (the union: what the ensemble learnt from)."""
    seen: dict[tuple[str, str, str], dict] = {}
    for cfg in configs:
        for s in cfg.training.get("sources", []):
            seen.setdefault((s["name"], s["role"], s["csv_sha256"]), s)
    return list(seen.values())


def build_ensemble(
    members: list[Path | str],
    data_dir: Path | str,
    out: Path | str,
    name: str = "",
    dtype: torch.dtype | None = torch.float16,
    device: str = "cpu",
    external_val: Sequence[Path | str] = (),
    geometry: str | None = None,
    command: str = "",
    class_weights: str = "mean",
) -> tuple[Path, CheckpointConfig]:
    """Combine ``members`` (checkpoint folders) into a calibrated ensemble checkpoint at ``out``.
    A member folder may hold an ensemble (e.g. the shipped model): its networks join one by one,
    or only network K with ``FOLDER#K``.

    ``external_val`` are the validation sets the members were selected on (scored and used for
    the temperature like in training); ``geometry`` sets the inference framing policy.
    ``class_weights``: ``mean`` (equal logits) or ``fit`` (two networks: per-class weights
    fitted on the validation sets, :func:`fit_class_weights`, recorded with a cross-fitted
    validation score so the fit's optimism can be seen)."""
    if class_weights not in ("mean", "fit"):
        raise CheckpointError(f"--class-weights {class_weights!r}: use mean or fit.")
    loaded = [_load_member(m, device) for m in members]
    folders = [folder for folder, _, _, _ in loaded]
    configs = [cfg for _, cfg, _, _ in loaded]
    _check_compatible(configs, folders)
    nets = [n for _, _, member_nets, _ in loaded for n in member_nets]
    records = [r for _, _, _, recs in loaded for r in recs]
    if len(nets) < 2:
        raise CheckpointError("An ensemble needs at least two member networks.")
    model = FusionEnsemble.from_members(nets).to(device)
    if dtype is not None:
        round_weights(model, dtype)
    first = configs[0]
    pre = (
        first.preprocessing if geometry is None else replace(first.preprocessing, geometry=geometry)
    )
    df = load_metadata(data_dir, classes=first.classes)
    held = {}
    for split in ("val", "test"):
        rows, info = select_rows(df, first, split, None)
        if "warning" in info:  # val must be the members' val, or calibration and selection leak
            raise DataError(f"{info['split_file']}: {info['warning']}.")
        held[split] = eval_loader(rows, pre)
    external = {
        source_name(f): eval_loader(load_metadata(f, classes=first.classes), pre)
        for f in external_val
    }
    sets = EvalSets(val=held["val"], test=held["test"], external=external)
    ck = ensemble_config(model, configs, name, dtype, command, pre, members=records)
    if class_weights == "fit":
        per_set = _member_logits(model.nets, sets, device)
        codes = first.classes.codes
        w = fit_class_weights(per_set, classes=first.classes)
        with torch.no_grad():
            model.member_weights.copy_(torch.from_numpy(w))
        lesions = {
            n: getattr(ld.dataset, "lesion_ids", None) or [] for n, ld in sets.validation().items()
        }
        ck.training["class_weights"] = {
            "rule": "per-class weight of member 0 from "
            f"{list(WEIGHT_GRID)} (member 1: 1 - w), coordinate ascent on the selection score "
            "over the validation sets",
            "weights": [dict(zip(codes, row.tolist(), strict=True)) for row in w],
            "fitted_selection_score": _weights_score(per_set, w, classes=first.classes),
            "crossfit_selection_score": crossfit_score(per_set, lesions, classes=first.classes),
            "mean_selection_score": _weights_score(
                per_set, np.full_like(w, 0.5), classes=first.classes
            ),
        }
        print(f"class weights: {ck.training['class_weights']}", flush=True)
    detector = calibrate_and_score(model, ck, sets, device)
    out = Path(out)
    save_checkpoint(model, ck, out, dtype=dtype)
    detector.save(out)
    export_onnx(out, model, ck)  # the ensemble ships with its ONNX export
    return out, ck
