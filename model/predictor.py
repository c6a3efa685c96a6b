"""The predictor: checkpoint + image + optional metadata → calibrated probabilities + explanations.

Usable without any UI (FSDL style): the CLIs, the history service and the Gradio app all call
:meth:`Predictor.predict` with a :class:`data_pipeline.request.PredictionRequest`, which was
validated once at the edge. Preprocessing comes from the checkpoint's config, never re-declared.

The network runs on ONNX Runtime when the checkpoint has a verified export and ``onnxruntime`` is
installed (:mod:`model.onnx_runtime`), else on PyTorch, the reference; ``runtime`` (or
``$DERMFUSION_RUNTIME``) forces one. Both give the same probabilities and explanations: one ONNX
pass yields the logits, the pooled features (OOD check, metadata ablation on the PyTorch head)
and the Grad-CAM layer's maps, from which Grad-CAM is exact in closed form.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.errors import MetadataError
from data_pipeline.images import ImageSource
from data_pipeline.preprocessing import model_view
from data_pipeline.request import PredictionRequest
from data_pipeline.schema import HAM7, ClassSet, Metadata, remember_classes
from model.checkpoint import CheckpointConfig, load_checkpoint, resolve_dir
from model.heatmap import resize_heatmap
from model.onnx_runtime import OnnxEngine, supports_linear_cam
from model.ood import LOW_CONFIDENCE, FeatureDistance

if TYPE_CHECKING:  # PyTorch is imported when a Predictor is built: Prediction and the constants
    import torch  # are read by serving code that runs without it (model.lean)

    from model.network import Network

#: Below this calibrated top-class probability a prediction is flagged as low confidence.
#: A malignant class with at least this probability is flagged, even when it is not the top one.
MALIGNANT_FLAG = 0.2


@dataclass
class Prediction:
    """One prediction; probabilities are temperature-calibrated and in the model's class order
    (``classes``, from its checkpoint)."""

    probabilities: dict[str, float]
    metadata: Metadata
    model_version: str
    latency_ms: float = 0.0
    heatmap: np.ndarray | None = None  # (H, W) float32 in [0, 1] over ``image``
    image: np.ndarray | None = None  # the RGB image the heatmap refers to (aspect-cropped)
    heatmap_grid: np.ndarray | None = None  # Grad-CAM on the model's input grid, before resizing
    metadata_contributions: dict[str, float] | None = None
    attribution_target: str | None = None
    ood_distance: float | None = None
    ood_threshold: float | None = None
    warnings: list[str] = field(default_factory=list)
    classes: ClassSet = HAM7

    @property
    def ranked(self) -> list[tuple[str, float]]:
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])

    @property
    def top_class(self) -> str:
        return self.ranked[0][0]

    @property
    def top_probability(self) -> float:
        return self.ranked[0][1]

    @property
    def malignant_flag(self) -> list[str]:
        """Malignant classes that rank first or reach :data:`MALIGNANT_FLAG`."""
        return [
            c
            for c, p in self.ranked
            if c in self.classes.malignant and (p >= MALIGNANT_FLAG or c == self.top_class)
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly summary (no arrays)."""
        return {
            "top_class": self.top_class,
            "top_class_name": self.classes.name(self.top_class),
            "top_probability": self.top_probability,
            "probabilities": dict(self.ranked),
            "metadata": self.metadata.as_dict(),
            "metadata_contributions": self.metadata_contributions,
            "attribution_target": self.attribution_target,
            "malignant_flag": self.malignant_flag,
            "warnings": list(self.warnings),
            "ood_distance": self.ood_distance,
            "ood_threshold": self.ood_threshold,
            "model_version": self.model_version,
            "latency_ms": self.latency_ms,
        }


class Predictor:
    """Loads a self-describing checkpoint once and serves predictions.

    Thread-safe: a prediction reads the model and writes only its own tensors (ONNX Runtime
    sessions and PyTorch modules in eval mode allow concurrent calls; Captum's hook-based
    Grad-CAM, the PyTorch path, is serialised), so the app may run a few predictions at once."""

    def __init__(
        self,
        model: Network,
        config: CheckpointConfig,
        folder: Path,
        device: str = "cpu",
        engine: OnnxEngine | None = None,
    ) -> None:
        import torch

        from data_pipeline.transforms import ImageTransform

        self.model = model.eval()
        self.config = config
        self.folder = folder
        self.device = torch.device(device)
        self.transform = ImageTransform(config.preprocessing, train=False)
        self.ood = FeatureDistance.from_checkpoint(folder, config.ood)
        self.engine = engine if self.device.type == "cpu" else None
        # stored rows keep class codes only: remember the names for the history of this model
        remember_classes(config.version, config.classes)
        remember_classes(self.version, config.classes)
        self._linear_cam = supports_linear_cam(model)
        # Captum's LayerGradCam hooks the shared module, so while it runs *any* other PyTorch
        # forward through that module (another request's) would overwrite the activation it
        # differentiates: on PyTorch, predictions run one at a time. ONNX Runtime serving needs
        # no lock (closed-form Grad-CAM on its feature maps; the head has no hooks).
        self._torch_lock = threading.Lock()

    @classmethod
    def from_checkpoint(
        cls,
        path: Path | str | None = None,
        device: str = "cpu",
        runtime: str | None = None,
        threads: int = 0,
    ) -> Predictor:
        """``path`` None → the shipped model. ``runtime``: ``auto`` (ONNX Runtime when possible,
        else PyTorch), ``onnx`` (refuse without a valid export) or ``torch``; None reads
        ``$DERMFUSION_RUNTIME`` (default auto). ``threads``: ONNX Runtime threads per call."""
        import torch

        folder = resolve_dir(path)
        model, cfg = load_checkpoint(folder, device=device)
        engine = None
        if torch.device(device).type == "cpu":
            engine = OnnxEngine.for_checkpoint(folder, cfg, runtime, threads=threads)
        return cls(model, cfg, folder, device, engine)

    @property
    def runtime(self) -> str:
        """``onnx`` or ``torch``: what runs the network."""
        return self.engine.name if self.engine is not None else "torch"

    @property
    def version(self) -> str:
        """The checkpoint's version, plus ``+int8`` when the quantised export serves: its
        predictions are a slightly different function of the image, so the history, the
        agreement view and reports keep them apart from the float32 model's."""
        return self.config.version + ("+int8" if self.runtime == "int8" else "")

    @property
    def uses_metadata(self) -> bool:
        return self.config.model.use_metadata

    @property
    def classes(self) -> ClassSet:
        """The class set the checkpoint predicts (codes in logit order, names, malignant)."""
        return self.config.classes

    def preprocess(self, rgb: np.ndarray) -> tuple[np.ndarray, torch.Tensor]:
        """Frame a decoded image as the checkpoint says → (RGB shown to users, model batch)."""
        shown = model_view(rgb, self.config.preprocessing)
        return shown, self.transform(shown)[None].to(self.device)

    def predict(
        self,
        request: PredictionRequest | ImageSource,
        *,
        explain: bool = True,
        tta: bool = False,
        **fields: Any,
    ) -> Prediction:
        """Predict (and optionally explain) one validated :class:`PredictionRequest`.

        For convenience a raw image plus ``age`` / ``sex`` / ``site`` / ``target`` keywords is
        accepted too; it is turned into a request by :meth:`PredictionRequest.build`, the one place
        that validates input.
        """
        if not isinstance(request, PredictionRequest):
            request = PredictionRequest.build(request, **fields)
        if self.engine is not None:
            return self._predict(request, explain, tta)
        with self._torch_lock:
            return self._predict(request, explain, tta)

    def _check_target(self, request: PredictionRequest) -> None:
        if request.target is not None and request.target not in self.classes:
            raise MetadataError(
                f"Unknown explanation target {request.target!r}: this model predicts "
                f"{', '.join(self.classes.codes)}."
            )

    def _predict(self, request: PredictionRequest, explain: bool, tta: bool) -> Prediction:
        import torch

        from model.attribution import gradcam, gradcam_from_maps, metadata_contributions
        from model.engine import TTA_VIEWS, tta_logits

        self._check_target(request)
        t0 = time.perf_counter()
        rgb, x = self.preprocess(request.rgb)
        m = torch.as_tensor(request.metadata.encode(), device=self.device)[None]
        temperature = self.config.temperature
        maps = None
        with torch.no_grad():
            if self.engine is not None:
                out = self.engine.run(x, m, None if explain else ("logits", "features"))
                features, logits, maps = out["features"], out["logits"], out.get("feature_maps")
                if tta:  # the identity view is already run; the flipped views in one batch
                    views = torch.cat([view(x) for view in TTA_VIEWS[1:]])
                    flipped = self.engine.run(views, m.expand(len(views), -1))["logits"]
                    logits = torch.cat([logits, flipped]).mean(dim=0, keepdim=True)
            else:
                features = self.model.image_features(x)
                logits = (
                    tta_logits(self.model, x, m, features) if tta else self.model.head(features, m)
                )
            probs = torch.softmax(logits / temperature, dim=1)[0].cpu().numpy()
        pred = self._new_prediction(request, probs, rgb)
        self._check_reliability(pred, features)
        if explain:
            tgt = self.classes.index(request.target) if request.target else int(np.argmax(probs))
            pred.attribution_target = self.classes.codes[tgt]
            pred.metadata_contributions = metadata_contributions(
                self.model, features, m, tgt, temperature
            )
            size = (int(x.shape[-2]), int(x.shape[-1]))
            if maps is not None and self._linear_cam:
                pred.heatmap_grid = gradcam_from_maps(self.model, maps, tgt, size)
            else:
                pred.heatmap_grid = gradcam(self.model, x, m, tgt)
            pred.heatmap = resize_heatmap(pred.heatmap_grid, rgb.shape[:2])
        pred.latency_ms = (time.perf_counter() - t0) * 1000.0
        return pred

    def _new_prediction(
        self, request: PredictionRequest, probs: np.ndarray, rgb: np.ndarray
    ) -> Prediction:
        """The prediction for ``request`` from its calibrated ``probs`` (the model's class order)
        and the RGB view the model saw."""
        return Prediction(
            probabilities={c: float(p) for c, p in zip(self.classes, probs, strict=True)},
            metadata=request.metadata,
            model_version=self.version,
            image=rgb,
            classes=self.classes,
        )

    def _check_reliability(self, pred: Prediction, features: torch.Tensor) -> None:
        """Append the out-of-distribution and low-confidence warnings."""
        if self.ood is None:
            self._warn(pred, None, None)
        else:
            self._warn(pred, float(self.ood.distance(features.cpu())[0]), self.ood.threshold)

    def _warn(self, pred: Prediction, distance: float | None, threshold: float | None) -> None:
        """Record the OOD distance (None: no detector) and append the warnings it and the top
        probability call for."""
        if distance is not None and threshold is not None:
            pred.ood_distance = distance
            pred.ood_threshold = threshold
            if pred.ood_distance > threshold:
                pred.warnings.append(
                    "Unreliable: this image is unlike the dermoscopy images the model was trained "
                    f"on (feature distance {pred.ood_distance:.3f} > {threshold:.3f}"
                    f"{self._ood_threshold_meaning()})."
                )
        if pred.top_probability < LOW_CONFIDENCE:
            pred.warnings.append(
                f"Low confidence: the top class has probability {pred.top_probability:.0%} "
                f"(< {LOW_CONFIDENCE:.0%})."
            )

    def _ood_threshold_meaning(self) -> str:
        """ ", the 99th percentile of validation images" from the checkpoint's ``ood`` config."""
        percentile = self.config.ood.get("percentile")
        if percentile is None:
            return ""
        return f", the {ordinal(float(percentile))} percentile of validation images"


def ordinal(value: float) -> str:
    """99 → "99th", 1 → "1st", 99.5 → "99.5th"."""
    if value != int(value):
        return f"{value:g}th"
    n = int(value)
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"
