"""The research features of the app through a real server and ``gradio_client``: confirmed
diagnoses and agreement, batch analysis, case reports, deletion, explaining another class, and
that with ``--no-store-images`` no uploaded file stays in Gradio's upload cache."""

from __future__ import annotations

import csv
import re
import socket
import zipfile
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

from app import views
from app.__main__ import launch
from app.ui.analyse import EXAMPLES_DIR
from app.ui.demo import build_demo as make_frontend
from data_pipeline.schema import CLASSES
from service.prediction import PredictionService

EXAMPLE = EXAMPLES_DIR / "ISIC_0029281.jpg"
ANY_FILTER = ("", "", [], 0, "any", "any")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(checkpoint: Path, db: Path, store_images: bool = True) -> SimpleNamespace:
    service = PredictionService.create(
        checkpoint, db_url=f"sqlite:///{db}", store_images=store_images
    )
    demo = make_frontend(service)
    served = launch(demo, host="127.0.0.1", port=free_port(), quiet=True)
    client = Client(served.local_url, verbose=False)
    return SimpleNamespace(service=service, demo=demo, client=client)


@pytest.fixture(scope="module")
def app(tiny_checkpoint, tmp_path_factory):
    a = serve(tiny_checkpoint, tmp_path_factory.mktemp("research") / "history.db")
    yield a
    a.demo.close()
    a.service.close()


def predict(client: Client, image: Path, *args):
    return client.predict(handle_file(str(image)), *args, api_name="/predict")


def images(folder: Path, n: int) -> list[Path]:
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        path = folder / f"lesion_{i}.jpg"
        Image.fromarray(rng.integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(path)
        out.append(path)
    return out


# --- confirm → agreement -------------------------------------------------------------------------


def test_predict_confirm_then_agreement_shows_it(app):
    *_, result = predict(app.client, EXAMPLE, "35", "female", "back")
    pid, top = result["prediction_id"], result["top_class"]
    before = app.client.predict(*ANY_FILTER, api_name="/agreement")[-1]

    status, shown_id, _, detail, _, _ = app.client.predict(
        str(pid), "mel", "histopathology", "excised", api_name="/confirm"
    )
    assert f"#{pid}" in status and "Melanoma (mel)" in status and shown_id == str(pid)
    assert "Confirmed diagnosis" in detail and "histopathology" in detail
    record = app.service.get(pid)
    assert (record.confirmed_dx, record.confirmed_source, record.confirmed_note) == (
        "mel",
        "histopathology",
        "excised",
    )

    summary, confusion, per_class, by_version, data = app.client.predict(
        *ANY_FILTER, api_name="/agreement"
    )
    assert data["n_confirmed"] == before["n_confirmed"] + 1
    assert data["n_predictions"] == app.service.count()
    mel_row = confusion["data"][CLASSES.index("mel")]
    assert mel_row[0] == "mel" and mel_row[1 + CLASSES.index(top)] >= 1
    assert data["support"]["mel"] >= 1
    assert (
        f"{data['n_confirmed']} of {views.plural(data['n_predictions'], 'prediction')}" in summary
    )
    assert result["model_version"] in data["by_model_version"]
    assert any(r[0] == result["model_version"] for r in by_version["data"])
    assert [r[0] for r in per_class["data"]] == list(CLASSES)
    # the service (CLI path) computes the same numbers
    assert app.service.agreement().to_dict() == data


def test_confirm_bad_values_are_refused(app):
    *_, result = predict(app.client, EXAMPLE)
    pid = str(result["prediction_id"])
    for args, message in [
        ((pid, "melanoma", "histopathology", ""), "Unknown confirmed diagnosis"),
        ((pid, "mel", "nobody", ""), "Unknown confirmation source"),
        # an empty form is refused, never stored as whatever was chosen before
        ((pid, "mel", "", ""), "Choose the confirmed diagnosis and who confirmed it"),
        ((pid, None, "clinician", ""), "Choose the confirmed diagnosis and who confirmed it"),
        (("99999", "mel", "clinician", ""), "No stored prediction has id 99999"),
        (("", "mel", "clinician", ""), "Enter a prediction id"),
    ]:
        with pytest.raises(AppError, match=message):
            app.client.predict(*args, api_name="/confirm")
    assert app.service.get(int(pid)).confirmed_dx is None


# --- batch ---------------------------------------------------------------------------------------


def test_batch_of_five_with_one_corrupt_stores_four_and_reports_it(app, tmp_path):
    good = images(tmp_path / "imgs", 4)
    bad = tmp_path / "imgs" / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a JPEG")
    meta = tmp_path / "meta.csv"
    meta.write_text("image_id,age,sex,localization\nlesion_0,45,male,back\nlesion_1,,female,face\n")
    before = app.service.count()
    summary, table, csv_path = app.client.predict(
        [handle_file(str(p)) for p in [*good[:2], bad, *good[2:]]],
        handle_file(str(meta)),
        api_name="/batch",
    )
    assert app.service.count() == before + 4
    rows = table["data"]
    assert len(rows) == 5
    broken = next(r for r in rows if r[1] == "broken.jpg")
    assert "not analysed" in broken[5] and "broken.jpg" in broken[6]
    assert "4 images analysed and stored" in summary and "1 file could not be analysed" in summary
    ok = [r for r in rows if r[1] != "broken.jpg"]
    assert all(r[0].startswith("![") and re.fullmatch(r"#\d+", r[2]) for r in ok)

    with open(csv_path, newline="") as fh:
        out = list(csv.DictReader(fh))
    assert [r["image"] for r in out] == [
        "lesion_0.jpg",
        "lesion_1.jpg",
        "broken.jpg",
        "lesion_2.jpg",
        "lesion_3.jpg",
    ]
    first = app.service.get(int(out[0]["prediction_id"]))
    assert (first.age, first.sex, first.site) == (45.0, "male", "back")  # from the CSV
    second = app.service.get(int(out[1]["prediction_id"]))
    assert (second.age, second.sex, second.site) == (None, "female", "face")
    assert out[2]["error"] and not out[2]["prediction_id"]


def test_batch_from_a_zip_with_its_own_csv(app, tmp_path):
    pics = images(tmp_path / "z", 2)
    archive = tmp_path / "batch.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in pics:
            z.write(p, f"folder/{p.name}")
        z.writestr("meta.csv", "image,age,sex,site\nlesion_1.jpg,70,male,scalp\n")
        z.writestr("notes.txt", "not an image")
    before = app.service.count()
    _summary, table, _ = app.client.predict([handle_file(str(archive))], None, api_name="/batch")
    assert app.service.count() == before + 2
    names = [r[1] for r in table["data"]]
    assert names == [
        "batch.zip/folder/lesion_0.jpg",
        "batch.zip/folder/lesion_1.jpg",
        "batch.zip/notes.txt",
    ]
    pid = int(table["data"][1][2].lstrip("#"))
    assert app.service.get(pid).age == 70.0


def test_batch_without_files_is_refused(app):
    with pytest.raises(AppError, match="No files"):
        app.client.predict([], None, api_name="/batch")


# --- report --------------------------------------------------------------------------------------


def test_report_is_a_valid_one_page_pdf(app):
    *_, result = predict(app.client, EXAMPLE, "61", "male", "face")
    pdf = Path(app.client.predict(str(result["prediction_id"]), api_name="/report"))
    data = pdf.read_bytes()
    assert data.startswith(b"%PDF-") and data.rstrip().endswith(b"%%EOF")
    assert len(re.findall(rb"/Type\s*/Page[^s]", data)) == 1
    assert pdf.name == f"dermfusion_case_{result['prediction_id']}.pdf"
    with pytest.raises(AppError, match="No stored prediction has id 424242"):
        app.client.predict("424242", api_name="/report")


# --- delete --------------------------------------------------------------------------------------


def test_delete_removes_the_row_and_counts_drop(app):
    *_, result = predict(app.client, EXAMPLE)
    pid = result["prediction_id"]
    app.client.predict(str(pid), "nv", "clinician", "", api_name="/confirm")
    before = app.service.count()
    agreed = app.client.predict(*ANY_FILTER, api_name="/agreement")[-1]["n_confirmed"]
    status, shown_id, image, *_ = app.client.predict(str(pid), api_name="/delete")
    assert f"#{pid} was deleted" in status and shown_id == "" and image is None
    assert app.service.get(pid) is None and app.service.count() == before - 1
    table, _summary, _ = app.client.predict(*ANY_FILTER, api_name="/history")
    assert pid not in [r[1] for r in table["data"]]
    assert app.client.predict(*ANY_FILTER, api_name="/agreement")[-1]["n_confirmed"] == agreed - 1
    with pytest.raises(AppError, match=f"No stored prediction has id {pid}"):
        app.client.predict(str(pid), api_name="/delete")


# --- explanation target and heatmap --------------------------------------------------------------


def test_predict_explains_the_chosen_class(app):
    *_, heatmap, _chart, info, result = predict(app.client, EXAMPLE, "", "", "", "bkl", 0.8)
    assert result["attribution_target"] == "bkl" and "Benign keratosis" in info
    wide = np.asarray(Image.open(heatmap))
    assert wide.shape[1] > wide.shape[0]  # original and overlay side by side
    assert app.service.get(result["prediction_id"]).attribution_target == "bkl"


def test_views_probabilities_and_alerts():
    html = views.probabilities_html({"nv": 0.91, "mel": 0.084, "bkl": 0.005, "bcc": 0.001})
    assert (
        html.count("&lt;1 %") == 5 and "91 %" in html and "8 %" in html and html.count("(nv)") == 1
    )
    assert html.index('data-class="nv"') < html.index('data-class="mel"')
    assert views.plural(1, "prediction") == "1 prediction"
    assert views.plural(2, "prediction") == "2 predictions"


# --- privacy -------------------------------------------------------------------------------------


def test_no_store_images_leaves_no_upload_on_disk(tiny_checkpoint, tmp_path):
    a = serve(tiny_checkpoint, tmp_path / "private.db", store_images=False)
    cache = Path(gr.utils.get_upload_folder())
    try:
        unique = tmp_path / "u" / "private_lesion_7f3a.jpg"
        unique.parent.mkdir()
        unique.write_bytes(EXAMPLE.read_bytes())
        *_, result = predict(a.client, unique, "50", "female", "face")
        assert result["stored"] is True
        batch = images(tmp_path / "b", 2)
        renamed = [
            p.rename(p.with_name(f"private_batch_{i}_9c2e.jpg")) for i, p in enumerate(batch)
        ]
        a.client.predict([handle_file(str(p)) for p in renamed], None, api_name="/batch")
        left = [p for p in cache.rglob("private_*") if p.is_file()]
        assert left == [], f"uploads left in Gradio's cache: {left}"
        assert unique.exists() and all(p.exists() for p in renamed)  # the user's own files stay
    finally:
        a.demo.close()
        a.service.close()


def test_report_of_a_row_without_image_and_with_confirmation():
    """--no-store-images rows have no thumbnail: the report says so and is still one page."""
    from datetime import UTC, datetime

    from db.models import PredictionRecord
    from service.render import heatmap_png
    from service.report import case_report_pdf

    record = PredictionRecord(
        id=7,
        created_at=datetime(2026, 3, 1, tzinfo=UTC),
        image_sha256="ab" * 32,
        image_width=600,
        image_height=450,
        thumbnail=None,
        age=None,
        sex="unknown",
        site="unknown",
        predicted_class="mel",
        predicted_probability=0.42,
        probabilities={c: (0.42 if c == "mel" else 0.58 / 6) for c in CLASSES},
        heatmap_png=heatmap_png(np.linspace(0, 1, 64 * 48).reshape(48, 64)),
        attribution_target="mel",
        metadata_contributions={"age": 0.0, "sex": 0.0, "site": 0.0},
        warnings=["Low confidence: the top class has probability 42% (< 50%)."],
        model_name="m",
        model_version="m@1",
        checkpoint_sha256="11" * 32,
        latency_ms=5.0,
        confirmed_dx="other",
        confirmed_source="clinician",
        confirmed_note="seborrhoeic keratosis",
        confirmed_at=datetime(2026, 3, 9, tzinfo=UTC),
    )
    data = case_report_pdf(record)
    assert data.startswith(b"%PDF-") and len(re.findall(rb"/Type\s*/Page[^s]", data)) == 1


def test_batch_csv_without_an_image_column_is_explained(tmp_path):
    from common.errors import DermError
    from service.batch import read_metadata_csv

    with pytest.raises(DermError, match="no image column"):
        read_metadata_csv(b"age,sex\n40,male\n", "meta.csv")
    table = read_metadata_csv(b"image_id,age,localization\nISIC_1,40,back\n")
    assert table == {"isic_1": {"age": "40", "sex": None, "site": "back"}}
