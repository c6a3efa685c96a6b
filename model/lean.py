"""A serving predictor without PyTorch: ONNX Runtime session + NumPy head, OOD bank and Grad-CAM.

Why: importing PyTorch (the CUDA wheel) costs a serving process ~670 MB resident and the PyTorch
model another ~240 MB, while everything a prediction needs is already in the checkpoint folder in
a torch-free form: the verified ONNX export (logits, pooled features, Grad-CAM feature maps in one
pass), the fusion head's weights in ``model.safetensors`` (read with ``safetensors.numpy``) and
the OOD bank in ``ood.safetensors``. :class:`LeanPredictor` computes from them exactly what
:class:`model.predictor.Predictor` computes on ONNX Runtime (tested to 1e-4 on the example
images): calibrated probabilities, TTA (flips), the OOD and low-confidence warnings, closed-form
Grad-CAM (:func:`model.heatmap.cam_from_maps`) and the metadata-field contributions (each field
blanked to its "unknown" encoding in a NumPy copy of the head, the same arithmetic as
:func:`model.attribution.metadata_contributions`).

It *is* a :class:`Predictor` (same interface: ``predict``, ``classes``, ``version``, ``runtime``,
``config``), so the service and the app have one code path. What only PyTorch can do — Captum
Grad-CAM for a backbone without a closed form, ``.model``, ``preprocess`` — builds the PyTorch
predictor on first use (sharing the ONNX session). :func:`load_predictor` is what serving calls:
the lean predictor when the export is verified and the runtime allows, else the PyTorch one.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from safetensors import safe_open
from threadpoolctl import threadpool_limits  # (a scikit-learn dependency)

from data_pipeline.preprocessing import eval_array, model_view
from data_pipeline.request import PredictionRequest
from data_pipeline.schema import FIELD_SLICES, FIELDS, UNKNOWN_VECTOR, remember_classes
from model.architecture import ModelConfig
from model.checkpoint import WEIGHTS_FILE, CheckpointConfig, load_config, resolve_dir
from model.heatmap import cam_from_maps, resize_heatmap
from model.onnx_runtime import OnnxEngine, resolve_runtime
from model.ood import OOD_FILE, K
from model.predictor import Prediction, Predictor

if TYPE_CHECKING:
    import torch

#: BatchNorm1d's default epsilon (the metadata MLP's normalisation layer).
BN_EPS = 1e-5


def load_predictor(
    path: Path | str | None = None, runtime: str | None = None, threads: int = 0
) -> Predictor:
    """The serving predictor for a checkpoint (None → the shipped model): a
    :class:`LeanPredictor` when ``runtime`` (see :func:`model.onnx_runtime.resolve_runtime`) is
    auto / onnx / int8 and the export verifies, else PyTorch's :class:`Predictor` (which also
    says why on stderr under auto, or refuses a named runtime it cannot serve)."""
    folder = resolve_dir(path)
    cfg = load_config(folder)
    if resolve_runtime(runtime) != "torch":
        engine = OnnxEngine.for_checkpoint(folder, cfg, runtime, threads=threads)
        if engine is not None:
            return LeanPredictor(cfg, folder, engine)
    return Predictor.from_checkpoint(folder, runtime="torch")  # (auto already said why)


class BankDistance:
    """:class:`model.ood.FeatureDistance` in NumPy: cosine distance to the k-th nearest
    validation image of ``ood.safetensors``."""

    def __init__(self, bank: np.ndarray, threshold: float, k: int = K) -> None:
        self.bank = _l2_normalise(np.asarray(bank, dtype=np.float32))
        self.threshold = float(threshold)
        self.k = int(k)

    def distance(self, features: np.ndarray) -> np.ndarray:
        sim = _l2_normalise(np.asarray(features, dtype=np.float32)) @ self.bank.T
        k = min(self.k, self.bank.shape[0])
        return 1.0 - np.sort(sim, axis=1)[:, -k]

    @classmethod
    def from_checkpoint(cls, folder: Path, ood: dict) -> BankDistance | None:
        """The checkpoint's detector (``config.json`` → ``ood``), or None if it has none."""
        path = Path(folder) / OOD_FILE
        if not ood or not path.is_file():
            return None
        with safe_open(str(path), framework="np") as f:
            bank = f.get_tensor("bank")
        return cls(bank, ood["threshold"], ood.get("k", K))


def _l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (``torch.nn.functional.normalize``: eps 1e-12)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class _Member:
    """One FusionNet's metadata MLP and classifier as NumPy arrays (eval mode: dropout is the
    identity, BatchNorm uses its running statistics)."""

    def __init__(self, tensors: dict[str, np.ndarray], cfg: ModelConfig) -> None:
        self.classifier_w = tensors["classifier.weight"]
        self.classifier_b = tensors["classifier.bias"]
        self.mlp: list[np.ndarray] | None = None
        meta_out = 0
        if cfg.use_metadata:
            scale = tensors["meta_mlp.1.weight"] / np.sqrt(
                tensors["meta_mlp.1.running_var"] + BN_EPS
            )
            shift = tensors["meta_mlp.1.bias"] - tensors["meta_mlp.1.running_mean"] * scale
            # Linear → BatchNorm (folded into an affine map after it) → ReLU → Linear → ReLU
            self.mlp = [
                tensors["meta_mlp.0.weight"],
                tensors["meta_mlp.0.bias"],
                scale,
                shift,
                tensors["meta_mlp.4.weight"],
                tensors["meta_mlp.4.bias"],
            ]
            meta_out = cfg.meta_out
        #: Width of this member's pooled image features (its share of ``features``).
        self.channels = int(self.classifier_w.shape[1]) - meta_out

    def logits(self, features: np.ndarray, meta: np.ndarray) -> np.ndarray:
        if self.mlp is not None:
            w0, b0, scale, shift, w4, b4 = self.mlp
            h = np.maximum((meta @ w0.T + b0) * scale + shift, 0.0)
            h = np.maximum(h @ w4.T + b4, 0.0)
            features = np.concatenate([features, h], axis=1)
        return features @ self.classifier_w.T + self.classifier_b


class NumpyHead:
    """The fusion head (:meth:`model.network.FusionNet.head` / ``FusionEnsemble.head``) on
    cached pooled features, from the checkpoint's safetensors weights."""

    def __init__(self, members: list[_Member], member_weights: np.ndarray | None) -> None:
        self.members = members
        #: [members, classes] weight of each member in each class's logit (None: one network).
        self.member_weights = member_weights

    @classmethod
    def load(cls, folder: Path, cfg: ModelConfig) -> NumpyHead:
        """Only the head's tensors are read (the backbone's stay on disk)."""
        with safe_open(str(Path(folder) / WEIGHTS_FILE), framework="np") as f:
            keys = set(f.keys())

            def part(prefix: str) -> dict[str, np.ndarray]:
                names = [k for k in keys if k.startswith(prefix) and "backbone." not in k]
                return {k[len(prefix) :]: f.get_tensor(k).astype(np.float32) for k in names}

            if cfg.members > 1:
                members = [_Member(part(f"members.{i}."), cfg) for i in range(cfg.members)]
                if "member_weights" in keys:
                    weights = f.get_tensor("member_weights").astype(np.float32)
                else:  # ensembles saved before per-class weights: the plain mean
                    weights = np.full((cfg.members, cfg.num_classes), 1.0 / cfg.members, np.float32)
                return cls(members, weights)
            return cls([_Member(part(""), cfg)], None)

    def logits(self, features: np.ndarray, meta: np.ndarray) -> np.ndarray:
        """(B, classes) logits; ``features`` (B or 1, Σ channels), ``meta`` (B, meta_dim)."""
        meta = np.asarray(meta, dtype=np.float32)
        features = np.broadcast_to(features, (meta.shape[0], features.shape[1]))
        out, start = [], 0
        for m in self.members:
            out.append(m.logits(features[:, start : start + m.channels], meta))
            start += m.channels
        if self.member_weights is None:
            return out[0]
        return np.sum(np.stack(out) * self.member_weights[:, None, :], axis=0)

    def scales(self, target: int) -> list[float]:
        """Each member's weight in ``target``'s logit (what its Grad-CAM map counts)."""
        if self.member_weights is None:
            return [1.0]
        return [float(w) for w in self.member_weights[:, target]]

    def cam_weights(self, target: int) -> list[np.ndarray]:
        """Each member's classifier row for ``target`` over its image channels."""
        return [m.classifier_w[target, : m.channels] for m in self.members]


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float32) / np.float32(temperature)
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


#: The test-time views after the identity (:data:`model.engine.TTA_VIEWS`): flips of W, H, both.
_TTA_FLIPS = ((3,), (2,), (2, 3))


class LeanPredictor(Predictor):
    """:class:`Predictor` on ONNX Runtime and NumPy only (see the module docstring).
    Thread-safe: the session allows concurrent runs and every array is per request."""

    def __init__(self, config: CheckpointConfig, folder: Path, engine: OnnxEngine) -> None:
        # (Predictor.__init__ builds the PyTorch model: deliberately not called)
        # NumPy's products here are tiny (the head, a 2560-wide OOD bank, a 1280-channel CAM):
        # OpenBLAS's extra threads only spin, doubling the CPU of a prediction (measured 21 → 11
        # ms); ONNX Runtime keeps its own thread pool. Process-wide, like the app's PyTorch setting.
        threadpool_limits(limits=1, user_api="blas")
        self.config = config
        self.folder = folder
        self.onnx = engine  # ``engine``, typed as never None (it is what serves)
        self.engine = engine
        self.ood = None  # PyTorch's detector; this predictor reads the NumPy one
        self.bank = BankDistance.from_checkpoint(folder, config.ood)
        self.numpy_head = NumpyHead.load(folder, config.model)
        remember_classes(config.version, config.classes)
        remember_classes(self.version, config.classes)
        self._torch: Predictor | None = None
        self._torch_lock = threading.Lock()

    def torch_predictor(self) -> Predictor:
        """The PyTorch predictor over the same checkpoint and ONNX session, built on first use
        (what Captum-only explanations and ``.model`` need)."""
        with self._torch_lock:
            if self._torch is None:
                from model.checkpoint import load_checkpoint

                model, cfg = load_checkpoint(self.folder)
                self._torch = Predictor(model, cfg, self.folder, "cpu", self.engine)
            return self._torch

    @property
    def model(self) -> torch.nn.Module:  # type: ignore[override]
        """The PyTorch network (loads PyTorch: not needed to serve)."""
        return self.torch_predictor().model

    def preprocess(self, rgb: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """:meth:`Predictor.preprocess` (a PyTorch batch: loads PyTorch)."""
        return self.torch_predictor().preprocess(rgb)

    def _predict(self, request: PredictionRequest, explain: bool, tta: bool) -> Prediction:
        if explain and not self.onnx.has_maps:  # Grad-CAM needs Captum's backward pass
            return self.torch_predictor().predict(request, explain=explain, tta=tta)
        self._check_target(request)
        t0 = time.perf_counter()
        pre = self.config.preprocessing
        rgb = model_view(request.rgb, pre)
        x = eval_array(rgb, pre)[None]
        m = np.asarray(request.metadata.encode(), dtype=np.float32)[None]
        out = self.onnx.run_arrays(x, m, None if explain else ("logits", "features"))
        features, logits = out["features"], out["logits"]
        if tta:  # the identity view is already run; the flipped views in one batch
            views = np.concatenate([np.flip(x, axis=axes) for axes in _TTA_FLIPS])
            flipped = self.onnx.run_arrays(views, np.repeat(m, len(views), axis=0), ("logits",))
            logits = np.concatenate([logits, flipped["logits"]]).mean(axis=0, keepdims=True)
        temperature = self.config.temperature
        probs = softmax(logits, temperature)[0]
        pred = self._new_prediction(request, probs, rgb)
        if self.bank is None:
            self._warn(pred, None, None)
        else:
            self._warn(pred, float(self.bank.distance(features)[0]), self.bank.threshold)
        if explain:
            tgt = self.classes.index(request.target) if request.target else int(np.argmax(probs))
            pred.attribution_target = self.classes.codes[tgt]
            pred.metadata_contributions = self.metadata_contributions(features, m, tgt)
            pred.heatmap_grid = cam_from_maps(
                out["feature_maps"][0],
                self.numpy_head.cam_weights(tgt),
                self.numpy_head.scales(tgt),
                (pre.height, pre.width),
            )
            pred.heatmap = resize_heatmap(pred.heatmap_grid, rgb.shape[:2])
        pred.latency_ms = (time.perf_counter() - t0) * 1000.0
        return pred

    def metadata_contributions(
        self, features: np.ndarray, meta: np.ndarray, target: int
    ) -> dict[str, float] | None:
        """Signed change in P(target) per field versus that field being unknown (what
        :func:`model.attribution.metadata_contributions` computes with Captum's grouped
        ablation); None for an image-only model."""
        if not self.uses_metadata:
            return None
        batch = np.repeat(meta, len(FIELDS) + 1, axis=0)
        for i, field in enumerate(FIELDS, start=1):
            batch[i, FIELD_SLICES[field]] = UNKNOWN_VECTOR[FIELD_SLICES[field]]
        p = softmax(self.numpy_head.logits(features, batch), self.config.temperature)[:, target]
        return {
            field: 0.0
            if np.array_equal(meta[0, FIELD_SLICES[field]], batch[i, FIELD_SLICES[field]])
            else float(p[0] - p[i])
            for i, field in enumerate(FIELDS, start=1)
        }
