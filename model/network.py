"""The fusion network: timm image backbone + MLP over age / sex / site, joined before the head.

The forward pass is split in two (:meth:`FusionNet.image_features`, :meth:`FusionNet.head`) so
metadata attributions can re-run only the cheap head while the image features stay cached.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, cast

import torch
from torch import nn

from model.architecture import DEFAULT_BACKBONE as DEFAULT_BACKBONE
from model.architecture import ModelConfig
from model.pretrained import create_backbone


def _num_features(backbone: nn.Module) -> int:
    """Width of a timm backbone's pooled features (timm sets ``num_features``)."""
    return int(cast(Any, backbone).num_features)


class FusionNet(nn.Module):
    """Image branch (pooled timm features) ⊕ metadata MLP → dropout → linear classifier.

    With ``use_metadata=False`` the metadata input is accepted and ignored (image-only ablation),
    so every caller passes the same arguments.
    """

    def __init__(self, cfg: ModelConfig, pretrained: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = create_backbone(cfg.backbone, pretrained=pretrained)
        feat_dim = _num_features(self.backbone)
        if cfg.use_metadata:
            self.meta_mlp: nn.Module | None = nn.Sequential(
                nn.Linear(cfg.meta_dim, cfg.meta_hidden),
                nn.BatchNorm1d(cfg.meta_hidden),
                nn.ReLU(inplace=True),
                nn.Dropout(0.1),
                nn.Linear(cfg.meta_hidden, cfg.meta_out),
                nn.ReLU(inplace=True),
            )
            feat_dim += cfg.meta_out
        else:
            self.meta_mlp = None
        self.dropout = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(feat_dim, cfg.num_classes)
        # channels-last convolutions are ~1.5x faster on CPU (oneDNN) and native for cuDNN AMP.
        self.to(memory_format=torch.channels_last)

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        """Pooled backbone features, shape (B, num_features)."""
        return self.backbone(image.contiguous(memory_format=torch.channels_last))

    def head(self, features: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        """Logits from cached image features and a metadata batch."""
        if self.meta_mlp is not None:
            if meta is None:
                raise ValueError("this model fuses metadata: pass the encoded metadata vector")
            features = torch.cat([features, self.meta_mlp(meta)], dim=1)
        return self.classifier(self.dropout(features))

    def forward(self, image: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.image_features(image), meta)

    @property
    def uses_metadata(self) -> bool:
        return self.meta_mlp is not None

    @property
    def cam_targets(self) -> list[tuple[nn.Module, nn.Module]]:
        """(network, layer) pairs whose Grad-CAM maps are summed into the image heatmap."""
        return [(self, self.last_conv)]

    def param_groups(self, lr: float, backbone_lr_mult: float) -> list[dict]:
        """Discriminative learning rates: the pretrained backbone learns slower than new layers."""
        backbone = list(self.backbone.parameters())
        ids = {id(p) for p in backbone}
        rest = [p for p in self.parameters() if id(p) not in ids]
        return [
            {"params": backbone, "lr": lr * backbone_lr_mult, "name": "backbone"},
            {"params": rest, "lr": lr, "name": "head"},
        ]

    @property
    def last_conv(self) -> nn.Module:
        """The last convolutional stage (Grad-CAM target): timm EfficientNets end in
        ``conv_head`` → ``bn2`` (BN + activation); other backbones fall back to the last conv."""
        if hasattr(self.backbone, "bn2"):
            return cast(nn.Module, self.backbone.bn2)
        return [m for m in self.backbone.modules() if isinstance(m, nn.Conv2d)][-1]


class FusionEnsemble(nn.Module):
    """Mean logits of N FusionNets trained with different seeds on the same split.

    Averaging independently trained networks is the most reliable way to improve ranking (AUC)
    without new data. The interface is FusionNet's: image features are the members' pooled
    features concatenated, and :meth:`head` splits them back, so cached-feature metadata
    attributions, TTA and the OOD check work unchanged; Grad-CAM sums each member's map.
    """

    member_weights: torch.Tensor

    def __init__(self, cfg: ModelConfig, pretrained: bool = False) -> None:
        super().__init__()
        if cfg.members < 2:
            raise ValueError(f"an ensemble needs at least 2 members, got {cfg.members}")
        self.cfg = cfg
        member_cfg = replace(cfg, members=1)
        self.members = nn.ModuleList(
            FusionNet(member_cfg, pretrained=pretrained) for _ in range(cfg.members)
        )
        self._dims = [_num_features(m.backbone) for m in self.nets]
        # Per-class member weights (rows sum to 1 per class): uniform is the plain mean of
        # logits; fitted on validation they let a generalist and a specialist each speak for the
        # classes it knows best (scripts.ensemble --class-weights fit).
        self.register_buffer(
            "member_weights", torch.full((cfg.members, cfg.num_classes), 1.0 / cfg.members)
        )

    @property
    def nets(self) -> list[FusionNet]:
        """The members, typed (``nn.ModuleList`` iterates as plain modules)."""
        return cast(list[FusionNet], list(self.members))

    @classmethod
    def from_members(cls, members: list[FusionNet]) -> FusionEnsemble:
        """Wrap trained single networks (identical configs) into one ensemble."""
        cfgs = {m.cfg for m in members}
        if len(cfgs) != 1:
            raise ValueError("ensemble members must share one architecture config")
        ens = cls(replace(members[0].cfg, members=len(members)))
        for mine, theirs in zip(ens.members, members, strict=False):
            mine.load_state_dict(theirs.state_dict())
        return ens.eval()

    def image_features(self, image: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.image_features(image) for m in self.nets], dim=1)

    def head(self, features: torch.Tensor, meta: torch.Tensor | None) -> torch.Tensor:
        parts = torch.split(features, self._dims, dim=1)
        logits = torch.stack([m.head(f, meta) for m, f in zip(self.nets, parts, strict=True)])
        return (logits * self.member_weights.to(logits.dtype)[:, None, :]).sum(dim=0)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        """Ensembles saved before per-class weights existed load as the plain mean."""
        if "member_weights" not in state_dict:
            state_dict = {**state_dict, "member_weights": self.member_weights.clone()}
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def forward(self, image: torch.Tensor, meta: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.image_features(image), meta)

    @property
    def uses_metadata(self) -> bool:
        return self.cfg.use_metadata

    @property
    def cam_targets(self) -> list[tuple[nn.Module, nn.Module]]:
        # d(mean logit)/d(layer of member i) is member i's own gradient / N, so each member's own
        # Grad-CAM is the ensemble's up to a common 1/N that normalisation removes; running each
        # member alone avoids N-1 wasted forward/backward passes per map.
        return [(m, m.last_conv) for m in self.nets]


Network = FusionNet | FusionEnsemble


def build_network(cfg: ModelConfig, pretrained: bool = False) -> Network:
    """The network a config describes: one FusionNet, or an ensemble when ``members > 1``."""
    return FusionEnsemble(cfg, pretrained) if cfg.members > 1 else FusionNet(cfg, pretrained)
