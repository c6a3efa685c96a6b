"""The shipped model: self-describing config, honest stored metrics, a working OOD check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_pipeline.schema import CLASSES, vocabulary
from data_pipeline.splits import DEFAULT_SPLITS, file_sha256
from model.checkpoint import SHIPPED_DIR, load_config
from model.predictor import Predictor
from tests.conftest import REPO

pytestmark = pytest.mark.skipif(
    not (SHIPPED_DIR / "config.json").is_file(), reason="no shipped model in model/shipped"
)


def test_config_is_self_describing():
    cfg = load_config(None)
    assert cfg.model.backbone == "tf_efficientnet_lite0" and cfg.model.use_metadata
    assert cfg.preprocessing.height == cfg.preprocessing.width == 192
    assert cfg.vocabulary == vocabulary()
    assert 0.05 < cfg.temperature < 20
    command = cfg.training["command"]
    assert "scripts.train" in command or "scripts.ensemble" in command
    for member in cfg.training.get("members", []):  # an ensemble records how each member was made
        assert "scripts.train" in member["command"] and "@" in member["version"]
    assert cfg.training["split_sha256"] == file_sha256(DEFAULT_SPLITS)
    for split in ("val", "test"):
        assert cfg.metrics[split]["n"] == 1287
    assert cfg.ood["threshold"] > 0


def test_ood_flags_non_dermoscopy_but_not_lesions():
    predictor = Predictor.from_checkpoint()
    rng = np.random.default_rng(0)
    odd = {
        "flat grey": np.full((300, 400, 3), 128, np.uint8),
        "white page": np.full((300, 400, 3), 255, np.uint8),
        "checkerboard": (np.indices((300, 400)).sum(0) // 20 % 2 * 255)
        .astype(np.uint8)[..., None]
        .repeat(3, 2),
        "noise": rng.integers(0, 255, (300, 400, 3), dtype=np.uint8),
    }
    for name, image in odd.items():
        pred = predictor.predict(image, explain=False)
        assert pred.ood_distance > pred.ood_threshold, name
        assert any("unlike the dermoscopy images" in w for w in pred.warnings), name
    examples = sorted((REPO / "app" / "examples").glob("*.jpg"))
    flagged = [
        p.name
        for p in examples
        if predictor.predict(p, explain=False).ood_distance > predictor.ood.threshold
    ]
    assert len(flagged) <= 1, flagged


@pytest.mark.realdata
def test_stored_test_metrics_reproduce(real_data):
    from model.evaluate import evaluate

    cfg = load_config(None)
    m = evaluate(real_data, None, None, split="test")
    stored = cfg.metrics["test"]
    for key in ("n", "accuracy", "balanced_accuracy", "macro_f1", "macro_auc", "ece"):
        assert m[key] == pytest.approx(stored[key], abs=1e-4), key
    assert m["classes"] == list(CLASSES)


@pytest.mark.realdata
def test_stored_external_metrics_reproduce(real_data):
    """The external validation sets recorded in the config score as stored (ISIC 2017 val)."""
    from model.evaluate import evaluate

    cfg = load_config(None)
    external = {
        s["name"]: s for s in cfg.training.get("sources", []) if s["role"] == "external_val"
    }
    folder = Path(real_data).parent / "isic2017" / "val"
    if "isic2017-val" not in external or not folder.is_dir():
        pytest.skip(f"no ISIC 2017 val copy at {folder} (or the model was not validated on it)")
    m = evaluate(folder, None, None, split="all")
    stored = cfg.metrics["external"]["isic2017-val"]
    for key in ("n", "balanced_accuracy", "macro_auc", "ece"):
        assert m[key] == pytest.approx(stored[key], abs=1e-4), key
    assert m["melanoma"]["auc"] == pytest.approx(stored["melanoma"]["auc"], abs=1e-4)
