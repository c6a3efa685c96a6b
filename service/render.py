"""Rendering and image encoding: heatmap overlays, the metadata chart, thumbnails and PNG bytes.

Why here (``service/``) and not in ``model/`` or ``db/``: drawing is presentation, not modelling,
and the ORM should store bytes without knowing image formats. The prediction service is the one
component that needs both sides — it encodes the thumbnail and heatmap it stores — and both
front ends (the app and the CLIs) sit above it, so they draw with the same code.
"""

from __future__ import annotations

import functools
import io
from typing import Any

import numpy as np
from PIL import Image

#: Longest side of stored thumbnails and heatmaps, in pixels.
THUMBNAIL_SIDE = 256
THUMBNAIL_QUALITY = 85
#: Images narrower than this are upscaled for display only (never for the model).
DISPLAY_WIDTH = 400


def fit_size(height: int, width: int, max_side: int = THUMBNAIL_SIDE) -> tuple[int, int]:
    """(h, w) scaled so the longest side is at most ``max_side`` (never enlarged)."""
    scale = min(1.0, max_side / max(height, width))
    return max(1, round(height * scale)), max(1, round(width * scale))


def overlay_heatmap(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a [0, 1] heatmap (jet colour map) over an RGB uint8 image.

    The service stores and returns heatmaps at their image's size, so nothing is resized here;
    only a mismatched pair (e.g. a row written by other code) is resized, from the stored map."""
    import cv2

    if heatmap.shape != image.shape[:2]:
        from model.attribution import resize_heatmap  # torch/captum: only when needed

        heatmap = resize_heatmap(heatmap, image.shape[:2])
    colour = cv2.applyColorMap((np.clip(heatmap, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB).astype(np.float32)
    weight = alpha * np.clip(heatmap, 0, 1)[..., None] ** 0.5
    out = image.astype(np.float32) * (1 - weight) + colour * weight
    return np.clip(out, 0, 255).astype(np.uint8)


def enlarge(image: np.ndarray | None, min_width: int = DISPLAY_WIDTH) -> np.ndarray | None:
    """Upscale small images (HAM10000 is 200×150) so the heatmap is visible on screen."""
    if image is None or image.shape[1] >= min_width:
        return image
    scale = min_width / image.shape[1]
    size = (min_width, max(1, round(image.shape[0] * scale)))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC))


def to_png(image: np.ndarray, optimize: bool = False) -> bytes:
    """PNG bytes; ``optimize`` makes them ~7 % smaller at ~10× the encoding time, so it is off
    for what is encoded per prediction (the stored heatmap)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", optimize=optimize)
    return buf.getvalue()


def heatmap_png(heatmap: np.ndarray) -> bytes:
    """Lossless 8-bit grayscale PNG of a [0, 1] heatmap (compact storage in the history DB)."""
    return to_png((np.clip(heatmap, 0, 1) * 255 + 0.5).astype(np.uint8))


def heatmap_from_png(data: bytes | None) -> np.ndarray | None:
    """A stored heatmap as an (H, W) float32 array in [0, 1] (None stays None)."""
    if data is None:
        return None
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32) / 255.0


def thumbnail_jpeg(rgb: np.ndarray, max_side: int = THUMBNAIL_SIDE) -> bytes:
    h, w = fit_size(rgb.shape[0], rgb.shape[1], max_side)
    img = Image.fromarray(rgb).resize((w, h), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=THUMBNAIL_QUALITY, optimize=True)
    return buf.getvalue()


def thumbnail_from_jpeg(data: bytes | None) -> np.ndarray | None:
    """A stored thumbnail as an RGB uint8 array (None when images were not stored)."""
    if data is None:
        return None
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)


@functools.lru_cache(maxsize=4)
def _font(size: int) -> Any:
    """Pillow's bundled scalable font (loaded once per size: two sizes are used)."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


#: Size of the metadata-contributions chart (what a 5 × 2.2 inch figure at 100 dpi was).
CHART_SIZE = (500, 220)
POSITIVE, NEGATIVE = (192, 57, 43), (36, 113, 163)


def contributions_chart(contributions: dict[str, float] | None, target: str) -> np.ndarray:
    """Horizontal bar chart (RGB array) of signed metadata contributions in percentage points.

    Drawn with PIL rather than matplotlib: the chart is made for every prediction, and a
    matplotlib figure (layout, ticks, text extents) cost more CPU than the network itself on a
    2-core server; these few bars and labels take about a millisecond."""
    from PIL import ImageDraw

    width, height = CHART_SIZE
    img = Image.new("RGB", CHART_SIZE, "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(13), _font(11)
    if not contributions:
        draw.text((width / 2, height / 2), "this model does not use metadata", "black", font, "mm")
        return np.asarray(img)
    left, right, top, bottom = 70, width - 20, 12, height - 48
    fields = list(contributions)
    vals = [100.0 * contributions[f] for f in fields]
    lim = max(1.0, max(abs(v) for v in vals) * 1.25)
    zero = (left + right) / 2

    def x_of(v: float) -> float:
        return zero + (right - left) / 2 * v / lim

    draw.rectangle((left, top, right, bottom), outline="black")
    row = (bottom - top) / len(fields)
    for i, (name, v) in enumerate(zip(fields, vals, strict=True)):
        y0, y1 = top + row * (i + 0.2), top + row * (i + 0.8)
        x = x_of(v)
        draw.rectangle((min(zero, x), y0, max(zero, x), y1), fill=POSITIVE if v > 0 else NEGATIVE)
        draw.text((left - 6, (y0 + y1) / 2), name, "black", font, "rm")
        anchor, dx = ("lm", 4) if v >= 0 else ("rm", -4)
        draw.text((x + dx, (y0 + y1) / 2), f"{v:+.1f}", "black", small, anchor)
    draw.line((zero, top, zero, bottom), fill="black", width=1)
    for v in (-lim, -lim / 2, 0.0, lim / 2, lim):
        x = x_of(v)
        draw.line((x, bottom, x, bottom + 4), fill="black")
        draw.text((x, bottom + 6), f"{v:g}" if v == int(v) else f"{v:.1f}", "black", small, "ma")
    draw.text(
        ((left + right) / 2, height - 6),
        f"change in P({target}) vs. field unknown (percentage points)",
        "black",
        font,
        "md",
    )
    return np.asarray(img)
