"""Albumentations pipelines: the single place where images are resized and normalised.

Training, evaluation and the app's inference all go through :func:`build_transform`, driven by
the :class:`Preprocessing` stored in the checkpoint, so a model never sees differently prepared
pixels at inference than in training.

Geometry: HAM10000 images are 4:3. Any image is first centre-cropped to the training aspect ratio
(a no-op for HAM10000), then resized to the model's input size. Lesions have no canonical
orientation, so flips and 90° rotations are label-preserving; affine jitter, colour / brightness
jitter (dermatoscopes and lighting differ), mild blur and coarse dropout (hair, bubbles, rulers)
make the model robust to acquisition differences.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import albumentations as A
import cv2
import numpy as np
from albumentations.pytorch import ToTensorV2

# OpenCV threads fight torch for the 2 CPU cores in data loading; augmentation is per-image anyway.
cv2.setNumThreads(0)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: Width / height of HAM10000 images; inputs are cropped to this before resizing.
SOURCE_ASPECT = 4.0 / 3.0


@dataclass(frozen=True)
class Preprocessing:
    """How pixels are prepared; stored in every checkpoint (like timm's ``pretrained_cfg``)."""

    height: int = 192
    width: int = 192
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    source_aspect: float = SOURCE_ASPECT
    interpolation: str = "area"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Preprocessing:
        d = dict(d)
        d["mean"], d["std"] = tuple(d["mean"]), tuple(d["std"])
        return cls(**d)


@dataclass(frozen=True)
class AugmentConfig:
    """Strength of the training augmentations (all probabilities in [0, 1])."""

    flip: float = 0.5
    rotate90: float = 0.5
    affine: float = 0.7
    color: float = 0.8
    blur: float = 0.15
    dropout: float = 0.3
    extra: dict = field(default_factory=dict)


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


_INTERP = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "cubic": cv2.INTER_CUBIC}


def build_transform(
    pre: Preprocessing, train: bool = False, aug: AugmentConfig | None = None
) -> A.Compose:
    """The albumentations pipeline ending in a normalised CHW float tensor."""
    resize = A.Resize(pre.height, pre.width, interpolation=_INTERP[pre.interpolation])
    tail = [A.Normalize(mean=pre.mean, std=pre.std, max_pixel_value=255.0), ToTensorV2()]
    if not train:
        return A.Compose([resize, *tail])
    aug = aug or AugmentConfig()
    ops = [
        resize,
        A.HorizontalFlip(p=aug.flip),
        A.VerticalFlip(p=aug.flip),
        # 90° turns would swap height and width of a non-square input.
        A.RandomRotate90(p=aug.rotate90 if pre.height == pre.width else 0.0),
        A.Affine(
            scale=(0.9, 1.15),
            translate_percent=(-0.06, 0.06),
            rotate=(-30, 30),
            shear=(-5, 5),
            border_mode=cv2.BORDER_REFLECT_101,
            p=aug.affine,
        ),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.15, hue=0.03, p=aug.color),
        A.GaussianBlur(blur_limit=(3, 5), p=aug.blur),
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
    """Crop-to-aspect + albumentations pipeline, callable on an RGB uint8 array."""

    def __init__(self, pre: Preprocessing, train: bool = False, aug: AugmentConfig | None = None):
        self.pre = pre
        self.pipeline = build_transform(pre, train=train, aug=aug)

    def __call__(self, image: np.ndarray):
        return self.pipeline(image=crop_to_aspect(image, self.pre.source_aspect))["image"]
