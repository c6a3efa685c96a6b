"""The Gradio app, exercised through a real server and ``gradio_client`` (as an API user would).

One app is started per module on a free localhost port, around a tiny untrained checkpoint and a
temporary SQLite history; tests compare the history row count before and after each call, so
every refused input is shown to store nothing.
"""

from __future__ import annotations

import csv
import io
import socket
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import gradio as gr
import httpx
import numpy as np
import pytest
from gradio_client import Client, handle_file
from PIL import Image
from sqlalchemy.exc import OperationalError

from app import views
from app.__main__ import build_parser, launch, main, parse_auth
from app.ui import history as history_ui
from app.ui.analyse import EXAMPLES_DIR
from app.ui.demo import build_demo as make_frontend
from common.errors import DermError
from common.text import DISCLAIMER
from data_pipeline.schema import CLASS_NAMES, CLASSES
from data_pipeline.transforms import Preprocessing
from service import history
from service.prediction import PredictionService

EXAMPLE = EXAMPLES_DIR / "ISIC_0029281.jpg"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def predict(client: Client, image, age=None, sex=None, site=None):
    return client.predict(
        handle_file(str(image)) if image is not None else None, age, sex, site, api_name="/predict"
    )


@pytest.fixture(scope="module")
def app(tiny_checkpoint, tmp_path_factory):
    db_path = tmp_path_factory.mktemp("appdb") / "history.db"
    service = PredictionService.create(tiny_checkpoint, db_url=f"sqlite:///{db_path}")
    demo = make_frontend(service)
    served = launch(demo, host="127.0.0.1", port=free_port(), quiet=True)
    client = Client(served.local_url, verbose=False)
    yield SimpleNamespace(service=service, demo=demo, client=client, url=served.local_url)
    demo.close()
    service.close()


@pytest.fixture
def files(tmp_path: Path) -> Path:
    return tmp_path


# --- predictions ---------------------------------------------------------------------------------


def test_example_files_are_documented():
    readme = (EXAMPLES_DIR / "README.md").read_text()
    with (EXAMPLES_DIR / "examples.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert 1 <= len(rows) <= 8
    assert "10.1038/sdata.2018.161" in readme and "CC BY-NC 4.0" in readme
    for r in rows:
        assert (EXAMPLES_DIR / r["file"]).is_file()
        assert r["dx"] in CLASSES and f"`{r['file']}`" in readme


def test_predict_with_metadata_returns_probabilities_and_stores_one_row(app):
    before = app.service.count()
    label, alerts, overlay, chart, info, result = predict(app.client, EXAMPLE, 35, "female", "back")

    # a bar per class, largest first: the top class leads and is not printed twice
    assert label.count('class="prob-row"') == len(CLASSES)
    assert all(label.count(history.class_label(c)) == 1 for c in CLASSES)
    assert all(CLASS_NAMES[c] in history.class_label(c) for c in CLASSES)
    assert sum(result["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
    first = label.index('data-class="')
    assert label[first:].startswith(f'data-class="{result["top_class"]}"')

    assert app.service.count() == before + 1
    row_id = result["prediction_id"]
    assert result["stored"] is True and f"#{row_id}" in info
    record = app.service.get(row_id)
    assert (record.age, record.sex, record.site) == (35.0, "female", "back")
    assert record.probabilities == pytest.approx(result["probabilities"])
    assert result["model_version"] in info and record.model_version == result["model_version"]

    shown = np.asarray(Image.open(overlay))
    assert shown.ndim == 3 and shown.shape[2] == 3 and min(shown.shape[:2]) >= 32
    assert Image.open(chart).size[0] > 100
    assert DISCLAIMER in alerts


def test_predict_without_metadata(app):
    before = app.service.count()
    label, *_, result = predict(app.client, EXAMPLE)
    assert label.count('class="prob-row"') == len(CLASSES)
    assert app.service.count() == before + 1
    record = app.service.get(result["prediction_id"])
    assert (record.age, record.sex, record.site) == (None, "unknown", "unknown")
    assert result["metadata"] == {"age": None, "sex": "unknown", "site": "unknown"}


def test_alerts_show_malignant_flag_and_warnings(app):
    """The tiny untrained model is never confident, so the low-confidence warning must show;
    the malignant flag mirrors the predictor's decision exactly."""
    *_, alerts, _, _, _, result = predict(app.client, EXAMPLE, 60, "male", "face")
    assert any(w.startswith("Low confidence") for w in result["warnings"])
    assert "Low confidence" in alerts
    if result["malignant_flag"]:
        assert "Possible malignant lesion" in alerts
        for c in result["malignant_flag"]:
            assert CLASS_NAMES[c] in alerts
    else:
        assert "No malignant class ranks high" in alerts


def _cmyk_jpeg(path: Path) -> Path:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (150, 200, 4), dtype=np.uint8), "CMYK").save(path)
    return path


def _rgba_png(path: Path) -> Path:
    arr = np.zeros((150, 200, 4), dtype=np.uint8)
    arr[..., 0], arr[..., 3] = 180, np.linspace(0, 255, 200, dtype=np.uint8)[None, :]
    Image.fromarray(arr, "RGBA").save(path)
    return path


def _gray16_png(path: Path) -> Path:
    arr = np.linspace(0, 65535, 150 * 200).reshape(150, 200).astype(np.uint16)
    Image.fromarray(arr).save(path)
    assert Image.open(path).mode.startswith("I")
    return path


@pytest.mark.parametrize(
    ("make", "name"),
    [(_cmyk_jpeg, "cmyk.jpg"), (_rgba_png, "rgba.png"), (_gray16_png, "gray16.png")],
)
def test_unusual_image_modes_are_converted_not_refused(app, files, make, name):
    path = make(files / name)
    before = app.service.count()
    label, *_, result = predict(app.client, path, 50, "male", "trunk")
    assert label.count('class="prob-row"') == len(CLASSES)
    assert app.service.count() == before + 1
    record = app.service.get(result["prediction_id"])
    assert (record.image_width, record.image_height) == (200, 150)


# --- refused inputs -------------------------------------------------------------------------------


def _text_file(d: Path) -> Path:
    p = d / "notes.txt"
    p.write_text("this is not an image")
    return p


def _truncated_jpeg(d: Path) -> Path:
    p = d / "truncated.jpg"
    p.write_bytes(EXAMPLE.read_bytes()[:1500])
    return p


def _empty_file(d: Path) -> Path:
    p = d / "empty.png"
    p.write_bytes(b"")
    return p


def _one_pixel(d: Path) -> Path:
    p = d / "pixel.png"
    Image.new("RGB", (1, 1), (200, 100, 50)).save(p)
    return p


def _bomb(d: Path, size: tuple[int, int], name: str) -> Path:
    p = d / name
    Image.new("1", size).save(p, optimize=True)  # a few KB on disk, tens of megapixels decoded
    assert p.stat().st_size < 2_000_000
    return p


BAD_INPUTS = {
    "not an image": (_text_file, {}, "notes.txt: not an image file"),
    "truncated JPEG": (_truncated_jpeg, {}, "corrupt or truncated"),
    "empty file": (_empty_file, {}, "empty.png: the file is empty"),
    "1x1 image": (_one_pixel, {}, "too small"),
    "70 MP bomb": (lambda d: _bomb(d, (10_000, 7_000), "bomb70.png"), {}, "too large"),
    "200 MP bomb": (lambda d: _bomb(d, (20_000, 10_000), "bomb200.png"), {}, "too large"),
    "no image": (lambda d: None, {}, "No image was submitted"),
    "age too high": (lambda d: EXAMPLE, {"age": 150}, "Age 150 is outside 0-120"),
    "negative age": (lambda d: EXAMPLE, {"age": -3}, "Age -3 is outside 0-120"),
    "age not a number": (lambda d: EXAMPLE, {"age": "forty"}, "is not a number of years"),
    "unknown sex": (lambda d: EXAMPLE, {"sex": "alien"}, "Unknown sex 'alien'"),
    "unknown site": (lambda d: EXAMPLE, {"site": "elbow"}, "Unknown body site 'elbow'"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_refused_with_its_message_and_nothing_stored(app, files, case):
    make, kwargs, message = BAD_INPUTS[case]
    image = make(files)
    before = app.service.count()
    with pytest.raises(Exception) as info:
        predict(app.client, image, **kwargs)
    assert type(info.value).__name__ == "AppError"
    assert message in str(info.value)
    assert "Traceback" not in str(info.value)
    assert app.service.count() == before


def test_storage_failure_is_shown_not_hidden(app, monkeypatch):
    def broken_session(**_kwargs):
        raise OperationalError("INSERT INTO predictions", {}, Exception("database is locked"))

    before = app.service.count()
    monkeypatch.setattr(app.service.db, "session", broken_session)
    label, alerts, *_, info, result = predict(app.client, EXAMPLE, 40, "female", "back")
    monkeypatch.undo()
    assert label.count('class="prob-row"') == len(CLASSES)  # the prediction itself is still shown
    assert result["stored"] is False and result["prediction_id"] is None
    assert "could not be stored" in result["storage_error"]
    assert "Not saved to history" in alerts and "database is locked" in alerts
    assert "not saved" in info
    assert app.service.count() == before


# --- history --------------------------------------------------------------------------------------


def test_history_filter_table_csv_and_detail(app):
    *_, result = predict(app.client, EXAMPLE, 77, "male", "scalp")
    row_id, top = result["prediction_id"], result["top_class"]

    table, summary, csv_path = app.client.predict(
        "", "", [top], 0, "male", "scalp", api_name="/history"
    )
    ids = [r[1] for r in table["data"]]
    assert row_id in ids and ids == sorted(ids, reverse=True)
    assert table["headers"] == views.HISTORY_TABLE_COLUMNS
    n = app.service.count({"classes": [top], "sex": "male", "site": "scalp"})
    assert f"**{views.plural(n, 'matching prediction')}**" in summary

    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == n and {int(r["id"]) for r in rows} == set(ids)
    mine = next(r for r in rows if int(r["id"]) == row_id)
    assert mine["predicted_class"] == top and float(mine["age"]) == 77
    assert float(mine[f"p_{top}"]) == pytest.approx(result["top_probability"])

    shown_id, image, detail, probs, chart = app.client.predict(row_id, api_name="/history_item")
    assert shown_id == str(row_id) and f"Prediction #{row_id}" in detail
    assert "age 77" in detail and "body site scalp" in detail
    assert probs[probs.index('data-class="') :].startswith(f'data-class="{top}"')
    assert np.asarray(Image.open(image)).shape[2] == 3 and Image.open(chart).size[0] > 100

    # A day range that excludes today finds nothing (and still gives a CSV with a header).
    table, summary, csv_path = app.client.predict(
        "2000-01-01", "2000-12-31", [], 0, "any", "any", api_name="/history"
    )
    assert table["data"] in ([], [[""] * len(views.HISTORY_TABLE_COLUMNS)]) or not any(
        r[1] for r in table["data"]
    )
    assert "No stored predictions match" in summary
    assert Path(csv_path).read_text().startswith("id,created_at,")


def test_history_csv_holds_every_row_beyond_the_table(app, monkeypatch):
    while app.service.count() < 5:
        predict(app.client, EXAMPLE)
    monkeypatch.setattr(history_ui, "HISTORY_PAGE", 2)
    monkeypatch.setattr(history_ui, "CSV_PAGE", 2)  # several database pages per export
    table, summary, csv_path = app.client.predict("", "", [], 0, "any", "any", api_name="/history")
    total = app.service.count()
    pages = -(-total // 2)
    assert len(table["data"]) == 2 and f"page 1 of {pages}: rows 1–2" in summary
    assert "all in the CSV" in summary
    with open(csv_path, newline="") as fh:
        ids = [int(r["id"]) for r in csv.DictReader(fh)]
    assert len(ids) == total == len(set(ids))
    assert ids[:2] == [r[1] for r in table["data"]]
    # paging past the newest rows: page 2 holds the next two, a page past the end the last
    table2, summary2, _ = app.client.predict("", "", [], 0, "any", "any", 2, api_name="/history")
    assert [r[1] for r in table2["data"]] == ids[2:4] and "rows 3–4" in summary2
    last, summary_last, _ = app.client.predict(
        "", "", [], 0, "any", "any", 999, api_name="/history"
    )
    assert [r[1] for r in last["data"]] == ids[2 * (pages - 1) :]
    assert f"page {pages} of {pages}" in summary_last


@pytest.mark.parametrize(
    ("since", "until", "message"),
    [
        ("2025-13-45", "", "Bad since date"),
        ("yesterday", "", "use YYYY-MM-DD"),
        ("2025-06-02", "2025-06-01", "is after the until date"),
    ],
)
def test_history_bad_filter_is_explained(app, since, until, message):
    with pytest.raises(Exception) as info:
        app.client.predict(since, until, [], 0, "any", "any", api_name="/history")
    assert message in str(info.value)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (987654, "No stored prediction has id 987654"),
        ("abc", "is not a whole number"),
        ("", "Enter a prediction id"),
    ],
)
def test_history_item_bad_id(app, value, message):
    with pytest.raises(Exception) as info:
        app.client.predict(value, api_name="/history_item")
    assert message in str(info.value)


# --- About tab ------------------------------------------------------------------------------------


def test_model_card_without_metrics_renders(app):
    card = views.model_card_markdown(app.service.predictor.config)
    assert "No evaluation metrics are stored" in card
    assert DISCLAIMER in card and "HAM10000" in card and "Lesion-grouped" in card
    assert "200×150" in card and "fair-skinned" in card and "Only 7 classes" in card


def test_model_card_with_metrics_shows_them_and_the_command(app):
    from copy import deepcopy

    cfg = deepcopy(app.service.predictor.config)
    per = {
        c: {"recall": 0.5, "precision": 0.4, "f1": 0.45, "support": 10, "auc": 0.9} for c in CLASSES
    }
    m = {
        "n": 70,
        "accuracy": 0.81,
        "balanced_accuracy": 0.642,
        "macro_f1": 0.6,
        "macro_auc": 0.93,
        "top3_accuracy": 0.95,
        "ece": 0.03,
        "per_class": per,
    }
    cfg.metrics = {"val": dict(m, balanced_accuracy=0.66), "test": m}
    cfg.training = {
        "command": "python -m scripts.train --data-dir ../shared/ham10000 --out runs/x",
        "split_file": "splits/ham10000_seed42.csv",
        "split_sha256": "ab" * 32,
    }
    card = views.model_card_markdown(cfg, "runs/x")
    assert "64.2%" in card and "66.0%" in card and "0.930" in card
    assert "python -m scripts.train --data-dir ../shared/ham10000 --out runs/x" in card
    assert "--checkpoint runs/x" in card and "Melanoma (mel)" in card
    assert "No evaluation metrics" not in card


# --- launching: --auth, --share, ports ------------------------------------------------------------


def test_parse_auth():
    assert parse_auth("alice:s3cret") == ("alice", "s3cret")
    assert parse_auth("bob:pa:ss:word") == ("bob", "pa:ss:word")
    args = build_parser().parse_args(["--auth", "a:b", "--auth", "c:d"])
    assert args.auth == [("a", "b"), ("c", "d")]


@pytest.mark.parametrize("bad", ["alice", ":secret", "alice:", ""])
def test_bad_auth_is_a_clear_cli_error(bad, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--auth", bad])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--auth" in err and "expected USER:PASSWORD" in err


def test_auth_protects_the_app(app, tiny_checkpoint):
    demo = make_frontend(app.service)
    served = launch(demo, port=free_port(), auth=[("alice", "pa:ss")], quiet=True)
    try:
        assert httpx.get(served.local_url + "config", timeout=30).status_code == 401
        with pytest.raises(Exception, match="credentials were not provided"):
            Client(served.local_url, verbose=False)
        client = Client(served.local_url, auth=("alice", "pa:ss"), verbose=False)
        _, summary, _ = client.predict("", "", [], 0, "any", "any", api_name="/history")
        assert "matching predictions" in summary
    finally:
        demo.close()


@pytest.mark.slow
def test_share_offline_keeps_serving_locally(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    """Real Gradio share code path, with the share server made unreachable (as offline): the CLI
    prints that no link could be made, warns about the missing --auth, and serves locally."""
    import gradio.networking

    monkeypatch.setattr(gradio.networking, "GRADIO_API_SERVER", "http://127.0.0.1:9/tunnel")
    monkeypatch.delenv("GRADIO_SHARE_SERVER_ADDRESS", raising=False)
    seen = {}

    def check_then_stop(self):
        seen["share_url"] = self.share_url
        seen["status"] = httpx.get(self.local_url, timeout=30).status_code
        c = Client(self.local_url, verbose=False)
        seen["summary"] = c.predict("", "", [], 0, "any", "any", api_name="/history")[1]
        self.close()

    monkeypatch.setattr(gr.Blocks, "block_thread", check_then_stop)
    db = f"sqlite:///{tmp_path / 'share.db'}"
    port = free_port()
    code = main(["--checkpoint", str(tiny_checkpoint), "--db", db, "--port", str(port), "--share"])
    out = capsys.readouterr().out
    assert code == 0
    assert seen["share_url"] is None and seen["status"] == 200
    assert "No stored predictions match" in seen["summary"]
    assert "--share without --auth" in out
    assert "No public share link could be made" in out and f"127.0.0.1:{port}" in out


def test_share_that_raises_falls_back_to_local(app, monkeypatch, capsys):
    """A Gradio version whose launch(share=True) raises must not stop the app either."""
    real_launch = gr.Blocks.launch

    def raising_launch(self, *args, share=None, **kwargs):
        if share:
            raise RuntimeError("Could not get share link from Gradio API Server.")
        return real_launch(self, *args, share=share, **kwargs)

    monkeypatch.setattr(gr.Blocks, "launch", raising_launch)
    demo = make_frontend(app.service)
    served = launch(demo, port=free_port(), share=True, auth=[("u", "p")], quiet=True)
    try:
        out = capsys.readouterr().out
        assert served.share_url is None
        assert "Could not create a public share link" in out
        assert "No public share link could be made" in out and "--share without" not in out
        assert httpx.get(served.local_url, timeout=30).status_code == 200
    finally:
        demo.close()


def test_port_in_use_is_a_clear_error(app):
    port = int(app.url.rstrip("/").rsplit(":", 1)[1])
    demo = make_frontend(app.service)
    with pytest.raises(DermError, match="--port"):
        launch(demo, port=port, quiet=True)


def test_csv_writer_handles_no_rows(tmp_path):
    out = history.write_csv([], tmp_path / "h.csv")
    header = next(csv.reader(io.StringIO(out.read_text())))
    assert header[:3] == ["id", "created_at", "predicted_class"]
    assert [f"p_{c}" for c in CLASSES] == [h for h in header if h.startswith("p_")]


def test_no_store_images_keeps_history_without_thumbnails(tiny_checkpoint, tmp_path):
    service = PredictionService.create(
        tiny_checkpoint, db_url=f"sqlite:///{tmp_path / 'private.db'}", store_images=False
    )
    demo = make_frontend(service)
    try:
        client = Client(launch(demo, port=free_port(), quiet=True).local_url, verbose=False)
        *_, result = predict(client, EXAMPLE, 50, "female", "face")
        row_id = result["prediction_id"]
        assert service.get(row_id).thumbnail is None
        shown_id, image, detail, probs, _ = client.predict(row_id, api_name="/history_item")
        assert shown_id == str(row_id) and image is None and "No image stored" in detail
        assert probs.count('class="prob-row"') == len(CLASSES)
    finally:
        demo.close()
        service.close()


def test_missing_checkpoint_is_a_clear_cli_error(tmp_path, capsys):
    code = main(["--checkpoint", str(tmp_path / "nope"), "--db", f"sqlite:///{tmp_path / 'x.db'}"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "is not a checkpoint folder" in err


def test_model_card_reads_sources_geometry_and_ood_from_the_config(app):
    """Newer checkpoints record their data sources and geometry; the card uses them, not code."""
    from copy import deepcopy

    cfg = deepcopy(app.service.predictor.config)
    cfg.preprocessing = SimpleNamespace(
        width=224,
        height=224,
        source_aspect=1.0,
        geometry={"crop": "centre square", "source_size": [600, 450]},
        color_constancy="shades of grey (p=6)",
    )
    cfg.training = {
        "sources": [
            {
                "name": "HAM10000",
                "role": "train",
                "n_images": 10015,
                "classes": list(CLASSES),
                "citation": "Tschandl et al. 2018",
            },
            {"name": "ISIC2017", "role": "external_val", "citation": "Codella et al. 2018"},
        ]
    }
    cfg.ood = {"threshold": 0.5, "percentile": 95.0}
    card = views.model_card_markdown(cfg)
    assert "crop centre square" in card and "resized to 224×224 px" in card
    assert "colour constancy: shades of grey (p=6)" in card
    assert "600×450 px" in card and "200×150" not in card
    assert "cropped to 4:3" not in card
    assert "Tschandl et al. 2018" in card and "10015 images" in card
    assert "**ISIC2017** (Codella et al. 2018), external validation" in card
    assert "95th percentile" in card and "99th" not in card
    assert views.training_dataset_name(cfg) == "HAM10000"


def test_model_card_of_a_multi_source_checkpoint(app):
    """The primary source counts as training data, an external set does not, and the per-source
    table is one Markdown table (not paragraphs of pipes)."""
    from copy import deepcopy

    cfg = deepcopy(app.service.predictor.config)
    cfg.training = {
        "sources": [
            {"name": "ham10000", "role": "primary"},
            {"name": "isic2017-train", "role": "train"},
            {"name": "isic2017-val", "role": "external_val"},
        ]
    }
    mel = {"auc": 0.87, "sens_at_spec90": 0.7}
    cfg.metrics = {
        "test": {"n": 10, "balanced_accuracy": 0.7, "melanoma": mel, "malignant": {"auc": 0.9}},
        "external": {"isic2017-val": {"n": 5, "balanced_accuracy": 0.8, "melanoma": mel}},
    }
    assert views.training_dataset_name(cfg) == "ham10000 + isic2017-train"
    card = views.model_card_markdown(cfg)
    assert "| Set | n |" in card and "|---|---|---|---|---|---|\n| HAM10000 test | 10 |" in card
    assert "\n| isic2017-val (external) | 5 | 80.0% | 0.870 | 70.0% | — |" in card
    assert "bootstrap interval" not in card
    # a checkpoint that stores 95 % intervals shows them beside each figure
    ci = {"value": 0.8, "low": 0.724, "high": 0.871}
    cfg.metrics["intervals"] = {
        "n_boot": 1000,
        "sets": {"isic2017-val": {"balanced_accuracy": ci, "mel_auc": {**ci, "low": None}}},
    }
    card = views.model_card_markdown(cfg)
    assert "95 % bootstrap interval, 1000 draws of whole lesions" in card
    assert "\n| isic2017-val (external) | 5 | 80.0% [72.4–87.1%] | 0.870 | 70.0% | — |" in card
    assert "\n| HAM10000 test | 10 | 70.0% | " in card  # no interval stored for it
    old = deepcopy(app.service.predictor.config)  # a v1 checkpoint: no sources, 4:3 crop
    old.preprocessing, old.training = Preprocessing(), {}
    old.ood = {**old.ood, "percentile": 99.0}
    legacy = views.model_card_markdown(old)
    assert "cropped to 4:3" in legacy and "10.1038/sdata.2018.161" in legacy
    assert "99th percentile" in legacy


def test_identical_output_images_get_their_own_cache_files():
    """Gradio rewrites a cached output file named by the hash of its bytes: two users getting the
    same picture at once must not share (and truncate) one file."""
    from gradio.utils import get_upload_folder
    from PIL import Image

    from app.ui.common import output_file

    rgb = (np.arange(40 * 30 * 3) % 251).astype(np.uint8).reshape(40, 30, 3)
    for kind in ("panel", "chart"):
        a, b = output_file(rgb, kind), output_file(rgb, kind)
        assert a != b  # same picture, two responses: two files
        for path in (a, b):
            assert Path(path).parent == Path(get_upload_folder())  # served as is
    chart = np.asarray(Image.open(output_file(rgb, "chart")).convert("RGB"))
    assert np.array_equal(chart, rgb)  # charts stay lossless
    panel = Image.open(output_file(rgb, "panel"))
    assert panel.format == "JPEG" and panel.size == (30, 40)
    assert output_file(None) is None


def test_served_output_images_are_removed_by_the_cache_clean_up(app):
    """The panel and chart files :func:`output_file` writes are registered with the app, so
    Gradio's ``delete_cache`` (every hour; every minute with --no-store-images) deletes them."""
    from gradio.route_utils import delete_files_created_by_app
    from gradio.utils import get_upload_folder

    from app.ui.common import OUTPUT_PREFIX

    def ours() -> set[Path]:
        return set(Path(get_upload_folder()).glob(f"{OUTPUT_PREFIX}*"))

    before = ours()
    predict(app.client, EXAMPLE, 50, "female", "back")
    new = ours() - before
    assert {p.suffix for p in new} == {".jpg", ".png"}  # the heatmap panel and the chart
    delete_files_created_by_app(app.demo, None)
    assert not any(p.exists() for p in new)


# --- records: named API, forms, delete means gone (issue 24) -------------------------------------


def test_api_parameters_are_named_and_no_helper_endpoint_is_public(app):
    """``gradio_client`` users see ``image, age, sex, ...``, not ``param_0 ...``, and only the
    documented endpoints (no ``/lambda_N`` helpers)."""
    api = app.client.view_api(print_info=False, return_format="dict")
    named = {
        name: [p["parameter_name"] for p in ep["parameters"]]
        for name, ep in api["named_endpoints"].items()
    }
    filters = ["since", "until", "classes", "min_prob", "sex", "site"]
    assert named == {
        "/predict": ["image", "age", "sex", "site", "explain_class", "opacity"],
        "/batch": ["files", "metadata"],
        "/history": [*filters, "page"],
        "/history_item": ["prediction_id"],
        "/confirm": ["prediction_id", "dx", "source", "note"],
        "/report": ["prediction_id"],
        "/delete": ["prediction_id"],
        "/agreement": filters,
    }
    assert not api["unnamed_endpoints"]
    # named parameters work as keywords, and the optional ones may be left out
    *_, result = app.client.predict(
        image=handle_file(str(EXAMPLE)), age="50", sex="male", site="back", api_name="/predict"
    )
    record = app.service.get(result["prediction_id"])
    assert (record.age, record.sex, record.site) == (50.0, "male", "back")


def _noise_png(path: Path, seed: int) -> Path:
    """A unique image (no example shares its bytes, so its upload is its own file)."""
    rgb = np.random.default_rng(seed).integers(0, 255, (48, 64, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return path


def _app_files() -> set[Path]:
    """Every file in Gradio's cache and in every export folder of this process."""
    import os
    import tempfile

    from gradio.utils import get_upload_folder

    from app.ui.common import EXPORT_PREFIX

    roots = [Path(get_upload_folder())]
    roots += Path(tempfile.gettempdir()).glob(f"{EXPORT_PREFIX}{os.getpid()}-*")
    return {p.resolve() for root in roots for p in root.rglob("*") if p.is_file()}


def _file_url(url: str, path: Path) -> str:
    return f"{url.rstrip('/')}/gradio_api/file={path}"


@pytest.fixture
def private_app(tiny_checkpoint, tmp_path, monkeypatch):
    """An app with its own Gradio cache and temp folder (the machine's /tmp/gradio is shared
    with other test runs, whose files must not look like this app's)."""
    import tempfile

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    (tmp_path / "tmp").mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    service = PredictionService.create(tiny_checkpoint, db_url=f"sqlite:///{tmp_path / 'h.db'}")
    demo = make_frontend(service)
    url = launch(demo, host="127.0.0.1", port=free_port(), quiet=True).local_url
    yield SimpleNamespace(service=service, url=url)
    demo.close()
    service.close()


def test_delete_removes_every_file_the_app_made_for_the_record(private_app, files):
    """Plant records (Analyse, a batch, another record kept), open them, make their reports and
    downloads; every file this produced is on disk and served. Delete the two: none of their
    files is on disk or served any more, and the kept record's files still are."""
    app = private_app
    # a client that does not download results: they would land in the server's cache folder
    # (same machine, same temp dir) and look like files the server made
    client = Client(app.url, verbose=False, download_files=False)

    def path_of(value: Any) -> Path:
        return Path(value["path"] if isinstance(value, dict) else value).resolve()

    def plant(name: str, seed: int) -> int:
        image = handle_file(str(_noise_png(files / name, seed)))
        return client.predict(image, "40", "female", "face", api_name="/predict")[-1][
            "prediction_id"
        ]

    kept = plant("kept.png", 1)
    client.predict(str(kept), api_name="/history_item")
    kept_report = path_of(client.predict(str(kept), api_name="/report"))
    before = _app_files()

    pid = plant("patient.png", 2)
    batch_image = handle_file(str(_noise_png(files / "batch_patient.png", 3)))
    _summary, table, _csv = client.predict([batch_image], None, api_name="/batch")
    batch_pid = int(str(table["data"][0][2]).lstrip("#"))
    served = []
    for one in (pid, batch_pid):
        _id, image, *_rest, chart = client.predict(str(one), api_name="/history_item")
        served += [
            path_of(image),
            path_of(chart),
            path_of(client.predict(str(one), api_name="/report")),
        ]
    client.predict("", "", [], 0, "any", "any", api_name="/history")
    # Gradio's upload parser leaves an empty placeholder per upload (tmpXXXX): no bytes of it
    made = {p for p in _app_files() - before if p.stat().st_size > 0}
    assert {".png", ".jpg", ".pdf", ".csv"} <= {p.suffix for p in made}
    assert any(p.name == "patient.png" for p in made)  # the uploaded original
    assert any(p.name == "batch_patient.png" for p in made)
    assert set(served) <= made
    cache = Path(gr.utils.get_upload_folder()).resolve()
    cached = [p for p in made if cache in p.parents]
    for path in cached:
        assert httpx.get(_file_url(app.url, path)).status_code == 200, path

    for one in (pid, batch_pid):
        status, *_ = client.predict(str(one), api_name="/delete")
        assert f"#{one} was deleted" in status
        assert app.service.get(one) is None
    left = [p for p in made if p.exists()]
    assert left == [], "\n".join(map(str, left))
    for path in cached:  # Gradio answers 403 (not 404) for a file that is not there
        assert httpx.get(_file_url(app.url, path)).status_code in (403, 404), path
    # the other record keeps its upload, panels and report (CSV listings go with any delete)
    assert kept_report.is_file()
    assert all(p.exists() for p in before if p.suffix != ".csv")


def test_opening_a_record_loads_its_own_confirmation_never_the_previous_one(app):
    from app.ui.history import confirm_record, confirmation_form

    a = predict(app.client, EXAMPLE, 40, "female", "back")[-1]["prediction_id"]
    b = predict(app.client, EXAMPLE, 41, "male", "face")[-1]["prediction_id"]
    confirm_record(app.service, a, "mel", "histopathology", "excised 2026-01")
    assert confirmation_form(app.service, a) == {
        "confirm_dx": "mel",
        "confirm_source": "histopathology",
        "confirm_note": "excised 2026-01",
    }
    assert confirmation_form(app.service, b) == {
        "confirm_dx": None,
        "confirm_source": None,
        "confirm_note": "",
    }
    # a typed display label counts as its code; an empty form is refused, nothing stored
    confirm_record(app.service, b, "Melanocytic nevus (nv)", "clinician")
    assert app.service.get(b).confirmed_dx == "nv"
    with pytest.raises(gr.Error, match="Choose the confirmed diagnosis"):
        confirm_record(app.service, a, None, None, "")
    assert app.service.get(a).confirmed_note == "excised 2026-01"


def test_actions_are_refused_for_an_id_the_form_does_not_show():
    """The confirm, report and delete buttons act on the record the page shows: a click sent
    with another id in the box (before its clearing arrived) is refused, nothing is called."""
    from app.ui.history import _shown_only

    calls = []
    guarded = _shown_only(lambda prediction_id, dx: calls.append((prediction_id, dx)))
    with pytest.raises(gr.Error, match="shows prediction #3, not #4"):
        guarded("4", "mel", 3)
    assert calls == []
    guarded("#3", "mel", 3)  # the shown record
    guarded("5", "nv", None)  # an API call names its id itself (no page state)
    assert calls == [("#3", "mel"), ("5", "nv")]


def test_explaining_another_class_keeps_the_saved_id(app):
    from app.ui.analyse import analyse, explain_again

    out = analyse(app.service, str(EXAMPLE), "40", "female", "back")
    pid = out["result"]["prediction_id"]
    again = explain_again(
        app.service, str(EXAMPLE), "40", "female", "back", "mel", 0.5, out["view"]
    )
    assert f"saved to history as **#{pid}**" in again["explained"]
    assert "Melanoma" in again["explained"] and again["view"]["id"] == pid


def test_percentages_never_round_across_the_threshold_they_are_compared_with():
    assert views.percent(0.499, 0.5) == "49.9 %"
    assert views.percent(0.49996, 0.5) == "49.9 %"  # never "50.0 %" below 50 %
    assert views.percent(0.5, 0.5) == "50 %" and views.percent(0.494, 0.5) == "49 %"
    assert views.percent(0.499) == "50 %" and views.percent(0.004) == "<1 %"
    assert views.percent(0.9996) == "99.9 %" and views.percent(1.0) == "100 %"


def test_batch_file_names_are_text_in_the_table():
    from service.batch import BatchRow

    name = "x](javascript:alert(1)) <img src=x onerror=alert(1)>.jpg"
    thumb = io.BytesIO()
    Image.new("RGB", (20, 20), (120, 80, 60)).save(thumb, format="JPEG")
    row = BatchRow(name=name, prediction_id=3, top_class="nv", probability=0.7)
    cell, file_cell, *_ = views.batch_table_row(row, thumb.getvalue())
    assert file_cell == name  # a "str" column: shown as typed
    alt = cell[2 : cell.index("](data:")]
    assert "](" not in alt and "<" not in alt and ">" not in alt and "(" not in alt


def test_a_record_deleted_by_another_process_loses_its_app_files_at_the_next_search(
    app, tmp_path: Path
):
    """``query_history --delete`` (another process) removes the row; this app's files for it
    (its upload, panels, report) go at the next History search, another record's stay."""
    from app.ui.common import record_files
    from app.ui.history import search_history, show_record
    from scripts import query_history

    kept = predict(app.client, EXAMPLE, 40, "female", "back")[-1]["prediction_id"]
    gone = predict(app.client, EXAMPLE, 41, "male", "face")[-1]["prediction_id"]
    kept_files = [show_record(app.service, kept)[k] for k in ("detail_image", "detail_chart")]
    gone_files = [show_record(app.service, gone)[k] for k in ("detail_image", "detail_chart")]
    assert all(Path(p).is_file() for p in kept_files + gone_files)
    assert query_history.main(["--db", app.service.db.url, "--delete", str(gone)]) in (0, None)
    assert all(Path(p).is_file() for p in gone_files)  # this app has not looked yet
    search_history(app.service, tmp_path, None, None, None, None, None, None)
    assert not any(Path(p).exists() for p in gone_files)
    assert all(Path(p).is_file() for p in kept_files)
    # nothing is remembered for it any more but the CSV listing that search just wrote
    assert all(p.endswith(".csv") for p in record_files(app.service).paths(gone))
