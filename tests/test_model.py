"""Model: weight mapping, forward passes, learning, checkpoints, calibration, metrics, CLIs."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from data_pipeline.schema import CLASSES, META_DIM, UNKNOWN_VECTOR, Metadata
from model.calibration import fit_temperature, softmax
from model.checkpoint import (
    CheckpointConfig,
    CheckpointError,
    load_checkpoint,
    resolve_dir,
    round_weights,
    save_checkpoint,
)
from model.metrics import compute_metrics, expected_calibration_error
from model.network import FusionEnsemble, FusionNet, ModelConfig
from model.predictor import Predictor
from model.pretrained import (
    WeightsError,
    create_backbone,
    load_offline_imagenet,
    map_state_dict_in_order,
    offline_weights_path,
)
from tests.conftest import REPO


def test_offline_weights_map_completely():
    path = offline_weights_path("tf_efficientnet_lite0")
    assert path is not None and path.name == "efficientnet-lite0-57934424.pth"
    source = torch.load(path, map_location="cpu", weights_only=True)
    assert len(source) == 296
    import timm

    full = timm.create_model("tf_efficientnet_lite0", pretrained=False)  # with classifier
    assert load_offline_imagenet(full, "tf_efficientnet_lite0") == 296
    for (tk, tv), (sk, sv) in zip(full.state_dict().items(), source.items(), strict=False):
        assert tv.shape == sv.shape, (tk, sk)
        assert torch.equal(tv, sv), f"{tk} did not receive {sk}"
    # the feature extractor (no classifier) receives every backbone tensor
    backbone = create_backbone("tf_efficientnet_lite0", pretrained=True)
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, full.state_dict()[k]), k


def test_mapping_rejects_wrong_shapes():
    import timm

    other = timm.create_model("resnet18", pretrained=False, num_classes=0)
    source = torch.load(offline_weights_path("tf_efficientnet_lite0"), weights_only=True)
    with pytest.raises(WeightsError, match="does not fit"):
        map_state_dict_in_order(source, other)


def test_unknown_backbone_is_clear():
    with pytest.raises(WeightsError, match="no model called"):
        create_backbone("no_such_net_123", pretrained=False)


@pytest.fixture(scope="module")
def fusion() -> FusionNet:
    torch.manual_seed(0)
    return FusionNet(ModelConfig(), pretrained=False).eval()


def test_forward_with_and_without_metadata(fusion):
    x = torch.randn(2, 3, 64, 64)
    full = torch.as_tensor(np.stack([Metadata.parse(70, "male", "back").encode()] * 2))
    blank = torch.as_tensor(np.stack([UNKNOWN_VECTOR] * 2))
    with torch.no_grad():
        a, b = fusion(x, full), fusion(x, blank)
    assert a.shape == b.shape == (2, len(CLASSES))
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    assert not torch.allclose(a, b)  # metadata reaches the logits
    with pytest.raises(ValueError, match="metadata"):
        fusion(x, None)


def test_image_only_ignores_metadata():
    model = FusionNet(ModelConfig(use_metadata=False), pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        a = model(x, torch.as_tensor(Metadata.parse(70, "male", "back").encode())[None])
        b = model(x, None)
    assert torch.allclose(a, b)


def test_few_steps_reduce_loss():
    torch.manual_seed(0)
    model = FusionNet(ModelConfig(), pretrained=True)
    x = torch.randn(8, 3, 64, 64)
    meta = torch.as_tensor(np.stack([UNKNOWN_VECTOR] * 8))
    y = torch.arange(8) % len(CLASSES)
    opt = torch.optim.AdamW(model.param_groups(1e-3, 0.3))
    model.train()
    losses = []
    for _ in range(8):
        loss = torch.nn.functional.cross_entropy(model(x, meta), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] * 0.7


def test_checkpoint_round_trip(tiny_checkpoint):
    model, cfg = load_checkpoint(tiny_checkpoint)
    again, cfg2 = load_checkpoint(tiny_checkpoint / "config.json")
    x = torch.randn(2, 3, 64, 64)
    meta = torch.as_tensor(np.stack([Metadata.parse(40, "female", "face").encode()] * 2))
    with torch.no_grad():
        assert torch.equal(model(x, meta), again(x, meta))
    assert cfg.version == cfg2.version and cfg.version.startswith("tiny-untrained@")
    assert cfg.preprocessing.height == 64 and cfg.vocabulary["classes"] == list(CLASSES)


def test_ensemble_is_member_mean_and_float16_round_trip(tmp_path):
    from data_pipeline.transforms import Preprocessing
    from model.attribution import gradcam, metadata_contributions

    members = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        members.append(FusionNet(ModelConfig(), pretrained=False).eval())
    ens = FusionEnsemble.from_members(members)
    x = torch.randn(2, 3, 64, 64)
    meta = torch.as_tensor(np.stack([Metadata.parse(40, "female", "face").encode()] * 2))
    with torch.no_grad():
        expected = (members[0](x, meta) + members[1](x, meta)) / 2
        assert torch.allclose(ens(x, meta), expected, atol=1e-5)
        feats = ens.image_features(x)
        assert feats.shape[1] == 2 * members[0].backbone.num_features
        assert torch.allclose(ens.head(feats, meta), expected, atol=1e-5)

    round_weights(ens, torch.float16)
    cfg = CheckpointConfig(name="ens", model=ens.cfg, preprocessing=Preprocessing(64, 64))
    save_checkpoint(ens, cfg, tmp_path / "ens", dtype=torch.float16)
    loaded, cfg2 = load_checkpoint(tmp_path / "ens")
    assert isinstance(loaded, FusionEnsemble) and cfg2.model.members == 2
    single = (tmp_path / "ens" / "model.safetensors").stat().st_size
    assert single < 1.1 * sum(p.numel() for p in ens.parameters()) * 2  # float16 on disk
    with torch.no_grad():
        assert torch.equal(loaded(x, meta), ens(x, meta))
    heat = gradcam(loaded, x[:1], meta[:1], target=3)
    assert heat.shape == (64, 64) and heat.min() >= 0.0 and heat.max() <= 1.0
    contrib = metadata_contributions(loaded, loaded.image_features(x[:1]), meta[:1], 3)
    assert set(contrib) == {"age", "sex", "site"}


def test_checkpoint_errors(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        resolve_dir(tmp_path)
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.safetensors").write_bytes((tiny_checkpoint / "model.safetensors").read_bytes())
    cfg = json.loads((tiny_checkpoint / "config.json").read_text())
    cfg["vocabulary"]["sites"] = ["moon"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(Exception, match="different class / metadata vocabulary"):
        load_checkpoint(bad)


def test_temperature_recovers_known_scale():
    rng = np.random.default_rng(0)
    true_logits = rng.normal(size=(4000, 7)) * 2.0
    labels = np.array([rng.choice(7, p=p) for p in softmax(true_logits)])
    t = fit_temperature(true_logits * 3.0, labels)  # over-confident by 3×
    assert t == pytest.approx(3.0, rel=0.1)


def test_metrics_on_hand_made_confusion():
    classes = ["a", "b", "c"]
    # true a: 3 (2 right, 1 → b); true b: 2 (both right); true c: 1 (→ a)
    y_true = np.array([0, 0, 0, 1, 1, 2])
    y_pred = np.array([0, 0, 1, 1, 1, 0])
    probs = np.full((6, 3), 0.1)
    probs[np.arange(6), y_pred] = 0.8
    m = compute_metrics(y_true, probs, classes)
    assert m["confusion_matrix"] == [[2, 1, 0], [0, 2, 0], [1, 0, 0]]
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["balanced_accuracy"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    pa, ra = 2 / 3, 2 / 3
    pb, rb = 2 / 3, 1.0
    f1a, f1b = 2 * pa * ra / (pa + ra), 2 * pb * rb / (pb + rb)
    assert m["per_class"]["a"]["f1"] == pytest.approx(f1a)
    assert m["macro_f1"] == pytest.approx((f1a + f1b + 0) / 3)
    assert m["weighted_f1"] == pytest.approx((3 * f1a + 2 * f1b) / 6)
    assert m["top3_accuracy"] == 1.0
    assert m["ece"] == pytest.approx(abs(0.8 - 4 / 6))
    assert m["per_class"]["c"]["support"] == 1


def test_metrics_with_absent_class():
    y_true = np.array([0, 0, 1, 1])
    probs = np.array([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.4, 0.5, 0.1]])
    m = compute_metrics(y_true, probs, ["a", "b", "c"])
    assert m["per_class"]["c"]["support"] == 0 and m["per_class"]["c"]["auc"] is None
    assert m["classes_present"] == ["a", "b"]
    assert m["balanced_accuracy"] == 1.0  # mean over present classes only
    assert m["macro_auc"] == pytest.approx(1.0)


def test_ece_perfectly_calibrated_is_zero():
    probs = np.array([[1.0, 0.0]] * 4)
    assert expected_calibration_error(probs, np.zeros(4, int)) == 0.0


def test_predictor_any_subset_of_metadata(tiny_checkpoint, synthetic_ham):
    predictor = Predictor.from_checkpoint(tiny_checkpoint)
    image = next((synthetic_ham / "images").glob("*.jpg"))
    for kwargs in ({}, {"age": 50}, {"sex": "female"}, {"site": "back"}, {"age": "", "sex": None}):
        pred = predictor.predict(image, **kwargs)
        assert sum(pred.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert list(pred.probabilities) == list(CLASSES)
        assert pred.heatmap.shape == pred.image.shape[:2]
        assert set(pred.metadata_contributions) == {"age", "sex", "site"}
    blank = predictor.predict(image)
    assert all(v == 0.0 for v in blank.metadata_contributions.values())  # unknown vs unknown


def test_weight_ema_warms_up_then_tracks_the_weights():
    from model.ema import WeightEMA

    lin = torch.nn.Linear(3, 2)
    start = lin.weight.detach().clone()
    ema = WeightEMA(lin, decay=0.99)
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin)  # warm-up: d = (1+1)/(10+1), so the average moves 9/11 of the way
    assert torch.allclose(ema.module.weight, start + 9 / 11)
    for _ in range(2000):
        ema.update(lin)
    assert torch.allclose(ema.module.weight, lin.weight, atol=1e-5)
    assert not ema.module.weight.requires_grad
    copy = WeightEMA(torch.nn.Linear(3, 2), decay=0.99)
    copy.load_state_dict(ema.state_dict())
    assert copy.updates == 2001 and torch.equal(copy.module.weight, ema.module.weight)
    with pytest.raises(ValueError, match="decay"):
        WeightEMA(lin, decay=1.0)


@pytest.mark.slow
def test_train_resume_evaluate_and_ensemble_cli(tmp_path):
    from tests.conftest import write_synthetic_ham

    data = write_synthetic_ham(tmp_path / "ham", per_class=14)
    out = tmp_path / "run"
    base = [
        sys.executable,
        "-m",
        "scripts.train",
        "--data-dir",
        str(data),
        "--out",
        str(out),
        "--splits",
        str(tmp_path / "splits.csv"),
        "--height",
        "64",
        "--width",
        "64",
        "--batch-size",
        "8",
        "--max-train-batches",
        "2",
        "--threads",
        "1",
    ]
    r = subprocess.run([*base, "--epochs", "1"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    r = subprocess.run(
        [*base, "--epochs", "2", "--resume"], cwd=REPO, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1, 2]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["temperature"] > 0
    assert {"val", "test", "external", "selection_score"} <= set(cfg["metrics"])
    assert cfg["training"]["split_sha256"] and "scripts.train" in cfg["training"]["command"]
    assert cfg["preprocessing"]["height"] == 64 and cfg["ood"]["threshold"] > 0
    # every held-out figure carries its 95 % bootstrap interval (whole lesions resampled)
    intervals = cfg["metrics"]["intervals"]
    assert intervals["n_boot"] == 1000 and set(intervals["sets"]) == {"val", "test"}
    ba = intervals["sets"]["test"]["balanced_accuracy"]
    assert ba["value"] == pytest.approx(cfg["metrics"]["test"]["balanced_accuracy"])
    assert ba["low"] <= ba["value"] <= ba["high"]
    for name in ("history.csv", "learning_curve.png", "splits.csv", "ood.safetensors"):
        assert (out / name).is_file()
    # the final checkpoint ships with its verified ONNX export
    assert (out / "model.onnx").is_file() and cfg["onnx"]["weights_sha256"] == cfg["weights_sha256"]

    ev = tmp_path / "eval"
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.evaluate",
            "--data-dir",
            str(data),
            "--checkpoint",
            str(out),
            "--out",
            str(ev),
            "--split",
            "test",
            "--tta",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((ev / "metrics.json").read_text())
    assert m["n"] == cfg["metrics"]["test"]["n"] and m["tta"] is True and m["runtime"] == "onnx"

    # a second seed on the same split, then both into one ensemble checkpoint
    second = [*base[:6], str(tmp_path / "run_s1"), *base[7:], "--epochs", "1", "--seed", "1"]
    r = subprocess.run(second, cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]

    def ensemble(out_dir: str, *members: str) -> subprocess.CompletedProcess:
        cmd = [sys.executable, "-m", "scripts.ensemble", "--data-dir", str(data), "--out", out_dir]
        return subprocess.run([*cmd, *members], cwd=REPO, capture_output=True, text=True)

    r = ensemble(str(tmp_path / "ens"), str(out), str(tmp_path / "run_s1"))
    assert r.returncode == 0, r.stderr[-2000:]
    ens = json.loads((tmp_path / "ens" / "config.json").read_text())
    assert ens["model"]["members"] == 2 and ens["training"]["weights_dtype"] == "float16"
    assert [mb["seed"] for mb in ens["training"]["members"]] == [42, 1]
    assert ens["training"]["split_sha256"] == cfg["training"]["split_sha256"]
    assert ens["metrics"]["test"]["n"] == m["n"] and ens["temperature"] > 0
    assert set(ens["metrics"]["intervals"]["sets"]) == {"val", "test"}
    image = next(data.rglob("*.jpg"))
    served = Predictor.from_checkpoint(tmp_path / "ens")
    assert served.runtime == "onnx" and (tmp_path / "ens" / "model.onnx").is_file()
    pred = served.predict(image, age=50)
    assert abs(sum(pred.probabilities.values()) - 1) < 1e-5 and pred.heatmap is not None
    ref = Predictor.from_checkpoint(tmp_path / "ens", runtime="torch").predict(image, age=50)
    for c, p in ref.probabilities.items():
        assert abs(pred.probabilities[c] - p) < 1e-4

    r = ensemble(str(tmp_path / "e1"), str(out))
    assert r.returncode == 2 and "at least two" in r.stderr and "Traceback" not in r.stderr

    # an ensemble can itself be a member: its networks join (here 2 + 1 = 3 members)
    r = ensemble(str(tmp_path / "e3"), str(tmp_path / "ens"), str(tmp_path / "run_s1"))
    assert r.returncode == 0, r.stderr[-2000:]
    e3 = json.loads((tmp_path / "e3" / "config.json").read_text())
    assert e3["model"]["members"] == 3 and e3["name"].endswith("-ensemble3")  # networks
    assert [mb["seed"] for mb in e3["training"]["members"]] == [42, 1, 1]

    # FOLDER#K: only network K of an ensemble joins (here network 1 of e3 + run_s1)
    r = ensemble(str(tmp_path / "e2"), f"{tmp_path / 'e3'}#1", str(tmp_path / "run_s1"))
    assert r.returncode == 0, r.stderr[-2000:]
    e2 = json.loads((tmp_path / "e2" / "config.json").read_text())
    assert e2["model"]["members"] == 2
    assert e2["training"]["members"] == e3["training"]["members"][1:]  # [e3's net 1, run_s1]
    picked, _ = load_checkpoint(tmp_path / "e2")
    source, _ = load_checkpoint(tmp_path / "e3")
    for a, b in zip(picked.nets[0].parameters(), source.nets[1].parameters(), strict=True):
        assert torch.equal(a, b)
    r = ensemble(str(tmp_path / "e4"), f"{tmp_path / 'e3'}#3", str(out))
    assert r.returncode == 2 and "holds 3 network(s)" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_train_cli_bad_data_dir(tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "scripts.train",
            "--data-dir",
            str(tmp_path / "missing"),
            "--out",
            str(tmp_path / "o"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "does not exist" in r.stderr and "Traceback" not in r.stderr


def test_evaluate_cli_external_set_without_some_classes(tiny_checkpoint, tmp_path):
    import pandas as pd

    from tests.conftest import write_synthetic_ham

    data = write_synthetic_ham(tmp_path / "ext", per_class=2)
    csv = data / "HAM10000_metadata.csv"
    df = pd.read_csv(csv)
    df[df["dx"] != "akiec"].to_csv(csv, index=False)  # an external set with no akiec
    out = tmp_path / "eval"
    from scripts.evaluate import main

    assert (
        main(
            [
                "--data-dir",
                str(data),
                "--checkpoint",
                str(tiny_checkpoint),
                "--out",
                str(out),
                "--split",
                "all",
            ]
        )
        == 0
    )
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 12 and m["per_class"]["akiec"]["support"] == 0
    assert "akiec" not in m["classes_present"]
    for key in (
        "accuracy",
        "balanced_accuracy",
        "macro_f1",
        "weighted_f1",
        "macro_auc",
        "top3_accuracy",
        "ece",
        "per_class",
        "confusion_matrix",
    ):
        assert key in m
    for png in ("confusion_matrix.png", "roc.png", "reliability.png"):
        assert (out / png).stat().st_size > 1000
    assert len(UNKNOWN_VECTOR) == META_DIM
