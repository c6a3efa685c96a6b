"""Classify dermoscopy images: calibrated probabilities per class, top class first.

    python -m scripts.predict lesion.jpg
    python -m scripts.predict a.jpg b.jpg --age 60 --sex male --site back
    python -m scripts.predict a.jpg --db sqlite:///history.db      # also store in the history
    python -m scripts.predict a.jpg --json --heatmap-dir out/      # JSON + overlay/chart PNGs
    python -m scripts.predict *.jpg --db sqlite:///history.db --batch-id 3f2a9c01d4e7  # resume

Any subset of age / sex / site may be given. Without --db nothing is stored. A bad image among
several is reported and skipped; the exit code is then 2. With --db every run is a batch whose id
is printed and stored on its rows (scripts.query_history --batch-id ID lists them); running again
with --batch-id ID resumes an interrupted run: images it already stored (same name, same bytes)
are skipped. Files written with --heatmap-dir are recorded with the row, never overwrite an
existing file, and are removed when the row is deleted. Research and education only — not a
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
from data_pipeline.schema import Metadata, normalize_target
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
        "--batch-id",
        default=None,
        metavar="ID",
        help="with --db: resume this batch run (skip images it already stored)",
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


def format_text(
    path: str, pred: Prediction, row_id: int | None, db_url: str | None, batch: str | None = None
) -> str:
    meta = pred.metadata
    age = "unknown" if meta.age is None else f"{meta.age:g}"
    lines = [
        f"{path}",
        f"  metadata: age {age}, sex {meta.sex}, site {meta.site}",
    ]
    names = pred.classes.names_by_code  # the model's own class names
    width = max(len(n) for n in names.values())
    for rank, (code, prob) in enumerate(pred.ranked, 1):
        lines.append(f"  {rank}. {code:<5} {names[code]:<{width}} {_pct(prob)}")
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
        in_batch = f" (batch {batch})" if batch else ""
        lines.append(f"  stored as prediction id {row_id} in {db_url}{in_batch}")
    return "\n".join(lines)


def heatmap_dir(value: str | None) -> Path | None:
    """The --heatmap-dir folder, created now: a bad one fails before any model is loaded or
    any row is stored."""
    if not value:
        return None
    out_dir = Path(value)
    if out_dir.exists() and not out_dir.is_dir():
        raise DermError(f"--heatmap-dir {out_dir} is a file, not a folder: name a folder.")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DermError(f"--heatmap-dir {out_dir} cannot be created ({exc.strerror}).") from None
    return out_dir


def _write_new(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary name next to ``path``, then rename (never half a file)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def write_heatmaps(out_dir: Path, path: str, pred: Prediction, used: set[str]) -> list[Path]:
    """``<image>_overlay.png`` and ``<image>_contributions.png``; a name already used by this run
    or by a file in the folder gets ``_2``, ``_3``…, so no earlier file (perhaps recorded with
    another stored row) is overwritten."""
    from service.render import contributions_chart, overlay_heatmap, to_png

    stem = Path(path).stem or "image"
    base, n = stem, 2

    def taken(b: str) -> bool:
        return b in used or any((out_dir / f"{b}_{k}.png").exists() for k in HEATMAP_KINDS)

    while taken(base):
        base, n = f"{stem}_{n}", n + 1
    used.add(base)
    written = []
    try:
        if pred.heatmap is not None and pred.image is not None:
            overlay = out_dir / f"{base}_overlay.png"
            _write_new(overlay, to_png(overlay_heatmap(pred.image, pred.heatmap)))
            written.append(overlay)
        chart = out_dir / f"{base}_contributions.png"
        target = pred.attribution_target or ""
        _write_new(chart, to_png(contributions_chart(pred.metadata_contributions, target)))
        written.append(chart)
    except OSError as exc:
        remove_files(written)
        raise DermError(
            f"{path}: cannot write to --heatmap-dir {out_dir} ({exc.strerror})."
        ) from None
    return written


HEATMAP_KINDS = ("overlay", "contributions")


def remove_files(paths: list[Path]) -> None:
    for p in paths:
        p.unlink(missing_ok=True)


def _report(
    args: argparse.Namespace,
    path: str,
    stored: StoredPrediction,
    db_url: str | None,
    written: list[Path],
    batch: str | None,
) -> dict[str, Any] | None:
    """Print one result as text (returns None), or return it as a JSON-ready dict."""
    pred, row_id = stored.prediction, stored.id
    if args.json:
        d = {"image": path, **pred.to_dict()}
        if row_id is not None:
            d["id"] = row_id
            d["batch_id"] = batch
        if written:
            d["files"] = [str(p) for p in written]
        return d
    print(format_text(path, pred, row_id, db_url, batch))
    for p in written:
        print(f"  wrote {p}")
    print()
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # Validate the shared fields once, before the model is loaded; each image is then read,
    # hashed and decoded once into a request.
    metadata = Metadata.parse(args.age, args.sex, args.site)
    out_dir = heatmap_dir(args.heatmap_dir)

    from data_pipeline.request import PredictionRequest
    from db.queries import normalize_batch_id
    from db.session import Database
    from model.predictor import Predictor
    from service.batch import new_batch_id
    from service.prediction import PredictionService, file_name

    if args.batch_id is not None and not args.db:
        raise DermError("--batch-id resumes a batch stored in a database: give --db too.")
    resumed = normalize_batch_id(args.batch_id)
    # One code path with or without --db: the service predicts and, given a database, stores.
    db = Database(args.db) if args.db else None
    batch = (resumed or new_batch_id()) if db is not None else None
    predictor = Predictor.from_checkpoint(args.checkpoint, runtime=args.runtime)
    target = normalize_target(args.target, predictor.classes.codes)  # the model's classes
    service = PredictionService(predictor, db, store_images=not args.no_store_images)
    results: list[dict[str, Any]] = []
    failed = 0
    used_names: set[str] = set()
    try:
        done = service.batch_members(resumed) if resumed else {}
        if batch is not None:
            print(f"batch {batch} (resume with --batch-id {batch})", file=sys.stderr)
        for path in _progress(args.images):
            written: list[Path] = []
            try:
                request = PredictionRequest.for_image(path, metadata, target)
                earlier = done.get((str(file_name(request.name)), request.image_sha256))
                if earlier is not None:
                    print(
                        f"{path}: skipped, already stored as prediction id {earlier} "
                        f"by batch {batch}",
                        file=sys.stderr,
                    )
                    if args.json:
                        results.append({"image": path, "id": earlier, "batch_id": batch})
                    continue
                pred = service.explain(request, tta=args.tta)
                if out_dir is not None:
                    written = write_heatmaps(out_dir, path, pred, used_names)
                recorded = [str(p.resolve()) for p in written]
                stored = service.store(request, pred, batch_id=batch, output_files=recorded)
            except DermError as exc:
                remove_files(written)  # files of a row that was not stored
                failed += 1
                print(f"error: {exc}", file=sys.stderr)
                continue
            d = _report(args, path, stored, db.display_url if db else None, written, batch)
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
