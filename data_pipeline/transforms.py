"""Albumentations pipelines: the single place where images are framed, colour-normalised, resized
and normalised.

Training, evaluation, the CLIs and the app all go through :class:`ImageTransform`, driven by the
:class:`Preprocessing` stored in the checkpoint, so a model never sees differently prepared pixels
at inference than in training. The steps, in order:

1. **Geometry** (:func:`model_view`): how an image of any aspect ratio becomes the model's square
   input. ``squash`` resizes the whole image (nothing is cut off: a lesion near the border
   survives), ``pad`` pads to a square, ``crop`` centre-crops to a square, and the legacy
   ``crop_aspect`` centre-crops to HAM10000's 4:3 first (which cuts the top and bottom off a
   square image; models up to v1 used it).
2. **Training only:** a random-resized crop with scale and aspect jitter (other cameras frame and
   zoom differently), flips / 90° turns (lesions have no orientation), affine jitter, and
   *acquisition-shift* augmentations — gamma, contrast, hue, JPEG re-compression, down-and-up
   scaling, blur — then coarse dropout (hair, bubbles, rulers).
3. **Colour constancy** (optional, :func:`shades_of_gray`): each image's illuminant is estimated
   with the Minkowski p-norm of its channels and divided out, so a dermatoscope's colour cast is
   removed *after* the simulated acquisition shift, at training and inference alike.
4. Normalisation with the backbone's mean / std.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

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


@dataclass(frozen=True)
class AugmentConfig:
    """Which training augmentations run, and how often (probabilities in [0, 1])."""

    random_resized_crop: bool = True
    crop_scale: tuple[float, float] = (0.5, 1.0)
    crop_ratio: tuple[float, float] = (0.75, 4.0 / 3.0)
    flip: float = 0.5
    rotate90: float = 0.5
    affine: float = 0.7
    color: float = 0.8
    gamma: float = 0.4
    jpeg: float = 0.3
    downscale: float = 0.2
    blur: float = 0.15
    dropout: float = 0.3
    #: False reproduces the v1 recipe: no crop jitter and no gamma / JPEG / downscale.
    acquisition: bool = True


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


class ShadesOfGray(A.ImageOnlyTransform):
    """:func:`shades_of_gray` as an albumentations step (always applied)."""

    def __init__(self, p_norm: float = 6.0) -> None:
        super().__init__(p=1.0)
        self.p_norm = p_norm

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return shades_of_gray(img, self.p_norm)


_INTERP = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}


def _acquisition_shift(aug: AugmentConfig) -> list[A.BasicTransform]:
    """Colour, tone and compression changes of the kind another dermatoscope or camera makes."""
    ops: list[A.BasicTransform] = [
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.15, hue=0.03, p=aug.color)
    ]
    if aug.acquisition:
        ops = [
            A.ColorJitter(brightness=0.25, contrast=0.25, saturation=0.2, hue=0.05, p=aug.color),
            A.RandomGamma(gamma_limit=(70, 150), p=aug.gamma),
            A.ImageCompression(quality_range=(35, 95), p=aug.jpeg),
            A.Downscale(
                scale_range=(0.35, 0.85),
                interpolation_pair={"downscale": cv2.INTER_AREA, "upscale": cv2.INTER_LINEAR},
                p=aug.downscale,
            ),
        ]
    return [*ops, A.GaussianBlur(blur_limit=(3, 5), p=aug.blur)]


def _framing(pre: Preprocessing, aug: AugmentConfig) -> A.BasicTransform:
    interp = _INTERP[pre.interpolation]
    if aug.random_resized_crop:
        return A.RandomResizedCrop(
            size=(pre.height, pre.width),
            scale=aug.crop_scale,
            ratio=aug.crop_ratio,
            interpolation=cv2.INTER_LINEAR,
        )
    return A.Resize(pre.height, pre.width, interpolation=interp)


def build_transform(
    pre: Preprocessing, train: bool = False, aug: AugmentConfig | None = None
) -> A.Compose:
    """The albumentations pipeline (after :func:`model_view`) ending in a normalised CHW tensor."""
    tail: list[A.BasicTransform] = []
    if pre.color_constancy == "shades_of_gray":
        tail.append(ShadesOfGray(pre.minkowski_p))
    tail += [A.Normalize(mean=pre.mean, std=pre.std, max_pixel_value=255.0), ToTensorV2()]
    if not train:
        resize = A.Resize(pre.height, pre.width, interpolation=_INTERP[pre.interpolation])
        return A.Compose([resize, *tail])
    aug = aug or AugmentConfig()
    ops = [
        _framing(pre, aug),
        A.HorizontalFlip(p=aug.flip),
        A.VerticalFlip(p=aug.flip),
        # 90° turns would swap height and width of a non-square input.
        A.RandomRotate90(p=aug.rotate90 if pre.height == pre.width else 0.0),
        A.Affine(
            scale=(0.8, 1.15) if aug.acquisition else (0.9, 1.15),
            translate_percent=(-0.06, 0.06),
            rotate=(-30, 30),
            shear=(-5, 5),
            border_mode=cv2.BORDER_REFLECT_101,
            p=aug.affine,
        ),
        *_acquisition_shift(aug),
        A.CoarseDropout(
            num_holes_range=(1, 4),
            hole_height_range=(0.04, 0.12),
            hole_width_range=(0.04, 0.12),
            fill=0,
            p=aug.dropout,
        ),
    ]
    return A.Compose([*ops, *tail])


class ImageTransform:
    """Geometry (:func:`model_view`) + albumentations pipeline, callable on an RGB uint8 array."""

    def __init__(
        self, pre: Preprocessing, train: bool = False, aug: AugmentConfig | None = None
    ) -> None:
        self.pre = pre
        self.pipeline = build_transform(pre, train=train, aug=aug)

    def __call__(self, image: np.ndarray) -> Any:
        return self.pipeline(image=model_view(image, self.pre))["image"]
