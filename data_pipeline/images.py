"""Safe image decoding: the one place where files, bytes or arrays become RGB uint8 arrays.

Training, evaluation, the CLIs and the app all decode through :func:`load_rgb`, so a format that
is accepted (or refused) in one is accepted (or refused) in all.
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

ImageSource = str | Path | bytes | bytearray | Image.Image | np.ndarray


def _open(source: ImageSource, name: str) -> Image.Image:
    if isinstance(source, Image.Image):
        return source
    if isinstance(source, np.ndarray):
        return _from_array(source, name)
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
    return img


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


def load_rgb(source: ImageSource, name: str | None = None) -> np.ndarray:
    """Decode ``source`` to an RGB uint8 array (H, W, 3), or raise :class:`ImageError`."""
    if name is None:
        name = str(source) if isinstance(source, (str, Path)) else "image"
    img = _open(source, name)
    _check_size(img.size, name)
    return np.asarray(to_rgb(img, name), dtype=np.uint8)


@dataclass(frozen=True)
class DecodedImage:
    """An input image read and decoded once: its RGB pixels and the SHA-256 that identifies it."""

    rgb: np.ndarray
    sha256: str
    name: str


def read_image(source: ImageSource, name: str | None = None) -> DecodedImage:
    """Read ``source`` once, hash it and decode it (raises :class:`ImageError`).

    The hash is of the uploaded bytes (bytes or a file path), else of the decoded RGB pixels.
    A file is read into memory a single time and decoded from those bytes.
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
        return DecodedImage(load_rgb(source, name), digest, name)
    rgb = load_rgb(source, name)
    digest = hashlib.sha256(np.ascontiguousarray(rgb, dtype=np.uint8).tobytes()).hexdigest()
    return DecodedImage(rgb, digest, name)
