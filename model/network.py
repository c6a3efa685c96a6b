"""The fusion network: timm image backbone + MLP over age / sex / site, joined before the head.

The forward pass is split in two (:meth:`FusionNet.image_features`, :meth:`FusionNet.head`) so
metadata attributions can re-run only the cheap head while the image features stay cached.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from data_pipeline.schema import CLASSES, META_DIM
from model.pretrained import create_backbone


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; stored in the checkpoint to rebuild the network."""

    backbone: str = "tf_efficientnet_lite0"
    use_metadata: bool = True
    num_classes: int = len(CLASSES)
    meta_dim: int = META_DIM
    meta_hidden: int = 64
    meta_out: int = 32
    dropout: float = 0.3

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**d)


class FusionNet(nn.Module):
    """Image branch (pooled timm features) ⊕ metadata MLP → dropout → linear classifier.

    With ``use_metadata=False`` the metadata input is accepted and ignored (image-only ablation),
    so every caller passes the same arguments.
    """

    def __init__(self, cfg: ModelConfig, pretrained: bool = False) -> None:
        super().__init__()
        self.cfg = cfg
        self.backbone = create_backbone(cfg.backbone, pretrained=pretrained)
        feat_dim = int(self.backbone.num_features)
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
            return self.backbone.bn2
        return [m for m in self.backbone.modules() if isinstance(m, nn.Conv2d)][-1]
