"""Browse the prediction history.

    python -m scripts.query_history --db sqlite:///history.db
    python -m scripts.query_history --dx mel bcc --since 2026-01-01 --min-prob 0.5
    python -m scripts.query_history --site back --age-min 40 --format csv > back.csv
    python -m scripts.query_history --id 12 --format json        # one row, with its heatmap
    python -m scripts.query_history --stats                      # count per class per day

The database is --db, else $SKIN_DB_URL, else sqlite:///predictions.db. Dates are UTC days;
--until includes its whole day. JSON output includes probabilities, metadata contributions and
the heatmap (base64 PNG).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from collections.abc import Sequence
from typing import Any

from common.errors import DermError
from data_pipeline.schema import CLASSES, FIELDS
from db.models import PredictionRecord
from db.queries import (
    HistoryFilter,
    count_predictions,
    counts_per_class_per_day,
    get_prediction,
    query_predictions,
)
from db.session import Database, resolve_db_url, sqlite_path
from common.cli import run_cli


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m scripts.query_history",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--db", default=None, metavar="URL", help="history database URL")
    p.add_argument(
        "--dx",
        nargs="+",
        default=[],
        metavar="CLASS",
        help=f"top class is one of these ({' '.join(CLASSES)})",
    )
    p.add_argument("--since", default=None, metavar="YYYY-MM-DD", help="from this UTC day on")
    p.add_argument(
        "--until", default=None, metavar="YYYY-MM-DD", help="up to and including this UTC day"
    )
    p.add_argument("--min-prob", default=None, metavar="P", help="top-class probability ≥ P")
    p.add_argument("--max-prob", default=None, metavar="P", help="top-class probability ≤ P")
    p.add_argument("--sex", default=None)
    p.add_argument("--site", default=None)
    p.add_argument("--age-min", default=None, metavar="YEARS")
    p.add_argument("--age-max", default=None, metavar="YEARS")
    p.add_argument("--model-version", default=None, metavar="NAME@HASH")
    p.add_argument("--id", type=int, default=None, metavar="N", help="show this one prediction")
    p.add_argument("--limit", type=int, default=50, help="rows to show (default 50)")
    p.add_argument("--offset", type=int, default=0, help="skip this many rows (paging)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--stats", action="store_true", help="count per class per day instead of rows")
    return p


# --- formatting --------------------------------------------------------------------------------


def _when(row: PredictionRecord) -> str:
    return row.created_at.strftime("%Y-%m-%d %H:%M:%S")


def _age(age: float | None) -> str:
    return "" if age is None else f"{age:g}"


def _is_number(text: str) -> bool:
    if text == "":
        return True
    try:
        float(text)
    except ValueError:
        return False
    return True


def render_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Plain aligned columns; numbers right-aligned."""
    cells = [[str(c) for c in headers]] + [["" if v is None else str(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    numeric = [bool(rows) and all(_is_number(r[i]) for r in cells[1:]) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if num else c.ljust(w) for c, w, num in zip(r, widths, numeric)
        ).rstrip()

    out = [line(cells[0]), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells[1:]]
    return "\n".join(out)


TABLE_HEADERS = ("id", "created_at (UTC)", "class", "prob", "age", "sex", "site", "model", "warn")


def table_rows(rows: Sequence[PredictionRecord]) -> list[list[Any]]:
    return [
        [
            r.id,
            _when(r),
            r.predicted_class,
            f"{r.predicted_probability:.3f}",
            _age(r.age),
            r.sex,
            r.site,
            r.model_version,
            len(r.warnings or []),
        ]
        for r in rows
    ]


CSV_HEADERS = (
    ["id", "created_at", "predicted_class", "predicted_probability", "age", "sex", "site"]
    + [f"p_{c}" for c in CLASSES]
    + ["attribution_target"]
    + [f"contribution_{f}" for f in FIELDS]
    + [
        "warnings",
        "model_name",
        "model_version",
        "checkpoint_sha256",
        "image_sha256",
        "image_width",
        "image_height",
        "latency_ms",
    ]
)


def csv_row(r: PredictionRecord) -> list[Any]:
    d = r.to_dict()
    contrib = d["metadata_contributions"] or {}
    return (
        [
            d["id"],
            d["created_at"],
            d["predicted_class"],
            d["predicted_probability"],
            d["age"],
            d["sex"],
            d["site"],
        ]
        + [d["probabilities"].get(c) for c in CLASSES]
        + [d["attribution_target"]]
        + [contrib.get(f) for f in FIELDS]
        + [
            "; ".join(d["warnings"]),
            d["model_name"],
            d["model_version"],
            d["checkpoint_sha256"],
            d["image_sha256"],
            d["image_width"],
            d["image_height"],
            d["latency_ms"],
        ]
    )


def to_csv(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(headers)
    writer.writerows(["" if v is None else v for v in row] for row in rows)
    return buf.getvalue().rstrip("\n")


def detail_text(r: PredictionRecord) -> str:
    from data_pipeline.schema import CLASS_NAMES

    d = r.to_dict()
    lines = [
        f"prediction {r.id}  ({_when(r)} UTC)",
        (
            f"  image: sha256 {r.image_sha256}, {r.image_width}×{r.image_height} px, "
            f"thumbnail {'stored' if r.thumbnail is not None else 'not stored'}"
        ),
        f"  metadata: age {_age(r.age) or 'unknown'}, sex {r.sex}, site {r.site}",
    ]
    ranked = sorted(d["probabilities"].items(), key=lambda kv: -kv[1])
    for code, prob in ranked:
        lines.append(f"    {code:<5} {CLASS_NAMES.get(code, code):<46} {100 * prob:5.1f}%")
    if d["metadata_contributions"]:
        contrib = ", ".join(
            f"{k} {100 * v:+.1f} pp" for k, v in d["metadata_contributions"].items()
        )
        lines.append(f"  metadata effect on P({r.attribution_target}): {contrib}")
    lines.append(f"  heatmap: {'stored' if r.heatmap_png is not None else 'none'}")
    for w in d["warnings"]:
        lines.append(f"  warning: {w}")
    lines.append(f"  model: {r.model_version} (weights sha256 {r.checkpoint_sha256})")
    lines.append(f"  latency: {r.latency_ms:.0f} ms")
    return "\n".join(lines)


# --- main ----------------------------------------------------------------------------------------


def open_existing(url: str | None) -> Database:
    """Open the history database; a SQLite file must already exist (no silent empty DB)."""
    resolved = resolve_db_url(url)
    path = sqlite_path(resolved)
    if path is not None and not path.is_file():
        raise DermError(
            f"No history database at {path} ({resolved}); store predictions first with "
            "python -m scripts.predict IMAGE --db URL, or pass --db."
        )
    return Database(resolved)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    f = HistoryFilter(
        since=args.since,
        until=args.until,
        classes=args.dx,
        min_prob=args.min_prob,
        max_prob=args.max_prob,
        sex=args.sex,
        site=args.site,
        age_min=args.age_min,
        age_max=args.age_max,
        model_version=args.model_version,
    )
    db = open_existing(args.db)
    try:
        with db.session() as session:
            if args.id is not None:
                row = get_prediction(session, args.id)
                if row is None:
                    raise DermError(f"No prediction with id {args.id} in {db.display_url}.")
                if args.format == "json":
                    print(json.dumps(row.to_dict(include_heatmap=True), indent=2))
                elif args.format == "csv":
                    print(to_csv(CSV_HEADERS, [csv_row(row)]))
                else:
                    print(detail_text(row))
                return 0

            if args.stats:
                stats = counts_per_class_per_day(session, f)
                if args.format == "json":
                    print(
                        json.dumps(
                            [{"day": d, "class": c, "count": n} for d, c, n in stats], indent=2
                        )
                    )
                elif args.format == "csv":
                    print(to_csv(["day", "class", "count"], stats))
                else:
                    print(render_table(["day", "class", "count"], stats))
                    print(f"\n{sum(n for _, _, n in stats)} prediction(s); {f.describe()}")
                return 0

            rows = query_predictions(
                session, f, limit=args.limit, offset=args.offset, images=args.format == "json"
            )
            if args.format == "json":
                print(json.dumps([r.to_dict(include_heatmap=True) for r in rows], indent=2))
            elif args.format == "csv":
                print(to_csv(CSV_HEADERS, [csv_row(r) for r in rows]))
            else:
                total = count_predictions(session, f)
                print(render_table(TABLE_HEADERS, table_rows(rows)))
                first = args.offset + 1 if rows else 0
                print(
                    f"\nrows {first}-{args.offset + len(rows)} of {total} matching "
                    f"({f.describe()}); newest first. Research/education only — not a diagnosis."
                )
            return 0
    finally:
        db.dispose()


def cli() -> int:
    """Console-script entry point."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
