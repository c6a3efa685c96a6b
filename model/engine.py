"""Batched inference shared by validation during training, evaluation and calibration."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

#: Test-time augmentation views: identity, h-flip, v-flip, 180° rotation (all label-preserving).
TTA_VIEWS = (
    lambda x: x,
    lambda x: torch.flip(x, dims=[3]),
    lambda x: torch.flip(x, dims=[2]),
    lambda x: torch.flip(x, dims=[2, 3]),
)


def tta_logits(model: torch.nn.Module, images: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """Mean logits over :data:`TTA_VIEWS` (image features per view, one head pass each)."""
    return torch.stack([model(view(images), meta) for view in TTA_VIEWS]).mean(dim=0)


@torch.no_grad()
def collect_logits(
    model: torch.nn.Module,
    loader: DataLoader,
    device: torch.device | str = "cpu",
    tta: bool = False,
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Raw (uncalibrated) logits and labels for every batch of ``loader``."""
    model.eval()
    logits, labels = [], []
    iterator = loader
    if progress:
        from tqdm import tqdm

        iterator = tqdm(loader, desc="eval", unit="batch", leave=False)
    for images, meta, y in iterator:
        images, meta = images.to(device), meta.to(device)
        with torch.autocast(device_type=torch.device(device).type, enabled=_amp(device)):
            out = tta_logits(model, images, meta) if tta else model(images, meta)
        logits.append(out.float().cpu().numpy())
        labels.append(np.asarray(y))
    if not logits:
        return np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
    return np.concatenate(logits), np.concatenate(labels)


def _amp(device: torch.device | str) -> bool:
    return torch.device(device).type == "cuda"
