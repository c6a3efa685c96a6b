"""Per-class ensemble weights: the plain mean by default, fitted on validation when asked."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model.ensemble import _weights_score, crossfit_score, fit_class_weights
from model.network import FusionEnsemble, FusionNet, ModelConfig


def _sets(seed: int = 0) -> dict:
    """Two members on two validation sets: member 0 knows classes 0-3, member 1 knows 4-6."""
    rng = np.random.default_rng(seed)
    out = {}
    for name, n in (("val", 280), ("ext", 140)):
        y = np.arange(n) % 7
        good = np.eye(7)[y] * 4.0
        z0 = rng.normal(0, 1.5, (n, 7)) + np.where(y[:, None] < 4, good, 0.0)
        z1 = rng.normal(0, 1.5, (n, 7)) + np.where(y[:, None] >= 4, good, 0.0)
        out[name] = ([z0, z1], y)
    return out


def test_fitted_weights_follow_each_members_strength() -> None:
    w = fit_class_weights(_sets())
    assert w.shape == (2, 7)
    np.testing.assert_allclose(w.sum(axis=0), 1.0)
    # member 0 gets more say on the classes it separates, member 1 on the others
    assert w[0, :4].mean() > 0.5 > w[0, 4:].mean()


def test_crossfit_is_no_higher_than_the_fit_on_the_same_rows() -> None:
    sets = _sets(1)
    lesions = {name: [f"{name}{i}" for i in range(len(y))] for name, (_, y) in sets.items()}
    fitted = _weights_score(sets, fit_class_weights(sets))
    assert crossfit_score(sets, lesions) <= fitted + 1e-9


def test_more_than_two_members_are_refused() -> None:
    sets = {"val": ([np.zeros((7, 7))] * 3, np.arange(7))}
    with pytest.raises(Exception, match="two networks"):
        fit_class_weights(sets)


def test_uniform_weights_are_the_mean_and_old_ensembles_load() -> None:
    cfg = ModelConfig(backbone="tf_efficientnet_lite0", use_metadata=True)
    nets = [FusionNet(cfg, pretrained=False).eval() for _ in range(2)]
    ens = FusionEnsemble.from_members(nets).eval()
    x, meta = torch.randn(2, 3, 64, 64), torch.zeros(2, cfg.meta_dim)
    with torch.no_grad():
        mean = torch.stack([n(x, meta) for n in nets]).mean(0)
        torch.testing.assert_close(ens(x, meta), mean)
        # a state dict saved before per-class weights existed loads as the plain mean
        old = {k: v for k, v in ens.state_dict().items() if k != "member_weights"}
        again = FusionEnsemble(ens.cfg)
        again.load_state_dict(old)
        torch.testing.assert_close(again.eval()(x, meta), mean)
        ens.member_weights.copy_(torch.tensor([[1.0] * 7, [0.0] * 7]))
        torch.testing.assert_close(ens(x, meta), nets[0](x, meta))


def test_weights_are_fitted_on_the_members_own_class_set() -> None:
    """A clinic's three-class ensemble (not HAM10000's seven) is fitted and scored with its own
    codes: member 0 is the better scc reader, so it gets the larger scc weight."""
    from data_pipeline.schema import ClassSet

    clinic = ClassSet(("scc", "bcc", "other"), ("SCC", "BCC", "Other"), frozenset({"scc", "bcc"}))
    rng = np.random.default_rng(1)
    sets = {}
    for name, n in (("val", 240), ("ext", 120)):
        y = np.arange(n) % 3
        good = np.eye(3)[y] * 4.0
        z0 = rng.normal(0, 1.5, (n, 3)) + np.where(y[:, None] == 0, good, 0.0)
        z1 = rng.normal(0, 1.5, (n, 3)) + np.where(y[:, None] != 0, good, 0.0)
        sets[name] = ([z0, z1], y)
    w = fit_class_weights(sets, classes=clinic)
    assert w.shape == (2, 3) and w[0, 0] > 0.5 > w[0, 2]
    lesions = {name: [f"L{i}" for i in range(len(y))] for name, (_, y) in sets.items()}
    assert (
        crossfit_score(sets, lesions, classes=clinic)
        <= _weights_score(sets, w, classes=clinic) + 1e-9
    )
