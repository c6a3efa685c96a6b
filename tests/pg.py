"""A throw-away PostgreSQL server for the tests: ``initdb`` into a temporary folder, ``pg_ctl`` on
a free port, listening on 127.0.0.1 only, password-protected, torn down at the end.

PostgreSQL refuses to run as root, so as root the server runs as the unprivileged ``postgres``
user (created by Debian's ``postgresql`` package) or ``nobody``. Set ``DERMFUSION_POSTGRES_URL``
(a role allowed to ``CREATE DATABASE``) to test against an existing server instead.
"""

from __future__ import annotations

import glob
import os
import pwd
import secrets
import shutil
import socket
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

#: An existing server to use instead of a throw-away one, e.g.
#: ``postgresql+psycopg://user:pw@127.0.0.1:5432/postgres``.
POSTGRES_URL_ENV = "DERMFUSION_POSTGRES_URL"
#: Set to 1 (CI does) to fail, not skip, when PostgreSQL cannot be tested.
REQUIRE_ENV = "DERMFUSION_REQUIRE_POSTGRES"
USER = "dermfusion"


def unavailable_reason() -> str | None:
    """Why PostgreSQL tests cannot run here, or None when they can."""
    import importlib.util

    if importlib.util.find_spec("psycopg") is None:
        return 'no PostgreSQL driver: pip install -e ".[postgres]"'
    if os.environ.get(POSTGRES_URL_ENV):
        return None
    if find_bindir() is None:
        return (
            "no PostgreSQL server binaries (initdb, pg_ctl): apt-get install postgresql, "
            f"or set {POSTGRES_URL_ENV}"
        )
    return None


def find_bindir() -> Path | None:
    """The folder holding ``initdb`` and ``pg_ctl`` (Debian keeps them off PATH)."""
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.insert(0, str(Path(on_path).parent))
    for folder in candidates:
        if (Path(folder) / "initdb").is_file() and (Path(folder) / "pg_ctl").is_file():
            return Path(folder)
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run_as() -> dict[str, Any]:
    """subprocess arguments that drop root to an unprivileged user (nothing when not root)."""
    if os.geteuid() != 0:
        return {}
    for name in ("postgres", "nobody"):
        try:
            user = pwd.getpwnam(name)
        except KeyError:
            continue
        return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}
    raise RuntimeError("running as root and no unprivileged 'postgres' or 'nobody' user exists")


@contextmanager
def throwaway_server() -> Iterator[str]:
    """Start a private server; yields a SQLAlchemy URL of its ``postgres`` database."""
    bindir = find_bindir()
    assert bindir is not None, "check unavailable_reason() first"
    as_user = _run_as()
    root = Path(tempfile.mkdtemp(prefix="dermfusion-pg-"))
    data, password = root / "data", secrets.token_hex(16)
    pwfile = root / "pw"
    pwfile.write_text(password + "\n")
    if as_user:
        os.chown(root, as_user["user"], as_user["group"])
        os.chown(pwfile, as_user["user"], as_user["group"])
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C.UTF-8", "TZ": "UTC"}
    run = dict(check=True, capture_output=True, text=True, env=env, cwd=root, **as_user)
    port = free_port()
    subprocess.run(
        [
            bindir / "initdb",
            "-D",
            data,
            "-U",
            USER,
            "--auth=scram-sha-256",
            "--pwfile",
            pwfile,
            "--encoding=UTF8",
            "--no-sync",
        ],
        **run,
    )
    options = " ".join(
        [
            "-c listen_addresses=127.0.0.1",
            f"-c port={port}",
            f"-c unix_socket_directories={root}",
            "-c max_connections=200",
            # Durability is pointless for a throw-away server; speed is not.
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
            # A non-UTC server time zone, so nothing can rely on the server's clock being UTC.
            "-c timezone=Asia/Kolkata",
        ]
    )
    log = root / "server.log"
    try:
        subprocess.run(
            [bindir / "pg_ctl", "-D", data, "-l", log, "-o", options, "-w", "-t", "60", "start"],
            **run,
        )
    except subprocess.CalledProcessError as exc:
        tail = log.read_text()[-2000:] if log.is_file() else ""
        shutil.rmtree(root, ignore_errors=True)
        raise RuntimeError(f"pg_ctl start failed: {exc.stderr}\n{tail}") from None
    try:
        yield f"postgresql+psycopg://{USER}:{password}@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [bindir / "pg_ctl", "-D", data, "-m", "immediate", "-w", "stop"],
            **{**run, "check": False},
        )
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def server() -> Iterator[str]:
    """``$DERMFUSION_POSTGRES_URL`` when set, else a throw-away server."""
    url = os.environ.get(POSTGRES_URL_ENV, "").strip()
    if url:
        yield url
        return
    with throwaway_server() as url:
        yield url


def _admin_execute(admin_url: str, statement: str) -> None:
    """One statement outside a transaction (CREATE / DROP DATABASE cannot run inside one)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.execute(text(statement))
    finally:
        engine.dispose()


def create_database(admin_url: str, prefix: str = "dermfusion_test") -> str:
    """A new empty database on the server of ``admin_url``; returns its URL."""
    from sqlalchemy.engine import make_url

    name = f"{prefix}_{secrets.token_hex(6)}"
    _admin_execute(admin_url, f'CREATE DATABASE "{name}"')
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


def drop_database(admin_url: str, url: str) -> None:
    """Drop a database made by :func:`create_database`, closing any connection still open."""
    from sqlalchemy.engine import make_url

    name = make_url(url).database
    _admin_execute(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
