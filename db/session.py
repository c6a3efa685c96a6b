"""The one engine / session factory of the history database.

Which database: an explicit URL (``--db``) wins, then the ``SKIN_DB_URL`` environment variable,
then ``sqlite:///predictions.db`` in the current directory. Any SQLAlchemy URL works; SQLite files
get WAL journaling, a 30 s busy timeout, foreign keys and ``secure_delete`` on every connection,
and real (transactional) BEGINs so migrations are all-or-nothing.

Writes (:meth:`Database.session` with ``write=True``) take SQLite's write lock at ``BEGIN
IMMEDIATE``: a deferred transaction that reads and then writes cannot wait for the lock (SQLite
answers "database is locked" at once to avoid a deadlock), an immediate one waits up to the busy
timeout. Reads stay deferred, so a read-only file can still be browsed.

Deleting is for privacy, so a delete must leave no copy of the row's bytes behind
(:meth:`Database.purge`): on SQLite ``secure_delete`` overwrites the freed cells and pages with
zeros, and a ``wal_checkpoint(TRUNCATE)`` copies the zeroed pages into the database file and
empties the ``-wal`` file, which still held the pages as they were written. PostgreSQL keeps a
deleted row's tuple (and its TOAST-ed image bytes) in the table files until (auto)vacuum reclaims
the space and a later write reuses it, and in the server's WAL segments (and any base backups or
archives) until they are recycled. A plain ``VACUUM`` only marks the space free; an operator who
must guarantee erasure runs ``VACUUM FULL predictions`` (rewrites the table into new files, takes
an exclusive lock, so not per delete from the app), then ``CHECKPOINT`` and rotates WAL archives
and backups. :meth:`Database.purge` does nothing there.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, NoSuchModuleError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from common.errors import DatabaseError, DermError

DEFAULT_DB_URL = "sqlite:///predictions.db"
DB_URL_ENV = "SKIN_DB_URL"
#: The deployment's variables (docs/deploy/configuration.md): the CLIs read them as the app does.
DEPLOY_DB_URL_ENV = "DERMFUSION_DB_URL"
DB_PASSWORD_FILE_ENV = "DERMFUSION_DB_PASSWORD_FILE"
#: Seconds a SQLite connection waits for another writer before giving up.
SQLITE_TIMEOUT_S = 30
#: Optional dependency groups (``pip install -e ".[NAME]"``) holding a backend's driver.
DRIVER_EXTRAS = {"postgresql": "postgres"}


def error_reason(exc: BaseException) -> str:
    """The first line of the driver's message (e.g. "database is locked"), without SQL."""
    if isinstance(exc, DermError):
        if isinstance(exc.__cause__, SQLAlchemyError):
            return error_reason(exc.__cause__)
        return str(exc)
    return (str(getattr(exc, "orig", None) or exc).splitlines() or [type(exc).__name__])[0]


def missing_driver(url: URL, exc: ImportError) -> DatabaseError:
    """One sentence naming the missing driver module and how to install it."""
    backend = url.get_backend_name()
    module = exc.name or str(exc)
    extra = DRIVER_EXTRAS.get(backend)
    pip = ".venv/bin/python -m pip install"  # the project's environment (setup.sh)
    fix = f'{pip} -e ".[{extra}]"' if extra else f"{pip} {module}"
    return DatabaseError(
        f"The database driver for {url.drivername} ({module}) is not installed: run {fix}."
    )


def resolve_db_url(url: str | None = None) -> str:
    """Explicit ``url`` > ``$DERMFUSION_DB_URL`` (with the password of
    ``$DERMFUSION_DB_PASSWORD_FILE`` when set, as the app takes them) > ``$SKIN_DB_URL`` >
    :data:`DEFAULT_DB_URL`. So a CLI run beside a configured deployment opens its database."""
    if url is not None and str(url).strip():
        return str(url).strip()
    deploy = os.environ.get(DEPLOY_DB_URL_ENV, "").strip()
    if deploy:
        return with_password_file(deploy, os.environ.get(DB_PASSWORD_FILE_ENV, "").strip())
    env = os.environ.get(DB_URL_ENV, "").strip()
    return env or DEFAULT_DB_URL


def with_password_file(url: str, password_file: str | Path | None) -> str:
    """``url`` with the password read from ``password_file`` (escaped as a URL needs); ``url``
    itself when no file is given."""
    if not password_file:
        return url
    try:
        password = Path(password_file).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise DermError(
            f"The database password file {password_file} cannot be read ({type(exc).__name__})."
        ) from None
    try:
        parsed = make_url(url)
    except ArgumentError:
        raise DermError("The database URL cannot be parsed (see --db).") from None
    return parsed.set(password=password).render_as_string(hide_password=False)


def parse_url(url: str) -> URL:
    try:
        return make_url(url)
    except ArgumentError:
        raise DermError(
            f"Bad database URL {url!r}: expected e.g. sqlite:///predictions.db "
            "or postgresql://user@host/dbname."
        ) from None


def _is_memory(url: URL) -> bool:
    db = url.database
    return db in (None, "", ":memory:") or (url.query.get("mode") == "memory")


def sqlite_path(url: str | URL) -> Path | None:
    """The file of a SQLite URL, or None (in-memory or not SQLite)."""
    u = parse_url(url) if isinstance(url, str) else url
    if u.get_backend_name() != "sqlite" or _is_memory(u):
        return None
    db = u.database or ""
    db = db.removeprefix("file:")
    return Path(db).expanduser()


def _sqlite_on_connect(dbapi_connection: Any, connection_record: Any) -> None:
    # Let SQLAlchemy, not the sqlite3 module, decide where transactions begin (see _sqlite_begin):
    # the module's legacy mode would otherwise auto-commit DDL half-way through a migration.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_TIMEOUT_S * 1000}")
        cursor.execute("PRAGMA foreign_keys=ON")
        # A deleted record's bytes are overwritten, not just unlinked (see Database.purge).
        cursor.execute("PRAGMA secure_delete=ON")
        # A read-only file keeps its journal mode; reading it must still work.
        with suppress(sqlite3.OperationalError):
            cursor.execute("PRAGMA journal_mode=WAL")
    finally:
        cursor.close()


def _sqlite_begin(conn: Any) -> None:
    # ``immediate`` takes the write lock at BEGIN (waiting up to busy_timeout), for transactions
    # that read and then write: confirms, deletes, migrations run by two processes at once.
    mode = "BEGIN IMMEDIATE" if conn.get_execution_options().get("sqlite_immediate") else "BEGIN"
    conn.exec_driver_sql(mode)


def make_engine(url: str | None = None, **kwargs: Any) -> Engine:
    """Create an engine for ``url`` (resolved by :func:`resolve_db_url`)."""
    resolved = resolve_db_url(url)
    u = parse_url(resolved)
    if u.get_backend_name() != "sqlite":
        # A server may restart or drop idle connections under a long-running app.
        kwargs.setdefault("pool_pre_ping", True)
        try:
            return create_engine(u, **kwargs)
        except ImportError as exc:
            raise missing_driver(u, exc) from None
        except NoSuchModuleError:
            raise DatabaseError(
                f"Unknown database type {u.drivername!r} in {u.render_as_string()!r}: use "
                "sqlite:///FILE.db or postgresql://user@host/dbname."
            ) from None
    connect_args = {"check_same_thread": False, "timeout": SQLITE_TIMEOUT_S}
    connect_args.update(kwargs.pop("connect_args", {}))
    if _is_memory(u):
        # One shared connection, or every thread / pool checkout would see its own empty DB.
        kwargs.setdefault("poolclass", StaticPool)
    else:
        path = sqlite_path(u)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(u, connect_args=connect_args, **kwargs)
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "begin", _sqlite_begin)
    return engine


class Database:
    """An engine plus a session factory; the schema is migrated when it is opened."""

    def __init__(
        self, url: str | None = None, *, migrate: bool = True, **engine_kwargs: Any
    ) -> None:
        self.url = resolve_db_url(url)
        self.engine = make_engine(self.url, **engine_kwargs)
        self.Session = sessionmaker(self.engine, expire_on_commit=False)
        # Same pool; on SQLite its transactions start with BEGIN IMMEDIATE (see _sqlite_begin).
        self.WriteSession = sessionmaker(
            self.engine.execution_options(sqlite_immediate=True), expire_on_commit=False
        )
        if migrate:
            self.migrate()

    def migrate(self) -> list[int]:
        """Apply pending schema migrations; returns the versions applied.

        An up-to-date database is only read, so a read-only file can still be browsed."""
        from db.migrations import migrate

        try:
            return migrate(self.engine)
        except SQLAlchemyError as exc:
            self.engine.dispose()
            raise self.error("cannot be opened", exc) from None

    def error(self, what: str, exc: BaseException) -> DatabaseError:
        """A one-sentence :class:`DatabaseError` about this database."""
        reason = error_reason(exc)
        hint = ""
        if "readonly" in reason or "read-only" in reason:
            hint = " Check the file's permissions, or point --db at a writable database."
        elif "locked" in reason:
            hint = " Another program holds a lock on it; try again in a moment."
        return DatabaseError(f"The history database {self.display_url} {what}: {reason}.{hint}")

    @contextmanager
    def session(self, *, write: bool = False) -> Iterator[Session]:
        """A session that commits on success and rolls back on any exception; database failures
        (down, locked, read-only, corrupt) become a :class:`DatabaseError`.

        ``write=True`` for a transaction that changes rows: on SQLite it takes the write lock up
        front, so concurrent writers queue (up to the busy timeout) instead of failing."""
        try:
            session = (self.WriteSession if write else self.Session)()
        except SQLAlchemyError as exc:
            raise self.error("cannot be used", exc) from None
        try:
            yield session
            session.commit()
        except SQLAlchemyError as exc:
            with suppress(SQLAlchemyError):
                session.rollback()
            raise self.error("cannot be used", exc) from exc
        except BaseException:
            session.rollback()
            raise
        finally:
            session.close()

    def purge(self) -> None:
        """Make deleted rows unrecoverable from the database files (call after a delete commits).

        SQLite: the deleted cells are already zeroed (``secure_delete``); the checkpoint copies
        those pages into the main file and truncates the ``-wal`` file to zero bytes, waiting
        (busy timeout) for readers to finish. Other backends: nothing here; on PostgreSQL the
        dead tuple stays in the table files until (auto)vacuum reuses its space — see the module
        docstring for what an operator runs to erase it."""
        try:
            if self.engine.dialect.name == "sqlite":
                raw = self.engine.raw_connection()
                try:
                    # Outside any transaction (isolation_level None): a checkpoint cannot
                    # truncate the log while this connection itself holds a read snapshot.
                    cursor = raw.cursor()
                    busy = cursor.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
                    cursor.close()
                finally:
                    raw.close()
                if busy and busy[0]:
                    raise DatabaseError(
                        f"The history database {self.display_url} could not be checkpointed "
                        "after a delete (another program keeps reading it): the deleted row's "
                        "bytes may remain in its -wal file until the next checkpoint."
                    )
        except SQLAlchemyError as exc:
            raise self.error("cannot be cleaned after a delete", exc) from None
        except sqlite3.Error as exc:
            raise self.error("cannot be cleaned after a delete", exc) from None

    @property
    def display_url(self) -> str:
        return self.engine.url.render_as_string(hide_password=True)

    def dispose(self) -> None:
        self.engine.dispose()

    def __repr__(self) -> str:
        return f"Database({self.display_url!r})"
