"""scripts.compare: a paired bootstrap of two models' predictions on the same images (synthetic
predictions.csv files, seconds)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from common.cli import run_cli
from common.errors import DataError
from data_pipeline.schema import CLASSES
from model.bootstrap import bootstrap_intervals
from model.compare import PROB_COLUMNS, compare_predictions, load_predictions, pair
from model.metrics import compute_metrics
from model.scoring import selection_score
from scripts import compare as compare_cli


def _predictions(
    y: np.ndarray, probs: np.ndarray, sources: np.ndarray, lesions: np.ndarray | None = None
) -> pd.DataFrame:
    ids = [f"ISIC_{i:07d}" for i in range(len(y))]
    df = pd.DataFrame({"source": sources, "image_id": ids, "dx": [CLASSES[k] for k in y]})
    if lesions is not None:
        df["lesion_id"] = lesions
    for j, col in enumerate(PROB_COLUMNS):
        df[col] = probs[:, j]
    return df


def _noisy(y: np.ndarray, skill: float, seed: int) -> np.ndarray:
    """Probabilities that put ``skill`` extra mass on the true class of each image."""
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(len(CLASSES)), size=len(y))
    p[np.arange(len(y)), y] += skill
    return p / p.sum(axis=1, keepdims=True)


@pytest.fixture
def two_sources():
    rng = np.random.default_rng(0)
    y_ham = rng.integers(0, len(CLASSES), 300)
    y_ext = rng.choice([CLASSES.index(c) for c in ("nv", "mel", "bkl")], 90)
    y = np.concatenate([y_ham, y_ext])
    sources = np.array(["ham10000"] * 300 + ["external"] * 90)
    return y, sources


def _by_row(rows) -> dict:
    return {(r.source, r.metric): r for r in rows}


def test_selection_score_matches_the_rule(two_sources):
    """compare's metrics are the selection rule's: as compute_metrics + selection_score."""
    y, sources = two_sources
    probs = _noisy(y, 0.8, 1)
    rows = _by_row(compare_predictions(*(2 * [_predictions(y, probs, sources)]), n_boot=20))
    per_set = {
        s: compute_metrics(y[sources == s], probs[sources == s], CLASSES)
        for s in ("ham10000", "external")
    }
    want = selection_score(per_set)
    got = rows[("all", "selection_score")]
    assert got.a == pytest.approx(want) and got.b == pytest.approx(want)
    assert rows[("external", "mel_auc")].a == pytest.approx(per_set["external"]["melanoma"]["auc"])
    # identical models: every paired difference is exactly zero, so B never "beats" A
    for r in rows.values():
        assert r.diff == 0 and r.low == r.high == 0 and r.p_b_better == 0


def test_a_clearly_better_model_wins_every_draw_and_noise_does_not(two_sources):
    y, sources = two_sources
    weak = _predictions(y, _noisy(y, 0.05, 1), sources)
    strong = _predictions(y, _noisy(y, 2.0, 2), sources)
    rows = _by_row(compare_predictions(weak, strong, n_boot=200, seed=3))
    sel = rows[("all", "selection_score")]
    assert sel.diff > 0.2 and sel.low > 0 and sel.p_b_better == 1.0
    assert rows[("ham10000", "balanced_accuracy")].low > 0
    # two equally good models with independent noise: the interval straddles zero
    a = _predictions(y, _noisy(y, 0.6, 4), sources)
    b = _predictions(y, _noisy(y, 0.6, 5), sources)
    sel = _by_row(compare_predictions(a, b, n_boot=200, seed=3))[("all", "selection_score")]
    assert sel.low < 0 < sel.high and 0.025 < sel.p_b_better < 0.975


def test_draws_resample_whole_lesions(two_sources):
    y, sources = two_sources
    lesions = np.array([f"L{i // 3}" for i in range(len(y))])
    a = _predictions(y, _noisy(y, 0.6, 4), sources)
    b = _predictions(y, _noisy(y, 0.6, 5), sources, lesions)
    both = pair(a, b)  # the lesion column of either file is used
    assert both["group"].nunique() == len(set(lesions))
    assert pair(a, a)["group"].tolist() == a["image_id"].tolist()


def test_cli_writes_json_and_refuses_mismatched_files(two_sources, tmp_path, capsys):
    y, sources = two_sources
    a_dir = tmp_path / "a"
    a_dir.mkdir()
    _predictions(y, _noisy(y, 0.5, 1), sources).to_csv(a_dir / "predictions.csv", index=False)
    b_csv = tmp_path / "b.csv"
    _predictions(y, _noisy(y, 0.9, 2), sources).to_csv(b_csv, index=False)
    out = tmp_path / "cmp.json"
    argv = [str(a_dir), str(b_csv), "--n-boot", "50", "--json", str(out)]
    assert run_cli(compare_cli.main, argv) == 0
    printed = capsys.readouterr().out
    assert "| all | selection_score |" in printed
    payload = json.loads(out.read_text())
    assert payload["n_boot"] == 50 and {r["source"] for r in payload["rows"]} == {
        "ham10000",
        "external",
        "all",
    }

    fewer = tmp_path / "fewer.csv"
    pd.read_csv(b_csv).iloc[:-5].to_csv(fewer, index=False)
    relabelled = tmp_path / "relabelled.csv"
    df = pd.read_csv(b_csv)
    df.loc[0, "dx"] = "nv" if df.loc[0, "dx"] != "nv" else "mel"
    df.to_csv(relabelled, index=False)
    no_probs = tmp_path / "no_probs.csv"
    pd.read_csv(b_csv).drop(columns=["p_mel"]).to_csv(no_probs, index=False)
    garbled = tmp_path / "garbled.csv"
    garbled.write_text("a\nb\nc,d,e\n")
    cases = {
        garbled: "not a readable CSV",
        fewer: "different image sets",
        relabelled: "different labels",
        no_probs: "missing column(s) p_mel",
        tmp_path / "absent": "no such predictions file",
    }
    for path, message in cases.items():
        assert run_cli(compare_cli.main, [str(a_dir), str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and message in err and "\n" not in err
    with pytest.raises(DataError, match="at least 10"):
        compare_predictions(load_predictions(a_dir), load_predictions(b_csv), n_boot=1)


def test_intervals_hold_the_reported_value_and_shrink_with_more_images(two_sources):
    """One model's bootstrap intervals: centred on compute_metrics' own figures, degenerate for
    a perfect model, narrower on a larger sample, whole lesions resampled."""
    y, sources = two_sources
    probs = _noisy(y, 0.6, 3)
    df = _predictions(y, probs, sources)
    out = bootstrap_intervals(df, n_boot=100)
    assert list(out) == ["ham10000", "external"]
    ham = sources == "ham10000"
    m = compute_metrics(y[ham], probs[ham], CLASSES)
    row = out["ham10000"]
    assert row["balanced_accuracy"]["value"] == pytest.approx(m["balanced_accuracy"])
    assert row["macro_auc"]["value"] == pytest.approx(m["macro_auc"])
    assert row["mel_auc"]["value"] == pytest.approx(m["melanoma"]["auc"])
    assert row["malignant_auc"]["value"] == pytest.approx(m["malignant"]["auc"])
    for r in row.values():
        assert r["low"] <= r["value"] <= r["high"]
    # the external source has no akiec / bcc / df / vasc: its macro AUC covers nv / mel / bkl only
    assert out["external"]["macro_auc"]["value"] is not None

    perfect = np.eye(len(CLASSES))[y]
    sure = bootstrap_intervals(_predictions(y, perfect, sources), n_boot=20)["ham10000"]
    assert sure["balanced_accuracy"] == {"value": 1.0, "low": 1.0, "high": 1.0}

    def width(n: int) -> float:
        rng = np.random.default_rng(7)
        yy = rng.integers(0, len(CLASSES), n)
        r = bootstrap_intervals(_predictions(yy, _noisy(yy, 0.4, 8), np.array(["s"] * n)), 200)
        ba = r["s"]["balanced_accuracy"]
        return ba["high"] - ba["low"]

    assert width(2000) < 0.6 * width(200)

    # ten images of one lesion count once: the interval of one lesion repeated is degenerate
    one = _predictions(y[:10], probs[:10], np.array(["s"] * 10), np.array(["L1"] * 10))
    ba = bootstrap_intervals(one, n_boot=20)["s"]["balanced_accuracy"]
    assert ba["low"] == ba["high"] == ba["value"]
    with pytest.raises(DataError, match="at least 10"):
        bootstrap_intervals(df, n_boot=3)
