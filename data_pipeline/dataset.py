"""Torch dataset (image, metadata vector, label) and the class-balancing sampler."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset, Sampler, WeightedRandomSampler

from common.errors import DataError, DermError
from data_pipeline.ham10000 import metadata_matrix
from data_pipeline.images import load_rgb
from data_pipeline.schema import FIELDS, HAM7, blank_fields
from data_pipeline.transforms import ImageTransform


class LesionDataset(Dataset):
    """Rows of a loaded metadata table (see :func:`data_pipeline.ham10000.load_metadata`).

    ``blank_prob`` is the per-field probability of replacing age / sex / site with "unknown" in
    training, so the fused model stays useful when a user leaves fields empty. With ``masks``
    (per row, the classes its source can contain; see :func:`data_pipeline.sources.class_masks`)
    items are ``(image, meta, label, mask)`` for the source-aware training loss.
    """

    def __init__(
        self,
        df: pd.DataFrame,
        transform: ImageTransform,
        blank_prob: float = 0.0,
        seed: int = 0,
        masks: np.ndarray | None = None,
    ) -> None:
        self.paths = df["path"].tolist()
        self.labels = df["label"].to_numpy(dtype=np.int64)
        # images of one lesion are not independent: bootstrap intervals resample them together
        self.lesion_ids = df["lesion_id"].astype(str).tolist() if "lesion_id" in df else None
        self.meta = metadata_matrix(df) if len(df) else np.zeros((0, 0), np.float32)
        self.transform = transform
        self.blank_prob = blank_prob
        self.rng = np.random.default_rng(seed)
        self.masks = None if masks is None else torch.as_tensor(masks, dtype=torch.bool)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        try:
            image = load_rgb(Path(self.paths[i]))
        except DermError as exc:
            raise DataError(str(exc)) from None
        meta = self.meta[i]
        if self.blank_prob > 0:
            drop = [f for f in FIELDS if self.rng.random() < self.blank_prob]
            if drop:
                meta = blank_fields(meta, drop)
        item = (self.transform(image), torch.from_numpy(meta), int(self.labels[i]))
        return item if self.masks is None else (*item, self.masks[i])


def class_counts(labels: Sequence[int] | np.ndarray, n_classes: int = len(HAM7)) -> np.ndarray:
    """Images per class index; ``n_classes`` is the run's class-set size (absent classes: 0)."""
    return np.bincount(np.asarray(labels, dtype=np.int64), minlength=n_classes)


def class_sampling_weights(counts: np.ndarray, power: float) -> np.ndarray:
    """Per-class weight for one sample: ``(1 / n_c) ** power`` (0 for absent classes).

    The expected sampled share of class c is then proportional to ``n_c ** (1 - power)``:
    power 0 keeps the natural 60:1 imbalance, 1 samples every class equally, 0.5 is in between.
    """
    counts = np.asarray(counts, dtype=np.float64)
    weights = np.zeros_like(counts)
    present = counts > 0
    weights[present] = (1.0 / counts[present]) ** power
    return weights


def share_counts(counts: np.ndarray, reference: np.ndarray | None) -> np.ndarray:
    """The counts whose ``n ** (1 - power)`` sets each class's sampled share.

    ``reference`` None: the training union's own counts (adding a source of nv / mel / bkl only
    then shrinks every other class's share). With the primary source's counts as ``reference``,
    each class keeps the share it has in the primary source, and an extra source only adds
    variety *within* the classes it shows; a class the primary source lacks keeps its union count.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if reference is None:
        return counts
    ref = np.asarray(reference, dtype=np.float64)
    return np.where(ref > 0, ref, counts)


def expected_class_share(counts: np.ndarray, power: float) -> np.ndarray:
    """The class distribution a sampler with this ``power`` draws, in expectation."""
    mass = np.asarray(counts, dtype=np.float64) * class_sampling_weights(counts, power)
    return mass / mass.sum()


class DistributedWeightedSampler(Sampler[int]):
    """One rank's share of one weighted sample with replacement, for ``DistributedDataParallel``.

    Every rank draws the same ``num_samples`` (rounded up to a multiple of the world size) indices
    from one generator seeded with ``seed + epoch``, and keeps positions ``rank, rank + world,
    ...``: the shares are disjoint, equally long (so every rank runs the same number of steps),
    and together they are exactly the sample one process would have drawn. Call
    :meth:`set_epoch` before each epoch, as with ``DistributedSampler``; an epoch's sample is
    deterministic, so a resumed run draws what the uninterrupted one would have.
    """

    def __init__(
        self,
        weights: Sequence[float],
        num_samples: int,
        rank: int,
        world_size: int,
        seed: int = 0,
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of size {world_size}")
        self.weights = torch.as_tensor(weights, dtype=torch.double)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.per_rank = math.ceil(num_samples / world_size)
        self.total = self.per_rank * world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.per_rank

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        sample = torch.multinomial(self.weights, self.total, replacement=True, generator=generator)
        return iter(sample[self.rank :: self.world_size].tolist())


def make_weighted_sampler(
    labels: Sequence[int],
    power: float = 0.5,
    num_samples: int | None = None,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    reference_counts: np.ndarray | None = None,
    n_classes: int = len(HAM7),
) -> WeightedRandomSampler | DistributedWeightedSampler:
    """A sampler drawing class c with share ∝ ``m_c ** (1 - power)``, ``m`` being
    :func:`share_counts` (the labels' own counts, or a reference source's): a
    :class:`WeightedRandomSampler` in one process, this rank's
    :class:`DistributedWeightedSampler` share when ``world_size`` > 1."""
    if not 0.0 <= power <= 1.0:
        raise ValueError(f"sampler power must be in [0, 1], got {power}")
    y = np.asarray(labels, dtype=np.int64)
    counts = class_counts(y, n_classes)
    per_class = class_sampling_weights(counts, power)
    if reference_counts is not None:
        m = share_counts(counts, reference_counts)
        present = counts > 0
        # share_c / n_c per image: the class draws m_c^(1-power) in total, spread over its images
        per_class[present] = m[present] ** (1.0 - power) / counts[present]
    if world_size > 1:
        return DistributedWeightedSampler(
            per_class[y].tolist(), num_samples or len(y), rank, world_size, seed=seed
        )
    generator = torch.Generator().manual_seed(seed)
    return WeightedRandomSampler(
        weights=per_class[y].tolist(),
        num_samples=num_samples or len(y),
        replacement=True,
        generator=generator,
    )
