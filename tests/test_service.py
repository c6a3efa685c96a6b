"""PredictionService: the one validate → predict → store path (tiny untrained checkpoint, CPU)."""

from __future__ import annotations

import hashlib
import io
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import text

from common.errors import DermError, ImageError, MetadataError
from data_pipeline.images import load_rgb
from data_pipeline.request import PredictionRequest
from data_pipeline.schema import CLASSES
from db.queries import HistoryFilter
from db.session import Database
from model.predictor import Predictor
from service.history import record_dict
from service.prediction import PredictionService, StorageError, StoredPrediction
from service.render import fit_size, heatmap_from_png, thumbnail_from_jpeg

req = PredictionRequest.build


def jpeg_bytes(seed: int = 0, size: tuple[int, int] = (200, 150)) -> bytes:
    """A real JPEG (w×h) with a blob, so Grad-CAM and the thumbnail have something to show."""
    rng = np.random.default_rng(seed)
    w, h = size
    img = rng.integers(90, 160, size=(h, w, 3)).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    blob = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (min(h, w) / 4) ** 2
    img[blob] = (60 + seed % 50, 30, 20)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


@pytest.fixture(scope="module")
def predictor(tiny_checkpoint: Path) -> Predictor:
    return Predictor.from_checkpoint(tiny_checkpoint)


@pytest.fixture
def service(predictor: Predictor, tmp_path: Path) -> PredictionService:
    svc = PredictionService(predictor, Database(f"sqlite:///{tmp_path / 'history.db'}"))
    yield svc
    svc.close()


def test_round_trip_of_every_field(service: PredictionService, predictor: Predictor):
    data = jpeg_bytes(1)
    out = service.predict_and_store(req(data, age="62", sex="M", site="Lower_Extremity"))
    assert isinstance(out, StoredPrediction) and out.stored and out.id == 1
    pred = out.prediction
    row = service.get(out.id)
    assert row is not None and row.id == out.id

    assert row.image_sha256 == hashlib.sha256(data).hexdigest()
    assert (row.image_width, row.image_height) == (200, 150)
    assert (row.age, row.sex, row.site) == (62.0, "male", "lower extremity")
    assert list(row.probabilities) == list(CLASSES)
    assert row.probabilities == pred.probabilities  # exact floats
    assert sum(row.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
    assert row.predicted_class == pred.top_class
    assert row.predicted_probability == pred.top_probability == max(row.probabilities.values())
    assert row.attribution_target == pred.attribution_target == pred.top_class
    assert set(row.metadata_contributions) == {"age", "sex", "site"}
    assert row.metadata_contributions == pred.metadata_contributions
    assert row.warnings == pred.warnings
    assert row.ood_distance == pytest.approx(pred.ood_distance)
    assert row.model_name == predictor.config.name == "tiny-untrained"
    assert row.model_version == predictor.version == pred.model_version
    assert row.checkpoint_sha256 == predictor.config.weights_sha256
    assert len(row.checkpoint_sha256) == 64
    assert row.latency_ms == pytest.approx(pred.latency_ms) and row.latency_ms > 0
    assert row.created_at.utcoffset().total_seconds() == 0

    # Heatmap: a PNG at thumbnail size of the image the model saw, same values as the prediction.
    heat = heatmap_from_png(row.heatmap_png)
    assert heat.shape == fit_size(*pred.image.shape[:2]) == pred.heatmap.shape == (150, 200)
    assert np.abs(heat - pred.heatmap).max() <= 1 / 255 + 1e-6
    assert np.array_equal(heatmap_from_png(row.heatmap_png), heat)
    # Thumbnail: a JPEG of the same region, so the heatmap overlays it.
    assert Image.open(io.BytesIO(row.thumbnail)).format == "JPEG"
    thumb = thumbnail_from_jpeg(row.thumbnail)
    assert thumb.shape == (150, 200, 3)
    assert np.abs(thumb.astype(int) - pred.image.astype(int)).mean() < 20

    (listed,) = service.history()
    assert record_dict(listed, include_heatmap=True) == record_dict(row, include_heatmap=True)
    d = record_dict(row, include_heatmap=True, include_thumbnail=True)
    assert d["probabilities"] == pred.probabilities
    assert d["heatmap_png_base64"] and d["thumbnail_jpeg_base64"]
    assert d["predicted_class_name"]
    assert service.count() == 1
    assert service.get(999) is None


def test_large_image_is_stored_small(service: PredictionService):
    out = service.predict_and_store(req(jpeg_bytes(2, size=(800, 600))))
    row = service.get(out.id)
    assert (row.image_width, row.image_height) == (800, 600)
    assert thumbnail_from_jpeg(row.thumbnail).shape == (192, 256, 3)
    assert heatmap_from_png(row.heatmap_png).shape == (192, 256)
    assert out.prediction.heatmap.shape == (600, 800)


def test_hash_of_path_and_of_pixels(service: PredictionService, tmp_path: Path):
    data = jpeg_bytes(3)
    path = tmp_path / "lesion.jpg"
    path.write_bytes(data)
    by_path = service.get(service.predict_and_store(req(path)).id)
    by_str = service.get(service.predict_and_store(req(str(path))).id)
    assert by_path.image_sha256 == by_str.image_sha256 == hashlib.sha256(data).hexdigest()
    rgb = load_rgb(data)
    by_array = service.get(service.predict_and_store(req(rgb)).id)
    by_pil = service.get(service.predict_and_store(req(Image.fromarray(rgb))).id)
    assert by_array.image_sha256 == by_pil.image_sha256 == hashlib.sha256(rgb.tobytes()).hexdigest()
    assert by_array.probabilities == pytest.approx(by_path.probabilities, abs=1e-6)


def test_no_images_stored_with_privacy_flag(predictor: Predictor, tmp_path: Path):
    svc = PredictionService(
        predictor, Database(f"sqlite:///{tmp_path / 'p.db'}"), store_images=False
    )
    out = svc.predict_and_store(req(jpeg_bytes(4), age=40))
    row = svc.get(out.id)
    assert row.thumbnail is None and thumbnail_from_jpeg(row.thumbnail) is None
    assert record_dict(row, include_thumbnail=True)["thumbnail_jpeg_base64"] is None
    assert record_dict(row)["has_thumbnail"] is False
    assert heatmap_from_png(row.heatmap_png) is not None  # a coarse heatmap is not the image
    assert row.image_sha256 == hashlib.sha256(jpeg_bytes(4)).hexdigest()
    svc.close()


def test_explanation_target(service: PredictionService):
    out = service.predict_and_store(req(jpeg_bytes(5), target="MEL"))
    row = service.get(out.id)
    assert row.attribution_target == out.prediction.attribution_target == "mel"
    with pytest.raises(DermError, match="Unknown explanation target 'cancer'"):
        service.predict_and_store(req(jpeg_bytes(5), target="cancer"))


def test_service_without_database(predictor: Predictor):
    svc = PredictionService(predictor, None)
    out = svc.predict_and_store(req(jpeg_bytes(6)))
    assert out.stored is False and out.id is None
    assert out.prediction.top_class in CLASSES
    with pytest.raises(DermError, match="no history database"):
        svc.history()


def test_create_uses_url(tiny_checkpoint: Path, tmp_path: Path):
    url = f"sqlite:///{tmp_path / 'deep' / 'created.db'}"
    svc = PredictionService.create(tiny_checkpoint, url, store_images=False)
    out = svc.predict_and_store(req(jpeg_bytes(7), sex="female"))
    assert (tmp_path / "deep" / "created.db").is_file()
    assert svc.get(out.id).sex == "female" and svc.store_images is False
    svc.close()


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"age": -5}, MetadataError, "Age -5 is outside 0-120"),
        ({"age": 300}, MetadataError, "Age 300 is outside 0-120"),
        ({"age": "abc"}, MetadataError, "Age 'abc' is not a number"),
        ({"site": "moon"}, MetadataError, "Unknown body site 'moon'"),
        ({"sex": "robot"}, MetadataError, "Unknown sex 'robot'"),
        ({"image": b"not an image"}, ImageError, "not an image file"),
        ({"image": b""}, ImageError, "the file is empty"),
        ({"image": jpeg_bytes(0, size=(20, 20))}, ImageError, "too small"),
    ],
)
def test_invalid_input_stores_nothing(service: PredictionService, kwargs, error, message):
    image = kwargs.pop("image", jpeg_bytes(8))
    with pytest.raises(error, match=message) as info:
        service.predict_and_store(req(image, **kwargs))
    assert isinstance(info.value, DermError)
    assert service.count() == 0
    with service.db.engine.connect() as conn:
        assert conn.execute(text("SELECT COUNT(*) FROM predictions")).scalar() == 0


def test_missing_file_names_the_path(service: PredictionService, tmp_path: Path):
    missing = tmp_path / "nope.jpg"
    with pytest.raises(ImageError, match=r"nope\.jpg: no such image file"):
        service.predict_and_store(req(missing))
    assert service.count() == 0


def test_database_failure_is_storage_error_and_writes_nothing(service: PredictionService):
    service.predict_and_store(req(jpeg_bytes(9)))
    with service.db.engine.begin() as conn:
        conn.exec_driver_sql(
            "CREATE TRIGGER reject AFTER INSERT ON predictions "
            "BEGIN SELECT RAISE(ABORT, 'disk says no'); END"
        )
    with pytest.raises(
        StorageError, match="Prediction made but could not be stored: disk says no"
    ) as info:
        service.predict_and_store(req(jpeg_bytes(10)))
    assert isinstance(info.value, DermError)
    assert info.value.prediction is not None and info.value.prediction.top_class in CLASSES
    assert service.count() == 1  # the failed row left no trace
    with service.db.engine.begin() as conn:
        conn.exec_driver_sql("DROP TRIGGER reject")
    assert service.predict_and_store(req(jpeg_bytes(10))).stored
    assert service.count() == 2


def test_50_concurrent_predictions_one_sqlite_file(service: PredictionService):
    images = [jpeg_bytes(i, size=(64, 48)) for i in range(50)]
    sites = ["back", "face", None, "trunk", "scalp"]

    def work(i: int) -> StoredPrediction:
        return service.predict_and_store(
            req(images[i], age=20 + i, sex="female", site=sites[i % 5])
        )

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = list(pool.map(work, range(50)))
    assert all(r.stored for r in results)
    assert sorted(r.id for r in results) == list(range(1, 51))
    assert service.count() == 50
    rows = service.history(limit=100)
    assert len(rows) == 50
    by_id = {r.id: r for r in rows}
    for i, r in enumerate(results):
        row = by_id[r.id]
        assert row.age == 20 + i
        assert row.image_sha256 == hashlib.sha256(images[i]).hexdigest()
        assert row.probabilities == r.prediction.probabilities
    assert service.count({"site": "face"}) == 10
    assert service.count({"site": "unknown"}) == 10


def test_history_count_stats_with_filters(service: PredictionService):
    service.predict_and_store(req(jpeg_bytes(11), age=30, sex="male", site="back"))
    service.predict_and_store(req(jpeg_bytes(12), age=70, sex="female", site="face"))
    service.predict_and_store(req(jpeg_bytes(13)))
    assert [r.age for r in service.history()] == [None, 70.0, 30.0]  # newest first
    assert [r.sex for r in service.history(HistoryFilter(age_min=50))] == ["female"]
    assert [r.site for r in service.history({"sex": "male"})] == ["back"]
    assert len(service.history(limit=1, offset=1)) == 1
    light = service.history(images=False)
    assert [r.id for r in light] == [r.id for r in service.history()]
    assert all(record_dict(r)["has_thumbnail"] is None for r in light)
    assert service.count(HistoryFilter(site="back")) == 1
    version = service.predictor.version
    assert service.count(HistoryFilter(model_version=version)) == 3
    stats = service.stats()
    assert sum(n for _, _, n in stats) == 3
    assert {c for _, c, _ in stats} <= set(CLASSES)
    with pytest.raises(DermError, match="Unknown diagnosis class"):
        service.history({"classes": ["cancer"]})
