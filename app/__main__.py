"""Serve the DermFusion web app and its REST API (research and education only — not a diagnosis).

    python -m app                                   # shipped model, sqlite:///predictions.db
    python -m app --checkpoint runs/fusion --db sqlite:///history.db --port 7861
    python -m app --share --auth alice:s3cret       # temporary public link, password protected
    python -m app --host 0.0.0.0 --auth-file /run/secrets/dermfusion_auth --root-path /dermfusion
    DERMFUSION_DB_URL=postgresql+psycopg://app@db/dermfusion python -m app   # by environment

One server on --port: the web app at /, the REST API at /api/v1 (schema: /api/v1/openapi.json,
page: /api/v1/docs) and GET /healthz (liveness + database reachability, no login). Each flag can
be given as an environment variable instead (listed at the end); a flag wins over its variable.

The history database is --db, else $DERMFUSION_DB_URL, else $SKIN_DB_URL, else
sqlite:///predictions.db in the current directory. --share asks Gradio for a temporary public
*.gradio.live link; without internet no link can be made and the app keeps serving locally.
Always combine --share (or --host 0.0.0.0) with a login: anyone who reaches the app can otherwise
use it and read its prediction history. Failed logins slow the client down (--login-delay).

Many users at once: --concurrency predictions run at the same time (default 2, one per core of a
small server; the predictor is thread-safe), up to --max-queue more wait, and beyond that a
request is refused at once with "The demo is busy, try again in a moment" instead of waiting
without bound (the REST API has the same limits). Uploads above --max-file-size are refused
before they are stored. SIGTERM (docker stop) finishes the requests in flight, then exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from app.config import (
    DEFAULT_HOST,
    DEFAULT_MAX_FILE_SIZE,
    DEFAULT_PORT,
    Settings,
    add_arguments,
    environment_help,
    parse_auth,
    resolve,
)
from common.cli import run_cli
from common.errors import DermError
from common.text import DISCLAIMER
from common.version import __version__

__all__ = ["build_parser", "exposure_warnings", "launch", "main", "parse_auth", "run"]


@dataclass
class Served:
    """Where a launched app can be reached."""

    local_url: str
    share_url: str | None


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app",
        description=__doc__,
        epilog=environment_help(),
        formatter_class=argparse.RawTextHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"DermFusion {__version__}")
    add_arguments(p)
    return p


LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def exposure_warnings(host: str, share: bool, auth: Any) -> list[str]:
    """Warnings for serving patient history to others without a login."""
    if auth:
        return []
    out = []
    if share:
        out.append(
            "WARNING: --share without --auth: anyone who gets the public link can use this app "
            "and browse its prediction history. Add --auth USER:PASSWORD."
        )
    if host not in LOOPBACK_HOSTS:
        out.append(
            f"WARNING: --host {host} without --auth: anyone on your network can use this app "
            "and browse its prediction history. Add --auth USER:PASSWORD."
        )
    return out


def _size(n: int) -> str:
    """Bytes as the start-up line shows them: 20 MB, 500 kB, 900 bytes (never "0 MB")."""
    for unit, size in (("GB", 1024**3), ("MB", 1024**2), ("kB", 1024)):
        if n >= size:
            value = n / size
            return (
                f"{value:.0f} {unit}"
                if value >= 10 or value == int(value)
                else f"{value:.1f} {unit}"
            )
    return f"{n} bytes"


def launch(
    demo: Any,
    host: str = DEFAULT_HOST,
    port: int | None = DEFAULT_PORT,
    share: bool = False,
    auth: list[tuple[str, str]] | Callable[[str, str], bool] | None = None,
    quiet: bool = False,
    max_file_size: int | str | None = DEFAULT_MAX_FILE_SIZE,
    root_path: str = "",
    app_kwargs: dict[str, Any] | None = None,
) -> Served:
    """Start serving ``demo`` without blocking; falls back to local-only when sharing fails.

    ``app_kwargs`` go to the FastAPI app Gradio creates (the REST routes, /healthz and the login
    throttle ride on it: one server). Gradio 6 catches a failed share tunnel itself (prints
    "Could not create share link" and serves locally); older / newer versions may raise
    instead, so both are handled here."""
    from app.ui.common import EXAMPLES_DIR
    from app.ui.demo import CSS

    for warning in exposure_warnings(host, share, auth):
        print(warning, flush=True)
    kwargs: dict[str, Any] = {
        "server_name": host,
        "server_port": port,
        "auth": auth or None,
        "auth_message": f"DermFusion — {DISCLAIMER}",
        "prevent_thread_lock": True,
        "quiet": quiet,
        "show_error": False,
        "ssr_mode": False,
        "css": CSS,
        # Gradio stops reading an upload past this and answers 413 "File size exceeded maximum
        # allowed size of N bytes." (the browser checks it before uploading, too)
        "max_file_size": max_file_size,
        # the Analyse tab's example gallery loads its images into the form from the package:
        # Gradio serves only the working directory and temp files unless told (the app is
        # started from anywhere; in the container from /data)
        "allowed_paths": [str(EXAMPLES_DIR)],
    }
    if root_path:
        kwargs["root_path"] = root_path
    if app_kwargs:
        kwargs["app_kwargs"] = app_kwargs
    try:
        demo.launch(share=share, **kwargs)
    except OSError as exc:
        if "port" in str(exc).lower():
            raise DermError(
                f"Cannot listen on {host}:{port}: the port is in use or not allowed. "
                "Choose another with --port."
            ) from None
        if not share:
            raise
        _share_failed(demo, exc, kwargs)
    except Exception as exc:  # a failed tunnel must not stop local serving
        if not share:
            raise
        _share_failed(demo, exc, kwargs)

    share_url = getattr(demo, "share_url", None) if share else None
    local_url = demo.local_url
    if share and share_url:
        print(
            f"Public link: {share_url} (temporary; "
            f"{'login required' if auth else 'NO login required'}).",
            flush=True,
        )
    elif share:
        print(
            "No public share link could be made (no internet connection, or the Gradio share "
            f"server is unreachable or blocked). Serving locally only at {local_url}",
            flush=True,
        )
    print(f"DermFusion app running at {local_url} ({DISCLAIMER})", flush=True)
    return Served(local_url=local_url, share_url=share_url)


def _share_failed(demo: Any, exc: Exception, kwargs: dict[str, Any]) -> None:
    print(f"Could not create a public share link ({type(exc).__name__}: {exc}).", flush=True)
    with contextlib.suppress(Exception):  # best effort before relaunching locally
        demo.close()
    demo.launch(share=False, **kwargs)


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM (not an Exception: nothing may swallow it)."""


class AppServer:
    """The one serving process: the prediction service, the Gradio UI, the REST API, /healthz
    and the login throttle on one uvicorn server, and its graceful stop."""

    def __init__(self, service: Any, settings: Settings) -> None:
        from starlette.middleware import Middleware
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        from app.auth import Credentials, LoginThrottle, ThrottledLogin
        from app.health import DatabaseProbe, Lifecycle, health
        from app.rest import MountedApi, RestApi
        from app.ui.demo import build_demo

        self.service = service
        self.settings = settings
        self.credentials = Credentials(settings.auth)
        self.throttle = LoginThrottle(settings.login_delay)
        self.lifecycle = Lifecycle()
        self.probe = DatabaseProbe(service.db.url) if service.db is not None else None
        self.rest = RestApi(service, settings, self.credentials, self.throttle, self.lifecycle)
        self.demo = build_demo(
            service, concurrency=settings.concurrency, max_queue=settings.max_queue
        )

        async def healthz(_: Request) -> JSONResponse:
            from starlette.concurrency import run_in_threadpool

            status, body = await run_in_threadpool(
                health, self.service, self.probe, self.lifecycle.draining
            )
            return JSONResponse(body, status_code=status)

        self._routes = lambda: [Route("/healthz", healthz, methods=["GET"])]
        self._middleware = lambda: [
            Middleware(MountedApi, api=self.rest.asgi),
            Middleware(ThrottledLogin, throttle=self.throttle),
        ]

    def app_kwargs(self) -> dict[str, Any]:
        return {"routes": self._routes(), "middleware": self._middleware()}

    def launch(self, quiet: bool = False) -> Served:
        s = self.settings
        served = launch(
            self.demo,
            host=s.host,
            port=s.port,
            share=s.share,
            auth=self.credentials if self.credentials else None,
            quiet=quiet,
            max_file_size=s.max_file_size,
            root_path=s.root_path,
            app_kwargs=self.app_kwargs(),
        )
        self.rest.bind_gradio(getattr(self.demo, "server_app", None))
        return served

    def serve_until_stopped(self) -> None:
        """Block until Ctrl-C, SIGTERM or the app is closed; then stop gracefully."""
        from app.health import gradio_jobs

        def on_sigterm(signum: int, frame: Any) -> None:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)  # one stop is enough
            raise Terminated

        previous = signal.signal(signal.SIGTERM, on_sigterm)
        try:
            self.demo.block_thread()
        except Terminated:
            print("SIGTERM: finishing the requests in flight, then stopping.", flush=True)
        finally:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            try:
                drained = self.lifecycle.drain(
                    lambda: gradio_jobs(self.demo), timeout=self.settings.drain_timeout
                )
                if not drained:
                    print(
                        f"Stopping with requests still in flight after "
                        f"{self.settings.drain_timeout:g} s.",
                        flush=True,
                    )
                time.sleep(0.2)  # let the last answers leave their sockets
                self.close()
            finally:
                signal.signal(signal.SIGTERM, previous)

    def close(self) -> None:
        """Close the server and the database; the UI's export folder goes at exit (atexit)."""
        with contextlib.suppress(Exception):
            self.demo.close(verbose=False)
        if self.probe is not None:
            self.probe.dispose()
        self.service.close()


def run(argv: list[str] | None = None) -> int:
    settings = resolve(build_parser().parse_args(argv))
    from service.prediction import PredictionService

    service = PredictionService.create(
        settings.checkpoint,
        db_url=settings.db,
        store_images=settings.store_images,
        runtime=settings.runtime,
    )
    if service.predictor.runtime == "torch":
        pass  # PyTorch serves the whole network: leave it its default threads
    elif "torch" in sys.modules:
        # ONNX Runtime runs the network on its own threads; where PyTorch is loaded at all it
        # is left one thread, so OpenMP hand-offs do not compete with ONNX Runtime's.
        sys.modules["torch"].set_num_threads(1)
    db_url = service.db.display_url if service.db else "none"
    login = f"{len(settings.auth)} login(s)" if settings.auth else "no login"
    print(
        f"DermFusion {__version__}: model {service.predictor.version} on "
        f"{service.predictor.runtime}; history database {db_url}; {settings.concurrency} at "
        f"once, {settings.max_queue} may wait, uploads up to "
        f"{_size(settings.max_file_size)}; {login}"
        + (f"; served under {settings.root_path}" if settings.root_path else ""),
        flush=True,
    )
    try:
        server = AppServer(service, settings)
        server.launch()
    except BaseException:
        service.close()
        raise
    server.serve_until_stopped()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (``dermfusion-app``)."""
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
