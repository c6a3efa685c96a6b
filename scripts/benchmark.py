"""Speed and memory of the predictor on this machine (not a test: numbers depend on hardware).

    python -m scripts.benchmark                       # shipped model, an example image
    python -m scripts.benchmark --threads 2 --n 100 --json outputs/benchmark.json
    python -m scripts.benchmark --data-dir ../shared/ham10000 --batch-images 512

Reports latency percentiles for the predictor alone (predict only; predict + attributions:
Grad-CAM + metadata ablation) beside the app's whole path — the file read, hashed and decoded
into a request, then the prediction service predicting, explaining and storing the row (thumbnail,
heatmap PNG) in a temporary SQLite database — plus model load time, peak resident memory and, with
--data-dir, batched evaluation throughput in images/s.
"""

from __future__ import annotations

import argparse
import json
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
from db.session import Database
from model.predictor import Predictor
from service.prediction import PredictionService

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
    predictor: Predictor, data_dir: Path, n_images: int, batch: int
) -> dict[str, Any]:
    from data_pipeline.ham10000 import load_metadata
    from model.engine import collect_logits, eval_loader

    df = load_metadata(data_dir).iloc[:n_images]
    loader = eval_loader(df, predictor.config.preprocessing, batch_size=batch)
    t0 = time.perf_counter()
    collect_logits(predictor.model, loader)
    seconds = time.perf_counter() - t0
    return {"images": len(df), "batch_size": batch, "images_per_s": len(df) / seconds}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--image", type=Path, default=None, help="default: first app example")
    p.add_argument("--n", type=int, default=50, help="timed calls per measurement")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch default)")
    p.add_argument("--data-dir", type=Path, default=None, help="also measure batched eval")
    p.add_argument("--batch-images", type=int, default=256)
    p.add_argument("--json", type=Path, default=None, help="write results here")
    return p


def latencies(predictor: Predictor, image: Path, n: int, warmup: int) -> dict[str, Any]:
    """Predictor alone (with and without explanations) and the app's full path: the request
    built from the file, then the service predicting, explaining and storing on a temp SQLite."""
    request = PredictionRequest.build(image, **REQUEST_FIELDS)
    with tempfile.TemporaryDirectory(prefix="dermfusion-bench-") as tmp:
        service = PredictionService(predictor, Database(f"sqlite:///{Path(tmp) / 'bench.db'}"))
        try:

            def app_path() -> None:
                service.predict_and_store(PredictionRequest.build(image, **REQUEST_FIELDS))

            service_ms = time_calls(app_path, n, warmup)
            stored = service.count()
        finally:
            service.close()
    return {
        "predict_only": percentiles(
            time_calls(lambda: predictor.predict(request, explain=False), n, warmup)
        ),
        "predict_and_explain": percentiles(
            time_calls(lambda: predictor.predict(request, explain=True), n, warmup)
        ),
        "service_with_storage": {**percentiles(service_ms), "rows_stored": stored},
    }


def report(result: dict[str, Any]) -> None:
    po, pe = result["predict_only"], result["predict_and_explain"]
    ps = result["service_with_storage"]
    print(
        f"{result['model_version']}  input {result['input_size']}  "
        f"threads {result['torch_threads']}"
    )
    print(f"predict only        p50 {po['p50_ms']:.0f} ms  p90 {po['p90_ms']:.0f} ms")
    print(f"predict + explain   p50 {pe['p50_ms']:.0f} ms  p90 {pe['p90_ms']:.0f} ms")
    print(f"app path (store)    p50 {ps['p50_ms']:.0f} ms  p90 {ps['p90_ms']:.0f} ms")
    if "eval_throughput" in result:
        print(f"batched eval        {result['eval_throughput']['images_per_s']:.1f} images/s")
    print(f"model load {result['load_seconds']:.2f} s   peak RSS {result['peak_rss_mb']:.0f} MB")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    image = args.image or sorted(EXAMPLES.glob("*.jpg"))[0]
    t0 = time.perf_counter()
    predictor = Predictor.from_checkpoint(args.checkpoint)
    load_s = time.perf_counter() - t0
    pre = predictor.config.preprocessing
    result: dict[str, Any] = {
        "model_version": predictor.version,
        "input_size": [pre.height, pre.width],
        "image": str(image),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "load_seconds": load_s,
        **latencies(predictor, image, args.n, args.warmup),
    }
    if args.data_dir:
        result["eval_throughput"] = eval_throughput(predictor, args.data_dir, args.batch_images, 64)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    report(result)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
