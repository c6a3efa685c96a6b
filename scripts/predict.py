"""Classify dermoscopy images: calibrated probabilities per class, top class first.

    python -m scripts.predict lesion.jpg
    python -m scripts.predict a.jpg b.jpg --age 60 --sex male --site back
    python -m scripts.predict a.jpg --db sqlite:///history.db      # also store in the history
    python -m scripts.predict a.jpg --json --heatmap-dir out/      # JSON + overlay/chart PNGs

Any subset of age / sex / site may be given. Without --db nothing is stored. A bad image among
several is reported and skipped; the exit code is then 2. Research and education only — not a
diagnosis.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from common.cli import run_cli
from common.errors import DermError
from common.text import DISCLAIMER
from data_pipeline.schema import CLASS_NAMES, Metadata, normalize_target
from model.onnx_runtime import RUNTIME_HELP, RUNTIMES

if TYPE_CHECKING:  # the model stack is imported only after the fields are validated
    from model.predictor import Prediction
    from service.prediction import StoredPrediction


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.predict",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (JPEG, PNG, ...)")
    p.add_argument("--age", default=None, help="age in years (0-120); omit if unknown")
    p.add_argument("--sex", default=None, help="female / male; omit if unknown")
    p.add_argument("--site", default=None, help="body site, e.g. back, face, lower extremity")
    p.add_argument("--checkpoint", default=None, help="checkpoint folder (default: shipped model)")
    p.add_argument("--json", action="store_true", help="print a JSON list instead of text")
    p.add_argument(
        "--db",
        default=None,
        metavar="URL",
        help="store each prediction in this history database (e.g. sqlite:///history.db)",
    )
    p.add_argument(
        "--no-store-images",
        action="store_true",
        help="with --db: store no thumbnail of the image (privacy)",
    )
    p.add_argument("--tta", action="store_true", help="average over flips (slower)")
    p.add_argument(
        "--runtime",
        default=None,
        metavar="|".join(RUNTIMES),
        help=RUNTIME_HELP,
    )
    p.add_argument(
        "--target",
        default=None,
        metavar="CLASS",
        help="explain this class instead of the top one (e.g. mel)",
    )
    p.add_argument(
        "--heatmap-dir",
        default=None,
        metavar="DIR",
        help="write <image>_overlay.png and <image>_contributions.png per image here",
    )
    return p


def _pct(p: float) -> str:
    return f"{100.0 * p:5.1f}%"


def format_text(path: str, pred: Prediction, row_id: int | None, db_url: str | None) -> str:
    meta = pred.metadata
    age = "unknown" if meta.age is None else f"{meta.age:g}"
    lines = [
        f"{path}",
        f"  metadata: age {age}, sex {meta.sex}, site {meta.site}",
    ]
    width = max(len(n) for n in CLASS_NAMES.values())
    for rank, (code, prob) in enumerate(pred.ranked, 1):
        lines.append(f"  {rank}. {code:<5} {CLASS_NAMES[code]:<{width}} {_pct(prob)}")
    if pred.metadata_contributions:
        contrib = ", ".join(
            f"{k} {100.0 * v:+.1f} pp" for k, v in pred.metadata_contributions.items()
        )
        lines.append(f"  metadata effect on P({pred.attribution_target}): {contrib}")
    if pred.malignant_flag:
        lines.append(f"  flag: malignant class(es) rank high: {', '.join(pred.malignant_flag)}")
    for warning in pred.warnings:
        lines.append(f"  warning: {warning}")
    if row_id is not None:
        lines.append(f"  stored as prediction id {row_id} in {db_url}")
    return "\n".join(lines)


def write_heatmaps(out_dir: Path, path: str, pred: Prediction, used: set[str]) -> list[Path]:
    from service.render import contributions_chart, overlay_heatmap, to_png

    out_dir.mkdir(parents=True, exist_ok=True)
    stem = Path(path).stem or "image"
    base, n = stem, 2
    while base in used:
        base, n = f"{stem}_{n}", n + 1
    used.add(base)
    written = []
    if pred.heatmap is not None and pred.image is not None:
        overlay = out_dir / f"{base}_overlay.png"
        overlay.write_bytes(to_png(overlay_heatmap(pred.image, pred.heatmap)))
        written.append(overlay)
    chart = out_dir / f"{base}_contributions.png"
    chart.write_bytes(
        to_png(contributions_chart(pred.metadata_contributions, pred.attribution_target or ""))
    )
    written.append(chart)
    return written


def _report(
    args: argparse.Namespace,
    path: str,
    stored: StoredPrediction,
    db_url: str | None,
    used: set[str],
) -> dict[str, Any] | None:
    """Print one result as text (returns None), or return it as a JSON-ready dict."""
    pred, row_id = stored.prediction, stored.id
    written = write_heatmaps(Path(args.heatmap_dir), path, pred, used) if args.heatmap_dir else []
    if args.json:
        d = {"image": path, **pred.to_dict()}
        if row_id is not None:
            d["id"] = row_id
        if written:
            d["files"] = [str(p) for p in written]
        return d
    print(format_text(path, pred, row_id, db_url))
    for p in written:
        print(f"  wrote {p}")
    print()
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Validate the shared fields once, before the model is loaded; each image is then read,
    # hashed and decoded once into a request.
    metadata = Metadata.parse(args.age, args.sex, args.site)
    target = normalize_target(args.target)

    from data_pipeline.request import PredictionRequest
    from db.session import Database
    from model.predictor import Predictor
    from service.prediction import PredictionService

    # One code path with or without --db: the service predicts and, given a database, stores.
    db = Database(args.db) if args.db else None
    predictor = Predictor.from_checkpoint(args.checkpoint, runtime=args.runtime)
    service = PredictionService(predictor, db, store_images=not args.no_store_images)
    results: list[dict[str, Any]] = []
    failed = 0
    used_names: set[str] = set()
    try:
        for path in _progress(args.images):
            try:
                request = PredictionRequest.for_image(path, metadata, target)
                stored = service.predict_and_store(request, tta=args.tta)
            except DermError as exc:
                failed += 1
                print(f"error: {exc}", file=sys.stderr)
                continue
            d = _report(args, path, stored, db.display_url if db else None, used_names)
            if d is not None:
                results.append(d)
    finally:
        service.close()

    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"model: {service.predictor.version}")
        print(DISCLAIMER)
    if failed:
        print(
            f"error: {failed} of {len(args.images)} image(s) could not be processed.",
            file=sys.stderr,
        )
        return 2
    return 0


def _progress(paths: list[str]) -> Any:
    """A progress bar on stderr for batches (stdout keeps only the results)."""
    from tqdm import tqdm

    return tqdm(paths, desc="predict", unit="image", disable=len(paths) < 2, leave=False)


def cli() -> int:
    """Console-script entry point."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
