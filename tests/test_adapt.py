"""scripts.adapt on tiny synthetic data: the cached tail is the network, splits, draws, the
written checkpoint and learning curve, and one-line errors that leave no RUN behind."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from common.cli import run_cli
from data_pipeline.ham10000 import load_metadata
from data_pipeline.splits import make_splits, save_splits
from data_pipeline.transforms import Preprocessing
from model.adapt import (
    AdaptError,
    Tail,
    build_cache,
    cache_loader,
    parse_budgets,
    split_parts,
    stratified_draw,
)
from model.checkpoint import CheckpointConfig, load_checkpoint, save_checkpoint
from model.engine import collect_outputs, eval_loader
from model.network import FusionEnsemble, FusionNet, ModelConfig
from scripts.adapt import main
from tests.conftest import write_synthetic_ham


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, Path]:
    """A clinic folder, a HAM10000 stand-in with a split file, and a tiny 2-network ensemble
    checkpoint (64 px) whose config names that split file."""
    root = tmp_path_factory.mktemp("adapt")
    clinic = write_synthetic_ham(root / "clinic", per_class=6, seed=1)
    ham = write_synthetic_ham(root / "ham", per_class=6, seed=2, size=(120, 90))
    split = root / "ham_split.csv"
    digest = save_splits(make_splits(load_metadata(ham), seed=0), split)
    torch.manual_seed(0)
    mcfg = ModelConfig(use_metadata=True)
    nets = [FusionNet(mcfg).eval(), FusionNet(mcfg).eval()]
    ens = FusionEnsemble.from_members(nets)
    cfg = CheckpointConfig(
        name="tiny-ens",
        model=ens.cfg,
        preprocessing=Preprocessing(height=64, width=64),
        training={"split_file": str(split), "split_sha256": digest, "weights_dtype": "float16"},
    )
    save_checkpoint(ens, cfg, root / "parent", dtype=torch.float16)
    return {"root": root, "clinic": clinic, "ham": ham, "parent": root / "parent"}


def test_the_cached_tail_is_the_network(data):
    model, cfg = load_checkpoint(data["parent"])
    df = load_metadata(data["clinic"]).iloc[:10]
    for blocks in (0, 1, 2):
        cache = build_cache(model, df, cfg.preprocessing, blocks, "cpu", batch_size=4)
        z, _, f = collect_outputs(model, eval_loader(df, cfg.preprocessing), "cpu")
        z2, _, f2 = collect_outputs(Tail(model, blocks, cache.widths), cache_loader(cache), "cpu")
        assert np.allclose(cache.before_logits, z, atol=1e-5)
        assert np.allclose(z2, z, atol=1e-5) and np.allclose(f2, f, atol=1e-5)


def test_budgets_and_draws():
    assert parse_budgets("25, 50,all,25") == (25, 50, 0)
    for bad in ("0", "ten", ""):
        with pytest.raises(AdaptError):
            parse_budgets(bad)
    labels = np.array([0] * 60 + [1] * 30 + [2] * 10)
    idx = stratified_draw(labels, 20, seed=1)
    assert len(idx) == 20 and len(set(idx)) == 20
    assert np.bincount(labels[idx]).tolist() == [12, 6, 2]
    assert np.bincount(labels[stratified_draw(labels, 3, seed=0)]).tolist() == [1, 1, 1]
    assert not np.array_equal(stratified_draw(labels, 20, 1), stratified_draw(labels, 20, 2))


def test_split_keeps_an_official_split_and_groups_patients(data):
    df = load_metadata(data["clinic"])
    official = df.assign(split=np.where(np.arange(len(df)) % 5 == 0, "valid", "train"))
    parts, origin = split_parts(official, has_test_dir=True, seed=0)
    assert "own split" in origin
    assert (parts["split"] == "val").sum() == (np.arange(len(df)) % 5 == 0).sum()
    assert set(parts["split"]) == {"train", "val"}
    # no split column: patients never cross parts, a test part is carved too
    patients = df.assign(patient_id=[f"P{i // 4}" for i in range(len(df))])
    parts, _ = split_parts(patients, has_test_dir=False, seed=0)
    assert set(parts["split"]) == {"train", "val", "test"}
    assert parts.groupby("patient_id")["split"].nunique().max() == 1
    assert parts.groupby("lesion_id")["split"].nunique().max() == 1


def _adapt(data, out: Path, *extra: str) -> int:
    return run_cli(
        main,
        [
            str(data["clinic"]),
            "--from",
            str(data["parent"]),
            "--ham-dir",
            str(data["ham"]),
            "--out",
            str(out),
            "--epochs",
            "2",
            "--epoch-samples",
            "32",
            "--n-boot",
            "20",
            "--threads",
            "1",
            *extra,
        ],
    )


def test_adapt_writes_a_self_describing_checkpoint_and_curve(data, capsys):
    out = data["root"] / "run"
    assert _adapt(data, out, "--label-budget", "8,all", "--draws", "2") == 0
    printed = capsys.readouterr().out
    assert "[clinic-test]" in printed and "[ham10000-test]" in printed and "gain" in printed
    model, cfg = load_checkpoint(out)
    parent_cfg = load_checkpoint(data["parent"])[1]
    assert isinstance(model, FusionEnsemble)
    t = cfg.training
    assert t["adapted_from"]["version"] == parent_cfg.version == t["init_from_version"]
    assert t["command"].startswith("python -m scripts.adapt ")
    assert set(t["data_sha256"]) == {str(data["clinic"]), str(data["ham"])}
    assert len(t["networks"]) == 2
    assert cfg.ood and (out / "ood.safetensors").is_file() and cfg.onnx
    assert cfg.metrics["test"]["n"] > 0
    adapt_block = cfg.metrics["adapt"]["sets"]
    assert set(adapt_block) == {"clinic-test", "ham10000-test"}
    for block in adapt_block.values():
        assert {"before", "after", "gain"} <= set(block)
        ba = block["before"]["balanced_accuracy"]
        assert ba["low"] <= ba["value"] <= ba["high"]
    splits = pd.read_csv(out / "splits.csv")
    assert set(splits["split"]) == {"train", "val", "test"}
    assert splits.groupby("lesion_id")["split"].nunique().max() == 1
    curve = pd.read_csv(out / "label_budget.csv")
    n_train = int((splits["split"] == "train").sum())
    assert sorted(set(curve["n_labelled"])) == [8, n_train]
    assert set(curve.loc[curve["n_labelled"] == 8, "draw"]) == {0, 1}
    summary = json.loads((out / "label_budget.json").read_text())["summary"]
    assert {s["set"] for s in summary} == {"clinic-test", "ham10000-test"}
    assert (out / "label_budget.png").stat().st_size > 0
    assert not list(data["root"].glob(".run.tmp-*"))
    # the recorded split lets scripts.evaluate score the adapted model's own test part
    from model.evaluate import evaluate

    m = evaluate(data["clinic"], out, split="test", bootstrap=0, runtime="torch")
    assert m["n"] == int((splits["split"] == "test").sum())


def renamed_copy(src: Path, dst: Path, prefix: str) -> Path:
    """``src`` with every image id prefixed (synthetic folders reuse the same ids)."""
    (dst / "images").mkdir(parents=True)
    df = pd.read_csv(src / "HAM10000_metadata.csv")
    for image_id in df["image_id"]:
        (dst / "images" / f"{prefix}{image_id}.jpg").write_bytes(
            (src / "images" / f"{image_id}.jpg").read_bytes()
        )
    df.assign(image_id=prefix + df["image_id"]).to_csv(dst / "HAM10000_metadata.csv", index=False)
    return dst


def test_one_network_of_an_ensemble_and_an_explicit_test_folder(data, capsys):
    out = data["root"] / "run_member"
    # the same image ids as the clinic's: refused, nothing written
    assert _adapt(data, out, "--test-dir", str(data["ham"])) == 2
    assert "would be trained or selected on" in capsys.readouterr().err
    assert not out.exists()
    test_dir = renamed_copy(data["ham"], data["root"] / "other_clinic", "X")
    code = _adapt(data, out, "--from", f"{data['parent']}#1", "--test-dir", str(test_dir))
    assert code == 0
    assert "[other_clinic]" in capsys.readouterr().out
    model, cfg = load_checkpoint(out)
    assert isinstance(model, FusionNet)
    assert cfg.training["adapted_from"]["spec"].endswith("#1")
    assert set(pd.read_csv(out / "splits.csv")["split"]) == {"train", "val"}


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--label-budget", "5000"), "exceeds the"),
        (("--label-budget", "x"), "is not a positive number"),
        (("--train-blocks", "99"), "stages"),
        (("--from", "/no/such/checkpoint"), "not a checkpoint folder"),
    ],
)
def test_bad_input_is_one_line_and_leaves_no_run(data, capsys, extra, message):
    out = data["root"] / "bad"
    assert _adapt(data, out, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.count("\n") == 0
    assert not out.exists() and not list(data["root"].glob(".bad.tmp-*"))


def test_an_existing_run_is_refused(data, capsys):
    out = data["root"] / "exists"
    out.mkdir()
    assert _adapt(data, out) == 2
    assert "already exists" in capsys.readouterr().err


def test_adapting_keeps_the_parents_class_set(data, tmp_path):
    from data_pipeline.schema import ClassSet

    classes = ClassSet.build(("cnv", "anv", "mel"), {"mel": "Melanoma"}, {"mel"})
    folder = renamed_copy(data["clinic"], tmp_path / "ph2like", "P")
    df = pd.read_csv(folder / "HAM10000_metadata.csv")
    df["dx"] = [classes.codes[i % 3] for i in range(len(df))]
    df.to_csv(folder / "HAM10000_metadata.csv", index=False)
    mcfg = ModelConfig(use_metadata=True, num_classes=3)
    parent = tmp_path / "parent3"
    save_checkpoint(
        FusionNet(mcfg).eval(),
        CheckpointConfig(
            name="tiny3",
            model=mcfg,
            preprocessing=Preprocessing(height=64, width=64),
            classes=classes,
        ),
        parent,
    )
    out = tmp_path / "run3"
    argv = [str(folder), "--from", str(parent), "--ham-dir", "none", "--out", str(out)]
    argv += ["--epochs", "1", "--epoch-samples", "32", "--n-boot", "20", "--threads", "1"]
    assert run_cli(main, argv) == 0
    _, cfg = load_checkpoint(out)
    assert cfg.classes == classes
    assert set(cfg.training["train_class_counts"]) == set(classes.codes)
    block = cfg.metrics["adapt"]["sets"]["ph2like-test"]
    assert block["gain"]["balanced_accuracy"]["low"] is not None
