"""Attributions mean something: Grad-CAM finds a planted discriminative patch, and metadata
contributions are exact probability differences."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_pipeline.schema import FIELD_SLICES, UNKNOWN_VECTOR, Metadata, blank_fields
from model.attribution import gradcam, metadata_contributions
from model.network import FusionNet, ModelConfig
from service.render import contributions_chart, heatmap_from_png, heatmap_png, overlay_heatmap

SIZE = 128
PATCH = 40


def _batch(rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor, list]:
    """Skin-like noise; label 1 images carry a dark blob in a random corner."""
    x = 0.2 * rng.standard_normal((n, 3, SIZE, SIZE)).astype(np.float32)
    y = rng.integers(0, 2, n)
    corners = []
    for i in range(n):
        r, c = rng.integers(0, 2, 2) * (SIZE - PATCH)
        corners.append((r, c))
        if y[i] == 1:
            x[i, :, r : r + PATCH, c : c + PATCH] = -2.0
    return torch.from_numpy(x), torch.from_numpy(y), corners


@pytest.fixture(scope="module")
def patch_model() -> FusionNet:
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    model = FusionNet(ModelConfig(num_classes=2, use_metadata=False), pretrained=True)
    opt = torch.optim.AdamW(model.param_groups(2e-3, 0.5))
    model.train()
    for _ in range(20):
        x, y, _ = _batch(rng, 12)
        loss = torch.nn.functional.cross_entropy(model(x, None), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    x, y, _ = _batch(np.random.default_rng(1), 64)
    with torch.no_grad():
        acc = (model(x, None).argmax(1) == y).float().mean().item()
    assert acc > 0.9, f"the patch task was not learned (acc {acc:.2f})"
    return model


def _patch_share(model: FusionNet, seed: int) -> list[float]:
    """Share of heatmap mass inside the planted patch, for several test images."""
    rng = np.random.default_rng(seed)
    shares = []
    for r, c in [(0, 0), (0, SIZE - PATCH), (SIZE - PATCH, 0), (SIZE - PATCH, SIZE - PATCH)]:
        x = 0.2 * rng.standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)
        x[0, :, r : r + PATCH, c : c + PATCH] = -2.0
        heat = gradcam(model, torch.from_numpy(x), None, target=1)
        assert heat.shape == (SIZE, SIZE) and heat.min() >= 0 and heat.max() <= 1
        shares.append(float(heat[r : r + PATCH, c : c + PATCH].sum() / max(heat.sum(), 1e-9)))
    return shares


def test_gradcam_concentrates_on_planted_patch(patch_model):
    shares = _patch_share(patch_model, seed=2)
    area = (PATCH * PATCH) / (SIZE * SIZE)  # ~10 % of the image
    # the patch covers ~10 % of the pixels; it must hold far more of the heat
    assert min(shares) > 3 * area, shares


def test_metadata_contributions_are_probability_differences():
    torch.manual_seed(0)
    model = FusionNet(ModelConfig(), pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    meta_np = Metadata.parse(75, "male", "face").encode()
    meta = torch.from_numpy(meta_np)[None]
    with torch.no_grad():
        feats = model.image_features(x)
        contrib = metadata_contributions(model, feats, meta, target=4, temperature=1.5)

        def p(vec):
            logits = model.head(feats, torch.from_numpy(vec)[None])
            return torch.softmax(logits / 1.5, dim=1)[0, 4].item()

    assert set(contrib) == {"age", "sex", "site"}
    for field in contrib:
        expected = p(meta_np) - p(blank_fields(meta_np, [field]))
        assert contrib[field] == pytest.approx(expected, abs=1e-5)
    assert any(abs(v) > 0 for v in contrib.values())
    # all unknown → nothing to attribute
    zero = metadata_contributions(model, feats, torch.from_numpy(UNKNOWN_VECTOR)[None], 4)
    assert all(v == pytest.approx(0.0, abs=1e-7) for v in zero.values())
    assert FIELD_SLICES["site"].stop == len(UNKNOWN_VECTOR)


def test_image_only_model_has_no_metadata_contributions():
    model = FusionNet(ModelConfig(use_metadata=False), pretrained=False).eval()
    feats = model.image_features(torch.randn(1, 3, 64, 64))
    assert metadata_contributions(model, feats, torch.from_numpy(UNKNOWN_VECTOR)[None], 0) is None


def test_rendering_helpers():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (150, 200, 3), dtype=np.uint8)
    heat = rng.random((150, 200)).astype(np.float32)
    over = overlay_heatmap(image, heat)
    assert over.shape == image.shape and over.dtype == np.uint8 and not np.array_equal(over, image)
    back = heatmap_from_png(heatmap_png(heat))
    assert back.shape == heat.shape and np.abs(back - heat).max() <= 1 / 255 + 1e-6
    chart = contributions_chart({"age": 0.05, "sex": -0.01, "site": 0.12}, "mel")
    assert chart.ndim == 3 and chart.shape[2] == 3
    assert contributions_chart(None, "mel").shape[2] == 3
