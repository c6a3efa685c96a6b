"""Heatmap arithmetic in NumPy: closed-form Grad-CAM from feature maps, scaling, resizing.

Why apart from :mod:`model.attribution`: that module wraps Captum and PyTorch; these steps need
neither, and a serving process that runs the ONNX export (:mod:`model.lean`) must not import
them. :func:`model.attribution.gradcam_from_maps` (PyTorch weights) and the lean predictor
(safetensors weights) both call :func:`cam_from_maps`, so the two give the same heatmap.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import numpy as np


def cam_from_maps(
    maps: np.ndarray,
    weights: Sequence[np.ndarray],
    scales: Sequence[float],
    size: tuple[int, int],
) -> np.ndarray:
    """Grad-CAM on a (H, W) grid ``size`` from the members' last-stage ``maps`` (C, h, w),
    members concatenated on channels: member i's map is ReLU(Σ_k w_i[k] / (h·w) · A_k) times
    ``scales[i]`` (its weight in the target's logit), where ``w_i`` is its classifier's row for
    the target restricted to the image channels (see :func:`model.attribution.gradcam_from_maps`
    for why this equals Captum's Grad-CAM). Summed on the small grid, upsampled once with
    PyTorch's bilinear weights (``align_corners=False``), scaled to [0, 1]."""
    maps = np.asarray(maps, dtype=np.float32)
    total = np.zeros(maps.shape[1:], dtype=np.float32)
    start = 0
    for w, scale in zip(weights, scales, strict=True):
        channels = int(w.shape[0])
        a = maps[start : start + channels]
        start += channels
        alpha = np.asarray(w, dtype=np.float32) / float(a.shape[-2] * a.shape[-1])
        total += scale * np.maximum(np.tensordot(alpha, a, axes=1), 0.0)
    if start != maps.shape[0]:
        raise ValueError(f"feature maps have {maps.shape[0]} channels, expected {start}")
    grid_h, grid_w = int(maps.shape[-2]), int(maps.shape[-1])
    heat = bilinear_matrix(grid_h, size[0]) @ total @ bilinear_matrix(grid_w, size[1]).T
    return normalise(heat)


@functools.lru_cache(maxsize=16)
def bilinear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) matrix of PyTorch's bilinear upsampling weights (``align_corners=False``)."""
    src = np.maximum((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0)
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    i1 = np.minimum(i0 + 1, n_in - 1)
    frac = (src - i0).astype(np.float32)
    m = np.zeros((n_out, n_in), dtype=np.float32)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - frac)
    np.add.at(m, (rows, i1), frac)
    return m


def normalise(heat: np.ndarray) -> np.ndarray:
    """ReLU, then scale to [0, 1] by the peak (all zeros stay zeros)."""
    heat = np.maximum(heat, 0.0)
    peak = float(heat.max())
    return (heat / peak).astype(np.float32) if peak > 0 else np.zeros_like(heat, dtype=np.float32)


def resize_heatmap(heat: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Resize a [0, 1] heatmap from the model's input grid to ``shape`` (H, W) in one step.

    Every displayed or stored heatmap is made from the Grad-CAM grid by this one call, never by
    resizing an already resized map."""
    import cv2

    h, w = shape
    if heat.shape[:2] == (h, w):
        return heat.astype(np.float32, copy=False)
    return np.clip(cv2.resize(heat, (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
