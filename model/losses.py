"""Training losses for imbalanced, multi-source data.

Two ways to counter HAM10000's 60:1 class imbalance are offered (``TrainConfig.loss``):

* ``weighted_ce`` — cross-entropy with class weights ∝ n_c^-loss_power, on top of the weighted
  sampler (the v1 recipe);
* ``logit_adjusted`` — the logit-adjusted loss of Menon et al. (ICLR 2021): cross-entropy on
  ``logits + tau · log π``, π being the class prior the sampler actually draws. The network's own
  logits then estimate a *balanced* posterior, which is what balanced accuracy rewards, without
  the noisy gradients of large per-class weights.

Both are **source-aware**: a row's softmax runs only over the classes its source can contain
(``mask``). ISIC 2017 has no akiec / bcc / df / vasc, and letting its 2000 images push those
classes' logits down would teach the model that they do not exist outside HAM10000.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

LOSSES: tuple[str, ...] = ("weighted_ce", "logit_adjusted")


def class_weights(counts: np.ndarray, sampler_power: float, loss_power: float) -> torch.Tensor:
    """Class weights ∝ n_c^-loss_power, normalised to mean 1 under the sampled distribution."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    w = counts**-loss_power
    sampled = sampled_prior(counts, sampler_power)
    return torch.tensor(w / (w * sampled).sum(), dtype=torch.float32)


def sampled_prior(counts: np.ndarray, sampler_power: float) -> np.ndarray:
    """The class distribution a sampler of this power draws: ∝ n_c^(1 - power)."""
    counts = np.maximum(np.asarray(counts, dtype=np.float64), 1.0)
    share = counts ** (1.0 - sampler_power)
    return share / share.sum()


def source_aware_ce(
    logits: torch.Tensor,
    target: torch.Tensor,
    mask: torch.Tensor | None = None,
    weight: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    logit_offset: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy over each row's allowed classes, with optional class weights, label
    smoothing (spread over the allowed classes only) and a logit offset (``tau · log π``).

    With no mask and no offset this equals ``F.cross_entropy(logits, target, weight,
    label_smoothing=...)`` — a test checks it.
    """
    z = logits.float()
    if logit_offset is not None:
        z = z + logit_offset
    if mask is None:
        mask = torch.ones_like(z, dtype=torch.bool)
    mask = mask | F.one_hot(target, z.shape[1]).bool()  # the true class is always allowed
    logp = torch.log_softmax(z.masked_fill(~mask, float("-inf")), dim=1).masked_fill(~mask, 0.0)
    n_allowed = mask.sum(dim=1, keepdim=True).float()
    soft = mask.float() * (label_smoothing / n_allowed)
    soft = soft + (1.0 - label_smoothing) * F.one_hot(target, z.shape[1]).float()
    if weight is not None:
        # Same convention as F.cross_entropy: per-class weights applied per target class.
        soft = soft * weight[None, :]
        per_row = -(soft * logp).sum(dim=1)
        return per_row.sum() / weight[target].sum()
    return -(soft * logp).sum(dim=1).mean()
