"""Batched inference shared by validation during training, evaluation and calibration."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from data_pipeline.dataset import LesionDataset
from data_pipeline.transforms import ImageTransform, Preprocessing
from model.network import Network

if TYPE_CHECKING:
    from model.onnx_runtime import OnnxEngine

#: Test-time augmentation views: identity, h-flip, v-flip, 180° rotation (all label-preserving).
TTA_VIEWS = (
    lambda x: x,
    lambda x: torch.flip(x, dims=[3]),
    lambda x: torch.flip(x, dims=[2]),
    lambda x: torch.flip(x, dims=[2, 3]),
)


def tta_logits(
    model: Network,
    images: torch.Tensor,
    meta: torch.Tensor,
    features: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean logits over :data:`TTA_VIEWS` (image features per view, one head pass each).

    ``features`` are the un-augmented view's, when the caller already has them (it needs them
    for the OOD check), so the identity view's backbone pass is not run twice."""
    if features is None:
        features = model.image_features(images)
    views = [model.head(features, meta)]
    views += [model(view(images), meta) for view in TTA_VIEWS[1:]]
    return torch.stack(views).mean(dim=0)


@torch.no_grad()
def collect_outputs(
    model: Network,
    loader: DataLoader,
    device: torch.device | str = "cpu",
    tta: bool = False,
    progress: bool = False,
    engine: OnnxEngine | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Raw (uncalibrated) logits, labels and pooled image features (of the un-augmented view,
    what the OOD check reads) for every batch of ``loader``.

    ``engine``: run the network on ONNX Runtime (the checkpoint's verified export) instead of
    PyTorch; same outputs, several times faster on a CPU."""
    model.eval()
    logits, labels, feats = [], [], []
    iterator = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="eval", unit="batch", leave=False, dynamic_ncols=True)
    for images, meta, y in iterator:
        if engine is not None:
            out, f = engine.logits_and_features(images, meta)
            if tta:
                flipped = [engine.logits_and_features(v(images), meta)[0] for v in TTA_VIEWS[1:]]
                out = torch.stack([out, *flipped]).mean(dim=0)
            logits.append(out.numpy())
            feats.append(f.numpy())
            labels.append(np.asarray(y))
            continue
        images, meta = images.to(device), meta.to(device)
        with torch.autocast(device_type=torch.device(device).type, enabled=_amp(device)):
            f = model.image_features(images)
            out = tta_logits(model, images, meta, f) if tta else model.head(f, meta)
        logits.append(out.float().cpu().numpy())
        feats.append(f.float().cpu().numpy())
        labels.append(np.asarray(y))
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
    return np.concatenate(logits), np.concatenate(labels), np.concatenate(feats)


def collect_logits(
    model: Network,
    loader: DataLoader,
    device: torch.device | str = "cpu",
    tta: bool = False,
    progress: bool = False,
    engine: OnnxEngine | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw (uncalibrated) logits and labels for every batch of ``loader``."""
    logits, labels, _ = collect_outputs(model, loader, device, tta, progress, engine)
    return logits, labels


def _amp(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"


def eval_loader(
    df: pd.DataFrame, pre: Preprocessing, batch_size: int = 64, workers: int = 0
) -> DataLoader:
    """The one evaluation DataLoader: rows in order, the checkpoint's inference preprocessing."""
    return DataLoader(
        LesionDataset(df, ImageTransform(pre, train=False)),
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        persistent_workers=workers > 0,
    )
