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

from dataclasses import dataclass
from typing import Any

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

from data_pipeline.preprocessing import (
    COLOR_CONSTANCY,
    DEFAULT_SIZE,
    GEOMETRIES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    INTERP,
    SOURCE_ASPECT,
    Preprocessing,
    crop_to_aspect,
    model_view,
    pad_to_aspect,
    shades_of_gray,
)

__all__ = [
    "COLOR_CONSTANCY",
    "DEFAULT_SIZE",
    "GEOMETRIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "SOURCE_ASPECT",
    "AugmentConfig",
    "ImageTransform",
    "Preprocessing",
    "build_transform",
    "crop_to_aspect",
    "model_view",
    "pad_to_aspect",
    "shades_of_gray",
]


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


class ShadesOfGray(A.ImageOnlyTransform):
    """:func:`shades_of_gray` as an albumentations step (always applied)."""

    def __init__(self, p_norm: float = 6.0) -> None:
        super().__init__(p=1.0)
        self.p_norm = p_norm

    def apply(self, img: np.ndarray, **params: Any) -> np.ndarray:
        return shades_of_gray(img, self.p_norm)


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
    interp = INTERP[pre.interpolation]
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
        resize = A.Resize(pre.height, pre.width, interpolation=INTERP[pre.interpolation])
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
