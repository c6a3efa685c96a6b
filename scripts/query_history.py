"""Browse the prediction history.

    python -m scripts.query_history --db sqlite:///history.db
    python -m scripts.query_history --dx mel bcc --since 2026-01-01 --min-prob 0.5
    python -m scripts.query_history --site back --age-min 40 --format csv > back.csv
    python -m scripts.query_history --id 12 --format json        # one row, with its heatmap
    python -m scripts.query_history --stats                      # count per class per day
    python -m scripts.query_history --confirm 12 --dx mel --confirm-source histopathology \
        --note "excised 2026-03-02"                              # record a confirmed diagnosis
    python -m scripts.query_history --agreement --since 2026-01-01  # model vs confirmed
    python -m scripts.query_history --delete 12                  # delete one stored prediction
    python -m scripts.query_history --batch-id 3f2a9c01d4e7      # the rows of one batch run

The database is --db, else $SKIN_DB_URL, else sqlite:///predictions.db. Dates are UTC days;
--until includes its whole day. JSON output includes probabilities, metadata contributions and
the heatmap (base64 PNG). With --confirm, --dx is the confirmed diagnosis (one of the 7 classes or
"other") and --confirm-source says how it was confirmed (histopathology, follow-up, expert
consensus, clinician). --agreement compares the model's top class with the confirmed diagnoses of
the matching rows (the same numbers as the app's Agreement tab). --delete removes the row, its
bytes in the database files and the files scripts.predict --heatmap-dir wrote for it. CSV cells
that a spreadsheet would run as a formula (=, +, -, @) are written with a leading '.
"""

from __future__ import annotations

import argparse
import json
import sys

from common.cli import run_cli
from common.errors import DatabaseError, DermError
from common.text import DISCLAIMER
from data_pipeline.schema import CLASSES
from db.models import CONFIRM_SOURCES
from db.queries import (
    HistoryFilter,
    confirm_prediction,
    confirmed_dx_choices,
    count_predictions,
    counts_per_class_per_day,
    get_prediction,
    query_predictions,
    remember_stored_classes,
)
from db.session import Database, resolve_db_url, sqlite_path
from service.agreement import (
    PER_CLASS_HEADERS,
    VERSION_HEADERS,
    agreement_for,
    confusion_headers,
    confusion_rows,
    per_class_rows,
    summary_lines,
    version_rows,
)
from service.history import (
    TABLE_COLUMNS,
    class_label,
    csv_codes,
    csv_columns,
    csv_row,
    delete_record,
    detail_text,
    record_dict,
    render_table,
    table_row,
    to_csv,
)

STATS_COLUMNS = ["day", "class", "count"]


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
        help=f"top class is one of these ({' '.join(CLASSES)}, or another stored model's codes)",
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
    p.add_argument(
        "--batch-id", default=None, metavar="ID", help="only the rows this batch run stored"
    )
    p.add_argument("--id", type=int, default=None, metavar="N", help="show this one prediction")
    p.add_argument("--limit", type=int, default=50, help="rows to show (default 50)")
    p.add_argument("--offset", type=int, default=0, help="skip this many rows (paging)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--stats", action="store_true", help="count per class per day instead of rows")
    p.add_argument(
        "--confirmed-only", action="store_true", help="only rows with a confirmed diagnosis"
    )
    p.add_argument(
        "--agreement",
        action="store_true",
        help="model vs confirmed diagnoses over the matching rows",
    )
    p.add_argument(
        "--confirm",
        type=int,
        default=None,
        metavar="ID",
        help="record the confirmed diagnosis (--dx) of prediction ID",
    )
    p.add_argument(
        "--confirm-source",
        default=None,
        metavar="SOURCE",
        help=f"with --confirm: {', '.join(CONFIRM_SOURCES)}",
    )
    p.add_argument("--note", default=None, help="with --confirm: an optional note")
    p.add_argument(
        "--delete", type=int, default=None, metavar="ID", help="delete stored prediction ID"
    )
    return p


# --- main ----------------------------------------------------------------------------------------


def open_existing(url: str | None) -> Database:
    """Open the history database; a SQLite file must already exist (no silent empty DB)."""
    resolved = resolve_db_url(url)
    path = sqlite_path(resolved)
    if path is not None and path.is_dir():
        raise DatabaseError(
            f"The history database {resolved} cannot be opened: {path} is a directory."
        )
    if path is not None and not path.is_file():
        raise DermError(
            f"No history database at {path} ({resolved}); store predictions first with "
            "python -m scripts.predict IMAGE --db URL, or pass --db."
        )
    return Database(resolved)


def history_filter(args: argparse.Namespace) -> HistoryFilter:
    return HistoryFilter(
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
        confirmed=True if args.confirmed_only else None,
        batch_id=args.batch_id,
    )


def show_one(db: Database, args: argparse.Namespace) -> None:
    with db.session() as session:
        row = get_prediction(session, args.id)
        if row is None:
            raise DermError(f"No prediction with id {args.id} in {db.display_url}.")
        if args.format == "json":
            print(json.dumps(record_dict(row, include_heatmap=True), indent=2))
        elif args.format == "csv":
            codes = csv_codes([row])  # its model's classes
            print(to_csv(csv_columns(codes), [csv_row(row, codes)]))
        else:
            print(detail_text(row))


def show_stats(db: Database, f: HistoryFilter, fmt: str) -> None:
    with db.session() as session:
        stats = counts_per_class_per_day(session, f)
    if fmt == "json":
        print(json.dumps([dict(zip(STATS_COLUMNS, s, strict=True)) for s in stats], indent=2))
    elif fmt == "csv":
        print(to_csv(STATS_COLUMNS, stats))
    else:
        print(render_table(STATS_COLUMNS, stats))
        print(f"\n{sum(n for _, _, n in stats)} prediction(s); {f.describe()}")


def show_rows(db: Database, f: HistoryFilter, args: argparse.Namespace) -> None:
    with db.session() as session:
        rows = query_predictions(
            session, f, limit=args.limit, offset=args.offset, images=args.format == "json"
        )
        full_page = len(rows) >= args.limit
        total = count_predictions(session, f) if args.format == "table" or full_page else len(rows)
    if args.format in ("json", "csv") and total > args.offset + len(rows):
        # on stderr, so that the CSV / JSON on stdout stays clean: an export is not cut silently
        print(
            f"note: rows {args.offset + 1}-{args.offset + len(rows)} of {total} matching; "
            "use --limit / --offset for the others",
            file=sys.stderr,
        )
    if args.format == "json":
        print(json.dumps([record_dict(r, include_heatmap=True) for r in rows], indent=2))
    elif args.format == "csv":
        codes = csv_codes(rows)  # the classes of the rows' models
        print(to_csv(csv_columns(codes), [csv_row(r, codes) for r in rows]))
    else:
        print(render_table(TABLE_COLUMNS, [table_row(r) for r in rows]))
        first = args.offset + 1 if rows else 0
        print(
            f"\nrows {first}-{args.offset + len(rows)} of {total} matching "
            f"({f.describe()}); newest first. {DISCLAIMER}"
        )


def confirm(db: Database, args: argparse.Namespace) -> None:
    if len(args.dx) != 1:
        raise DermError(
            "--confirm needs exactly one --dx: the confirmed diagnosis "
            f"({', '.join(confirmed_dx_choices())})."
        )
    with db.session(write=True) as session:
        row = confirm_prediction(session, args.confirm, args.dx[0], args.confirm_source, args.note)
        print(
            f"prediction {row.id}: confirmed {class_label(str(row.confirmed_dx))} "
            f"({row.confirmed_source}); the model's top class was "
            f"{class_label(row.predicted_class)}."
        )


def delete(db: Database, prediction_id: int) -> None:
    if not delete_record(db, prediction_id):
        raise DermError(f"No prediction with id {prediction_id} in {db.display_url}.")
    print(f"prediction {prediction_id} deleted.")


def show_agreement(db: Database, f: HistoryFilter, fmt: str) -> None:
    a = agreement_for(db, f)
    if fmt == "json":
        print(json.dumps(a.to_dict(), indent=2))
        return
    if fmt == "csv":
        print(to_csv(confusion_headers(a), confusion_rows(a)))
        return
    print("\n".join(summary_lines(a)))
    if a.n_confirmed:
        print("\nConfusion matrix (rows: confirmed diagnosis, columns: model's top class)")
        print(render_table(confusion_headers(a), confusion_rows(a)))
        print()
        print(render_table(PER_CLASS_HEADERS, per_class_rows(a)))
        print()
        print(render_table(VERSION_HEADERS, version_rows(a)))
    print(f"\n{f.describe()}. {DISCLAIMER}")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.confirm is not None and args.delete is not None:
        raise DermError("Use --confirm or --delete, not both.")
    db = open_existing(args.db)
    try:
        with db.session() as session:  # a row's classes are its model's: accept those stored
            remember_stored_classes(session)
        # with --confirm, --dx is the confirmed diagnosis, not a filter
        f = history_filter(args) if args.confirm is None else HistoryFilter()
        if args.confirm is not None:
            confirm(db, args)
        elif args.delete is not None:
            delete(db, args.delete)
        elif args.agreement:
            show_agreement(db, f, args.format)
        elif args.id is not None:
            show_one(db, args)
        elif args.stats:
            show_stats(db, f, args.format)
        else:
            show_rows(db, f, args)
    finally:
        db.dispose()
    return 0


def cli() -> int:
    """Console-script entry point."""
    return run_cli(main)


if __name__ == "__main__":
    sys.exit(cli())
