"""Liveness and database reachability (``GET /healthz``), and a graceful stop on SIGTERM.

``/healthz`` answers without a login (a container orchestrator or load balancer calls it) and
says no more than it must: the versions, the runtime, the database backend and whether a fresh
connection to it answers ``SELECT 1`` — 200 when it does, 503 when it does not (the app cannot
store predictions then), and 503 ``draining`` once SIGTERM arrived. It never shows the database
URL, host or port (why a connection failed goes to the server log).

:class:`Lifecycle` counts requests in flight (REST calls; the Gradio queue reports its own jobs),
refuses new REST calls while draining, and :meth:`Lifecycle.drain` waits for both to finish
before the server is closed.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.pool import NullPool

from common.errors import DermError
from common.version import __version__
from db.session import error_reason, make_engine
from service.prediction import PredictionService

#: Seconds a probe waits for a database server to accept the connection.
PROBE_TIMEOUT_S = 3


class DatabaseProbe:
    """``SELECT 1`` on a fresh connection each time (no pool): a pooled connection could still
    answer after the server went away or the file became unreachable."""

    def __init__(self, url: str) -> None:
        self.backend = url.split(":", 1)[0].split("+", 1)[0]
        self._logged: str | None = None  # the failure last written to the server log
        self.engine: Engine | None
        # a server that does not answer must not hang the probe (and the orchestrator's check)
        kwargs: dict[str, Any] = {"poolclass": NullPool}
        if self.backend == "postgresql":
            kwargs["connect_args"] = {"connect_timeout": PROBE_TIMEOUT_S}
        try:
            self.engine = make_engine(url, **kwargs)
        except (DermError, SQLAlchemyError, OSError):
            self.engine = None

    def check(self) -> tuple[bool, str | None]:
        """(reachable, reason). The driver's message names the server's host and port, which an
        unauthenticated caller must not learn: it goes to the server log (once per new
        message), the caller gets only that the connection failed."""
        if self.engine is None:
            return False, "it cannot be opened"
        try:
            with self.engine.connect() as conn:
                conn.execute(text("SELECT 1"))
        except (SQLAlchemyError, OSError) as exc:
            detail = error_reason(exc)
            if detail != self._logged:
                print(f"healthz: the history database is unreachable: {detail}", file=sys.stderr)
                self._logged = detail
            return False, "a fresh connection failed; the server log says why"
        self._logged = None
        return True, None

    def dispose(self) -> None:
        if self.engine is not None:
            self.engine.dispose()


def health(
    service: PredictionService, probe: DatabaseProbe | None, draining: bool = False
) -> tuple[int, dict[str, Any]]:
    """(HTTP status, JSON body) of ``/healthz``; 503 ``draining`` once SIGTERM arrived, so a
    load balancer stops sending work to a replica that is stopping."""
    body: dict[str, Any] = {
        "status": "ok",
        "version": __version__,
        "model_version": service.predictor.version,
        "runtime": service.predictor.runtime,
    }
    if draining:
        body["status"] = "draining"
        return 503, body
    if probe is None:
        body["database"] = {"configured": False}
        return 200, body
    ok, reason = probe.check()
    body["database"] = {"configured": True, "backend": probe.backend, "reachable": ok}
    if not ok:
        body["status"] = "unavailable"
        body["database"]["error"] = f"the history database is unreachable ({reason})"
        return 503, body
    return 200, body


class Lifecycle:
    """In-flight REST requests and the draining state shared by the API and SIGTERM."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._in_flight = 0
        self.draining = False

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        with self._lock:
            self._in_flight += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight -= 1

    def drain(
        self, busy: Callable[[], int] = lambda: 0, timeout: float = 30.0, poll: float = 0.05
    ) -> bool:
        """Refuse new REST calls, then wait until nothing is in flight (here or ``busy()``, the
        Gradio queue's jobs) or ``timeout`` passed; True when everything finished."""
        self.draining = True
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.in_flight == 0 and busy() == 0:
                return True
            time.sleep(poll)
        return self.in_flight == 0 and busy() == 0


def gradio_jobs(demo: Any) -> int:
    """Events waiting in or being processed by ``demo``'s queue (0 when it cannot tell)."""
    queue = getattr(demo, "_queue", None)
    if queue is None:
        return 0
    try:
        active = sum(1 for worker in queue.active_jobs for job in (worker or []) if job)
        waiting = sum(len(q.queue) for q in queue.event_queue_per_concurrency_id.values())
    except (AttributeError, TypeError):
        return 0
    return active + waiting
