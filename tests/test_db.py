"""History database without a model: session setup, migrations, filters, SQL-looking input.

Every test that takes ``database`` or ``db_url`` runs twice: on SQLite and on a real PostgreSQL
server (``tests/pg.py``; skipped with the reason where none can be started).
"""

from __future__ import annotations

import base64
import io
import threading
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import Column, String, inspect, select, text

from common.errors import DermError, MetadataError
from db import migrations
from db.models import Base, PredictionRecord
from db.queries import (
    HistoryFilter,
    count_predictions,
    counts_per_class_per_day,
    existing_ids,
    get_prediction,
    parse_date,
    query_predictions,
)
from db.session import DB_URL_ENV, DEFAULT_DB_URL, Database, resolve_db_url, sqlite_path
from service.history import record_dict

T0 = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


def _png(h: int = 6, w: int = 8) -> bytes:
    buf = io.BytesIO()
    Image.new("L", (w, h), 128).save(buf, format="PNG")
    return buf.getvalue()


def make_row(**over) -> PredictionRecord:
    cls = over.pop("predicted_class", "nv")
    prob = over.pop("predicted_probability", 0.6)
    values = {
        "created_at": T0,
        "image_sha256": "ab" * 32,
        "image_width": 600,
        "image_height": 450,
        "thumbnail": None,
        "age": 50.0,
        "sex": "female",
        "site": "back",
        "predicted_class": cls,
        "predicted_probability": prob,
        "probabilities": {cls: prob},
        "heatmap_png": _png(),
        "attribution_target": cls,
        "metadata_contributions": {"age": 0.01, "sex": -0.02, "site": 0.0},
        "warnings": [],
        "model_name": "fusion",
        "model_version": "fusion@111111111111",
        "checkpoint_sha256": "11" * 32,
        "latency_ms": 12.5,
    }
    values.update(over)
    if values["created_at"] is None:
        del values["created_at"]  # let the model's default fill it in
    return PredictionRecord(**values)


@pytest.fixture
def database(db_url: str) -> Database:
    d = Database(db_url)
    yield d
    d.dispose()


def insert(database: Database, *rows: PredictionRecord) -> list[int]:
    with database.session() as s:
        s.add_all(rows)
        s.flush()
        return [r.id for r in rows]


def ids(database: Database, f: HistoryFilter | None = None, **kw) -> list[int]:
    with database.session() as s:
        return [r.id for r in query_predictions(s, f, **kw)]


# --- session ----------------------------------------------------------------------------------


def test_db_url_precedence(monkeypatch):
    monkeypatch.delenv(DB_URL_ENV, raising=False)
    assert resolve_db_url(None) == DEFAULT_DB_URL == "sqlite:///predictions.db"
    monkeypatch.setenv(DB_URL_ENV, "sqlite:////tmp/from_env.db")
    assert resolve_db_url(None) == "sqlite:////tmp/from_env.db"
    assert resolve_db_url("sqlite:///explicit.db") == "sqlite:///explicit.db"


def test_clis_read_the_deployments_variables(monkeypatch, tmp_path: Path):
    # a CLI run beside a deployment configured by docs/deploy/configuration.md opens its database
    monkeypatch.setenv(DB_URL_ENV, "sqlite:////tmp/old_name.db")
    monkeypatch.setenv("DERMFUSION_DB_URL", "postgresql+psycopg://app@db/dermfusion")
    monkeypatch.delenv("DERMFUSION_DB_PASSWORD_FILE", raising=False)
    assert resolve_db_url(None) == "postgresql+psycopg://app@db/dermfusion"
    secret = tmp_path / "pw"
    secret.write_text("p@ss/w:rd\n")
    monkeypatch.setenv("DERMFUSION_DB_PASSWORD_FILE", str(secret))
    assert resolve_db_url(None) == "postgresql+psycopg://app:p%40ss%2Fw%3Ard@db/dermfusion"
    assert resolve_db_url("sqlite:///x.db") == "sqlite:///x.db"  # --db wins as a whole
    monkeypatch.setenv("DERMFUSION_DB_PASSWORD_FILE", str(tmp_path / "missing"))
    with pytest.raises(DermError, match=r"password file .* cannot be read"):
        resolve_db_url(None)


def test_sqlite_file_gets_parent_dirs_and_pragmas(tmp_path: Path):
    database = Database(f"sqlite:///{tmp_path / 'sub' / 'history.db'}")
    assert (tmp_path / "sub" / "history.db").is_file()
    assert sqlite_path(database.url) == tmp_path / "sub" / "history.db"
    with database.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    database.dispose()


def test_bad_db_url_is_a_clear_error():
    with pytest.raises(DermError, match="Bad database URL"):
        Database("not a url at all")


def test_in_memory_database_is_shared_between_threads():
    d = Database("sqlite://")
    insert(d, make_row())
    seen = []
    t = threading.Thread(target=lambda: seen.append(ids(d)))
    t.start()
    t.join()
    assert seen == [[1]]


def test_session_rolls_back_on_error(database: Database):
    with pytest.raises(RuntimeError), database.session() as s:
        s.add(make_row())
        s.flush()
        raise RuntimeError("boom")
    assert ids(database) == []


def test_created_at_is_utc_aware_and_converted(database: Database):
    plus2 = timezone(timedelta(hours=2))
    (rid,) = insert(database, make_row(created_at=datetime(2026, 3, 10, 14, 0, tzinfo=plus2)))
    with database.session() as s:
        row = get_prediction(s, rid)
        assert row.created_at == T0
        assert row.created_at.tzinfo is not None and row.created_at.utcoffset() == timedelta(0)
        raw = s.execute(text("SELECT created_at FROM predictions")).scalar()
    assert str(raw).startswith("2026-03-10 12:00:00")
    d = record_dict(row, include_heatmap=True)
    assert d["created_at"] == "2026-03-10T12:00:00+00:00"
    assert base64.b64decode(d["heatmap_png_base64"]) == row.heatmap_png
    assert Image.open(io.BytesIO(base64.b64decode(d["heatmap_png_base64"]))).size == (8, 6)
    assert "heatmap_png_base64" not in record_dict(row)


def test_default_created_at_is_now(database: Database):
    before = datetime.now(UTC)
    (rid,) = insert(database, make_row(created_at=None))
    with database.session() as s:
        assert before - timedelta(seconds=1) <= get_prediction(s, rid).created_at


# --- migrations ---------------------------------------------------------------------------------


def test_migrated_schema_matches_models(database: Database):
    insp = inspect(database.engine)
    for table in Base.metadata.sorted_tables:
        got = {c["name"]: c["nullable"] for c in insp.get_columns(table.name)}
        want = {c.name: bool(c.nullable) and not c.primary_key for c in table.columns}
        assert got == want, f"{table.name}: migrate() and db.models disagree"
        got_ix = {(i["name"], tuple(i["column_names"])) for i in insp.get_indexes(table.name)}
        want_ix = {(i.name, tuple(c.name for c in i.columns)) for i in table.indexes}
        assert got_ix == want_ix
    assert ("ix_predictions_class_created", ("predicted_class", "created_at")) in got_ix


def test_migration_recorded_and_idempotent(database: Database):
    latest = migrations.latest_version()
    assert migrations.current_version(database.engine) == latest
    assert database.migrate() == []
    assert migrations.migrate(database.engine) == []
    with database.engine.connect() as conn:
        rows = conn.execute(select(migrations.schema_migrations)).all()
    assert [r.version for r in rows] == list(range(1, latest + 1))
    assert rows[0].applied_at.tzinfo is not None


def _add_note_migration(conn):
    migrations.add_column(conn, "predictions", Column("reviewer_note", String(200)))


def test_new_migration_keeps_history(db_url: str, monkeypatch):
    url = db_url
    d1 = Database(url)
    insert(d1, make_row(predicted_class="mel"), make_row(age=None, site="face"))
    d1.dispose()

    nxt = migrations.latest_version() + 1
    v2 = migrations.Migration(nxt, "add reviewer_note", _add_note_migration)
    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, v2])
    d2 = Database(url, migrate=False)
    assert migrations.migrate(d2.engine) == [nxt]
    assert migrations.migrate(d2.engine) == []  # second run is a no-op
    assert "reviewer_note" in {c["name"] for c in inspect(d2.engine).get_columns("predictions")}
    with d2.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT predicted_class, age, site, reviewer_note FROM predictions ORDER BY id")
        ).all()
        versions = conn.execute(text("SELECT version FROM schema_migrations ORDER BY version"))
        assert [v for (v,) in versions] == list(range(1, nxt + 1))
    assert [tuple(r) for r in rows] == [("mel", 50.0, "back", None), ("nv", None, "face", None)]
    d2.dispose()


def test_failing_migration_changes_nothing(db_url: str, monkeypatch):
    url = db_url
    d = Database(url)
    insert(d, make_row())

    def half_then_fail(conn):
        _add_note_migration(conn)
        conn.exec_driver_sql("UPDATE predictions SET sex = 'male'")
        raise RuntimeError("migration bug")

    latest = migrations.latest_version()
    broken = migrations.Migration(latest + 1, "broken", half_then_fail)
    monkeypatch.setattr(migrations, "MIGRATIONS", [*migrations.MIGRATIONS, broken])
    with pytest.raises(RuntimeError, match="migration bug"):
        migrations.migrate(d.engine)
    cols = {c["name"] for c in inspect(d.engine).get_columns("predictions")}
    assert "reviewer_note" not in cols  # the DDL was rolled back too
    assert migrations.current_version(d.engine) == latest
    with d.session() as s:
        assert [r.sex for r in query_predictions(s)] == ["female"]
    d.dispose()


def test_database_newer_than_code_is_refused(db_url: str, monkeypatch):
    url = db_url
    known = list(migrations.MIGRATIONS)
    future = migrations.Migration(len(known) + 1, "future", lambda conn: None)
    monkeypatch.setattr(migrations, "MIGRATIONS", [*known, future])
    Database(url).dispose()
    monkeypatch.setattr(migrations, "MIGRATIONS", known)
    with pytest.raises(DermError, match=f"schema version {len(known) + 1}, newer"):
        Database(url)


def test_processes_opening_a_new_database_at_once_migrate_it_once(db_url: str):
    """Several app servers started together on an empty database: one migrates, the others wait
    (SQLite: BEGIN IMMEDIATE; PostgreSQL: an advisory lock) and then find it done."""
    from concurrent.futures import ThreadPoolExecutor

    barrier = threading.Barrier(6)

    def open_db(_: int) -> list[int]:
        barrier.wait()
        d = Database(db_url, migrate=False)
        try:
            return d.migrate()
        finally:
            d.dispose()

    with ThreadPoolExecutor(max_workers=6) as pool:
        applied = list(pool.map(open_db, range(6)))
    everything = list(range(1, migrations.latest_version() + 1))
    assert sorted(applied) == [[]] * 5 + [everything]
    d = Database(db_url)
    with d.engine.connect() as conn:
        versions = [r.version for r in conn.execute(select(migrations.schema_migrations))]
    assert sorted(versions) == everything
    d.dispose()


# --- filters ------------------------------------------------------------------------------------


def test_date_filters_until_is_inclusive(database: Database):
    day = timedelta(days=1)
    a, b, c, d = insert(
        database,
        make_row(created_at=T0 - day),  # 2026-03-09 12:00
        make_row(created_at=T0),  # 2026-03-10 12:00
        make_row(created_at=datetime(2026, 3, 10, 23, 59, 59, tzinfo=UTC)),
        make_row(created_at=datetime(2026, 3, 11, 0, 0, tzinfo=UTC)),
    )
    assert ids(database, HistoryFilter(since="2026-03-10")) == [d, c, b]
    assert ids(database, HistoryFilter(until="2026-03-10")) == [c, b, a]
    assert ids(database, HistoryFilter(since=date(2026, 3, 10), until=date(2026, 3, 10))) == [c, b]
    assert ids(database, HistoryFilter(since=T0 + timedelta(minutes=1))) == [d, c]
    assert ids(database, HistoryFilter(until=T0)) == [b, a]  # datetimes are exact instants
    # naive datetimes mean UTC
    assert ids(database, HistoryFilter(since=datetime(2026, 3, 11))) == [d]


def test_class_prob_sex_site_age_model_filters(database: Database):
    r = insert(
        database,
        make_row(predicted_class="mel", predicted_probability=0.9, sex="male", age=70.0),
        make_row(predicted_class="bcc", predicted_probability=0.5, site="face", age=None),
        make_row(predicted_class="nv", predicted_probability=0.3, sex="unknown", age=30.0),
        make_row(model_version="fusion@222222222222", age=45.0),
    )
    newest_first = r[::-1]
    assert ids(database, HistoryFilter(classes=["mel", "bcc"])) == [r[1], r[0]]
    assert ids(database, HistoryFilter(classes="MEL")) == [r[0]]
    assert ids(database, HistoryFilter(min_prob=0.5)) == [r[3], r[1], r[0]]
    assert ids(database, HistoryFilter(max_prob=0.5)) == [r[2], r[1]]
    assert ids(database, HistoryFilter(min_prob="0.4", max_prob="0.55")) == [r[1]]
    assert ids(database, HistoryFilter(sex="M")) == [r[0]]
    assert ids(database, HistoryFilter(sex="unknown")) == [r[2]]
    assert ids(database, HistoryFilter(site="face")) == [r[1]]
    assert ids(database, HistoryFilter(site="Lower_Extremity")) == []
    assert ids(database, HistoryFilter(age_min=40)) == [r[3], r[0]]  # unknown age never matches
    assert ids(database, HistoryFilter(age_max="45")) == [r[3], r[2]]
    assert ids(database, HistoryFilter(age_min=31, age_max=69)) == [r[3]]
    assert ids(database, HistoryFilter(model_version="fusion@222222222222")) == [r[3]]
    assert ids(database, HistoryFilter()) == ids(database) == newest_first
    assert ids(database, HistoryFilter(classes=["nv"], sex="female")) == [r[3]]  # AND
    assert ids(database, HistoryFilter(sex="", site="  ", since="")) == newest_first  # blanks
    with database.session() as s:
        assert count_predictions(s, HistoryFilter(min_prob=0.5)) == 3
        assert count_predictions(s) == 4


def test_limit_offset_and_ordering(database: Database):
    # Same timestamp for the first three: ties are broken by id, newest id first.
    r = insert(database, *[make_row() for _ in range(3)], make_row(created_at=T0 - timedelta(1)))
    assert ids(database) == [r[2], r[1], r[0], r[3]]
    assert ids(database, limit=2) == [r[2], r[1]]
    assert ids(database, limit=2, offset=2) == [r[0], r[3]]
    assert ids(database, offset=4) == []
    for bad in ({"limit": 0}, {"limit": -1}, {"offset": -1}, {"limit": 10**9}):
        with pytest.raises(DermError, match=r"Limit|Offset"):
            ids(database, **bad)


def test_counts_per_class_per_day(database: Database):
    d1, d2 = T0, T0 + timedelta(days=1)
    insert(
        database,
        make_row(created_at=d1, predicted_class="nv"),
        make_row(created_at=d1, predicted_class="nv"),
        # 23:30 UTC is already the next day in many time zones (the test server runs in +05:30):
        # days are UTC days whatever the server's or the client's zone.
        make_row(created_at=d1.replace(hour=23, minute=30), predicted_class="mel"),
        make_row(created_at=d2, predicted_class="bcc", sex="male"),
    )
    with database.session() as s:
        assert counts_per_class_per_day(s) == [
            ("2026-03-10", "mel", 1),
            ("2026-03-10", "nv", 2),
            ("2026-03-11", "bcc", 1),
        ]
        assert counts_per_class_per_day(s, HistoryFilter(sex="male")) == [("2026-03-11", "bcc", 1)]
        assert counts_per_class_per_day(s, HistoryFilter(since="2027-01-01")) == []


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"classes": ["foo"]}, "Unknown diagnosis class 'foo'"),
        ({"min_prob": 1.5}, "outside 0-1"),
        ({"max_prob": "abc"}, "not a number"),
        ({"min_prob": 0.8, "max_prob": 0.2}, "above maximum"),
        ({"since": "2026-13-45"}, "Bad since date '2026-13-45': use YYYY-MM-DD"),
        ({"until": "yesterday"}, "Bad until date 'yesterday'"),
        ({"since": "2026-02-01", "until": "2026-01-01"}, "after the until date"),
        ({"sex": "robot"}, "Unknown sex"),
        ({"site": "moon"}, "Unknown body site"),
        ({"age_min": -5}, "outside 0-120"),
        ({"age_max": "old"}, "not a number"),
        ({"age_min": 60, "age_max": 20}, "above maximum age"),
    ],
)
def test_bad_filters_are_clear_errors(kwargs, message):
    with pytest.raises(DermError, match=message):
        HistoryFilter(**kwargs)


def test_parse_date():
    assert parse_date("2026-01-01") == date(2026, 1, 1)
    assert parse_date(" 2026-01-31 ") == date(2026, 1, 31)
    assert parse_date("2026-01-01T10:30") == datetime(2026, 1, 1, 10, 30)
    for bad in ("2026-13-45", "01/02/2026", "", "2026-02-30"):
        with pytest.raises(DermError, match="use YYYY-MM-DD"):
            parse_date(bad)


# --- SQL-looking input ------------------------------------------------------------------------


def test_sql_looking_filter_values_are_harmless(database: Database):
    insert(database, make_row(), make_row(predicted_class="mel"))
    evil = "back'; DROP TABLE predictions;--"
    with pytest.raises(MetadataError, match="Unknown body site"):
        HistoryFilter(site=evil)
    with pytest.raises(DermError, match="Unknown sex"):
        HistoryFilter(sex="male' OR '1'='1")
    with pytest.raises(DermError, match="Unknown diagnosis class"):
        HistoryFilter(classes=["mel') OR 1=1 --"])
    with pytest.raises(DermError, match="NUL character"):
        HistoryFilter(model_version="fusion\x00@1")  # PostgreSQL would refuse it as SQL text
    for value in ("x' OR '1'='1", "'; DROP TABLE predictions;--", 'fusion@1" OR ""="'):
        assert ids(database, HistoryFilter(model_version=value)) == []
    # The table survived and still holds both rows.
    assert inspect(database.engine).has_table("predictions")
    with database.session() as s:
        assert count_predictions(s) == 2
    # Stored values are data too: a model version that looks like SQL round-trips unchanged.
    (rid,) = insert(database, make_row(model_version=evil))
    assert ids(database, HistoryFilter(model_version=evil)) == [rid]
    with database.session() as s:
        assert count_predictions(s) == 3


def test_two_engines_writing_one_database_concurrently(db_url: str):
    """Like the app and a CLI at once: separate engines, many threads, no 'database is locked'."""
    from concurrent.futures import ThreadPoolExecutor

    url = db_url
    dbs = [Database(url), Database(url)]

    def work(i: int) -> int:
        d = dbs[i % 2]
        for j in range(10):
            with d.session() as s:
                s.add(make_row(age=float(j), predicted_class=CLASSES_CYCLE[i % 3]))
            with d.session() as s:
                count_predictions(s, HistoryFilter(classes=[CLASSES_CYCLE[i % 3]]))
        return i

    with ThreadPoolExecutor(max_workers=8) as pool:
        assert sorted(pool.map(work, range(16))) == list(range(16))
    with dbs[0].session() as s:
        assert count_predictions(s) == 160
        assert count_predictions(s, HistoryFilter(classes=["mel"])) == 6 * 10
    for d in dbs:
        d.dispose()


CLASSES_CYCLE = ("mel", "nv", "bcc")


def test_listing_without_image_bytes(database: Database):
    from sqlalchemy.exc import InvalidRequestError

    # Bytes with NUL and high bytes, and a dict whose key order must survive (PostgreSQL's
    # ``json``, unlike ``jsonb``, keeps it; the class order of a stored answer is meaningful).
    probabilities = {"nv": 0.6, "akiec": 0.3, "bcc": 0.1}
    (rid,) = insert(database, make_row(thumbnail=b"\xff\xd8\x00jpeg", probabilities=probabilities))
    with database.session() as s:
        (light,) = query_predictions(s, images=False)
        d = record_dict(light, include_heatmap=True)
        assert d["has_heatmap"] is None and d["heatmap_png_base64"] is None
        assert list(d["probabilities"].items()) == list(probabilities.items()) and d["id"] == rid
        with pytest.raises(InvalidRequestError):
            _ = light.thumbnail  # never a silent extra query per row
    with database.session() as s:
        (full,) = query_predictions(s)
        assert record_dict(full)["has_heatmap"] is True and full.thumbnail == b"\xff\xd8\x00jpeg"
        assert isinstance(full.thumbnail, bytes) and full.heatmap_png == make_row().heatmap_png


def test_existing_ids_of_more_ids_than_one_query_binds(database: Database):
    # The History tab asks which of every id it ever wrote files for still has a row; a long-lived
    # registry can hold more ids than one statement binds (PostgreSQL: 65 535 parameters; older
    # SQLite: 999), so the query goes in chunks.
    kept = insert(database, *(make_row() for _ in range(3)))
    asked = list(range(70_000, 0, -1))  # the three rows among 69 997 ids that have none
    with database.session() as s:
        assert existing_ids(s, asked) == set(kept)
        assert existing_ids(s, []) == set()
