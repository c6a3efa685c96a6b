"""Ordered, recorded schema migrations: a schema change must never lose stored history.

Each migration has a version number and a function that receives a connection inside the
migration transaction. Applied versions are recorded in ``schema_migrations(version, description,
applied_at)``; :func:`migrate` applies only the pending ones, in order, in one transaction (on
SQLite and PostgreSQL DDL is transactional, so a failing migration leaves the database as it was).
Several processes may open one database at once (app servers behind a proxy): SQLite serialises
them with ``BEGIN IMMEDIATE``, PostgreSQL with a transaction-scoped advisory lock, so the second
one waits, then finds the migrations recorded.

A fresh database runs the very same steps as an upgraded one, so migration 1 creates the tables
as they were in version 1 (a frozen copy below, not :mod:`db.models`). To change the schema:
edit :mod:`db.models`, append a migration here (e.g. ``add_column``), and run the tests —
``tests/test_db.py`` fails when the migrated schema and the models disagree.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import (
    JSON,
    Column,
    Connection,
    DateTime,
    Engine,
    Float,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    func,
    insert,
    inspect,
    select,
)

from common.errors import DermError
from db.models import UTCDateTime, utcnow

MIGRATIONS_TABLE = "schema_migrations"
#: PostgreSQL advisory-lock key held while migrating (any constant 64-bit number; this one is
#: ``zlib.crc32(b"dermfusion.schema_migrations")``).
PG_MIGRATION_LOCK = 0x69FF_42A0


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    apply: Callable[[Connection], None]


_recorder_md = MetaData()
schema_migrations = Table(
    MIGRATIONS_TABLE,
    _recorder_md,
    Column("version", Integer, primary_key=True, autoincrement=False),
    Column("description", String(200), nullable=False),
    Column("applied_at", UTCDateTime(), nullable=False),
)


# --- helpers for future migrations -----------------------------------------------------------


def has_column(conn: Connection, table: str, column: str) -> bool:
    return column in {c["name"] for c in inspect(conn).get_columns(table)}


def add_column(conn: Connection, table: str, column: Column) -> None:
    """``ALTER TABLE ... ADD COLUMN`` (skipped when present); existing rows get NULL/default."""
    if has_column(conn, table, column.name):
        return
    col_type = column.type.compile(dialect=conn.dialect)
    quote = conn.dialect.identifier_preparer.quote
    sql = f"ALTER TABLE {quote(table)} ADD COLUMN {quote(column.name)} {col_type}"
    if column.server_default is not None:
        sql += f" DEFAULT {cast(Any, column.server_default).arg}"
    conn.exec_driver_sql(sql)


# --- migration 1: the initial schema (frozen; never edit, add a migration instead) ------------


def _v1_columns() -> list[Column]:
    return [
        Column("id", Integer, primary_key=True, autoincrement=True),
        Column("created_at", DateTime(), nullable=False),
        Column("image_sha256", String(64), nullable=False),
        Column("image_width", Integer, nullable=False),
        Column("image_height", Integer, nullable=False),
        Column("thumbnail", LargeBinary, nullable=True),
        Column("age", Float, nullable=True),
        Column("sex", String(16), nullable=False),
        Column("site", String(32), nullable=False),
        Column("predicted_class", String(8), nullable=False),
        Column("predicted_probability", Float, nullable=False),
        Column("probabilities", JSON, nullable=False),
        Column("heatmap_png", LargeBinary, nullable=True),
        Column("attribution_target", String(8), nullable=True),
        Column("metadata_contributions", JSON, nullable=True),
        Column("warnings", JSON, nullable=False),
        Column("ood_distance", Float, nullable=True),
        Column("model_name", String(128), nullable=False),
        Column("model_version", String(160), nullable=False),
        Column("checkpoint_sha256", String(64), nullable=False),
        Column("latency_ms", Float, nullable=False),
    ]


def _v1_indexes() -> list[Index]:
    return [
        Index("ix_predictions_created_at", "created_at"),
        Index("ix_predictions_image_sha256", "image_sha256"),
        Index("ix_predictions_sex", "sex"),
        Index("ix_predictions_site", "site"),
        Index("ix_predictions_predicted_class", "predicted_class"),
        Index("ix_predictions_predicted_probability", "predicted_probability"),
        Index("ix_predictions_model_version", "model_version"),
        Index("ix_predictions_class_created", "predicted_class", "created_at"),
    ]


def _v1_tables(md: MetaData) -> None:
    Table("predictions", md, *_v1_columns(), *_v1_indexes())


def _initial_schema(conn: Connection) -> None:
    md = MetaData()
    _v1_tables(md)
    md.create_all(conn)


# --- migration 2: confirmed diagnoses (nullable columns: existing rows are kept, unconfirmed) --


def _v2_columns() -> list[Column]:
    return [
        Column("confirmed_dx", String(8), nullable=True),
        Column("confirmed_source", String(32), nullable=True),
        Column("confirmed_note", Text, nullable=True),
        Column("confirmed_at", DateTime(), nullable=True),
    ]


def _confirmed_diagnosis(conn: Connection) -> None:
    for column in _v2_columns():
        add_column(conn, "predictions", column)


# --- migration 3: ids are never reused (SQLite AUTOINCREMENT) ----------------------------------


def _never_reuse_ids(conn: Connection) -> None:
    """SQLite hands out ``max(id) + 1`` unless the key is ``AUTOINCREMENT``, so deleting the
    newest row gave its id to the next patient. SQLite cannot add AUTOINCREMENT to a table, so the
    table is rebuilt (the documented 12-step way, in the migration's transaction): a copy with
    AUTOINCREMENT, every row copied with its id (which seeds ``sqlite_sequence`` with the largest
    id), the old table dropped, the copy renamed and the indexes re-created. PostgreSQL's
    ``SERIAL`` sequence never gives an id twice already: nothing to do there."""
    if conn.dialect.name != "sqlite":
        return
    columns = [*_v1_columns(), *_v2_columns()]
    Table("predictions_v3", MetaData(), *columns, sqlite_autoincrement=True).create(conn)
    quote = conn.dialect.identifier_preparer.quote
    names = ", ".join(quote(c.name) for c in columns)
    conn.exec_driver_sql(f"INSERT INTO predictions_v3 ({names}) SELECT {names} FROM predictions")
    conn.exec_driver_sql("DROP TABLE predictions")
    conn.exec_driver_sql("ALTER TABLE predictions_v3 RENAME TO predictions")
    renamed = Table("predictions", MetaData(), *[*_v1_columns(), *_v2_columns()], *_v1_indexes())
    for index in renamed.indexes:
        index.create(conn)


# --- migration 4: where a row came from (file name, batch) and the files written for it -------


def _provenance(conn: Connection) -> None:
    for column in (
        Column("file_name", String(255), nullable=True),
        Column("batch_id", String(32), nullable=True),
        Column("output_files", JSON, nullable=True),
    ):
        add_column(conn, "predictions", column)
    table = Table("predictions", MetaData(), Column("batch_id", String(32)))
    Index("ix_predictions_batch_id", table.c.batch_id).create(conn)


# --- migration 5: each model version's class set (names and malignancy of stored codes) ------


def _model_classes(conn: Connection) -> None:
    Table(
        "model_classes",
        MetaData(),
        Column("model_version", String(160), primary_key=True),
        Column("classes", JSON, nullable=False),
        Column("created_at", DateTime(), nullable=False),
    ).create(conn)


#: The ordered list of migrations; append only.
MIGRATIONS: list[Migration] = [
    Migration(1, "initial schema: predictions", _initial_schema),
    Migration(2, "confirmed diagnosis: dx, source, note, time", _confirmed_diagnosis),
    Migration(3, "ids never reused (SQLite AUTOINCREMENT)", _never_reuse_ids),
    Migration(4, "file name, batch id and written files of each prediction", _provenance),
    Migration(5, "class set of each model version that stored rows", _model_classes),
]


def latest_version(migrations: list[Migration] | None = None) -> int:
    migrations = MIGRATIONS if migrations is None else migrations
    return max((m.version for m in migrations), default=0)


def applied_versions(conn: Connection) -> dict[int, datetime]:
    if not inspect(conn).has_table(MIGRATIONS_TABLE):
        return {}
    rows = conn.execute(select(schema_migrations.c.version, schema_migrations.c.applied_at))
    return {int(v): at for v, at in rows}


def current_version(engine: Engine) -> int:
    with engine.connect() as conn:
        return max(applied_versions(conn), default=0)


def _up_to_date(engine: Engine, migrations: list[Migration]) -> bool:
    """True when every migration is recorded (checked in a read-only transaction)."""
    with engine.connect() as conn:
        done = applied_versions(conn)
    return all(m.version in done for m in migrations) and max(done, default=0) <= latest_version(
        migrations
    )


def migrate(engine: Engine, migrations: list[Migration] | None = None) -> list[int]:
    """Apply the pending migrations in one transaction; returns the versions applied (often [])."""
    migrations = list(MIGRATIONS if migrations is None else migrations)
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)):
        raise RuntimeError(f"migration versions must be unique and increasing: {versions}")
    applied: list[int] = []
    if _up_to_date(engine, migrations):
        return applied  # nothing is written, so a read-only database opens too
    with engine.connect() as conn:
        conn.execution_options(sqlite_immediate=True)
        with conn.begin():
            if conn.dialect.name == "postgresql":
                # Released at commit / rollback; a concurrent migrate() waits here.
                conn.execute(select(func.pg_advisory_xact_lock(PG_MIGRATION_LOCK)))
            schema_migrations.create(conn, checkfirst=True)
            done = applied_versions(conn)
            newest = max(done, default=0)
            if newest > latest_version(migrations):
                raise DermError(
                    f"The history database {engine.url.render_as_string(hide_password=True)} has "
                    f"schema version {newest}, newer than this code knows "
                    f"({latest_version(migrations)}); upgrade the code to use it."
                )
            for m in migrations:
                if m.version in done:
                    continue
                m.apply(conn)
                conn.execute(
                    insert(schema_migrations).values(
                        version=m.version, description=m.description, applied_at=utcnow()
                    )
                )
                applied.append(m.version)
    return applied
