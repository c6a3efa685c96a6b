"""Speed and memory of the predictor on this machine (not a test: numbers depend on hardware).

    python -m scripts.benchmark                       # shipped model, an example image
    python -m scripts.benchmark --threads 2 --n 100 --json outputs/benchmark.json
    python -m scripts.benchmark --data-dir ../shared/ham10000 --batch-images 512
    python -m scripts.benchmark --clients 50          # load: the real app, 50 concurrent users
    python -m scripts.benchmark --clients 8 --requests 200 --upload-mb 300

For each runtime (``--runtimes``, default ONNX Runtime and PyTorch) it reports latency
percentiles for the predictor alone (predict only; predict + explanations: Grad-CAM + metadata
ablation) and batched evaluation throughput in images/s (``--data-dir``, else the app examples
repeated). For the serving runtime it adds the app's whole path — the file read, hashed and
decoded into a request, then the prediction service predicting, explaining and storing the row
(thumbnail, heatmap PNG) in a temporary SQLite database — the cost of a 7700×7700 PNG (seconds and
peak memory growth), resident memory over ``--memory-n`` predictions rendered like the app's, model
load time and peak resident memory. With ``--clients`` it runs the load benchmark instead
(:mod:`scripts.load_benchmark`: the real app in a subprocess, concurrent ``gradio_client`` users).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.cli import run_cli
from data_pipeline.request import PredictionRequest
from data_pipeline.schema import CLASSES
from db.session import Database
from model.predictor import Predictor
from scripts.load_benchmark import add_load_arguments, run_load
from service.prediction import PredictionService
from service.render import contributions_chart, overlay_heatmap

EXAMPLES = Path(__file__).resolve().parent.parent / "app" / "examples"
REQUEST_FIELDS: dict[str, Any] = {"age": 55, "sex": "male", "site": "back"}


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    a = np.asarray(samples_ms)
    return {
        "p50_ms": float(np.percentile(a, 50)),
        "p90_ms": float(np.percentile(a, 90)),
        "p99_ms": float(np.percentile(a, 99)),
        "mean_ms": float(a.mean()),
        "n": len(a),
    }


def time_calls(fn: Callable[[], object], n: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000.0)
    return out


def eval_throughput(
    predictor: Predictor, data_dir: Path | None, n_images: int, batch: int
) -> dict[str, Any]:
    """Images/s of the one evaluation loop (decode, preprocess, network) on ``predictor``'s
    runtime; without a data folder the app's examples are repeated."""
    from data_pipeline.ham10000 import load_metadata
    from model.engine import collect_logits, eval_loader

    if data_dir is not None:
        df = load_metadata(data_dir).iloc[:n_images]
        source = str(data_dir)
    else:
        df = examples_table(n_images)
        source = "app/examples (repeated)"
    loader = eval_loader(df, predictor.config.preprocessing, batch_size=batch)
    collect_logits(
        predictor.model,
        eval_loader(df.iloc[:batch], predictor.config.preprocessing, batch_size=batch),
        engine=predictor.engine,
    )  # warm-up
    t0 = time.perf_counter()
    collect_logits(predictor.model, loader, engine=predictor.engine)
    seconds = time.perf_counter() - t0
    return {
        "images": len(df),
        "batch_size": batch,
        "images_per_s": len(df) / seconds,
        "source": source,
    }


def examples_table(n: int) -> Any:
    """A HAM10000-style table of the app's example images, repeated to ``n`` rows."""
    import pandas as pd

    rows = pd.read_csv(EXAMPLES / "examples.csv")
    rows = rows.loc[np.arange(n) % len(rows)].reset_index(drop=True)
    return rows.assign(
        label=[CLASSES.index(dx) for dx in rows["dx"]],
        path=[str(EXAMPLES / f) for f in rows["file"]],
        image_id=[f"{Path(f).stem}_{i}" for i, f in enumerate(rows["file"])],
    )


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--image", type=Path, default=None, help="default: first app example")
    p.add_argument("--n", type=int, default=50, help="timed calls per measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="batched eval on these images (default: examples)",
    )
    p.add_argument("--batch-images", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64, help="batched eval batch size")
    p.add_argument(
        "--runtimes",
        nargs="+",
        choices=("onnx", "int8", "torch"),
        default=["onnx", "torch"],
        help="runtimes to measure; the first also measures the app path (default: onnx torch; "
        "int8 needs the checkpoint's int8 export)",
    )
    p.add_argument(
        "--memory-n", type=int, default=500, help="predictions for the memory check (0: skip)"
    )
    p.add_argument("--json", type=Path, default=None, help="write results here")
    add_load_arguments(p)
    return p


def latencies(predictor: Predictor, request: PredictionRequest, n: int, warmup: int) -> dict:
    """The predictor alone, with and without explanations."""
    return {
        "predict_only": percentiles(
            time_calls(lambda: predictor.predict(request, explain=False), n, warmup)
        ),
        "predict_and_explain": percentiles(
            time_calls(lambda: predictor.predict(request, explain=True), n, warmup)
        ),
    }


def app_path(predictor: Predictor, image: Path, n: int, warmup: int, memory_n: int) -> dict:
    """The app's full path: the request built from the file, then the service predicting,
    explaining and storing on a temporary SQLite; then resident memory over ``memory_n`` such
    predictions rendered like the app's (overlay, contributions chart)."""
    result: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="dermfusion-bench-") as tmp:
        service = PredictionService(predictor, Database(f"sqlite:///{Path(tmp) / 'bench.db'}"))
        try:

            def one(path: Path = image) -> None:
                stored = service.predict_and_store(PredictionRequest.build(path, **REQUEST_FIELDS))
                pred = stored.prediction
                if pred.image is not None and pred.heatmap is not None:
                    overlay_heatmap(pred.image, pred.heatmap)
                contributions_chart(pred.metadata_contributions, pred.top_class)

            result["service_with_storage"] = percentiles(time_calls(one, n, warmup))
            if memory_n:
                examples = sorted(EXAMPLES.glob("*.jpg"))
                checkpoints = {}
                for i in range(memory_n):
                    one(examples[i % len(examples)])
                    if i + 1 in (50, memory_n):
                        checkpoints[i + 1] = memory_mb()["rss_mb"]
                result["memory_over_predictions"] = {
                    "predictions": memory_n,
                    "rss_mb_after_50": checkpoints.get(50),
                    "rss_mb_at_end": checkpoints[memory_n],
                }
            result["rows_stored"] = service.count()
        finally:
            service.close()
    return result


def memory_mb() -> dict[str, float]:
    from scripts.load_benchmark import proc_memory_mb

    return proc_memory_mb(os.getpid())


def huge_png_cost(predictor: Predictor, side: int = 7700) -> dict[str, Any]:
    """Seconds and peak-memory growth of one prediction (with explanations) on a ``side``² PNG
    that compresses to a small upload: decode at the working size, predict, explain, overlay."""
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (side, side), (205, 160, 130))
    ImageDraw.Draw(img).ellipse((side // 4, side // 4, 3 * side // 4, 3 * side // 4), (90, 50, 40))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    del img
    data = buf.getvalue()
    _reset_peak()
    before = memory_mb()
    t0 = time.perf_counter()
    request = PredictionRequest.build(data, **REQUEST_FIELDS)
    pred = predictor.predict(request, explain=True)
    overlay = None
    if pred.image is not None and pred.heatmap is not None:
        overlay = overlay_heatmap(pred.image, pred.heatmap)
    seconds = time.perf_counter() - t0
    after = memory_mb()
    return {
        "pixels": f"{side}x{side}",
        "png_bytes": len(data),
        "seconds": seconds,
        "peak_rss_growth_mb": after["peak_rss_mb"] - before["rss_mb"],
        "peak_reset": before["peak_rss_mb"] <= before["rss_mb"] + 1,
        "working_image": list(request.rgb.shape[:2]),
        "overlay": list(overlay.shape[:2]) if overlay is not None else None,
    }


def _reset_peak() -> None:
    """Reset this process's peak-RSS counter (Linux: writing 5 to clear_refs)."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def report(result: dict[str, Any]) -> None:
    print(
        f"{result['model_version']}  input {result['input_size']}  "
        f"threads {result['torch_threads']}"
    )
    for runtime, r in result["runtimes"].items():
        po, pe = r["predict_only"], r["predict_and_explain"]
        print(
            f"[{runtime}] predict only        p50 {po['p50_ms']:.1f} ms  p90 {po['p90_ms']:.1f} ms"
        )
        print(
            f"[{runtime}] predict + explain   p50 {pe['p50_ms']:.1f} ms  p90 {pe['p90_ms']:.1f} ms"
        )
        et = r["eval_throughput"]
        print(f"[{runtime}] batched eval        {et['images_per_s']:.1f} images/s ({et['source']})")
    ap = result["app_path"]
    ps = ap["service_with_storage"]
    print(f"app path (store, render)  p50 {ps['p50_ms']:.1f} ms  p90 {ps['p90_ms']:.1f} ms")
    if "memory_over_predictions" in ap:
        m = ap["memory_over_predictions"]
        print(
            f"memory over {m['predictions']} predictions: RSS {m['rss_mb_after_50']:.0f} MB after "
            f"50, {m['rss_mb_at_end']:.0f} MB at the end"
        )
    h = result["huge_png"]
    print(
        f"{h['pixels']} PNG ({h['png_bytes'] / 1e3:.0f} kB): {h['seconds']:.2f} s, peak memory "
        f"+{h['peak_rss_growth_mb']:.0f} MB, working image {h['working_image']}, "
        f"overlay {h['overlay']}"
    )
    print(f"model load {result['load_seconds']:.2f} s   peak RSS {result['peak_rss_mb']:.0f} MB")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.clients:
        run_load(args)
        return 0
    image = args.image or sorted(EXAMPLES.glob("*.jpg"))[0]
    request = PredictionRequest.build(image, **REQUEST_FIELDS)
    result: dict[str, Any] = {"runtimes": {}}
    predictors = {}
    threads = torch.get_num_threads()
    for runtime in args.runtimes:
        # as the app does: with ONNX Runtime serving, PyTorch runs only the tiny head, on 1 thread
        torch.set_num_threads(1 if runtime != "torch" else threads)
        t0 = time.perf_counter()
        predictor = Predictor.from_checkpoint(args.checkpoint, runtime=runtime, threads=threads)
        load_s = time.perf_counter() - t0
        predictors[runtime] = predictor
        result["runtimes"][runtime] = {
            "load_seconds": load_s,
            **latencies(predictor, request, args.n, args.warmup),
            "eval_throughput": eval_throughput(
                predictor, args.data_dir, args.batch_images, args.batch_size
            ),
        }
    serving = predictors[args.runtimes[0]]
    torch.set_num_threads(1 if serving.runtime != "torch" else threads)
    pre = serving.config.preprocessing
    result.update(
        {
            "model_version": serving.version,
            "serving_runtime": serving.runtime,
            "input_size": [pre.height, pre.width],
            "image": str(image),
            "torch_threads": threads,
            "onnx_threads": serving.engine.session.get_session_options().intra_op_num_threads
            if serving.engine is not None
            else None,
            "cpu": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "load_seconds": result["runtimes"][args.runtimes[0]]["load_seconds"],
            "app_path": app_path(serving, image, args.n, args.warmup, args.memory_n),
            "huge_png": huge_png_cost(serving),
        }
    )
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    report(result)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
