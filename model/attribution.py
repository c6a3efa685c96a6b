"""Captum attributions: where in the image, and how much each metadata field, drove a prediction.

Image: **Grad-CAM** (Captum ``LayerGradCam``) on the backbone's last convolutional stage, ReLU'd,
bilinearly upsampled to the input and scaled to [0, 1]. Chosen over Integrated Gradients because it
costs one forward + one backward pass (IG needs 20-50), which keeps predict + explain well inside
the 300 ms budget on a 2-core CPU, and because its coarse, class-discriminative map is what a
clinician can read at a glance; IG's pixel-level saliency is noisy on dermoscopy textures.

Metadata: **grouped feature ablation** (Captum ``FeatureAblation`` with a feature mask joining the
one-hot columns of each field). Each field in turn is replaced by its "unknown" encoding — exactly
what the model sees when a user leaves the field blank, and what it was trained with — and the
change in the calibrated probability of the target class is recorded. A contribution of +0.04 for
``site`` therefore reads: "knowing the site raised P(class) by 4 percentage points compared with an
unknown site". Only the small fusion head is re-run, on cached image features, so it is cheap.
"""

from __future__ import annotations

from typing import Any, cast

import numpy as np
import torch
from captum.attr import FeatureAblation, LayerAttribution, LayerGradCam

from data_pipeline.schema import FIELD_SLICES, FIELDS, META_DIM, UNKNOWN_VECTOR
from model.heatmap import cam_from_maps, normalise
from model.heatmap import resize_heatmap as resize_heatmap
from model.network import FusionNet, Network


def _member_scales(model: Network, target: int) -> list[float]:
    """Each network's weight in the logit of ``target``: an ensemble's member i contributes
    ``w[i, target]`` times its own logit (uniform for the plain mean, which normalisation
    cancels), so its map counts that much; a single network: 1."""
    weights = getattr(model, "member_weights", None)
    if weights is None:
        return [1.0] * len(model.cam_targets)
    return [float(w) for w in weights[:, target].detach().float().cpu()]


def gradcam(model: Network, image: torch.Tensor, meta: torch.Tensor, target: int) -> np.ndarray:
    """Grad-CAM heatmap for ``target``, shape (H, W) of ``image``, values in [0, 1].

    For an ensemble the maps of every member's last stage are summed (see ``cam_targets``)."""
    model.eval()
    maps = []
    for (net, layer), scale in zip(model.cam_targets, _member_scales(model, target), strict=True):
        cam = LayerGradCam(net, layer)
        with torch.enable_grad():
            attr = cam.attribute(
                image, target=target, additional_forward_args=(meta,), relu_attributions=True
            )
        maps.append(attr.detach() * scale)
    return _combine(maps, (int(image.shape[-2]), int(image.shape[-1])))


def gradcam_from_maps(
    model: Network, feature_maps: torch.Tensor, target: int, size: tuple[int, int]
) -> np.ndarray:
    """The same heatmap as :func:`gradcam`, computed in closed form from the members' last-stage
    feature maps (the ONNX export's ``feature_maps``: members concatenated on channels).

    Why it is exact: after its Grad-CAM layer each member global-average-pools the maps A (C, h, w),
    concatenates them with the metadata branch and applies (eval-mode) dropout and a linear head,
    so d logit_c / d A_k(i, j) = W[c, k] / (h·w) everywhere. Grad-CAM's channel weight — the
    spatial mean of that gradient — is therefore W[c, k] / (h·w), and the map is
    ReLU(Σ_k W[c, k] / (h·w) · A_k), exactly what Captum's ``LayerGradCam`` computes with one
    backward pass. Valid only where :func:`model.onnx_runtime.supports_linear_cam` holds; a test
    checks it against Captum on the shipped model.

    Computed in NumPy (a few microseconds) by :func:`model.heatmap.cam_from_maps`, from each
    member's classifier row for ``target`` and its weight in that logit.
    """
    weights = []
    for module, _ in model.cam_targets:
        net = cast(FusionNet, module)
        channels = int(cast(Any, net.backbone).num_features)
        weights.append(net.classifier.weight.detach()[target, :channels].float().cpu().numpy())
    maps = feature_maps[0].detach().float().cpu().numpy()
    return cam_from_maps(maps, weights, _member_scales(model, target), size)


def _combine(maps: list[torch.Tensor], size: tuple[int, int]) -> np.ndarray:
    """Upsample each member's (1, 1, h, w) map to ``size``, sum, and scale to [0, 1]."""
    heat = np.zeros(size, dtype=np.float32)
    for attr in maps:
        up = LayerAttribution.interpolate(attr, size, interpolate_mode="bilinear")
        heat += up[0, 0].float().cpu().numpy()
    return normalise(heat)


def _field_mask() -> torch.Tensor:
    mask = torch.zeros(1, META_DIM, dtype=torch.long)
    for i, field in enumerate(FIELDS):
        mask[0, FIELD_SLICES[field]] = i
    return mask


def metadata_contributions(
    model: Network,
    features: torch.Tensor,
    meta: torch.Tensor,
    target: int,
    temperature: float = 1.0,
) -> dict[str, float] | None:
    """Signed change in P(target) per field versus that field being unknown; None if the model
    does not use metadata (image-only variant)."""
    if not model.uses_metadata:
        return None
    if model.training:  # (a recursive eval() costs milliseconds per request when already set)
        model.eval()

    def prob_of_target(m: torch.Tensor) -> torch.Tensor:
        logits = model.head(features.expand(m.shape[0], -1), m)
        return torch.softmax(logits / temperature, dim=1)[:, target]

    ablation = FeatureAblation(prob_of_target)
    baseline = torch.as_tensor(UNKNOWN_VECTOR, dtype=meta.dtype, device=meta.device)[None]
    with torch.no_grad():
        # all fields ablated in one batched forward of the head (not one forward per field)
        attr = ablation.attribute(
            meta,
            baselines=baseline,
            feature_mask=_field_mask().to(meta.device),
            perturbations_per_eval=len(FIELDS),
        )
    # A field that is already unknown changes nothing when ablated: exactly 0 (the batched
    # ablation pass and the single original pass may differ in the last float digits).
    same = {
        f: bool(torch.equal(meta[0, FIELD_SLICES[f]], baseline[0, FIELD_SLICES[f]])) for f in FIELDS
    }
    return {f: 0.0 if same[f] else float(attr[0, FIELD_SLICES[f].start]) for f in FIELDS}
