"""A class set belongs to the checkpoint: a model trained on a non-HAM10000 class set (PH2-like
common nevus / atypical nevus / melanoma, and melanoma vs the rest) trains, evaluates, exports,
serves and stores history under its own classes; the shipped model still predicts HAM10000's 7.

Everything runs on a synthetic folder of 32-pixel images, one training epoch of two batches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from common.cli import run_cli
from common.errors import DataError, DermError
from data_pipeline.schema import (
    CLASSES,
    HAM7,
    ClassSet,
    ClassSetError,
    class_name,
    normalize_target,
    row_classes,
)

PH2 = ClassSet(
    codes=("cnv", "anv", "mel"),
    names=("Common nevus", "Atypical nevus", "Melanoma"),
    malignant=frozenset({"mel"}),
)
MEL_VS_REST = ClassSet(("mel", "other"), ("Melanoma", "Not melanoma"), frozenset({"mel"}))
COLOURS = {"cnv": (170, 120, 90), "anv": (120, 80, 60), "mel": (60, 40, 35), "other": (150, 90, 80)}


def write_folder(root: Path, classes: ClassSet, per_class: int = 10, manifest: bool = True) -> Path:
    """A HAM-format folder (CSV + 32-px JPEGs) whose ``dataset.json`` declares ``classes``, as
    an import with ``--classes native`` writes it."""
    rng = np.random.default_rng(0)
    (root / "images").mkdir(parents=True)
    rows = []
    for dx in classes:
        for j in range(per_class):
            image_id = f"IMD_{dx}_{j:02d}"
            img = np.clip(np.array(COLOURS[dx]) + rng.integers(-25, 25, (32, 32, 3)), 0, 255)
            Image.fromarray(img.astype(np.uint8)).save(root / "images" / f"{image_id}.jpg")
            rows.append(
                {
                    "lesion_id": f"L_{dx}_{j:02d}",
                    "image_id": image_id,
                    "dx": dx,
                    "age": 30 + j,
                    "sex": "female" if j % 2 else "male",
                    "localization": "back",
                }
            )
    pd.DataFrame(rows).to_csv(root / "HAM10000_metadata.csv", index=False)
    if manifest:
        entries = [
            {"code": c, "name": classes.name(c), "malignant": c in classes.malignant}
            for c in classes
        ]
        (root / "dataset.json").write_text(json.dumps({"name": root.name, "classes": entries}))
    return root


def train(data: Path, out: Path) -> Path:
    from scripts import train as train_cli

    argv = [
        "--data-dir", str(data), "--out", str(out), "--splits", str(out.parent / "splits.csv"),
        "--epochs", "1", "--max-train-batches", "2", "--batch-size", "4", "--no-pretrained",
        "--height", "32", "--width", "32", "--threads", "2", "--seed", "1",
    ]  # fmt: skip
    assert run_cli(train_cli.main, argv) == 0
    return out


@pytest.fixture(autouse=True)
def _forget_loaded_models():
    """Loading a model registers its class set for the process (see ``schema.class_name``);
    restore the registry so later test modules see only what they load themselves."""
    from data_pipeline import schema

    loaded, stored = dict(schema._LOADED), dict(schema._STORED)
    yield
    schema._LOADED.clear()
    schema._LOADED.update(loaded)
    schema._STORED.clear()
    schema._STORED.update(stored)


@pytest.fixture(scope="module")
def ph2_run(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ph2")
    data = write_folder(root / "ph2", PH2)
    return data, train(data, root / "run")


# --- the class set itself ------------------------------------------------------------------------


def test_class_set_round_trip_and_validation():
    assert ClassSet.from_dict(PH2.to_dict()) == PH2
    assert ClassSet.from_dict(HAM7.to_dict()) == HAM7 and HAM7.codes == CLASSES
    assert PH2.has_melanoma and not ClassSet(("ben", "mal"), ("B", "M")).has_melanoma
    for bad, match in (
        ((("mel",), ("Melanoma",)), "at least two"),
        ((("mel", "Nevus"), ("a", "b")), "not 1-8 characters"),
        ((("mel", "melanomas"), ("a", "b")), "not 1-8 characters"),
        ((("mel", "mel"), ("a", "b")), "appears twice"),
        ((("mel", "nv"), ("a",)), "2 codes but 1 names"),
        ((("mel", "nv"), ("a", " ")), "one-line display name"),
    ):
        with pytest.raises(ClassSetError, match=match):
            ClassSet(*bad)
    with pytest.raises(ClassSetError, match="'scc' is not one of the class codes"):
        ClassSet(("mel", "nv"), ("a", "b"), frozenset({"scc"}))
    with pytest.raises(ClassSetError, match="must be"):
        ClassSet.from_dict({"names": []})


def test_folder_without_manifest_and_unknown_dx(tmp_path: Path):
    from data_pipeline.ham10000 import folder_classes, load_metadata

    bare = write_folder(tmp_path / "bare", PH2, per_class=2, manifest=False)
    assert folder_classes(bare) == HAM7
    with pytest.raises(DataError, match=r"unknown dx 'cnv'.*dataset.json 'classes' list"):
        load_metadata(bare)
    df = load_metadata(bare, classes=PH2)
    assert df["label"].tolist() == [PH2.index(d) for d in df["dx"]]
    # a native import scored by a HAM10000 model: the error names the folder's own classes
    native = write_folder(tmp_path / "native", PH2, per_class=2)
    with pytest.raises(DataError, match=r"own classes are cnv, anv, mel.*--classes ham7"):
        load_metadata(native, classes=HAM7)


def test_inspect_data_reports_the_folders_classes(tmp_path: Path, capsys):
    from scripts import inspect_data

    data = write_folder(tmp_path / "ph2", PH2, per_class=8)
    argv = ["--data-dir", str(data), "--out", str(tmp_path / "o"), "--json"]
    assert run_cli(inspect_data.main, argv) == 0
    table = json.loads(capsys.readouterr().out)["per_class_split"]["all/images"]
    assert table == {"cnv": 8, "anv": 8, "mel": 8, "total": 24}


# --- train → evaluate → export → serve → store ---------------------------------------------------


@pytest.mark.slow
def test_checkpoint_carries_its_class_set(ph2_run):
    from model.checkpoint import load_checkpoint

    _, run = ph2_run
    raw = json.loads((run / "config.json").read_text())
    assert raw["classes"] == PH2.to_dict()
    assert raw["label_names"] == ["cnv", "anv", "mel"]
    assert raw["model"]["num_classes"] == 3
    assert raw["training"]["train_class_counts"].keys() == {"cnv", "anv", "mel"}
    model, cfg = load_checkpoint(run)
    assert cfg.classes == PH2 and model.classifier.out_features == 3
    assert set(cfg.metrics["val"]["per_class"]) == {"cnv", "anv", "mel"}
    assert "melanoma" in cfg.metrics["val"]  # the set has mel: melanoma figures apply
    assert cfg.onnx  # exported with the checkpoint


@pytest.mark.slow
def test_evaluate_reads_the_models_classes(ph2_run, tmp_path: Path):
    from model.evaluate import evaluate

    data, run = ph2_run
    m = evaluate(data, run, tmp_path / "eval", split="all", bootstrap=20)
    assert m["classes"] == ["cnv", "anv", "mel"] and m["n"] == 30
    assert np.asarray(m["confusion_matrix"]).shape == (3, 3)
    header = (tmp_path / "eval" / "predictions.csv").read_text().splitlines()[0]
    assert "p_cnv,p_anv,p_mel" in header
    assert set(m["intervals"]["by_source"]["ph2"]) >= {"mel_auc", "malignant_auc"}

    from model.compare import compare_predictions, load_predictions

    mine = load_predictions(tmp_path / "eval")
    assert mine.attrs["classes"] == PH2  # from the metrics.json beside it
    rows = {(r.source, r.metric): r for r in compare_predictions(mine, mine, n_boot=20)}
    assert rows[("ph2", "mel_auc")].diff == 0 and ("all", "selection_score") in rows


@pytest.mark.slow
def test_predictor_serves_and_history_stores_its_classes(ph2_run, tmp_path: Path, capsys):
    from data_pipeline.request import PredictionRequest
    from db.session import Database
    from model.predictor import Predictor
    from service import history
    from service.prediction import PredictionService
    from service.report import case_report

    data, run = ph2_run
    predictor = Predictor.from_checkpoint(run)
    assert predictor.classes == PH2 and predictor.runtime == "onnx"
    image = (data / "images" / "IMD_mel_00.jpg").read_bytes()
    with pytest.raises(DermError, match="this model predicts cnv, anv, mel"):
        predictor.predict(image, target="nv")
    pred = predictor.predict(image, age=40, target="anv")
    assert list(pred.probabilities) == ["cnv", "anv", "mel"]
    assert pred.attribution_target == "anv" and pred.to_dict()["top_class_name"] in PH2.names
    torch_pred = Predictor.from_checkpoint(run, runtime="torch").predict(image, age=40)
    assert torch_pred.probabilities == pytest.approx(pred.probabilities, abs=1e-4)

    url = f"sqlite:///{tmp_path / 'h.db'}"
    service = PredictionService(predictor, Database(url))
    try:
        stored = service.predict_and_store(PredictionRequest.build(image, age=40))
        row = service.get(stored.id)
        assert row is not None and list(row.probabilities) == ["cnv", "anv", "mel"]
        listed = [history.table_row(r) for r in service.history()]
        assert listed[0][2] == f"{PH2.name(row.predicted_class)} ({row.predicted_class})"
        assert history.record_dict(row)["predicted_class_name"] in PH2.names
        header = history.csv_columns(predictor.classes.codes)
        assert "p_anv" in header and history.csv_row(row, PH2.codes)[header.index("p_anv")]
        assert service.history({"classes": [row.predicted_class]})  # its codes filter
        service.confirm(stored.id, "anv", "histopathology")
        a = service.agreement()
        assert a.classes == PH2.codes and a.n_confirmed == 1 and a.support["anv"] == 1
        assert row_classes(row.probabilities, row.model_version) == PH2
        svg = case_report(row, fmt="svg").decode()
        assert all(f"{PH2.name(c)} ({c})" in svg for c in PH2) and "Nevus (nv)" not in svg
    finally:
        service.close()

    from data_pipeline import schema
    from scripts import query_history

    schema._LOADED.clear()  # as in a fresh process: the CLI loads no model
    argv = ["--db", url, "--dx", row.predicted_class, "--format", "csv"]
    assert run_cli(query_history.main, argv) == 0
    header, line = capsys.readouterr().out.splitlines()[:2]
    assert "p_cnv" in header and "p_anv" in header and line.startswith(f"{row.id},")
    assert run_cli(query_history.main, ["--db", url, "--agreement"]) == 0
    assert "confirmed  cnv  anv  mel  total" in capsys.readouterr().out
    # the database carries the model's class set (model_classes): without the model the CLI
    # still shows its names and accepts every one of its codes, not only stored top classes
    assert run_cli(query_history.main, ["--db", url, "--id", str(row.id), "--format", "json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["predicted_class_name"] == PH2.name(row.predicted_class) != row.predicted_class
    other = next(c for c in PH2.codes if c != row.predicted_class)
    assert run_cli(query_history.main, ["--db", url, "--dx", other, "--format", "csv"]) == 0
    argv = ["--db", url, "--confirm", str(row.id), "--dx", other, "--confirm-source", "clinician"]
    assert run_cli(query_history.main, argv) == 0
    schema._LOADED.clear()
    schema._STORED.clear()
    with Database(url).session() as session:
        from db.queries import model_class_sets

        assert model_class_sets(session) == {row.model_version: PH2}


@pytest.mark.slow
def test_app_serves_its_classes_and_lists_them_in_history(ph2_run, tmp_path: Path):
    """The app around the 3-class model: bars, the class to explain and the history's names."""
    import socket

    from gradio_client import Client, handle_file

    from app.__main__ import launch
    from app.ui.demo import build_demo
    from service.prediction import PredictionService

    data, run = ph2_run
    service = PredictionService.create(run, db_url=f"sqlite:///{tmp_path / 'app.db'}")
    demo = build_demo(service)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    served = launch(demo, host="127.0.0.1", port=port, quiet=True)
    try:
        client = Client(served.local_url, verbose=False)
        image = handle_file(str(data / "images" / "IMD_anv_00.jpg"))
        bars, *_, result = client.predict(image, 40, "male", "back", api_name="/predict")
        assert bars.count('class="prob-row"') == 3
        assert all(f"{PH2.name(c)} ({c})" in bars for c in PH2)
        assert list(result["probabilities"]) and set(result["probabilities"]) == set(PH2.codes)
        table, _, csv_path = client.predict("", "", [], 0, "any", "any", api_name="/history")
        top = result["top_class"]
        assert any(f"{PH2.name(top)} ({top})" in str(cell) for cell in table["data"][0])
        assert "p_cnv" in Path(csv_path).read_text().splitlines()[0]
        batch = [handle_file(str(data / "images" / f"IMD_{c}_01.jpg")) for c in ("cnv", "mel")]
        *_, batch_csv = client.predict(batch, None, api_name="/batch")
        header = Path(batch_csv).read_text().splitlines()[0].split(",")
        assert [h for h in header if h.startswith("p_")] == ["p_cnv", "p_anv", "p_mel"]
    finally:
        demo.close()
        service.close()


# --- the rules -----------------------------------------------------------------------------------


@pytest.mark.slow
def test_mel_vs_rest_trains_and_sources_must_share_classes(tmp_path: Path):
    from data_pipeline.sources import load_sources
    from model.checkpoint import load_config

    data = write_folder(tmp_path / "binary", MEL_VS_REST, per_class=12)
    run = train(data, tmp_path / "run")
    cfg = load_config(run)
    assert cfg.classes == MEL_VS_REST and cfg.model.num_classes == 2
    assert cfg.metrics["val"]["classes"] == ["mel", "other"]
    ph2 = write_folder(tmp_path / "ph2", PH2, per_class=2)
    with pytest.raises(DataError, match="must share the primary's \\(mel, other\\)"):
        load_sources(data, tmp_path / "run" / "splits.csv", extra_train=[ph2])


def test_selection_without_melanoma_uses_malignant_auc():
    from model.metrics import compute_metrics
    from model.scoring import SELECTION_RULE_NO_MELANOMA, selection_rule, set_score

    benign_malignant = ClassSet(("ben", "mal"), ("Benign", "Malignant"), frozenset({"mal"}))
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.6, 0.4]])
    m = compute_metrics(y, probs, benign_malignant)
    assert "melanoma" not in m and m["malignant"]["auc"] == pytest.approx(0.75)
    assert set_score(m) == pytest.approx(0.5 * (m["balanced_accuracy"] + 0.75))
    assert selection_rule(benign_malignant) == SELECTION_RULE_NO_MELANOMA
    assert "malignant-vs-benign" in SELECTION_RULE_NO_MELANOMA


def test_shipped_model_still_predicts_ham7():
    from model.checkpoint import load_config

    cfg = load_config(None)
    assert cfg.classes == HAM7 and cfg.model.num_classes == 7
    assert class_name("mel") == "Melanoma" and class_name("zzz") == "zzz"
    assert normalize_target("MEL") == "mel"
    with pytest.raises(DermError, match="Unknown explanation target"):
        normalize_target("cancer")
