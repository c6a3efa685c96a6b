"""The model's inference preprocessing, in NumPy and OpenCV only: the one definition of how an
image becomes the model's input, shared by training (through :mod:`data_pipeline.transforms`,
which adds albumentations' augmentations around these steps), evaluation and serving.

Why separate from the albumentations pipelines: importing albumentations imports PyTorch (~0.7 GB
resident), and a serving process that runs the ONNX export needs neither
(:mod:`model.lean`). :func:`eval_array` gives the same array as the evaluation pipeline
(:func:`data_pipeline.transforms.build_transform` with ``train=False``; tested to 1e-5).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import cv2
import numpy as np

# OpenCV threads fight torch for the 2 CPU cores in data loading; augmentation is per-image anyway.
cv2.setNumThreads(0)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Width / height of HAM10000 images (the legacy ``crop_aspect`` geometry crops to this).
SOURCE_ASPECT = 4.0 / 3.0
#: Ways an image of any shape is framed into the square model input (see :func:`model_view`).
GEOMETRIES: tuple[str, ...] = ("squash", "pad", "crop", "crop_aspect")
COLOR_CONSTANCY: tuple[str, ...] = ("none", "shades_of_gray")
#: Input size and backbone defaults, declared once for training, the CLIs and the tests.
DEFAULT_SIZE = 192


@dataclass(frozen=True)
class Preprocessing:
    """How pixels are prepared; stored in every checkpoint (like timm's ``pretrained_cfg``).

    Defaults of the framing and colour fields are the v1 behaviour, so checkpoints written before
    those fields existed load and predict exactly as they were measured.
    """

    height: int = DEFAULT_SIZE
    width: int = DEFAULT_SIZE
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source_aspect: float = SOURCE_ASPECT
    interpolation: str = "area"
    geometry: str = "crop_aspect"
    color_constancy: str = "none"
    minkowski_p: float = 6.0

    def __post_init__(self) -> None:
        if self.geometry not in GEOMETRIES:
            raise ValueError(f"geometry must be one of {', '.join(GEOMETRIES)}: {self.geometry!r}")
        if self.color_constancy not in COLOR_CONSTANCY:
            raise ValueError(
                f"color_constancy must be one of {', '.join(COLOR_CONSTANCY)}: "
                f"{self.color_constancy!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)

    def describe(self) -> str:
        """One line for model cards and logs."""
        cc = (
            f"Shades of Gray colour constancy (p={self.minkowski_p:g})"
            if self.color_constancy == "shades_of_gray"
            else "no colour constancy"
        )
        return f"{self.geometry} to {self.width}×{self.height} px, {cc}"


def crop_to_aspect(image: np.ndarray, aspect: float) -> np.ndarray:
    """Centre-crop ``image`` (H, W, C) to width/height == ``aspect``."""
    h, w = image.shape[:2]
    if abs(w / h - aspect) < 1e-3:
        return image
    if w / h > aspect:  # too wide
        new_w = max(1, round(h * aspect))
        x0 = (w - new_w) // 2
        return image[:, x0 : x0 + new_w]
    new_h = max(1, round(w / aspect))
    y0 = (h - new_h) // 2
    return image[y0 : y0 + new_h]


def pad_to_aspect(image: np.ndarray, aspect: float) -> np.ndarray:
    """Pad ``image`` symmetrically with black to width/height == ``aspect`` (nothing is lost)."""
    h, w = image.shape[:2]
    if abs(w / h - aspect) < 1e-3:
        return image
    if w / h > aspect:  # too wide: pad top and bottom
        extra = round(w / aspect) - h
        top = extra // 2
        return cv2.copyMakeBorder(image, top, extra - top, 0, 0, cv2.BORDER_CONSTANT, value=0)
    extra = round(h * aspect) - w
    left = extra // 2
    return cv2.copyMakeBorder(image, 0, 0, left, extra - left, cv2.BORDER_CONSTANT, value=0)


def model_view(image: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """The part of ``image`` the model sees, before resizing (also what heatmaps are drawn on)."""
    target = pre.width / pre.height
    if pre.geometry == "crop_aspect":
        return crop_to_aspect(image, pre.source_aspect)
    if pre.geometry == "crop":
        return crop_to_aspect(image, target)
    if pre.geometry == "pad":
        return pad_to_aspect(image, target)
    return image  # squash: the resize does it


def shades_of_gray(image: np.ndarray, p: float = 6.0) -> np.ndarray:
    """Shades of Gray colour constancy (Finlayson & Trezzi 2004) on an RGB uint8 image.

    The illuminant is each channel's Minkowski p-mean (p=1: grey world, p=∞: max-RGB); every
    channel is scaled so the illuminant becomes neutral grey of the same magnitude. p=6 is the
    value used by the ISIC 2018/2019 winning entries.

    Computed from each channel's 256-bin histogram and applied as a lookup table: the same
    numbers as raising every pixel to the 6th power in float64 (identical output on HAM10000
    images, tested) at a fifth of the CPU — it runs on every training, evaluation and served
    image.
    """
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"shades_of_gray expects an (H, W, C) uint8 image, got {image.dtype}")
    flat = image.reshape(-1, image.shape[-1])
    powers = _LEVELS**p
    means = [np.bincount(flat[:, c], minlength=256) @ powers for c in range(flat.shape[1])]
    illuminant = np.power(np.asarray(means) / flat.shape[0], 1.0 / p)
    norm = float(np.sqrt(np.sum(illuminant**2)))
    if norm < 1e-6:  # a black image has no illuminant to remove
        return image
    gains = norm / (np.maximum(illuminant, 1e-6) * np.sqrt(3.0))
    lut = np.clip(_LEVELS[:, None] * gains[None, :] + 0.5, 0, 255).astype(np.uint8)
    return cv2.LUT(np.ascontiguousarray(image), lut[:, None, :])


#: The 256 uint8 levels as float64 (for histogram-based colour statistics).
_LEVELS = np.arange(256, dtype=np.float64)


#: OpenCV interpolation flags by :attr:`Preprocessing.interpolation` name.
INTERP = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}


def eval_array(image: np.ndarray, pre: Preprocessing) -> np.ndarray:
    """The model input for an RGB uint8 ``image`` already framed by :func:`model_view`:
    resize → optional Shades of Gray → ``(x / 255 - mean) / std`` → (3, H, W) float32."""
    resized = cv2.resize(
        np.ascontiguousarray(image),
        (pre.width, pre.height),
        interpolation=INTERP[pre.interpolation],
    )
    if pre.color_constancy == "shades_of_gray":
        resized = shades_of_gray(resized, pre.minkowski_p)
    mean = np.asarray(pre.mean, dtype=np.float32) * 255.0
    scale = 1.0 / (np.asarray(pre.std, dtype=np.float32) * 255.0)
    out = (resized.astype(np.float32) - mean) * scale
    return np.ascontiguousarray(out.transpose(2, 0, 1))
