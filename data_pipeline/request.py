"""The one validated prediction request, built at the edge (CLI, app, API) and passed unchanged
through :class:`service.prediction.PredictionService` and :class:`model.predictor.Predictor`.

Validation happens here and only here: the metadata is parsed, the explanation target checked
and the image read, hashed and decoded once. Code below the edge trusts a request.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from data_pipeline.images import ImageSource, read_image
from data_pipeline.schema import Metadata, normalize_target


@dataclass(frozen=True)
class PredictionRequest:
    """Decoded RGB image + parsed metadata + the class to explain (None: the top class)."""

    rgb: np.ndarray
    metadata: Metadata
    target: str | None
    image_sha256: str
    name: str = "image"
    #: (width, height) as submitted; ``rgb`` is the working-size image (at most
    #: :data:`data_pipeline.images.WORKING_SIDE` long). None: the size of ``rgb``.
    original_size: tuple[int, int] | None = None

    @classmethod
    def build(
        cls,
        image: ImageSource,
        age: Any = None,
        sex: Any = None,
        site: Any = None,
        target: Any = None,
        *,
        name: str | None = None,
    ) -> PredictionRequest:
        """Validate raw user values (raises ``DermError`` subclasses with a readable message).

        Metadata and target are checked before the image is decoded, so bad fields fail fast.
        """
        return cls.for_image(image, Metadata.parse(age, sex, site), normalize_target(target), name)

    @classmethod
    def for_image(
        cls,
        image: ImageSource,
        metadata: Metadata,
        target: str | None = None,
        name: str | None = None,
    ) -> PredictionRequest:
        """A request for one more image with fields that were already validated (e.g. the same
        ``--age/--sex/--site`` applied to several files)."""
        decoded = read_image(image, name)
        return cls(
            decoded.rgb, metadata, target, decoded.sha256, decoded.name, decoded.original_size
        )

    @property
    def height(self) -> int:
        """Height of the image as submitted (stored in the history)."""
        return int(self.original_size[1]) if self.original_size else int(self.rgb.shape[0])

    @property
    def width(self) -> int:
        """Width of the image as submitted (stored in the history)."""
        return int(self.original_size[0]) if self.original_size else int(self.rgb.shape[1])
