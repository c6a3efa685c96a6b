"""Serving: the ONNX export against PyTorch, closed-form Grad-CAM against Captum, the working-size
decode of huge images, flat memory, and the app's busy queue and upload limit.

Tolerances: probabilities, OOD distances and metadata contributions agree to 1e-4 (measured on
the shipped model: ≤ 5e-7); [0, 1] heatmaps to 1e-4 (measured ≤ 2e-6). float32 kernels differ
between the two runtimes only in summation order, so anything larger would be a real difference.
"""

from __future__ import annotations

import io
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

from app.__main__ import build_parser, launch
from app.config import file_size, resolve
from app.frontend import BUSY_MESSAGE, EXAMPLES_DIR, make_frontend
from data_pipeline.images import WORKING_SIDE, read_image
from data_pipeline.request import PredictionRequest
from data_pipeline.schema import CLASSES
from model.attribution import gradcam, gradcam_from_maps
from model.checkpoint import (
    ONNX_FILE,
    SHIPPED_DIR,
    CheckpointError,
    load_checkpoint,
    load_config,
    save_checkpoint,
)
from model.onnx_runtime import OnnxEngine, export_onnx, members, onnx_status
from model.predictor import Predictor
from service.prediction import PredictionService

TOL = 1e-4
EXAMPLES = sorted(EXAMPLES_DIR.glob("*.jpg"))


@pytest.fixture(scope="module")
def runtimes() -> tuple[Predictor, Predictor]:
    torch.set_num_threads(2)
    onnx = Predictor.from_checkpoint(None, runtime="onnx")
    ref = Predictor.from_checkpoint(None, runtime="torch")
    assert onnx.runtime == "onnx" and ref.runtime == "torch"
    return onnx, ref


# --- ONNX export vs PyTorch ----------------------------------------------------------------------


def test_shipped_export_is_recorded_and_verified():
    cfg = load_config(SHIPPED_DIR)
    assert cfg.onnx["weights_sha256"] == cfg.weights_sha256
    assert cfg.onnx["outputs"] == ["logits", "features", "feature_maps"]
    assert onnx_status(SHIPPED_DIR, cfg) is None
    # the shipped model must stay small: weights + export within 30 MB
    size = (SHIPPED_DIR / ONNX_FILE).stat().st_size + (
        SHIPPED_DIR / "model.safetensors"
    ).stat().st_size
    assert size <= 30_000_000


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_onnx_and_pytorch_agree_on_real_images(runtimes, path):
    """Real HAM10000 images (app/examples): same probabilities, OOD distance, heatmap and
    metadata contributions from both runtimes."""
    onnx, ref = runtimes
    request = PredictionRequest.build(path, age=55, sex="female", site="back")
    a, b = onnx.predict(request), ref.predict(request)
    pa = np.array([a.probabilities[c] for c in CLASSES])
    pb = np.array([b.probabilities[c] for c in CLASSES])
    assert np.abs(pa - pb).max() <= TOL
    assert a.top_class == b.top_class and a.warnings == b.warnings
    assert a.ood_distance == pytest.approx(b.ood_distance, abs=TOL)
    assert a.attribution_target == b.attribution_target
    assert a.heatmap_grid is not None and b.heatmap_grid is not None
    assert np.abs(a.heatmap_grid - b.heatmap_grid).max() <= TOL
    assert a.metadata_contributions is not None and b.metadata_contributions is not None
    for field, value in a.metadata_contributions.items():
        assert value == pytest.approx(b.metadata_contributions[field], abs=TOL)


def test_onnx_tta_matches_pytorch_tta(runtimes):
    onnx, ref = runtimes
    request = PredictionRequest.build(EXAMPLES[0], age=40)
    a = onnx.predict(request, explain=False, tta=True)
    b = ref.predict(request, explain=False, tta=True)
    for c in CLASSES:
        assert a.probabilities[c] == pytest.approx(b.probabilities[c], abs=TOL)


def test_closed_form_gradcam_equals_captum_layer_gradcam(runtimes):
    """Grad-CAM from the feature maps (linear head) equals Captum's LayerGradCam on every
    member, for the top class and for other targets (tolerance 1e-5 on the [0, 1] map)."""
    _, ref = runtimes
    model = ref.model
    nonzero = 0
    for path in EXAMPLES[:3]:
        request = PredictionRequest.build(path, age=60, sex="male", site="face")
        _, x = ref.preprocess(request.rgb)
        m = torch.as_tensor(request.metadata.encode())[None]
        with torch.no_grad():
            maps = torch.cat([net.backbone.forward_features(x) for net in members(model)], dim=1)
        size = (int(x.shape[-2]), int(x.shape[-1]))
        for target in (0, CLASSES.index("mel"), CLASSES.index("nv")):
            captum = gradcam(model, x, m, target)
            closed = gradcam_from_maps(model, maps, target, size)
            nonzero += int(captum.max() > 0)  # a class with no positive evidence maps to zeros
            assert np.abs(captum - closed).max() <= 1e-5
    assert nonzero >= 6


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


@pytest.mark.slow
def test_export_of_a_single_network_and_integrity_checks(tiny_checkpoint, tmp_path, capsys):
    """Any N: a single FusionNet exports too; a tampered or stale export is never served."""
    folder = _copy_checkpoint(tiny_checkpoint, tmp_path / "tiny")
    model, cfg = load_checkpoint(folder)
    export_onnx(folder, model, cfg)
    cfg = load_config(folder)
    assert onnx_status(folder, cfg) is None
    engine = OnnxEngine.for_checkpoint(folder, cfg, "onnx")
    assert engine is not None
    x, m = torch.rand(3, 3, 64, 64), torch.zeros(3, 20)
    out = engine.run(x, m)
    with torch.no_grad():
        assert torch.allclose(out["logits"], model(x, m), atol=TOL)
        assert torch.allclose(out["features"], model.image_features(x), atol=TOL)

    # a tampered file: auto falls back to PyTorch and says why; onnx refuses
    data = bytearray((folder / ONNX_FILE).read_bytes())
    data[-1] ^= 0xFF
    (folder / ONNX_FILE).write_bytes(bytes(data))
    assert Predictor.from_checkpoint(folder, runtime="auto").runtime == "torch"
    assert "does not match the SHA-256" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="Cannot serve with runtime onnx"):
        Predictor.from_checkpoint(folder, runtime="onnx")

    # new weights written over the folder drop the old export (it described other weights)
    save_checkpoint(model, cfg, folder)
    assert not (folder / ONNX_FILE).exists() and load_config(folder).onnx == {}
    assert Predictor.from_checkpoint(folder, runtime="torch").runtime == "torch"


@pytest.mark.slow
def test_int8_export_calibrates_on_train_rows_is_verified_and_served_only_by_name(
    tiny_checkpoint, synthetic_ham, tmp_path, capsys
):
    """The optional int8 export: calibrated on training rows only, never chosen by ``auto``,
    refused when missing, tampered or made from other weights; probabilities within 0.05 of
    float32 on this (untrained) network."""
    from data_pipeline.ham10000 import load_metadata
    from data_pipeline.splits import make_splits, save_splits
    from model.checkpoint import INT8_FILE, write_config
    from model.quantize import calibration_rows, quantize_int8

    folder = _copy_checkpoint(tiny_checkpoint, tmp_path / "tiny")
    model, cfg = load_checkpoint(folder)
    splits = make_splits(load_metadata(synthetic_ham), seed=0)
    split_file = tmp_path / "splits.csv"
    cfg.training.update(split_file=str(split_file), split_sha256=save_splits(splits, split_file))
    write_config(cfg, folder)
    export_onnx(folder, model, cfg)
    with pytest.raises(CheckpointError, match="has no int8 export"):
        Predictor.from_checkpoint(folder, runtime="int8")

    quantize_int8(folder, synthetic_ham, per_class=3)
    cfg = load_config(folder)
    rows, record = calibration_rows(cfg, synthetic_ham, per_class=3)
    train_ids = set(splits.loc[splits["split"] == "train", "image_id"])
    assert set(rows["image_id"]) <= train_ids  # never a val or test image
    assert cfg.onnx["int8"]["calibration"] == record and record["images"] == len(rows)
    assert Predictor.from_checkpoint(folder, runtime="auto").runtime == "onnx"
    fast = Predictor.from_checkpoint(folder, runtime="int8")
    reference = Predictor.from_checkpoint(folder, runtime="onnx")
    assert fast.runtime == "int8"
    # stored apart from the float32 model's predictions, and named on the About tab
    assert fast.version == reference.version + "+int8"
    from app.views import model_card_markdown

    assert "**int8**" in model_card_markdown(fast.config, folder, fast.runtime)
    for path in EXAMPLES[:3]:
        request = PredictionRequest.build(path, age=50, sex="female", site="back")
        a, b = fast.predict(request), reference.predict(request)
        assert a.heatmap is not None and a.heatmap.shape == b.heatmap.shape
        diff = max(abs(a.probabilities[c] - b.probabilities[c]) for c in CLASSES)
        assert diff <= 0.05

    data = bytearray((folder / INT8_FILE).read_bytes())
    data[-1] ^= 0xFF
    (folder / INT8_FILE).write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="does not match the SHA-256"):
        Predictor.from_checkpoint(folder, runtime="int8")
    export_onnx(folder, model, cfg)  # a new float32 export drops the int8 one made from the old
    assert not (folder / INT8_FILE).exists() and "int8" not in load_config(folder).onnx


def test_unknown_runtime_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("DERMFUSION_RUNTIME", "tensorrt")
    with pytest.raises(CheckpointError, match="Unknown runtime 'tensorrt'"):
        Predictor.from_checkpoint(None)


# --- bounded cost per request --------------------------------------------------------------------


def _huge_png(side: int = 7700) -> bytes:
    img = Image.new("RGB", (side, side), (205, 160, 130))
    ImageDraw.Draw(img).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), (90, 50, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def test_huge_png_is_decoded_at_working_size_and_the_overlay_is_capped(runtimes, tmp_path):
    from app import frontend

    data = _huge_png()
    assert len(data) < 2_000_000  # 59 MP that compress to a small upload
    path = tmp_path / "huge.png"
    path.write_bytes(data)
    request = PredictionRequest.build(path, age=50)
    assert max(request.rgb.shape[:2]) == WORKING_SIDE
    assert (request.width, request.height) == (7700, 7700)  # the history keeps the real size
    service = PredictionService(runtimes[0], db=None)
    out = frontend.diagnose(service, str(path), "50", "male", "back")
    with Image.open(out["heatmap"]) as panel:  # a file (see frontend.output_file)
        assert max(panel.size) <= WORKING_SIDE
    assert out["result"]["top_class"] in CLASSES


def test_large_jpeg_decodes_reduced_and_thin_images_keep_their_short_side():
    big = Image.new("RGB", (4000, 3000), (150, 100, 90))
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=80)
    decoded = read_image(buf.getvalue())
    assert decoded.rgb.shape == (768, 1024, 3) and decoded.original_size == (4000, 3000)
    thin = np.full((40, 4000, 3), 128, np.uint8)
    decoded = read_image(thin)
    assert decoded.rgb.shape[0] >= 32 and decoded.rgb.shape[1] <= 4000
    small = read_image(EXAMPLES[0])  # smaller than the working size: every pixel kept
    w, h = Image.open(EXAMPLES[0]).size
    assert small.rgb.shape[:2] == (h, w) and small.original_size == (w, h)


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    pytest.skip("no /proc/self/status on this platform")
    return 0.0


@pytest.mark.slow
def test_memory_stays_flat_over_many_predictions(runtimes, tmp_path, monkeypatch):
    """Predict, explain, store and render 300 times: no growth from caches, figures or temp
    files (RSS within 64 MB after warm-up, no open matplotlib figure, no new temp file)."""
    import tempfile

    from app import frontend
    from common.plotting import pyplot
    from db.session import Database

    service = PredictionService(runtimes[0], Database(f"sqlite:///{tmp_path / 'h.db'}"))
    private_tmp = tmp_path / "tmp"  # this process's temp files only (the machine is shared)
    private_tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(private_tmp))
    try:
        for i in range(30):
            frontend.diagnose(service, str(EXAMPLES[i % len(EXAMPLES)]), "40", "male", "back")
        base = _rss_mb()
        for i in range(300):
            frontend.diagnose(service, str(EXAMPLES[i % len(EXAMPLES)]), str(i % 90), "", "")
        growth = _rss_mb() - base
        assert growth < 64, f"resident memory grew by {growth:.0f} MB over 300 predictions"
        assert service.count() == 330
    finally:
        service.close()
    assert pyplot().get_fignums() == []
    # the only files left are the two output images per prediction, in Gradio's cache, where
    # the running app's delete_cache removes them (tests/test_app.py)
    left = [p for p in private_tmp.rglob("*") if p.is_file()]
    cache = private_tmp / "gradio"
    assert all(p.parent == cache and p.name.startswith(frontend.OUTPUT_PREFIX) for p in left)
    assert len(left) == 2 * 330


# --- many users at once: the real app ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serving_flags_parse():
    s = resolve(build_parser().parse_args([]), {})
    assert (s.concurrency, s.max_queue, s.max_file_size) == (2, 64, 20 * 1024**2)
    assert file_size("500kb") == 500 * 1024 and file_size("1048576") == 1048576
    for bad in (["--max-file-size", "big"], ["--concurrency", "0"], ["--max-queue", "-3"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)


@pytest.fixture(scope="module")
def busy_app(tiny_checkpoint, tmp_path_factory):
    """The real app with one prediction at a time, one waiting, 200 kB uploads, and a service
    whose predictions wait for the test's go-ahead (so the queue fills deterministically)."""
    db = tmp_path_factory.mktemp("busy") / "h.db"
    service = PredictionService.create(tiny_checkpoint, db_url=f"sqlite:///{db}")
    started, release = threading.Semaphore(0), threading.Event()
    real = service.predict_and_store

    def gated(request, **kw):
        started.release()
        release.wait(timeout=120)
        return real(request, **kw)

    service.predict_and_store = gated  # type: ignore[method-assign]
    demo = make_frontend(service, concurrency=1, max_queue=1)
    served = launch(demo, port=_free_port(), quiet=True, max_file_size=200 * 1024)
    yield served.local_url.rstrip("/"), service, started, release, demo
    release.set()
    demo.close()
    service.close()


def _join(url: str, fn_index: int) -> httpx.Response:
    body = {"data": [None, "", "unknown", "unknown"], "fn_index": fn_index, "session_hash": "t"}
    return httpx.post(f"{url}/gradio_api/queue/join", json=body, timeout=30)


def test_full_queue_is_refused_with_a_busy_message(busy_app):
    from gradio_client import Client, handle_file
    from gradio_client.utils import QueueError

    url, service, started, release, demo = busy_app
    client = Client(url, verbose=False)
    example = handle_file(str(EXAMPLES[0]))
    running = client.submit(example, "40", "male", "back", api_name="/predict")
    assert started.acquire(timeout=60)  # the first prediction is running (and held)
    waiting = client.submit(example, "41", "male", "back", api_name="/predict")
    deadline = time.monotonic() + 60
    while len(demo._queue) < 1 and time.monotonic() < deadline:  # until B waits in the queue
        time.sleep(0.1)
    response = _join(url, client._infer_fn_index("/predict", None))
    assert response.status_code == 503
    assert response.json()["detail"] == BUSY_MESSAGE
    with pytest.raises(QueueError):
        client.predict(example, "42", "male", "back", api_name="/predict")
    before = service.count()
    release.set()
    assert running.result(timeout=120)[5]["stored"] is True
    assert waiting.result(timeout=120)[5]["stored"] is True
    assert service.count() == before + 2  # the refused requests stored nothing


def test_oversized_upload_is_refused_with_its_message(busy_app, tmp_path):
    url = busy_app[0]
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + bytes(400 * 1024))
    with big.open("rb") as fh:
        response = httpx.post(f"{url}/gradio_api/upload", files={"files": fh}, timeout=30)
    assert response.status_code == 413
    assert "File size exceeded maximum allowed size of 204800 bytes" in response.text
    small = EXAMPLES[0]
    with small.open("rb") as fh:
        assert httpx.post(f"{url}/gradio_api/upload", files={"files": fh}).status_code == 200


@pytest.mark.slow
def test_load_benchmark_drives_the_real_app_and_accounts_for_every_request(tiny_checkpoint):
    """The load benchmark (not a timing test): the app in a subprocess, 6 requests from 3
    gradio_client users, every answered request stored, a too-large upload refused with 413,
    and the CPU of both sides reported."""
    from scripts.load_benchmark import load_benchmark

    result = load_benchmark(
        3, 6, ["--checkpoint", str(tiny_checkpoint), "--max-file-size", "1mb"], upload_mb=2
    )
    assert (result["ok"], result["failed"], result["rows_stored"]) == (6, 0, 6)
    assert result["upload"]["status"] == 413
    assert result["server_cpu_ms_per_request"] > 0 and result["client_cpu_ms_per_request"] > 0
    assert result["p50_s"] <= result["p95_s"] <= result["max_s"]
