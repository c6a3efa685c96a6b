"""Rendering shared by the app and the CLIs: heatmap overlay and metadata-contribution chart."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a [0, 1] heatmap (jet colour map) over an RGB uint8 image of the same size."""
    import cv2

    if heatmap.shape != image.shape[:2]:
        heatmap = cv2.resize(heatmap, (image.shape[1], image.shape[0]))
    colour = cv2.applyColorMap(np.uint8(np.clip(heatmap, 0, 1) * 255), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB).astype(np.float32)
    weight = alpha * np.clip(heatmap, 0, 1)[..., None] ** 0.5
    out = image.astype(np.float32) * (1 - weight) + colour * weight
    return np.clip(out, 0, 255).astype(np.uint8)


def to_png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def heatmap_png(heatmap: np.ndarray) -> bytes:
    """Lossless 8-bit grayscale PNG of a [0, 1] heatmap (compact storage in the history DB)."""
    return to_png(np.uint8(np.clip(heatmap, 0, 1) * 255 + 0.5))


def heatmap_from_png(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32) / 255.0


def contributions_chart(contributions: dict[str, float] | None, target: str) -> np.ndarray:
    """Horizontal bar chart (RGB array) of signed metadata contributions in percentage points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 2.2), dpi=100)
    if not contributions:
        ax.text(0.5, 0.5, "this model does not use metadata", ha="center", va="center")
        ax.axis("off")
    else:
        fields = list(contributions)[::-1]
        vals = [100.0 * contributions[f] for f in fields]
        colours = ["#c0392b" if v > 0 else "#2471a3" for v in vals]
        ax.barh(fields, vals, color=colours)
        ax.axvline(0, color="black", linewidth=0.8)
        lim = max(1.0, max(abs(v) for v in vals) * 1.25)
        ax.set_xlim(-lim, lim)
        for y, v in enumerate(vals):
            ax.text(v, y, f" {v:+.1f}", va="center", ha="left" if v >= 0 else "right", fontsize=9)
        ax.set_xlabel(f"change in P({target}) vs. field unknown (percentage points)")
    fig.tight_layout()
    fig.canvas.draw()
    rgb = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return rgb
