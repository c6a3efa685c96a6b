"""Self-describing checkpoints: ``model.safetensors`` + ``config.json`` in one folder.

Like timm's ``pretrained_cfg``, the config carries everything needed to use the weights — backbone,
preprocessing (input size, mean/std), the class set (codes in logit order, names, malignant codes;
``classes``, plus timm's ``label_names`` / ``label_descriptions``), metadata vocabulary,
temperature — plus how the model was made (command, split-file hash) and its metrics. Nothing is
re-declared by the code that loads it, and loading never unpickles code (safetensors only). A
config without ``classes`` (every model made before class sets existed) predicts HAM10000's 7.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.errors import DermError
from common.version import __version__
from data_pipeline.preprocessing import Preprocessing
from data_pipeline.schema import HAM7, ClassSet, check_vocabulary, vocabulary
from model.architecture import ModelConfig

if TYPE_CHECKING:  # PyTorch only where weights are saved or loaded: serving reads configs without
    import torch

    from model.network import Network

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
#: The ONNX export (see model.onnx_runtime), written beside the weights.
ONNX_FILE = "model.onnx"
#: The optional int8 copy of the export (see model.quantize).
INT8_FILE = "model.int8.onnx"
FORMAT_VERSION = 1
#: The model shipped with the package and used when no --checkpoint is given.
SHIPPED_DIR = Path(__file__).resolve().parent / "shipped"


class CheckpointError(DermError):
    """A checkpoint folder that is missing, incomplete or incompatible."""


@dataclass
class CheckpointConfig:
    name: str
    model: ModelConfig
    preprocessing: Preprocessing
    temperature: float = 1.0
    #: The classes the network's logits stand for; the vocabulary's class keys follow it.
    classes: ClassSet = HAM7
    vocabulary: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    ood: dict[str, Any] = field(default_factory=dict)
    #: The ONNX export beside the weights (file, SHA-256, the weights hash it was made from);
    #: written by :func:`model.onnx_runtime.export_onnx`, empty when there is none.
    onnx: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    weights_sha256: str = ""
    format_version: int = FORMAT_VERSION
    #: The DermFusion version that wrote this checkpoint (kept when the config is rewritten,
    #: e.g. by an export); empty for checkpoints from before versions were recorded.
    software_version: str = field(default_factory=lambda: __version__)

    def __post_init__(self) -> None:
        if not self.vocabulary:
            self.vocabulary = vocabulary(self.classes)

    @property
    def version(self) -> str:
        """Human-readable model version: name + first 12 hex digits of the weights hash."""
        return f"{self.name}@{self.weights_sha256[:12]}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "name": self.name,
            "created_at": self.created_at,
            "software_version": self.software_version,
            "weights_sha256": self.weights_sha256,
            "model": self.model.to_dict(),
            "preprocessing": self.preprocessing.to_dict(),
            "temperature": self.temperature,
            "classes": self.classes.to_dict(),
            # timm's names for the same thing, so timm-style tooling reads the labels too
            "label_names": list(self.classes.codes),
            "label_descriptions": self.classes.names_by_code,
            "vocabulary": self.vocabulary,
            "training": self.training,
            "metrics": self.metrics,
            "ood": self.ood,
            "onnx": self.onnx,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointConfig:
        if d.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(f"Unsupported checkpoint format {d.get('format_version')!r}.")
        return cls(
            name=d["name"],
            model=ModelConfig.from_dict(d["model"]),
            preprocessing=Preprocessing.from_dict(d["preprocessing"]),
            temperature=float(d["temperature"]),
            classes=ClassSet.from_dict(d["classes"]) if "classes" in d else HAM7,
            vocabulary=d["vocabulary"],
            training=d.get("training", {}),
            metrics=d.get("metrics", {}),
            ood=d.get("ood", {}),
            onnx=d.get("onnx", {}),
            created_at=d["created_at"],
            weights_sha256=d.get("weights_sha256", ""),
            software_version=d.get("software_version", ""),
        )


def resolve_dir(path: Path | str | None) -> Path:
    """A checkpoint folder from a folder, a config.json / model.safetensors path, or None."""
    if path is None:
        path = SHIPPED_DIR
    path = Path(path)
    if path.is_file():
        path = path.parent
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise CheckpointError(
            f"{path} is not a checkpoint folder (needs {CONFIG_FILE} and {WEIGHTS_FILE})."
        )
    return path


def save_checkpoint(
    model: Network,
    cfg: CheckpointConfig,
    out_dir: Path | str,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write weights then config (config last, so a folder with a config is complete).

    ``dtype`` (e.g. ``torch.float16``) stores floating tensors at lower precision to keep a shipped
    ensemble small; loading casts back to float32. Round the model with :func:`round_weights`
    *before* measuring it, so stored metrics describe exactly the stored weights."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: _cast(v.detach().cpu(), dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out_dir / WEIGHTS_FILE))
    cfg.weights_sha256 = hashlib.sha256((out_dir / WEIGHTS_FILE).read_bytes()).hexdigest()
    # new weights: an earlier export no longer describes them (model.onnx_runtime re-exports)
    cfg.onnx = {}
    (out_dir / ONNX_FILE).unlink(missing_ok=True)
    (out_dir / INT8_FILE).unlink(missing_ok=True)
    write_config(cfg, out_dir)
    return out_dir


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return t.to(dtype) if dtype is not None and t.is_floating_point() else t


def round_weights(model: Network, dtype: torch.dtype) -> Network:
    """Round floating weights/buffers through ``dtype`` in place (what saving at ``dtype`` and
    loading back would give)."""
    import torch

    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(t.to(dtype))
    return model


def write_config(cfg: CheckpointConfig, out_dir: Path | str) -> None:
    path = Path(out_dir) / CONFIG_FILE
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(cfg.to_dict(), indent=2, sort_keys=False) + "\n")
    tmp.replace(path)


def load_config(path: Path | str | None) -> CheckpointConfig:
    folder = resolve_dir(path)
    try:
        data = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{folder / CONFIG_FILE} is not valid JSON ({exc}).") from None
    cfg = CheckpointConfig.from_dict(data)
    check_vocabulary(cfg.vocabulary, cfg.classes)
    if cfg.model.num_classes != len(cfg.classes):
        raise CheckpointError(
            f"{folder / CONFIG_FILE}: the network has {cfg.model.num_classes} outputs but the "
            f"class set {len(cfg.classes)} classes ({cfg.classes.describe()})."
        )
    return cfg


def load_checkpoint(
    path: Path | str | None = None, device: str | torch.device = "cpu"
) -> tuple[Network, CheckpointConfig]:
    """Rebuild the network from its config and load the weights; returns (model.eval(), cfg)."""
    from safetensors.torch import load_file

    from model.network import build_network

    folder = resolve_dir(path)
    cfg = load_config(folder)
    model = build_network(cfg.model, pretrained=False)
    state = load_file(str(folder / WEIGHTS_FILE), device=str(device))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{folder}: weights do not match the config ({exc}).") from None
    return model.to(device).eval(), cfg
