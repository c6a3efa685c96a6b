"""Skin tone of a dermoscopy image as the individual typology angle (ITA), in six bands.

Fairness audits of dermoscopy classifiers (e.g. Kinyanjui et al., MICCAI 2020; Groh et al., 2021)
estimate skin tone from the image itself, because the public datasets record none:

    ITA = arctan((L* − 50) / b*) × 180 / π

from the CIELAB lightness L* and yellow–blue b* of the skin around the lesion, binned into the
standard bands (Chardon et al., 1991): very light > 55°, light 41–55°, intermediate 28–41°,
tan 10–28°, brown −30–10°, dark < −30°.

The skin is the **border ring** of the image (the outer ``RING`` of each side, where the lesion
rarely reaches) minus a rough lesion mask: pixels darker than Otsu's threshold of the L* histogram
(the lesion, hair) and near-black pixels (a dermatoscope's vignette corners). The ring's median
L* and b* give one ITA per image. It is an *estimate*: illumination and the dermatoscope's colour
cast move it, so it says how a dataset is spread over skin tones, not a patient's phototype.
HAM10000 is mostly light skin; the band counts show how thin the evidence is for the others.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipeline.images import load_rgb

#: (code, lower bound in degrees, exclusive): the first band whose bound the ITA exceeds.
BANDS: tuple[tuple[str, float], ...] = (
    ("very light", 55.0),
    ("light", 41.0),
    ("intermediate", 28.0),
    ("tan", 10.0),
    ("brown", -30.0),
    ("dark", -float("inf")),
)
BAND_NAMES: tuple[str, ...] = tuple(name for name, _ in BANDS)
UNKNOWN = "unknown"
#: Width of the border ring, as a fraction of each side.
RING = 0.15
#: Images are reduced to about this many pixels on their long side first (speed; medians do not
#: need detail).
WORK_SIZE = 160
#: Pixels darker than this L* are vignette or hair, never skin.
MIN_L = 12.0
#: Fewer skin pixels than this share of the ring: the estimate is refused (unknown).
MIN_SKIN_SHARE = 0.05

# sRGB (D65) → XYZ, and the D65 white point (IEC 61966-2-1; CIE 15).
_RGB_TO_XYZ = np.array(
    [
        [0.4124564, 0.3575761, 0.1804375],
        [0.2126729, 0.7151522, 0.0721750],
        [0.0193339, 0.1191920, 0.9503041],
    ]
)
_WHITE = np.array([0.95047, 1.0, 1.08883])


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """CIELAB (D65) of sRGB values: uint8 0-255 or float 0-1, shape (..., 3) → (..., 3)."""
    c = np.asarray(rgb, dtype=np.float64)
    if np.asarray(rgb).dtype == np.uint8:
        c = c / 255.0
    linear = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    xyz = linear @ _RGB_TO_XYZ.T / _WHITE
    eps, kappa = 216 / 24389, 24389 / 27
    f = np.where(xyz > eps, np.cbrt(xyz), (kappa * xyz + 16) / 116)
    L = 116 * f[..., 1] - 16
    a = 500 * (f[..., 0] - f[..., 1])
    b = 200 * (f[..., 1] - f[..., 2])
    return np.stack([L, a, b], axis=-1)


def ita_degrees(L: float, b: float) -> float | None:
    """ITA of one L*, b* pair: the angle of (b*, L* − 50), which is arctan((L* − 50) / b*) for
    every skin colour (b* > 0) and stays monotonic in lightness where a dermatoscope's cast
    pushes b* to 0 or below (a light pinkish ring reads above 90°: very light). None if NaN."""
    if not np.isfinite(L) or not np.isfinite(b):
        return None
    return float(np.degrees(np.arctan2(L - 50.0, b)))


def band(ita: float | None) -> str:
    """The ITA band of an angle (``unknown`` for None)."""
    if ita is None:
        return UNKNOWN
    for name, lower in BANDS:
        if ita > lower:
            return name
    return BANDS[-1][0]


@dataclass(frozen=True)
class SkinTone:
    """One image's estimate: ITA in degrees (None when no skin could be measured) and band."""

    ita: float | None
    band: str
    skin_pixels: int

    def to_dict(self) -> dict[str, float | str | int | None]:
        return {"ita": self.ita, "band": self.band, "skin_pixels": self.skin_pixels}


def _reduce(rgb: np.ndarray) -> np.ndarray:
    step = max(1, int(max(rgb.shape[:2]) // WORK_SIZE))
    return rgb[::step, ::step]


def _otsu(values: np.ndarray) -> float:
    """Otsu's threshold of a 1-D sample (256 bins)."""
    hist, edges = np.histogram(values, bins=256)
    centres = (edges[:-1] + edges[1:]) / 2
    w0 = np.cumsum(hist)
    w1 = w0[-1] - w0
    m0 = np.cumsum(hist * centres)
    mean0 = m0 / np.maximum(w0, 1)
    mean1 = (m0[-1] - m0) / np.maximum(w1, 1)
    between = w0 * w1 * (mean0 - mean1) ** 2
    return float(centres[int(np.argmax(between))])


def ring_mask(shape: tuple[int, int], ring: float = RING) -> np.ndarray:
    """True on the outer ``ring`` of each side of an image of ``shape`` (height, width)."""
    h, w = shape
    dy, dx = max(1, round(h * ring)), max(1, round(w * ring))
    mask = np.ones((h, w), dtype=bool)
    mask[dy : h - dy, dx : w - dx] = False
    return mask


def estimate(rgb: np.ndarray) -> SkinTone:
    """The skin tone of an RGB uint8 image (H, W, 3) from the skin around the lesion."""
    lab = srgb_to_lab(_reduce(np.asarray(rgb)))
    L, b = lab[..., 0], lab[..., 2]
    ring = ring_mask(L.shape)
    bright = L > MIN_L
    candidates = L[bright]
    skin = ring & bright
    if candidates.size > 16 and np.ptp(candidates) > 1.0:
        skin = skin & (_otsu(candidates) <= L)  # the lesion and hair are the darker class
    if skin.sum() < MIN_SKIN_SHARE * ring.sum():
        skin = ring & bright  # a lesion filling the frame: the ring is all there is
    n = int(skin.sum())
    if n < MIN_SKIN_SHARE * ring.sum():
        return SkinTone(None, UNKNOWN, n)
    ita = ita_degrees(float(np.median(L[skin])), float(np.median(b[skin])))
    return SkinTone(ita, band(ita), n)


def estimate_file(path: Path | str) -> SkinTone:
    """:func:`estimate` of an image file, decoded at reduced size (JPEG draft mode)."""
    return estimate(load_rgb(Path(path), max_side=2 * WORK_SIZE))


def band_counts(bands: list[str]) -> dict[str, int]:
    """Images per band, every band listed (0 where none), ``unknown`` last."""
    return {name: int(sum(1 for x in bands if x == name)) for name in (*BAND_NAMES, UNKNOWN)}
