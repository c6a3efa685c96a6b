"""One login for the UI and the REST API, and a per-client slowdown after failed logins.

:class:`Credentials` is what Gradio's login form checks (it is passed as Gradio's ``auth``
callable) and what the REST API checks for HTTP Basic; a browser session that logged in through
the form is accepted by the REST API too (Gradio's session cookie, see :func:`session_user`).

:class:`LoginThrottle` slows password guessing: after a client's first failed login its next
attempt is answered only after ``delay`` seconds, doubling with each further failure up to
:data:`app.config.MAX_LOGIN_DELAY_S`; a success clears the count, and failures older than
:data:`FORGET_AFTER_S` are forgotten. The client is the connection's address (behind a reverse
proxy on the same host, uvicorn takes it from ``X-Forwarded-For``). The delay is an
``asyncio.sleep``, so a throttled client holds no worker thread.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hmac
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from app.config import MAX_LOGIN_DELAY_S

#: A client's failures are forgotten this long after its last one.
FORGET_AFTER_S = 900.0
#: Clients remembered at most (oldest forgotten first), so a flood of addresses cannot grow it.
MAX_CLIENTS = 10_000


class Credentials:
    """The configured ``(user, password)`` pairs; the check takes the same time whichever part
    of a password is wrong, and for unknown users too."""

    def __init__(self, pairs: tuple[tuple[str, str], ...] | list[tuple[str, str]]) -> None:
        self._passwords = {user: password.encode() for user, password in pairs}

    def __bool__(self) -> bool:
        return bool(self._passwords)

    def __repr__(self) -> str:  # never the passwords
        return f"Credentials({len(self._passwords)} users)"

    def __call__(self, user: str, password: str) -> bool:
        expected = self._passwords.get(user)
        given = str(password).encode()
        if expected is None:
            hmac.compare_digest(given, given)  # same work as a known user
            return False
        return hmac.compare_digest(given, expected)


class LoginThrottle:
    """Failed logins per client → the delay before that client's next attempt is checked."""

    def __init__(
        self,
        delay: float,
        max_delay: float = MAX_LOGIN_DELAY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.base = float(delay)
        self.max_delay = float(max_delay)
        self.clock = clock
        self._failures: dict[str, tuple[int, float]] = {}
        self._lock = threading.Lock()

    def delay(self, client: str) -> float:
        """Seconds ``client`` waits before its next attempt is checked (0: not throttled)."""
        if self.base <= 0:
            return 0.0
        with self._lock:
            count, last = self._failures.get(client, (0, 0.0))
            if count and self.clock() - last > FORGET_AFTER_S:
                self._failures.pop(client, None)
                count = 0
        if count == 0:
            return 0.0
        return min(self.base * 2 ** (count - 1), self.max_delay)

    def failure(self, client: str) -> None:
        with self._lock:
            count, _ = self._failures.pop(client, (0, 0.0))
            self._failures[client] = (count + 1, self.clock())
            while len(self._failures) > MAX_CLIENTS:
                self._failures.pop(next(iter(self._failures)))

    def success(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)

    async def wait(self, client: str) -> None:
        pause = self.delay(client)
        if pause > 0:
            await asyncio.sleep(pause)


def route_path(scope: Mapping[str, Any]) -> str:
    """The request's path inside the app: without the proxy's sub-path (``root_path``) when the
    proxy passed it on, as it is when the proxy stripped it."""
    root = str(scope.get("root_path", "") or "")
    path = str(scope.get("path", ""))
    return path[len(root) :] if root and path.startswith(root + "/") else path


def client_of(scope: Mapping[str, Any]) -> str:
    """The address a request came from (``scope["client"]``), or ``unknown``."""
    client = scope.get("client")
    return str(client[0]) if client else "unknown"


class ThrottledLogin:
    """ASGI middleware: ``POST …/login`` (Gradio's login form) waits out the client's delay, and
    its answer (200 success / 4xx failure) updates the client's count."""

    def __init__(self, app: Any, throttle: LoginThrottle) -> None:
        self.app = app
        self.throttle = throttle

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = route_path(scope).rstrip("/")
        if scope.get("type") != "http" or scope.get("method") != "POST" or path != "/login":
            await self.app(scope, receive, send)
            return
        client = client_of(scope)
        await self.throttle.wait(client)

        async def watch(message: dict[str, Any]) -> None:
            # the count changes before the answer leaves: a client that has its answer (and
            # tries again at once) is already judged by it
            if message.get("type") == "http.response.start":
                status = int(message["status"])
                if status < 300:
                    self.throttle.success(client)
                elif status in (400, 401, 403):
                    self.throttle.failure(client)
            await send(message)

        await self.app(scope, receive, watch)


def basic_credentials(header: str | None) -> tuple[str, str] | None:
    """``Authorization: Basic …`` → (user, password); None when absent or not Basic."""
    if not header:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        decoded = base64.b64decode(value.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    user, sep, password = decoded.partition(":")
    return (user, password) if sep else None


def session_user(gradio_app: Any, cookies: dict[str, str]) -> str | None:
    """The user of a browser session that logged in through Gradio's form (its
    ``access-token-<id>`` cookie, as Gradio's own ``get_current_user`` reads it)."""
    if gradio_app is None:
        return None
    cookie_id = getattr(gradio_app, "cookie_id", None)
    tokens = getattr(gradio_app, "tokens", None) or {}
    if cookie_id is None:
        return None
    token = cookies.get(f"access-token-{cookie_id}") or cookies.get(
        f"access-token-unsecure-{cookie_id}"
    )
    user = tokens.get(token) if token else None
    return str(user) if user is not None else None
