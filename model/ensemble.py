"""Seed ensembles: N trained fusion checkpoints → one self-describing checkpoint.

The members must share architecture, preprocessing, metadata vocabulary and split file (so val is
untouched by all of them and test stays held out). The ensemble is then treated exactly like a
freshly trained model: temperature and OOD check are fitted on val, val and test are scored, and
everything is written with :func:`model.checkpoint.save_checkpoint`. Weights are stored as float16
by default (an ensemble of two Lite0 members would not fit the 30 MB budget in float32); the model
is rounded *before* it is measured, so the stored metrics describe exactly the stored weights.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import torch

from common.errors import DataError
from data_pipeline.ham10000 import load_metadata
from data_pipeline.sources import source_name
from data_pipeline.transforms import Preprocessing
from model.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    load_checkpoint,
    resolve_dir,
    round_weights,
    save_checkpoint,
)
from model.engine import eval_loader
from model.evaluate import select_rows
from model.network import FusionEnsemble, FusionNet, Network
from model.onnx_runtime import export_onnx
from model.scoring import EvalSets, calibrate_and_score


def _check_compatible(configs: list[CheckpointConfig], folders: list[Path]) -> None:
    first = configs[0]
    for cfg, folder in zip(configs[1:], folders[1:], strict=False):
        for what, a, b in (
            ("architecture", replace(first.model, members=1), replace(cfg.model, members=1)),
            ("preprocessing", first.preprocessing, cfg.preprocessing),
            ("training sources", _data(first), _data(cfg)),
            ("metadata vocabulary", first.vocabulary, cfg.vocabulary),
            ("split file", first.training.get("split_sha256"), cfg.training.get("split_sha256")),
        ):
            if a != b:
                raise CheckpointError(
                    f"{folder} differs from {folders[0]} in its {what}; ensemble members must "
                    "be trained with the same recipe on the same split."
                )


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
        vocabulary=first.vocabulary,
        training={
            "command": command,
            "members": members,
            "weights_dtype": str(dtype or torch.float32).removeprefix("torch."),
            **{k: first.training[k] for k in inherited if k in first.training},
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


def _data(cfg: CheckpointConfig) -> list[tuple[str, str, str]]:
    """(name, role, CSV hash) of every source a checkpoint learnt from or was selected on."""
    return [(s["name"], s["role"], s["csv_sha256"]) for s in cfg.training.get("sources", [])]


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
) -> tuple[Path, CheckpointConfig]:
    """Combine ``members`` (checkpoint folders) into a calibrated ensemble checkpoint at ``out``.
    A member folder may hold an ensemble (e.g. the shipped model): its networks join one by one,
    or only network K with ``FOLDER#K``.

    ``external_val`` are the validation sets the members were selected on (scored and used for
    the temperature like in training); ``geometry`` sets the inference framing policy."""
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
    df = load_metadata(data_dir)
    held = {}
    for split in ("val", "test"):
        rows, info = select_rows(df, first, split, None)
        if "warning" in info:  # val must be the members' val, or calibration and selection leak
            raise DataError(f"{info['split_file']}: {info['warning']}.")
        held[split] = eval_loader(rows, pre)
    external = {source_name(f): eval_loader(load_metadata(f), pre) for f in external_val}
    sets = EvalSets(val=held["val"], test=held["test"], external=external)
    ck = ensemble_config(model, configs, name, dtype, command, pre, members=records)
    detector = calibrate_and_score(model, ck, sets, device)
    out = Path(out)
    save_checkpoint(model, ck, out, dtype=dtype)
    detector.save(out)
    export_onnx(out, model, ck)  # the ensemble ships with its ONNX export
    return out, ck
