"""Model v2 (issue 11): multi-source data, colour constancy, geometry, source-aware loss and the
clinical metrics — all on synthetic data, in seconds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from common.cli import run_cli
from common.errors import DataError
from data_pipeline.schema import CLASSES
from data_pipeline.sources import class_masks, load_sources, read_citation, source_name
from data_pipeline.transforms import (
    ImageTransform,
    Preprocessing,
    model_view,
    pad_to_aspect,
    shades_of_gray,
)
from model.checkpoint import CheckpointConfig, load_checkpoint, load_config, save_checkpoint
from model.losses import sampled_prior, source_aware_ce
from model.metrics import (
    binary_auc,
    binary_metrics,
    compute_metrics,
    sensitivity_at_specificity,
)
from model.network import FusionNet, ModelConfig
from model.scoring import selection_score, set_score
from tests.conftest import write_synthetic_ham


def _three_class_source(root: Path, first_id: int, per_class: int = 3) -> Path:
    """An ISIC-2017-like folder: nv / mel / bkl only, square images, no site, own image ids."""
    folder = write_synthetic_ham(root, per_class=per_class, size=(96, 96), seed=first_id)
    csv = folder / "HAM10000_metadata.csv"
    df = pd.read_csv(csv)
    df = df[df["dx"].isin(["nv", "mel", "bkl"])].reset_index(drop=True)
    new_ids = [f"ISIC_{first_id + i:07d}" for i in range(len(df))]
    for old, new in zip(df["image_id"], new_ids, strict=True):
        (folder / "images" / f"{old}.jpg").rename(folder / "images" / f"{new}.jpg")
    df["image_id"] = df["lesion_id"] = new_ids
    df["localization"] = "unknown"
    df.to_csv(csv, index=False)
    return folder


@pytest.fixture
def three_sources(tmp_path):
    ham = write_synthetic_ham(tmp_path / "ham", per_class=6)
    extra = _three_class_source(tmp_path / "isic" / "train", 1_000_000)
    external = _three_class_source(tmp_path / "isic" / "val", 2_000_000)
    return ham, extra, external, tmp_path / "splits.csv"


def test_sources_keep_apart_and_external_never_trains(three_sources):
    ham, extra, external, splits = three_sources
    df, sources, split_hash = load_sources(ham, splits, [extra], [external])
    assert [(s.name, s.role) for s in sources] == [
        ("ham", "primary"),
        ("isic-train", "train"),
        ("isic-val", "external_val"),
    ]
    assert split_hash and all(len(s.csv_sha256) == 64 for s in sources)
    by_source = df.groupby("source")["split"].agg(set).to_dict()
    assert by_source["isic-train"] == {"train"}
    assert by_source["isic-val"] == {"external"}
    assert by_source["ham"] <= {"train", "val", "test"}
    external_ids = set(pd.read_csv(external / "HAM10000_metadata.csv")["image_id"])
    assert external_ids.isdisjoint(df.loc[df["split"] == "train", "image_id"])
    # a source without a site still encodes it as unknown
    assert set(df.loc[df["source"] == "isic-train", "localization"]) == {"unknown"}
    assert sources[1].classes == ("bkl", "mel", "nv")


def test_external_image_that_also_trains_is_refused(three_sources):
    import shutil

    ham, extra, _, splits = three_sources
    leaky = shutil.copytree(extra, extra.parent / "leaky")  # same images under another name
    with pytest.raises(DataError, match="would leak into training"):
        load_sources(ham, splits, [extra], [leaky])
    # ISIC 2019 files some ISIC images as <id>_downsampled: still the same image
    csv = leaky / "HAM10000_metadata.csv"
    meta = pd.read_csv(csv)
    meta["image_id"] = meta["image_id"] + "_downsampled"
    meta.to_csv(csv, index=False)
    for f in (leaky / "images").iterdir():
        f.rename(f.with_name(f.stem + "_downsampled" + f.suffix))
    with pytest.raises(DataError, match="would leak into training"):
        load_sources(ham, splits, [extra], [leaky])
    # training refuses it before anything is written: no empty run folder is left behind
    from model.train import TrainConfig, train

    run = extra.parent / "run"
    cfg = TrainConfig(
        data_dir=str(ham),
        out=str(run),
        splits=str(splits),
        extra_train=(str(extra),),
        external_val=(str(leaky),),
    )
    with pytest.raises(DataError, match="would leak into training"):
        train(cfg)
    assert not run.exists()


def test_training_loader_holds_no_external_row(three_sources, tmp_path):
    from model.train import TrainConfig, prepare_data

    ham, extra, external, splits = three_sources
    cfg = TrainConfig(
        data_dir=str(ham),
        out=str(tmp_path / "run"),
        splits=str(splits),
        extra_train=(str(extra),),
        external_val=(str(external),),
        source_mask=True,
        height=32,
        width=32,
    )
    (tmp_path / "run").mkdir()
    data = prepare_data(cfg, tmp_path / "run")
    trained = {Path(p).stem for p in data.train.dataset.paths}
    external_ids = set(pd.read_csv(external / "HAM10000_metadata.csv")["image_id"])
    assert trained.isdisjoint(external_ids)
    assert set(data.sets.external) == {"isic-val"}
    assert len(data.sets.external["isic-val"].dataset) == len(external_ids)
    _, _, _, mask = data.train.dataset[len(data.train.dataset) - 1]  # last row: ISIC train
    assert mask.tolist() == [c in ("bkl", "mel", "nv") for c in CLASSES]
    written = pd.read_csv(tmp_path / "run" / "splits.csv")
    assert set(written["split"]) == {"train", "val", "test", "external"}


def test_class_masks_follow_each_source(three_sources):
    ham, extra, _, splits = three_sources
    df, sources, _ = load_sources(ham, splits, [extra])
    masks = class_masks(df, sources)
    assert masks[df["source"] == "ham"].all()
    isic = masks[(df["source"] == "isic-train").to_numpy()]
    assert (isic == np.array([c in ("bkl", "mel", "nv") for c in CLASSES])).all()


def test_source_names_and_citation(tmp_path):
    assert source_name(tmp_path / "isic2017" / "val") == "isic2017-val"
    assert source_name(tmp_path / "ham10000") == "ham10000"
    (tmp_path / "README.md").write_text("# X\n\nSource: Someone et al.\nSci. Data 2018.\n\nmore\n")
    assert read_citation(tmp_path) == "Someone et al. Sci. Data 2018."


def test_shades_of_gray_removes_a_colour_cast():
    rng = np.random.default_rng(0)
    grey = rng.integers(60, 200, size=(64, 64, 1)).repeat(3, axis=2).astype(np.float64)
    cast = np.clip(grey * np.array([1.35, 1.0, 0.65]), 0, 255).astype(np.uint8)

    def channel_pmean(img: np.ndarray) -> np.ndarray:
        return np.power(np.mean(np.power(img.astype(np.float64), 6), axis=(0, 1)), 1 / 6)

    before = channel_pmean(cast)
    after = channel_pmean(shades_of_gray(cast, 6))
    assert before.max() / before.min() > 1.9  # strongly cast
    assert after.max() / after.min() < 1.03  # grey-balanced
    # brightness is kept: the illuminant keeps its magnitude
    assert np.linalg.norm(after) == pytest.approx(np.linalg.norm(before), rel=0.03)
    assert shades_of_gray(np.zeros((8, 8, 3), np.uint8)).sum() == 0  # black stays black


def test_shades_of_gray_lookup_table_equals_the_per_pixel_formula():
    """The histogram + lookup-table implementation gives the per-pixel float64 formula's bytes."""
    rng = np.random.default_rng(1)
    for shape in [(37, 53, 3), (150, 200, 3), (192, 192, 3)]:
        img = rng.integers(0, 256, size=shape, dtype=np.uint8)
        img[..., 0] //= 2  # a colour cast
        x = img.astype(np.float64)
        illuminant = np.power(np.mean(np.power(x, 6.0), axis=(0, 1)), 1 / 6)
        gains = np.linalg.norm(illuminant) / (illuminant * np.sqrt(3.0))
        expected = np.clip(x * gains + 0.5, 0, 255).astype(np.uint8)
        assert np.array_equal(shades_of_gray(img, 6.0), expected)
        view = img[:, ::-1]  # a non-contiguous view (a flip) works as well
        assert np.array_equal(shades_of_gray(view, 6.0), expected[:, ::-1])


def test_geometry_policies_keep_or_cut_as_documented():
    square = np.zeros((256, 256, 3), np.uint8)
    wide = np.zeros((150, 200, 3), np.uint8)
    legacy = Preprocessing()
    assert model_view(square, legacy).shape == (192, 256, 3)  # v1: cuts top and bottom
    assert model_view(square, Preprocessing(geometry="squash")).shape == (256, 256, 3)
    assert model_view(wide, Preprocessing(geometry="crop")).shape == (150, 150, 3)
    padded = model_view(wide, Preprocessing(geometry="pad"))
    assert padded.shape == (200, 200, 3) and pad_to_aspect(padded, 1.0) is padded
    with pytest.raises(ValueError, match="geometry"):
        Preprocessing(geometry="stretch")


def test_checkpoint_preprocessing_is_what_inference_applies(tmp_path):
    from model.evaluate import evaluate

    pre = Preprocessing(height=48, width=48, geometry="pad", color_constancy="shades_of_gray")
    net = FusionNet(ModelConfig(), pretrained=False).eval()
    save_checkpoint(net, CheckpointConfig(name="pp", model=net.cfg, preprocessing=pre), tmp_path)
    loaded = load_config(tmp_path).preprocessing
    assert loaded == pre
    rng = np.random.default_rng(1)
    image = (rng.random((60, 100, 3)) * np.array([255, 160, 90])).astype(np.uint8)
    got = ImageTransform(loaded)(image)
    # the same steps by hand: pad to square, resize, Shades of Gray, normalise
    import cv2

    by_hand = cv2.resize(pad_to_aspect(image, 1.0), (48, 48), interpolation=cv2.INTER_AREA)
    by_hand = (shades_of_gray(by_hand) / 255.0 - np.array(pre.mean)) / np.array(pre.std)
    assert torch.allclose(got, torch.tensor(by_hand.transpose(2, 0, 1), dtype=got.dtype), atol=1e-3)
    assert not torch.allclose(got, ImageTransform(Preprocessing(48, 48))(image), atol=1e-2)
    # and evaluation reads it from the checkpoint, not from code defaults
    data = write_synthetic_ham(tmp_path / "d", per_class=1)
    m = evaluate(data, tmp_path, split="all")
    assert m["preprocessing"]["geometry"] == "pad"
    assert m["preprocessing"]["color_constancy"] == "shades_of_gray"


def test_old_checkpoint_config_keeps_v1_preprocessing(tmp_path):
    net = FusionNet(ModelConfig(), pretrained=False).eval()
    save_checkpoint(
        net, CheckpointConfig(name="v1", model=net.cfg, preprocessing=Preprocessing()), tmp_path
    )
    cfg = json.loads((tmp_path / "config.json").read_text())
    for key in ("geometry", "color_constancy", "minkowski_p"):
        del cfg["preprocessing"][key]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    _, loaded = load_checkpoint(tmp_path)
    assert loaded.preprocessing.geometry == "crop_aspect"
    assert loaded.preprocessing.color_constancy == "none"


def test_sensitivity_at_specificity_on_a_hand_made_case():
    # 10 negatives scored 0..9, 4 positives scored 5.5, 7.5, 9.5, 10.5
    neg = np.arange(10.0)
    pos = np.array([5.5, 7.5, 9.5, 10.5])
    y = np.r_[np.zeros(10), np.ones(4)].astype(bool)
    s = np.r_[neg, pos]
    # spec ≥ 0.9 allows 1 false positive (threshold 9 → only negative "9" above): TPR = 2/4
    assert sensitivity_at_specificity(y, s, 0.90) == pytest.approx(0.5)
    # spec ≥ 0.8 allows 2 false positives (threshold 8): positives 9.5, 10.5 -> 2/4; at
    # threshold 7.5 the FPs are 8, 9 (2 of 10) and TP 3/4
    assert sensitivity_at_specificity(y, s, 0.80) == pytest.approx(0.75)
    b = binary_metrics(y, s)
    assert b["n_pos"] == 4 and b["n_neg"] == 10
    # AUC by hand: pairs (pos > neg): 5.5→6, 7.5→8, 9.5→10, 10.5→10 = 34 of 40
    assert b["auc"] == pytest.approx(34 / 40)


def test_fast_auc_is_sklearns_auc_with_ties():
    """binary_auc (rank statistic, used thousands of times per bootstrap) gives exactly
    sklearn's roc_auc_score, ties included; by hand: one tie counts one half."""
    from sklearn.metrics import roc_auc_score

    assert binary_auc(np.array([0, 1, 0, 1], bool), np.array([0.1, 0.5, 0.5, 0.9])) == 0.875
    rng = np.random.default_rng(0)
    for decimals in (0, 1, 3):
        y = rng.integers(0, 2, 200).astype(bool)
        score = np.round(rng.random(200), decimals)
        assert binary_auc(y, score) == pytest.approx(roc_auc_score(y, score), abs=1e-12)


def test_melanoma_and_malignant_metrics_in_compute_metrics():
    idx = {c: i for i, c in enumerate(CLASSES)}
    y = np.array([idx["mel"], idx["bcc"], idx["nv"], idx["nv"], idx["bkl"], idx["akiec"]])
    probs = np.full((6, len(CLASSES)), 0.01)
    probs[0, idx["mel"]] = 0.9  # melanoma, confidently
    probs[1, idx["bcc"]] = 0.8
    probs[2, idx["nv"]] = 0.9
    probs[3, idx["mel"]] = 0.5  # a nevus that looks like melanoma
    probs[4, idx["bkl"]] = 0.9
    probs[5, idx["akiec"]] = 0.6
    probs /= probs.sum(axis=1, keepdims=True)
    m = compute_metrics(y, probs, CLASSES)
    assert m["melanoma"]["auc"] == pytest.approx(1.0)  # the melanoma outranks all five others
    assert m["melanoma"]["n_pos"] == 1
    # malignant = mel + bcc + akiec; the melanoma-looking nevus (0.5) ranks below akiec (0.6+)
    assert m["malignant"]["n_pos"] == 3 and m["malignant"]["auc"] == pytest.approx(1.0)
    no_mel = compute_metrics(y[1:], probs[1:], CLASSES)
    assert no_mel["melanoma"]["auc"] is None


def test_selection_rule_averages_sets():
    ham = {"balanced_accuracy": 0.8, "macro_auc": 0.9, "melanoma": {"auc": 0.86}}
    ext = {"balanced_accuracy": 0.6, "macro_auc": 0.7, "melanoma": {"auc": None}}
    assert set_score(ham) == pytest.approx(0.83)
    assert set_score(ext) == pytest.approx(0.65)  # no melanoma: macro AUC stands in
    assert selection_score({"val": ham, "ext": ext}) == pytest.approx(0.74)


def test_source_aware_loss_equals_cross_entropy_without_mask():
    torch.manual_seed(0)
    z = torch.randn(16, 7)
    y = torch.randint(0, 7, (16,))
    w = torch.rand(7) + 0.5
    ours = source_aware_ce(z, y, None, w, label_smoothing=0.1)
    ref = F.cross_entropy(z, y, weight=w, label_smoothing=0.1)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-5)
    offset = torch.log(torch.tensor(sampled_prior(np.arange(1, 8) * 10, 0.5), dtype=torch.float))
    ours = source_aware_ce(z, y, logit_offset=offset)
    assert ours.item() == pytest.approx(F.cross_entropy(z + offset, y).item(), rel=1e-5)


def test_masked_classes_get_no_gradient():
    z = torch.randn(4, 7, requires_grad=True)
    y = torch.tensor([4, 5, 2, 4])  # mel, nv, bkl, mel
    mask = torch.tensor([c in ("bkl", "mel", "nv") for c in CLASSES]).expand(4, 7)
    source_aware_ce(z, y, mask, label_smoothing=0.1).backward()
    absent = [CLASSES.index(c) for c in ("akiec", "bcc", "df", "vasc")]
    assert torch.all(z.grad[:, absent] == 0)
    assert torch.all(z.grad[:, [2, 4, 5]].abs().sum(dim=1) > 0)


def test_every_train_flag_has_a_real_help_text():
    from scripts.train import build_parser

    for action in build_parser()._actions:
        if action.option_strings and action.dest != "help":
            text = (action.help or "").strip()
            assert text and not text.startswith("(default"), action.dest


def test_evaluate_by_source_reports_each_source_and_flag_rates(tiny_checkpoint, three_sources):
    from model.evaluate import evaluate

    ham, _, external, _ = three_sources
    m = evaluate(ham, tiny_checkpoint, split="all", external=[external], by_source=True)
    assert set(m["by_source"]) == {"ham", "isic-val"}
    assert m["by_source"]["isic-val"]["n"] == len(pd.read_csv(external / "HAM10000_metadata.csv"))
    for sub in (m, *m["by_source"].values()):
        flags = sub["flagged"]
        assert 0 <= flags["low_confidence"] <= flags["any"] <= 1
        assert {"melanoma", "malignant"} <= set(sub)


def test_evaluate_cli_prints_per_source_tables(tiny_checkpoint, three_sources, tmp_path, capsys):
    from scripts.evaluate import main

    ham, _, external, _ = three_sources
    argv = ["--data-dir", str(ham), "--checkpoint", str(tiny_checkpoint), "--split", "all"]
    argv += ["--external", str(external), "--by-source", "--out", str(tmp_path / "e")]
    assert main([*argv, "--bootstrap", "50"]) == 0
    out = capsys.readouterr().out
    assert "[ham]" in out and "[isic-val]" in out and "flagged" in out
    assert "95 % intervals (50 draws" in out
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    intervals = metrics["intervals"]["by_source"]
    assert set(intervals) == {"ham", "isic-val"}
    ba = intervals["isic-val"]["balanced_accuracy"]
    assert ba["value"] == pytest.approx(metrics["by_source"]["isic-val"]["balanced_accuracy"])
    assert ba["low"] <= ba["value"] <= ba["high"]
    # too few draws: one line, before any image is scored
    assert run_cli(main, [*argv, "--bootstrap", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "at least 10" in err and "\n" not in err
    assert sys.modules["scripts.evaluate"] is not None
