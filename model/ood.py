"""A measurable "is this like the training images?" check on the image branch's features.

Criterion: the mean squared z-score of an image's pooled backbone features against the
validation images' per-feature mean and variance (a diagonal Mahalanobis distance). The
threshold is the 99th percentile of that distance over the validation split, so about 1 % of
genuine HAM10000 dermoscopy images are flagged, while photos of other things — a face, a
document, a flat colour — land far outside. Stored in the checkpoint as ``ood.safetensors``
(statistics) and ``config.json`` → ``ood`` (threshold), fitted by :func:`fit_ood`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader

OOD_FILE = "ood.safetensors"
PERCENTILE = 99.0


class FeatureDistance:
    """Diagonal-Mahalanobis distance of pooled features to the validation distribution."""

    def __init__(self, mean: torch.Tensor, var: torch.Tensor, threshold: float) -> None:
        self.mean, self.var, self.threshold = mean, var.clamp_min(1e-6), float(threshold)

    def distance(self, features: torch.Tensor) -> torch.Tensor:
        return (((features.float() - self.mean) ** 2) / self.var).mean(dim=1)

    def save(self, folder: Path) -> None:
        save_file(
            {"mean": self.mean.contiguous(), "var": self.var.contiguous()}, str(folder / OOD_FILE)
        )

    @classmethod
    def load(cls, folder: Path, threshold: float) -> FeatureDistance:
        t = load_file(str(Path(folder) / OOD_FILE))
        return cls(t["mean"], t["var"], threshold)


@torch.no_grad()
def fit_ood(
    model, loader: DataLoader, device: torch.device | str = "cpu"
) -> tuple[FeatureDistance, dict]:
    """Fit statistics on ``loader``'s images; returns the detector and its config entry."""
    model.eval()
    feats = torch.cat([model.image_features(x.to(device)).float().cpu() for x, _, _ in loader])
    mean, var = feats.mean(dim=0), feats.var(dim=0)
    det = FeatureDistance(mean, var, 0.0)
    d = det.distance(feats).numpy()
    det.threshold = float(np.percentile(d, PERCENTILE))
    info = {
        "method": "diagonal Mahalanobis distance of pooled image features (val statistics)",
        "percentile": PERCENTILE,
        "threshold": det.threshold,
        "n_fit": int(len(feats)),
    }
    return det, info
