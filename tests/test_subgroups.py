"""Subgroup audit: ITA skin-tone bands from colour patches of known CIELAB colour, the
``scripts.evaluate --by`` block, the audit stored with a checkpoint and what the app shows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from data_pipeline.skin_tone import (
    BAND_NAMES,
    UNKNOWN,
    band,
    estimate,
    ita_degrees,
    srgb_to_lab,
)
from data_pipeline.splits import make_splits, save_splits
from model.subgroups import (
    KEYS,
    age_band,
    audit_markdown,
    load_audit,
    parse_by,
    skin_tone_line,
    tone_context,
    tone_sentence,
    training_tone_counts,
    write_audit,
)


def lab_to_srgb(L: float, a: float, b: float) -> np.ndarray:
    """Inverse of the CIELAB (D65) → sRGB conversion, for building patches of a known colour."""
    fy = (L + 16) / 116
    fx, fz = fy + a / 500, fy - b / 200
    eps, kappa = 216 / 24389, 24389 / 27

    def finv(f: float) -> float:
        return f**3 if f**3 > eps else (116 * f - 16) / kappa

    xyz = np.array([finv(fx), finv(fy), finv(fz)]) * np.array([0.95047, 1.0, 1.08883])
    m = np.array(
        [
            [3.2404542, -1.5371385, -0.4985314],
            [-0.9692660, 1.8760108, 0.0415560],
            [0.0556434, -0.2040259, 1.0572252],
        ]
    )
    lin = m @ xyz
    assert (lin > -1e-6).all() and (lin < 1 + 1e-6).all(), "colour outside the sRGB gamut"
    c = np.where(lin <= 0.0031308, 12.92 * lin, 1.055 * np.clip(lin, 0, 1) ** (1 / 2.4) - 0.055)
    return np.clip(np.round(c * 255), 0, 255).astype(np.uint8)


#: (L*, a*, b*) of a skin colour in each band, with its ITA (arctan((L − 50) / b) in degrees).
PATCHES = {
    "very light": (80.0, 6.0, 12.0),  # 68.2°
    "light": (68.0, 8.0, 18.0),  # 45.0°
    "intermediate": (60.0, 9.0, 15.0),  # 33.7°
    "tan": (55.0, 10.0, 15.0),  # 18.4°
    "brown": (45.0, 10.0, 20.0),  # −14.0°
    "dark": (30.0, 8.0, 15.0),  # −53.1°
}


def skin_image(lab: tuple[float, float, float], size: int = 120) -> np.ndarray:
    """A uniform skin patch with a darker 'lesion' disc in the middle and black vignette corners."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = lab_to_srgb(*lab)
    yy, xx = np.mgrid[:size, :size]
    r = np.hypot(yy - size / 2, xx - size / 2)
    img[r < size * 0.25] = lab_to_srgb(lab[0] * 0.45, lab[1] + 8, lab[2] * 0.6)
    img[r > size * 0.69] = 0  # the dermatoscope's black corners
    return img


def test_lab_of_known_srgb_colours():
    lab = srgb_to_lab(np.array([[255, 255, 255], [0, 0, 0], [255, 0, 0]], dtype=np.uint8))
    assert lab[0] == pytest.approx([100.0, 0.0, 0.0], abs=1e-3)
    assert lab[1] == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    assert lab[2] == pytest.approx([53.24, 80.09, 67.20], abs=0.02)  # CIE reference for red


@pytest.mark.parametrize(("expected", "lab"), PATCHES.items())
def test_ita_band_of_a_known_skin_colour(expected: str, lab: tuple[float, float, float]):
    tone = estimate(skin_image(lab))
    L, _, b = lab
    assert tone.ita == pytest.approx(np.degrees(np.arctan((L - 50) / b)), abs=1.5)
    assert tone.band == expected


def test_band_edges_and_formula():
    assert [band(x) for x in (60, 50, 30, 20, 0, -40)] == list(BAND_NAMES)
    assert band(55.0) == "light" and band(55.01) == "very light"
    assert band(None) == UNKNOWN
    assert ita_degrees(50.0, 10.0) == pytest.approx(0.0)
    assert ita_degrees(60.0, 10.0) == pytest.approx(45.0)


def test_a_black_image_has_no_measurable_skin():
    assert estimate(np.zeros((60, 80, 3), dtype=np.uint8)).band == UNKNOWN


def test_age_bands_and_keys():
    assert [age_band(a) for a in (5, 29.9, 30, 44, 45, 60, 74, 75, 90)] == [
        "<30",
        "<30",
        "30-44",
        "30-44",
        "45-59",
        "60-74",
        "60-74",
        "≥75",
        "≥75",
    ]
    assert age_band(float("nan")) == UNKNOWN
    assert parse_by("age, skin-tone") == ("age", "skin_tone")
    with pytest.raises(ValueError, match="unknown subgroup 'colour'"):
        parse_by("age,colour")


def test_evaluate_by_writes_the_subgroup_block(synthetic_ham: Path, tiny_checkpoint, tmp_path):
    from model.evaluate import evaluate

    out = tmp_path / "eval"
    m = evaluate(
        synthetic_ham, tiny_checkpoint, out, split="all", bootstrap=20, by=KEYS, runtime="torch"
    )
    report = json.loads((out / "metrics.json").read_text())["subgroups"]
    assert report == json.loads(json.dumps(m["subgroups"]))
    assert report["by"] == list(KEYS)
    n = report["n"]
    assert n == len(pd.read_csv(synthetic_ham / "HAM10000_metadata.csv"))
    for key in KEYS:
        groups = report["groups"][key]
        assert sum(g["n"] for g in groups.values()) == n, key
        for g in groups.values():
            ba = g["figures"]["balanced_accuracy"]
            assert ba["value"] is not None and ba["low"] <= ba["value"] <= ba["high"]
    assert set(report["groups"]["age"]) <= {"<30", "30-44", "45-59", "unknown"}
    assert report["groups"]["age"]["unknown"]["n"] == 7  # one blank age per class
    assert set(report["groups"]["skin_tone"]) <= {*BAND_NAMES, UNKNOWN}
    assert (out / "subgroups.png").stat().st_size > 0
    preds = pd.read_csv(out / "predictions.csv")
    assert {"age_band", "sex", "site", "skin_tone", "ita"} <= set(preds.columns)


def test_evaluate_refuses_an_existing_file_as_out_before_evaluating(tmp_path, capsys):
    from common.cli import run_cli
    from scripts.evaluate import main

    target = tmp_path / "metrics.json"
    target.write_text("{}")
    # the checkpoint does not exist either: the --out check must come first
    code = run_cli(
        main,
        ["--data-dir", str(tmp_path), "--checkpoint", str(tmp_path / "nope"), "--out", str(target)],
    )
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and "is an existing file" in err
    assert target.read_text() == "{}"
    # a folder under a file cannot be made either: refused first, not after the evaluation
    under = target / "sub"
    code = run_cli(
        main,
        ["--data-dir", str(tmp_path), "--checkpoint", str(tmp_path / "nope"), "--out", str(under)],
    )
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "is a file, not a folder" in err


def test_audit_is_stored_and_shown(synthetic_ham: Path, tmp_path: Path):
    split = tmp_path / "split.csv"
    from data_pipeline.ham10000 import load_metadata

    df = load_metadata(synthetic_ham)
    save_splits(make_splits(df, seed=0), split)
    training = {
        "split_file": str(split),
        "sources": [{"name": "synthetic", "role": "primary", "path": str(synthetic_ham)}],
    }
    tones = training_tone_counts(training)
    n_train = int((pd.read_csv(split)["split"] == "train").sum())
    assert tones["n"] == n_train == sum(tones["counts"].values())
    metrics = {
        "model_version": "tiny@0",
        "data_dir": str(synthetic_ham),
        "split": "all",
        "external": [],
        "subgroups": {
            "by": ["skin_tone"],
            "n": 3,
            "n_boot": 20,
            "level": 0.95,
            "groups": {
                "skin_tone": {
                    "light": {
                        "n": 3,
                        "n_lesions": 2,
                        "class_counts": {"mel": 1},
                        "figures": {
                            "balanced_accuracy": {"value": 0.5, "low": 0.2, "high": 0.8},
                            "mel_auc": {"value": None, "low": None, "high": None},
                            "mel_recall": {"value": 1.0, "low": 1.0, "high": 1.0},
                        },
                    }
                }
            },
        },
    }
    folder = tmp_path / "ckpt"
    folder.mkdir()
    write_audit(folder, metrics, tones, "python -m scripts.evaluate ...")
    audit = load_audit(folder)
    assert audit is not None and audit["training_skin_tone"] == tones
    table = audit_markdown(audit)
    assert "| light | 3 | 1 | 0.50 [0.20, 0.80] | – | 1.00 [1.00, 1.00] |" in table
    assert load_audit(tmp_path) is None
    context = tone_context(skin_image(PATCHES["light"]), audit)
    assert context["band"] == "light"
    assert context["training_in_band"] == tones["counts"]["light"]
    assert context["training_total"] == n_train
    assert "light" in tone_sentence(context) and f"of the model's {n_train}" in tone_sentence(
        context
    )
    assert skin_tone_line(None, folder) == ""
    assert skin_tone_line(skin_image(PATCHES["light"]), folder) == tone_sentence(context)
    bare = tone_context(skin_image(PATCHES["dark"]), None)
    assert bare["band"] == "dark" and bare["training_in_band"] is None
    assert "dark" in tone_sentence(bare)
