"""Seed ensembles: N trained fusion checkpoints → one self-describing checkpoint.

The members must share architecture, preprocessing, metadata vocabulary and split file (so val is
untouched by all of them and test stays held out). The ensemble is then treated exactly like a
freshly trained model: temperature and OOD check are fitted on val, val and test are scored, and
everything is written with :func:`model.checkpoint.save_checkpoint`. Weights are stored as float16
by default (an ensemble of two Lite0 members would not fit the 30 MB budget in float32); the model
is rounded *before* it is measured, so the stored metrics describe exactly the stored weights.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from data_pipeline.dataset import LesionDataset
from common.errors import DataError
from data_pipeline.ham10000 import load_metadata
from data_pipeline.transforms import ImageTransform
from model.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    load_checkpoint,
    resolve_dir,
    round_weights,
    save_checkpoint,
)
from model.evaluate import select_rows
from model.network import FusionEnsemble, FusionNet
from model.train import calibrate_and_score


def _check_compatible(configs: list[CheckpointConfig], folders: list[Path]) -> None:
    first = configs[0]
    for cfg, folder in zip(configs[1:], folders[1:]):
        for what, a, b in (
            ("architecture", first.model, cfg.model),
            ("preprocessing", first.preprocessing, cfg.preprocessing),
            ("metadata vocabulary", first.vocabulary, cfg.vocabulary),
            ("split file", first.training.get("split_sha256"), cfg.training.get("split_sha256")),
        ):
            if a != b:
                raise CheckpointError(
                    f"{folder} differs from {folders[0]} in its {what}; ensemble members must "
                    "be trained with the same recipe on the same split."
                )


def build_ensemble(
    members: list[Path | str],
    data_dir: Path | str,
    out: Path | str,
    name: str = "",
    dtype: torch.dtype | None = torch.float16,
    device: str = "cpu",
) -> tuple[Path, CheckpointConfig]:
    """Combine ``members`` (checkpoint folders) into a calibrated ensemble checkpoint at ``out``."""
    if len(members) < 2:
        raise CheckpointError("An ensemble needs at least two member checkpoints.")
    folders = [resolve_dir(m) for m in members]
    loaded = [load_checkpoint(f, device=device) for f in folders]
    configs = [cfg for _, cfg in loaded]
    _check_compatible(configs, folders)
    nets = [net for net, _ in loaded]
    if not all(isinstance(n, FusionNet) for n in nets):
        raise CheckpointError("Ensemble members must be single networks, not ensembles.")
    model = FusionEnsemble.from_members(nets).to(device)
    if dtype is not None:
        round_weights(model, dtype)

    first = configs[0]
    df = load_metadata(data_dir)
    tf = ImageTransform(first.preprocessing, train=False)
    loaders = {}
    for split in ("val", "test"):
        rows, info = select_rows(df, first, split, None)
        if "warning" in info:  # val must be the members' val, or calibration and selection leak
            raise DataError(f"{info['split_file']}: {info['warning']}.")
        loaders[split] = DataLoader(LesionDataset(rows, tf), batch_size=64)
    ck = CheckpointConfig(
        name=name or f"{first.name}-ensemble{len(nets)}",
        model=model.cfg,
        preprocessing=first.preprocessing,
        vocabulary=first.vocabulary,
        training={
            "command": " ".join(
                shlex.quote(a) for a in ["python", "-m", "scripts.ensemble", *sys.argv[1:]]
            ),
            "members": [
                {
                    "version": cfg.version,
                    "command": cfg.training.get("command"),
                    "best_epoch": cfg.training.get("best_epoch"),
                    "seed": cfg.training.get("config", {}).get("seed"),
                    "val": {
                        k: cfg.metrics.get("val", {}).get(k)
                        for k in ("balanced_accuracy", "macro_auc")
                    },
                }
                for cfg in configs
            ],
            "weights_dtype": str(dtype or torch.float32).removeprefix("torch."),
            **{
                k: first.training[k]
                for k in ("split_file", "split_sha256", "train_class_counts")
                if k in first.training
            },
        },
    )
    detector = calibrate_and_score(model, ck, loaders, device)
    out = Path(out)
    save_checkpoint(model, ck, out, dtype=dtype)
    detector.save(out)
    return out, ck
