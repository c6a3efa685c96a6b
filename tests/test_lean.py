"""Lean serving: the torch-free predictor against the PyTorch one, the NumPy preprocessing against
the albumentations pipeline, and a serving process that never imports PyTorch.

Tolerances as in tests/test_serving.py: probabilities, OOD distances and metadata contributions to
1e-4, heatmaps to 1e-4 (both runtimes are float32; they differ only in summation order).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from data_pipeline.preprocessing import eval_array
from data_pipeline.request import PredictionRequest
from data_pipeline.transforms import ImageTransform, Preprocessing, model_view
from model.checkpoint import load_checkpoint, load_config, save_checkpoint
from model.lean import LeanPredictor, load_predictor
from model.predictor import Prediction, Predictor

TOL = 1e-4
REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "app" / "examples").glob("*.jpg"))
FIELDS: list[dict[str, Any]] = [
    {"age": 45, "sex": "male", "site": "back"},
    {"age": 70, "sex": "female", "site": "face", "target": "mel"},
    {},
]


def assert_same(a: Prediction, b: Prediction) -> None:
    assert a.classes == b.classes and a.model_version == b.model_version
    for c in a.probabilities:
        assert abs(a.probabilities[c] - b.probabilities[c]) < TOL
    assert a.attribution_target == b.attribution_target
    assert a.warnings == b.warnings
    assert (a.ood_distance is None) == (b.ood_distance is None)
    if a.ood_distance is not None and b.ood_distance is not None:
        assert abs(a.ood_distance - b.ood_distance) < TOL
    if b.metadata_contributions is None:
        assert a.metadata_contributions is None
    else:
        assert a.metadata_contributions is not None
        for f, v in b.metadata_contributions.items():
            assert abs(a.metadata_contributions[f] - v) < TOL, f
    if b.heatmap_grid is None:
        assert a.heatmap_grid is None
    else:
        assert a.heatmap_grid is not None and a.heatmap is not None and b.heatmap is not None
        assert np.abs(a.heatmap_grid - b.heatmap_grid).max() < TOL
        assert a.heatmap.shape == b.heatmap.shape
        assert a.image is not None and b.image is not None
        assert np.array_equal(a.image, b.image)


@pytest.mark.parametrize(
    "pre",
    [
        load_config(None).preprocessing,  # the shipped model's: squash + Shades of Gray
        Preprocessing(geometry="pad", interpolation="linear", color_constancy="shades_of_gray"),
        Preprocessing(geometry="crop", height=96, width=128, interpolation="cubic"),
        Preprocessing(geometry="crop_aspect"),
    ],
    ids=["shipped", "pad", "crop", "crop_aspect"],
)
def test_numpy_preprocessing_equals_the_albumentations_eval_transform(pre):
    transform = ImageTransform(pre, train=False)
    for path in EXAMPLES:
        rgb = PredictionRequest.build(path).rgb
        want = transform(rgb).numpy()
        got = eval_array(model_view(rgb, pre), pre)
        assert got.shape == want.shape == (3, pre.height, pre.width) and got.dtype == np.float32
        assert np.abs(got - want).max() < 1e-5, path.name


@pytest.fixture(scope="module")
def shipped() -> tuple[Predictor, Predictor, Predictor]:
    torch.set_num_threads(2)
    lean = load_predictor(None)
    assert isinstance(lean, LeanPredictor) and lean.runtime == "onnx"
    return (
        lean,
        Predictor.from_checkpoint(None, "cpu", "onnx"),
        Predictor.from_checkpoint(None, "cpu", "torch"),
    )


def test_lean_predictor_equals_the_pytorch_predictor_on_the_examples(shipped):
    lean, onnx, ref = shipped
    assert lean.classes == ref.classes and lean.version == ref.version
    for i, path in enumerate(EXAMPLES):
        fields = FIELDS[i % len(FIELDS)]
        got = lean.predict(path, **fields)
        assert_same(got, onnx.predict(path, **fields))
        assert_same(got, ref.predict(path, **fields))


def test_lean_tta_and_unexplained_predictions_equal_pytorch(shipped):
    lean, _, ref = shipped
    for path in EXAMPLES[:3]:
        assert_same(lean.predict(path, tta=True), ref.predict(path, tta=True))
        quick = lean.predict(path, explain=False, age=30)
        assert quick.heatmap is None and quick.metadata_contributions is None
        assert_same(quick, ref.predict(path, explain=False, age=30))


def test_runtime_choice_and_lazy_pytorch(shipped, monkeypatch):
    lean = shipped[0]
    assert type(load_predictor(None, runtime="torch")) is Predictor
    monkeypatch.setenv("DERMFUSION_RUNTIME", "torch")
    assert type(load_predictor(None)) is Predictor
    # what only PyTorch has is built on first use, over the same ONNX session
    assert lean.model is lean.torch_predictor().model
    assert lean.torch_predictor().engine is lean.engine
    shown, batch = lean.preprocess(PredictionRequest.build(EXAMPLES[0]).rgb)
    assert shown.ndim == 3 and tuple(batch.shape) == (1, 3, 192, 192)


@pytest.mark.slow
def test_weighted_ensemble_head_and_cam_equal_pytorch(tmp_path):
    """A 2-member ensemble with per-class member weights (what scripts.ensemble --class-weights
    fit writes): the NumPy head, contributions and member-weighted Grad-CAM follow them."""
    from model.network import FusionEnsemble, ModelConfig
    from model.onnx_runtime import export_onnx
    from model.ood import FeatureDistance

    torch.manual_seed(1)
    mcfg = ModelConfig(members=2)
    model = FusionEnsemble(mcfg).eval()
    with torch.no_grad():
        w = torch.rand(2, mcfg.num_classes) + 0.1
        model.member_weights.copy_(w / w.sum(dim=0, keepdim=True))
        for net in model.nets:  # an untrained BatchNorm is the identity: give it statistics
            bn = net.meta_mlp[1]  # type: ignore[index]
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    cfg_path = tmp_path / "ens"
    from model.checkpoint import CheckpointConfig

    cfg = CheckpointConfig(
        name="tiny-ensemble",
        model=mcfg,
        preprocessing=Preprocessing(height=64, width=64, geometry="squash"),
        temperature=1.3,
        ood={"threshold": 0.5, "k": 3, "percentile": 99.0},
    )
    save_checkpoint(model, cfg, cfg_path)
    FeatureDistance(torch.randn(12, 2 * 1280), 0.5, k=3).save(cfg_path)
    export_onnx(cfg_path)
    lean = load_predictor(cfg_path)
    assert isinstance(lean, LeanPredictor)
    loaded, _ = load_checkpoint(cfg_path)
    assert torch.equal(loaded.member_weights, model.member_weights)  # type: ignore[arg-type]
    ref = Predictor.from_checkpoint(cfg_path, runtime="torch")
    for i, path in enumerate(EXAMPLES[:3]):
        fields = FIELDS[i % len(FIELDS)]
        assert_same(lean.predict(path, **fields), ref.predict(path, **fields))


SERVING_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from pathlib import Path
    from app.__main__ import AppServer, build_parser
    from app.config import resolve
    from data_pipeline.request import PredictionRequest
    from service.prediction import PredictionService

    settings = resolve(build_parser().parse_args(["--db", "sqlite:///:memory:"]))
    service = PredictionService.create(settings.checkpoint, db_url=settings.db)
    server = AppServer(service, settings)  # the UI, the REST API and /healthz, as served
    request = PredictionRequest.build(Path(sys.argv[1]), age=50, sex="female", site="back")
    stored = service.predict_and_store(request)
    print(json.dumps({
        "predictor": type(service.predictor).__name__,
        "stored": stored.stored,
        "heatmap": stored.prediction.heatmap is not None,
        "contributions": stored.prediction.metadata_contributions is not None,
        "loaded": sorted(m for m in ("torch", "albumentations", "timm", "captum")
                         if m in sys.modules),
    }))
    """
)


@pytest.mark.slow
def test_serving_process_never_imports_pytorch(monkeypatch):
    monkeypatch.delenv("DERMFUSION_RUNTIME", raising=False)
    out = subprocess.run(
        [sys.executable, "-c", SERVING_SCRIPT, str(EXAMPLES[0])],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report == {
        "predictor": "LeanPredictor",
        "stored": True,
        "heatmap": True,
        "contributions": True,
        "loaded": [],
    }
