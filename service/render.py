"""Rendering and image encoding: heatmap overlays, the metadata chart, thumbnails and PNG bytes.

Why here (``service/``) and not in ``model/`` or ``db/``: drawing is presentation, not modelling,
and the ORM should store bytes without knowing image formats. The prediction service is the one
component that needs both sides — it encodes the thumbnail and heatmap it stores — and both
front ends (the app and the CLIs) sit above it, so they draw with the same code.
"""

from __future__ import annotations

import functools
import io
from collections.abc import Sequence
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
    """Blend a [0, 1] heatmap (jet colour map) over an RGB uint8 image: each pixel moves towards
    the heatmap colour by ``alpha · sqrt(heat)`` (cold regions stay close to the photo).

    The service stores and returns heatmaps at their image's size, so nothing is resized here;
    only a mismatched pair (e.g. a row written by other code) is resized, from the stored map.
    The blend is OpenCV's per-pixel ``blendLinear`` (it runs for every served prediction)."""
    import cv2

    if heatmap.shape != image.shape[:2]:
        from model.heatmap import resize_heatmap

        heatmap = resize_heatmap(heatmap, image.shape[:2])
    heat = np.clip(np.asarray(heatmap, dtype=np.float32), 0.0, 1.0)
    colour = cv2.applyColorMap((heat * 255).astype(np.uint8), cv2.COLORMAP_JET)
    colour = cv2.cvtColor(colour, cv2.COLOR_BGR2RGB)
    weight = np.float32(alpha) * cv2.sqrt(heat)
    return cv2.blendLinear(
        np.ascontiguousarray(image, dtype=np.uint8), colour, 1.0 - weight, weight
    )


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


#: Quality of the JPEG the app serves for the heatmap panel (chroma not subsampled, so the
#: colour scale and titles stay crisp).
DISPLAY_JPEG_QUALITY = 90


def display_jpeg(image: np.ndarray) -> bytes:
    """JPEG bytes of a photo-like RGB panel (the original | overlay heatmap panel) for display.

    Why not PNG: a 794×330 panel of a dermoscopy photo takes ~80 ms to encode as PNG (level 6)
    and ~1 ms as JPEG at quality 90, a fifth of the bytes; per request that PNG cost more CPU
    than the network on a 2-core server. What is *stored* stays lossless (:func:`heatmap_png`)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=DISPLAY_JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def chart_png(image: np.ndarray) -> bytes:
    """PNG bytes of a flat-colour chart at zlib level 1 (lossless text and bars; for such
    images level 1 is nearly as small as the default level 6 at half the time)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1)
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


#: Colours of the metadata chart: neither reads as "danger" (the alerts own red and amber).
RAISES_COLOUR = "#0f766e"
LOWERS_COLOUR = "#64748b"


def field_labels(metadata: Any | None) -> dict[str, str]:
    """Chart labels naming the given values: ``age 35``, ``female``, ``back`` (``age unknown``
    when a field was not given)."""
    age = getattr(metadata, "age", None)
    sex = getattr(metadata, "sex", None) or "unknown"
    site = getattr(metadata, "site", None) or "unknown"
    return {
        "age": "age unknown" if age is None else f"age {age:g}",
        "sex": "sex unknown" if sex == "unknown" else str(sex),
        "site": "site unknown" if site == "unknown" else str(site),
    }


def draw_contributions(
    ax: Any, contributions: dict[str, float] | None, target: str, metadata: Any | None = None
) -> None:
    """Signed metadata contributions on ``ax``: bars right raise P(target), bars left lower it."""
    if not contributions:
        ax.text(0.5, 0.5, "this model does not use metadata", ha="center", va="center")
        ax.axis("off")
        return
    labels = field_labels(metadata)
    fields = list(contributions)[::-1]
    vals = [100.0 * contributions[f] for f in fields]
    ax.barh(
        [labels.get(f, f) for f in fields],
        vals,
        color=[RAISES_COLOUR if v >= 0 else LOWERS_COLOUR for v in vals],
    )
    ax.axvline(0, color="#334155", linewidth=0.8)
    lim = max(1.0, max(abs(v) for v in vals) * 1.35)
    ax.set_xlim(-lim, lim)
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:+.1f} ", va="center", ha="left" if v >= 0 else "right", fontsize=9)
    ax.set_xlabel(f"percentage points added to P({target}) vs. the field unknown", fontsize=8)
    ax.tick_params(labelsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def draw_side_by_side(
    axes: Sequence[Any], image: np.ndarray, heatmap: np.ndarray | None, alpha: float
) -> Any:
    """Original on ``axes[0]``, heatmap overlay on ``axes[1]``; returns the colour mappable (for
    a colour bar) or None without a heatmap."""
    from matplotlib import cm, colors

    axes[0].imshow(image)
    axes[0].set_title("original", fontsize=9)
    shown = overlay_heatmap(image, heatmap, alpha) if heatmap is not None else image
    axes[1].imshow(shown)
    axes[1].set_title("Grad-CAM overlay" if heatmap is not None else "no heatmap", fontsize=9)
    for ax in axes[:2]:
        ax.axis("off")
    if heatmap is None:
        return None
    return cm.ScalarMappable(norm=colors.Normalize(0, 1), cmap="jet")


#: Width of each panel of :func:`side_by_side` (small images are enlarged to it, large shrunk).
PANEL_WIDTH = 360


def side_by_side(
    image: np.ndarray | None, heatmap: np.ndarray | None, alpha: float = 0.45
) -> np.ndarray | None:
    """Original and overlay side by side with a colour scale (RGB array); None without image.

    Drawn with PIL (a few milliseconds) rather than matplotlib (over 100 ms on 2 cores, more than
    the network), since the app draws it for every prediction; the PDF report, made on request,
    uses :func:`draw_side_by_side`."""
    if image is None:
        return None
    import cv2

    h = max(1, round(image.shape[0] * PANEL_WIDTH / image.shape[1]))
    w = PANEL_WIDTH
    small = np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))
    shown = small
    if heatmap is not None:
        heat = Image.fromarray(np.asarray(heatmap, dtype=np.float32), mode="F")
        heat = heat.resize((w, h), Image.Resampling.BILINEAR)
        shown = overlay_heatmap(small, np.asarray(heat, dtype=np.float32), alpha)
    # a top margin the app's image label and buttons can cover without hiding the titles
    top, gap, bar_w, label_w = 56, 8, 14, 44
    width = 2 * w + gap + (gap + bar_w + label_w if heatmap is not None else 0)
    canvas = Image.new("RGB", (width, h + top + 4), "white")
    canvas.paste(Image.fromarray(small), (0, top))
    canvas.paste(Image.fromarray(shown), (w + gap, top))
    _text(canvas, (w / 2, top - 12), "original", 13, "mm")
    title = "Grad-CAM overlay" if heatmap is not None else "no heatmap"
    _text(canvas, (w + gap + w / 2, top - 12), title, 13, "mm")
    if heatmap is not None:
        ramp = (np.linspace(1.0, 0.0, h) * 255).astype(np.uint8)[:, None]
        colour = cv2.cvtColor(cv2.applyColorMap(ramp, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
        x = 2 * w + 2 * gap
        canvas.paste(Image.fromarray(np.repeat(colour, bar_w, axis=1)), (x, top))
        _text(canvas, (x + bar_w + 4, top), "high", 11, "la")
        _text(canvas, (x + bar_w + 4, top + h), "low", 11, "ld")
    return np.asarray(canvas)


def small_thumbnail_jpeg(data: bytes | None, side: int = 64) -> bytes | None:
    """A stored thumbnail re-encoded small (for table cells)."""
    image = thumbnail_from_jpeg(data)
    return None if image is None else thumbnail_jpeg(image, max_side=side)


def _text(canvas: Image.Image, xy: tuple[float, float], text: str, size: int, anchor: str) -> None:
    """Draw black ``text`` like ``ImageDraw.text(xy, text, "black", _font(size), anchor)``, from a
    cached glyph mask: rasterising text with FreeType was the largest cost of drawing the
    heatmap panel and the chart, and their labels repeat from one prediction to the next."""
    mask, left, top = _text_mask(text, size, anchor)
    canvas.paste((0, 0, 0), (round(xy[0]) + left, round(xy[1]) + top), mask)


@functools.lru_cache(maxsize=512)
def _text_mask(text: str, size: int, anchor: str) -> tuple[Image.Image, int, int]:
    """``text`` rendered as an 8-bit coverage mask, and its offset from the anchor point."""
    from PIL import ImageDraw

    font = _font(size)
    left, top, right, bottom = (int(v) for v in font.getbbox(text, anchor=anchor))
    mask = Image.new("L", (max(1, right - left), max(1, bottom - top)), 0)
    ImageDraw.Draw(mask).text((-left, -top), text, 255, font, anchor)
    return mask, left, top


@functools.lru_cache(maxsize=4)
def _font(size: int) -> Any:
    """Pillow's bundled scalable font (loaded once per size: two sizes are used)."""
    from PIL import ImageFont

    return ImageFont.load_default(size=size)


#: Size of the metadata-contributions chart (what a 5 × 2.2 inch figure at 100 dpi was).
CHART_SIZE = (500, 250)


def contributions_chart(
    contributions: dict[str, float] | None, target: str, metadata: Any | None = None
) -> np.ndarray:
    """Horizontal bar chart (RGB array) of signed metadata contributions in percentage points,
    each bar labelled with the value that was given (``metadata``: anything with ``age``,
    ``sex``, ``site`` attributes), in the colours of :func:`draw_contributions`.

    Drawn with PIL rather than matplotlib: the chart is made for every prediction, and a
    matplotlib figure (layout, ticks, text extents) cost more CPU than the network itself on a
    2-core server; these few bars and labels take about a millisecond."""
    from PIL import ImageDraw

    width, height = CHART_SIZE
    img = Image.new("RGB", CHART_SIZE, "white")
    draw = ImageDraw.Draw(img)
    if not contributions:
        _text(img, (width / 2, height / 2), "this model does not use metadata", 13, "mm")
        return np.asarray(img)
    labels = field_labels(metadata)
    left, right, top, bottom = 100, width - 20, 44, height - 48
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
        draw.rectangle(
            (min(zero, x), y0, max(zero, x), y1), fill=RAISES_COLOUR if v >= 0 else LOWERS_COLOUR
        )
        _text(img, (left - 6, (y0 + y1) / 2), labels.get(name, name), 13, "rm")
        anchor, dx = ("lm", 4) if v >= 0 else ("rm", -4)
        _text(img, (x + dx, (y0 + y1) / 2), f"{v:+.1f}", 11, anchor)
    draw.line((zero, top, zero, bottom), fill="black", width=1)
    for v in (-lim, -lim / 2, 0.0, lim / 2, lim):
        x = x_of(v)
        draw.line((x, bottom, x, bottom + 4), fill="black")
        _text(img, (x, bottom + 6), f"{v:g}" if v == int(v) else f"{v:.1f}", 11, "ma")
    _text(
        img,
        ((left + right) / 2, height - 6),
        f"change in P({target}) vs. field unknown (percentage points)",
        13,
        "md",
    )
    return np.asarray(img)
