"""Safe image decoding: the one place where files, bytes or arrays become RGB uint8 arrays.

Training, evaluation, the CLIs and the app all decode through :func:`load_rgb`, so a format that
is accepted (or refused) in one is accepted (or refused) in all.

Prediction requests (:func:`read_image`) also bound their cost: an image is brought down to a
working size (longest side :data:`WORKING_SIDE`) while it is decoded — a JPEG decodes directly at
1/2, 1/4 or 1/8 scale (``Image.draft``), anything else is reduced right after decoding — so a
59-megapixel upload costs about what a phone photo costs in every later step (colour constancy,
heatmap, overlay, thumbnail), and what is shown or returned is never larger than that. The model
itself sees 192 px, so 1024 px keeps ample detail for the heatmap and thumbnail.
"""

from __future__ import annotations

import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from common.errors import ImageError

#: Smallest side we accept: below this a lesion cannot be seen at all.
MIN_SIDE = 32
#: Refuse images larger than this many pixels (decompression bombs; 60 MP ≈ a 9000×6700 photo).
MAX_PIXELS = 60_000_000
#: Longest side of a prediction request's working image (see :func:`read_image`).
WORKING_SIDE = 1024

ImageSource = str | Path | bytes | bytearray | Image.Image | np.ndarray


def _open(
    source: ImageSource, name: str, max_side: int | None = None
) -> tuple[Image.Image, tuple[int, int]]:
    """(decoded image, its stored (w, h) before any draft-mode reduction)."""
    if isinstance(source, Image.Image):
        return source, source.size
    if isinstance(source, np.ndarray):
        img = _from_array(source, name)
        return img, img.size
    data: io.BytesIO | Path
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageError(f"{name}: the file is empty.")
        data = io.BytesIO(bytes(source))
    else:
        data = Path(source)
        if not data.is_file():
            raise ImageError(f"{name}: no such image file.")
        if data.stat().st_size == 0:
            raise ImageError(f"{name}: the file is empty.")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(data)
            _check_size(img.size, name)
            stored = img.size
            if max_side is not None and img.format == "JPEG":
                # decode at the smallest 1/2^k scale that still covers the working size
                img.draft("RGB", _working_size(img.size, max_side))
            img.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageError(
            f"{name}: the image is too large to decode safely (limit {MAX_PIXELS // 1_000_000} MP)."
        ) from None
    except UnidentifiedImageError:
        raise ImageError(
            f"{name}: not an image file PIL can read (JPEG, PNG, TIFF, ...)."
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{name}: the image file is corrupt or truncated ({exc}).") from None
    return img, stored


def _from_array(arr: np.ndarray, name: str) -> Image.Image:
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ImageError(f"{name}: expected an H×W, H×W×3 or H×W×4 array, got {arr.shape}.")
    if arr.dtype != np.uint8:
        arr = _to_uint8(arr.astype(np.float64))
    return Image.fromarray(arr)


def _to_uint8(arr: np.ndarray) -> np.ndarray:
    """Rescale a high-bit-depth or float array to 0-255 by its own range."""
    lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    if lo >= 0 and hi <= 1.0:
        lo, hi = 0.0, 1.0
    elif lo >= 0 and hi <= 255:
        lo, hi = 0.0, 255.0
    elif lo >= 0 and hi <= 65535:
        lo, hi = 0.0, 65535.0
    return np.clip((arr - lo) / (hi - lo) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _check_size(size: tuple[int, int], name: str) -> None:
    w, h = size
    if w * h > MAX_PIXELS:
        raise ImageError(
            f"{name}: {w}×{h} pixels is too large to decode safely "
            f"(limit {MAX_PIXELS // 1_000_000} MP)."
        )
    if min(w, h) < MIN_SIDE:
        raise ImageError(
            f"{name}: {w}×{h} pixels is too small (need at least {MIN_SIDE} per side)."
        )


def to_rgb(img: Image.Image, name: str = "image") -> Image.Image:
    """Convert any PIL mode to RGB: alpha is composited on white, 16-bit is rescaled."""
    img = ImageOps.exif_transpose(img) if hasattr(img, "getexif") else img
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(img, dtype=np.float64))).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (OSError, ValueError) as exc:
        raise ImageError(f"{name}: cannot convert {img.mode} image to RGB ({exc}).") from None


def _working_size(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """(w, h) scaled so the longest side is at most ``max_side`` (never enlarged), keeping the
    shortest side at least :data:`MIN_SIDE` so a thin image stays usable."""
    w, h = size
    scale = min(1.0, max(max_side / max(w, h), MIN_SIDE / min(w, h)))
    return max(1, round(w * scale)), max(1, round(h * scale))


#: Modes ``Image.reduce`` handles (palette and 16-bit images are converted first).
_REDUCIBLE = ("RGB", "RGBA", "RGBX", "L", "LA", "I", "F", "CMYK", "YCbCr")


def _reduce(img: Image.Image, max_side: int) -> Image.Image:
    """An integer box-filter reduction towards the working size, in the decoded mode (before the
    RGB conversion, so a huge grayscale image is never tripled in memory at full size)."""
    target = _working_size(img.size, max_side)
    factor = min(img.size[0] // target[0], img.size[1] // target[1])
    return img.reduce(factor) if factor >= 2 and img.mode in _REDUCIBLE else img


def _downscale(img: Image.Image, max_side: int) -> Image.Image:
    """Shrink an RGB image to the working size: an integer ``reduce`` first (cheap), then one
    antialiased resize to the exact size."""
    img = _reduce(img, max_side)
    target = _working_size(img.size, max_side)
    return img.resize(target, Image.Resampling.LANCZOS) if img.size != target else img


def load_rgb(
    source: ImageSource, name: str | None = None, max_side: int | None = None
) -> np.ndarray:
    """Decode ``source`` to an RGB uint8 array (H, W, 3), or raise :class:`ImageError`.

    ``max_side``: bring the image down to this longest side while decoding (see the module
    docstring); None keeps every pixel (training and evaluation)."""
    if name is None:
        name = str(source) if isinstance(source, (str, Path)) else "image"
    return np.asarray(_decode(source, name, max_side)[0], dtype=np.uint8)


def _decode(
    source: ImageSource, name: str, max_side: int | None
) -> tuple[Image.Image, tuple[int, int]]:
    """(RGB image, original (w, h)) — the size is the file's, before any downscaling."""
    img, stored = _open(source, name, max_side)
    _check_size(stored, name)
    original = _upright(img, stored)
    if max_side is not None:
        img = _reduce(img, max_side)
    rgb = to_rgb(img, name)
    if max_side is not None:
        rgb = _downscale(rgb, max_side)
    return rgb, original


def _upright(img: Image.Image, stored: tuple[int, int]) -> tuple[int, int]:
    """The original (w, h) as displayed: an EXIF rotation by 90° swaps the stored sides."""
    w, h = stored
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception:  # a malformed EXIF block must not stop decoding
        orientation = 1
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


@dataclass(frozen=True)
class DecodedImage:
    """An input image read and decoded once: its RGB pixels and the SHA-256 that identifies it."""

    rgb: np.ndarray
    sha256: str
    name: str
    #: (width, height) of the image as submitted, before it was brought to the working size.
    original_size: tuple[int, int] | None = None


def read_image(
    source: ImageSource, name: str | None = None, max_side: int | None = WORKING_SIDE
) -> DecodedImage:
    """Read ``source`` once, hash it and decode it at most ``max_side`` pixels long
    (raises :class:`ImageError`).

    The hash is of the uploaded bytes (bytes or a file path), else of the decoded RGB pixels
    (before downscaling). A file is read into memory a single time and decoded from those bytes.
    """
    if name is None:
        name = str(source) if isinstance(source, (str, Path)) else "image"
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise ImageError(f"{name}: no such image file.")
        try:
            source = path.read_bytes()
        except OSError as exc:
            raise ImageError(f"{name}: the file cannot be read ({exc.strerror}).") from None
    if isinstance(source, (bytes, bytearray)):
        digest = hashlib.sha256(bytes(source)).hexdigest()
        img, original = _decode(source, name, max_side)
        return DecodedImage(np.asarray(img, dtype=np.uint8), digest, name, original)
    full, original = _decode(source, name, None)
    rgb = np.asarray(full, dtype=np.uint8)
    digest = hashlib.sha256(np.ascontiguousarray(rgb).tobytes()).hexdigest()
    if max_side is not None:
        rgb = np.asarray(_downscale(full, max_side), dtype=np.uint8)
    return DecodedImage(rgb, digest, name, original)
