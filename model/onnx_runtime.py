"""ONNX export of a checkpoint and the ONNX Runtime engine that serves it.

Why: on a 2-core CPU, ONNX Runtime runs the Lite0 backbone several times faster than eager
PyTorch (fused Conv+BN+activation kernels, no Python per layer). PyTorch stays the reference and
the fallback: every checkpoint still loads and predicts without ``onnxruntime``.

**The export** (``model.onnx`` beside ``model.safetensors``) takes ``image`` (B, 3, H, W) and
``meta`` (B, 20) and returns, in one pass, everything serving needs:

- ``logits``: the network's raw (uncalibrated) logits — an ensemble's mean over its members;
- ``features``: the pooled image features (members concatenated), which the OOD check and the
  metadata ablation read;
- ``feature_maps``: each member's last conv stage (the Grad-CAM layer), concatenated on channels,
  so Grad-CAM is computed exactly from them without a backward pass
  (:func:`model.attribution.gradcam_from_maps`). Only backbones whose last conv stage feeds an
  average pool directly export it (:func:`supports_linear_cam`).

**Size.** Weights are stored as float16 when rounding them through float16 is exact (always true
for a checkpoint saved in float16, like the shipped ensemble); each such initializer is cast to
float32 inside the graph, a cast ONNX Runtime folds away when the session loads, so the file is
half the size at no cost in accuracy or speed. BatchNorm is kept as its own node at export (not
folded into the convolution by the exporter) so the stored weights stay exactly the checkpoint's;
ONNX Runtime fuses it when the session loads.

**Integrity.** ``config.json`` → ``onnx`` records the file's SHA-256 and the weights hash it was
exported from. On load a missing runtime, a missing file, or a mismatch of either hash means the
export is not used: with ``runtime="auto"`` the predictor falls back to PyTorch and says why on
stderr; with ``runtime="onnx"`` it refuses with a :class:`CheckpointError`. A stale export can
therefore never serve predictions from other weights than the checkpoint's.

**Imports.** PyTorch is imported only by what needs it (the export, :meth:`OnnxEngine.run`'s
tensors): a serving process runs :meth:`OnnxEngine.run_arrays` on NumPy arrays and verifies the
export with :func:`onnx_status` without it (:mod:`model.lean`).
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import warnings
from collections.abc import Sequence
from copy import deepcopy
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from model.checkpoint import (
    INT8_FILE,
    ONNX_FILE,
    CheckpointConfig,
    CheckpointError,
    load_checkpoint,
    write_config,
)

if TYPE_CHECKING:
    import torch
    from torch import nn

    from model.network import FusionNet, Network

OPSET = 17
INPUTS = ("image", "meta")
#: Graph outputs, in order (``feature_maps`` only where :func:`supports_linear_cam`).
OUTPUTS = ("logits", "features", "feature_maps")
#: auto: the float32 export when valid, else PyTorch; onnx: the float32 export; int8: the
#: optional quantised export (:mod:`model.quantize`; faster, not accuracy-neutral); torch.
RUNTIMES = ("auto", "onnx", "int8", "torch")
#: Environment variable choosing the runtime when no flag does (auto / onnx / int8 / torch).
RUNTIME_ENV = "DERMFUSION_RUNTIME"
RUNTIME_HELP = (
    "auto: ONNX Runtime (float32) when the checkpoint has a valid export, else PyTorch (default; "
    "or $DERMFUSION_RUNTIME); onnx / int8 / torch force one (int8: the quantised export, "
    "faster on a CPU but not accuracy-neutral, see docs/benchmarks.md)"
)


def members(model: Network) -> list[FusionNet]:
    """The single networks of ``model`` (one for a FusionNet, N for an ensemble)."""
    from model.network import FusionEnsemble

    return model.nets if isinstance(model, FusionEnsemble) else [model]


def supports_linear_cam(model: Network) -> bool:
    """True when each member's Grad-CAM layer output goes straight into a global average pool
    and from there, through concatenation and (eval-mode) dropout, into the linear classifier —
    the case where Grad-CAM has a closed form in the feature maps (timm EfficientNets)."""
    from torch import nn

    for net in members(model):
        backbone: Any = net.backbone
        pool = getattr(backbone, "global_pool", None)
        if not (
            hasattr(backbone, "bn2")
            and net.last_conv is backbone.bn2
            and hasattr(backbone, "forward_features")
            and getattr(pool, "pool_type", None) == "avg"
            and isinstance(net.classifier, nn.Linear)
        ):
            return False
    return True


def _exportable(model: Network) -> nn.Module:
    """``model`` as one graph: (image, meta) → logits, pooled features[, feature maps]
    (``.with_maps`` says whether the maps are an output)."""
    import torch
    from torch import nn

    class Exportable(nn.Module):
        def __init__(self, model: Network) -> None:
            super().__init__()
            self.model = model
            self.with_maps = supports_linear_cam(model)

        def forward(self, image: torch.Tensor, meta: torch.Tensor) -> tuple[torch.Tensor, ...]:
            if not self.with_maps:
                features = self.model.image_features(image)
                return self.model.head(features, meta), features
            maps, pooled = [], []
            for net in members(self.model):
                backbone: Any = net.backbone
                a = backbone.forward_features(image)  # ends in bn2 = net.last_conv
                maps.append(a)
                pooled.append(backbone.forward_head(a))
            features = torch.cat(pooled, dim=1)
            return self.model.head(features, meta), features, torch.cat(maps, dim=1)

    return Exportable(model)


E = TypeVar("E", bound="nn.Module")


def static_same_padding(module: E, example: tuple[torch.Tensor, ...]) -> E:
    """A copy of ``module`` whose TensorFlow-style "SAME" convolutions pad by a fixed amount.

    The ``tf_`` EfficientNets compute the asymmetric padding of their strided convolutions from
    the input's shape at every call (timm's ``Conv2dSame``); exported as is, that is a chain of
    Shape / Gather / Ceil / Pad nodes per convolution that ONNX Runtime runs on every request.
    The model's input size is fixed by its preprocessing, so timm's ``Conv2dSameExport`` (the
    same weights, padding computed once from ``example``) gives the same outputs bit for bit
    with a static graph."""
    import torch
    from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport

    copy = deepcopy(module)
    for parent in list(copy.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv2dSame):
                conv: Any = child  # nn.Conv2d types its sizes as tuple[int, ...]
                static = Conv2dSameExport(
                    conv.in_channels,
                    conv.out_channels,
                    conv.kernel_size,
                    conv.stride,
                    0,
                    conv.dilation,
                    conv.groups,
                    conv.bias is not None,
                )
                static.load_state_dict(child.state_dict())
                setattr(parent, name, static)
    with torch.no_grad():
        copy(*example)  # each Conv2dSameExport fixes its padding for this input size
    return copy


def export_onnx(
    folder: Path | str,
    model: Network | None = None,
    cfg: CheckpointConfig | None = None,
    verbose: bool = False,
) -> Path:
    """Export the checkpoint in ``folder`` to ``folder/model.onnx`` and record its hash in
    ``config.json``. ``model`` / ``cfg`` skip reloading when the caller has them (as saved)."""
    import torch

    folder = Path(folder)
    if model is None or cfg is None:
        model, cfg = load_checkpoint(folder)
    model = model.cpu().eval()
    pre = cfg.preprocessing
    example = (torch.zeros(1, 3, pre.height, pre.width), torch.zeros(1, cfg.model.meta_dim))
    wrapper = static_same_padding(_exportable(model).eval(), example)
    names = list(OUTPUTS if getattr(wrapper, "with_maps", False) else OUTPUTS[:2])
    batch = {0: "batch"}
    with tempfile.TemporaryDirectory(prefix="dermfusion-onnx-") as tmp:
        raw = Path(tmp) / "raw.onnx"
        with torch.no_grad(), warnings.catch_warnings():
            # the TorchScript exporter warns that it is deprecated; it is the one that keeps
            # BatchNorm unfolded (TrainingMode.PRESERVE), and its output is checked below
            warnings.simplefilter("ignore")
            torch.onnx.export(
                wrapper,
                example,
                str(raw),
                input_names=list(INPUTS),
                output_names=names,
                dynamic_axes={name: batch for name in (*INPUTS, *names)},
                opset_version=OPSET,
                # keep BatchNorm as nodes: their weights stay the checkpoint's (exactly float16
                # for a float16 checkpoint); ONNX Runtime fuses them at session load.
                training=torch.onnx.TrainingMode.PRESERVE,
                dynamo=False,
                verbose=False,
            )
        data = _shrink(raw)
    (folder / INT8_FILE).unlink(missing_ok=True)  # made from the previous export
    cfg.onnx = {**write_export(folder, ONNX_FILE, data, cfg), "opset": OPSET, "outputs": names}
    write_config(cfg, folder)
    if verbose:
        print(f"wrote {folder / ONNX_FILE} ({len(data) / 1e6:.1f} MB)", file=sys.stderr)
    return folder / ONNX_FILE


def write_export(folder: Path, name: str, data: bytes, cfg: CheckpointConfig) -> dict[str, Any]:
    """Write ``data`` to ``folder/name`` atomically (a reader never sees half a file) and return
    the record :func:`onnx_status` verifies: file, SHA-256, the weights it was made from, size.
    Shared by the float32 export and its int8 copy (:mod:`model.quantize`)."""
    out = folder / name
    tmp_out = out.with_suffix(".onnx.tmp")
    tmp_out.write_bytes(data)
    tmp_out.replace(out)
    return {
        "file": name,
        "sha256": hashlib.sha256(data).hexdigest(),
        "weights_sha256": cfg.weights_sha256,
        "bytes": len(data),
    }


def _shrink(path: Path) -> bytes:
    """The ONNX model with every float32 initializer that float16 represents exactly stored as
    float16 plus a Cast back to float32 (lossless; the cast is folded when a session loads)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    proto = onnx.load(str(path))
    graph = proto.graph
    casts = []
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        arr = numpy_helper.to_array(init)
        if arr.size < 16:
            continue
        half = arr.astype(np.float16)
        if not np.array_equal(half.astype(np.float32), arr):
            continue
        name = init.name
        init.CopyFrom(numpy_helper.from_array(half, name=f"{name}__fp16"))
        casts.append(helper.make_node("Cast", [f"{name}__fp16"], [name], to=TensorProto.FLOAT))
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(casts + nodes)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def onnx_status(folder: Path | str, cfg: CheckpointConfig, int8: bool = False) -> str | None:
    """None when ``folder``'s export (``int8``: its quantised copy) can serve ``cfg``'s weights,
    else why not (one sentence)."""
    folder = Path(folder)
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return "onnxruntime is not installed (pip install onnxruntime)"
    path = folder / ONNX_FILE
    if not cfg.onnx or not path.is_file():
        return f"{folder} has no ONNX export (run: python -m scripts.export {folder})"
    entry, fix = cfg.onnx, f"re-export: python -m scripts.export {folder}"
    if int8:
        entry, path = cfg.onnx.get("int8") or {}, folder / INT8_FILE
        fix = f"python -m scripts.export {folder} --int8 --data-dir DIR"
        if not entry or not path.is_file():
            return f"{folder} has no int8 export ({fix})"
    if entry.get("weights_sha256") != cfg.weights_sha256:
        return f"{path} was made from other weights than {folder}'s ({fix})"
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != entry.get("sha256"):
        return f"{path} does not match the SHA-256 recorded in config.json ({fix})"
    return None


def resolve_runtime(runtime: str | None) -> str:
    """The runtime to use: the argument, else ``$DERMFUSION_RUNTIME``, else ``auto``."""
    value = (runtime or os.environ.get(RUNTIME_ENV) or "auto").strip().lower()
    if value not in RUNTIMES:
        raise CheckpointError(
            f"Unknown runtime {value!r} (from --runtime or ${RUNTIME_ENV}): use one of "
            f"{', '.join(RUNTIMES)}."
        )
    return value


class OnnxEngine:
    """An ONNX Runtime session over a checkpoint's verified export. ``run`` is thread-safe
    (ONNX Runtime allows concurrent ``run`` calls on one session)."""

    def __init__(self, path: Path, threads: int = 0, name: str = "onnx") -> None:
        import onnxruntime as ort

        #: The runtime's name as reported to users: ``onnx`` (float32) or ``int8``.
        self.name = name
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # its own pool, independent of PyTorch's setting (the app leaves PyTorch 1 thread)
        opts.intra_op_num_threads = threads or os.cpu_count() or 1
        opts.inter_op_num_threads = 1
        # Idle worker threads sleep instead of spinning: on a shared 2-core machine spinning
        # steals the CPU other requests (and other processes) need.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(
            str(path), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.inputs = {i.name for i in self.session.get_inputs()}
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.has_maps = "feature_maps" in self.outputs

    @classmethod
    def for_checkpoint(
        cls, folder: Path | str, cfg: CheckpointConfig, runtime: str | None = None, threads: int = 0
    ) -> OnnxEngine | None:
        """The engine for ``folder`` when the runtime (``auto`` / ``onnx`` / ``int8`` /
        ``torch``, see :func:`resolve_runtime`) and the export allow it; None means: serve with
        PyTorch. Only ``auto`` falls back; a runtime asked for by name is refused if unusable."""
        runtime = resolve_runtime(runtime)
        if runtime == "torch":
            return None
        int8 = runtime == "int8"
        problem = onnx_status(folder, cfg, int8=int8)
        if problem is not None:
            if runtime != "auto":
                raise CheckpointError(f"Cannot serve with runtime {runtime}: {problem}.")
            print(f"note: serving with PyTorch: {problem}.", file=sys.stderr, flush=True)
            return None
        path = Path(folder) / (INT8_FILE if int8 else ONNX_FILE)
        return cls(path, threads=threads, name="int8" if int8 else "onnx")

    def run_arrays(
        self, image: np.ndarray, meta: np.ndarray, outputs: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Outputs by name (:data:`OUTPUTS`; ``outputs`` picks some) from float32 NumPy
        batches, as NumPy arrays: the torch-free path (:mod:`model.lean`)."""
        feed = {"image": np.ascontiguousarray(image, dtype=np.float32)}
        if "meta" in self.inputs:
            feed["meta"] = np.ascontiguousarray(meta, dtype=np.float32)
        names = list(outputs) if outputs is not None else self.outputs
        values = self.session.run(names, feed)
        return dict(zip(names, values, strict=True))

    def run(
        self, image: torch.Tensor, meta: torch.Tensor, outputs: Sequence[str] | None = None
    ) -> dict[str, torch.Tensor]:
        """:meth:`run_arrays` on tensors, returning float32 CPU tensors."""
        import torch

        out = self.run_arrays(_numpy(image), _numpy(meta), outputs)
        return {name: torch.from_numpy(v) for name, v in out.items()}

    def logits_and_features(
        self, image: torch.Tensor, meta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What batched evaluation reads: raw logits and pooled features (the Grad-CAM maps,
        ~1.5 MB per image, are not copied out)."""
        out = self.run(image, meta, ("logits", "features"))
        return out["logits"], out["features"]


def _numpy(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().float().cpu().numpy())
