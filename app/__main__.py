"""Serve the DermFusion web app (research and education only — not a diagnosis).

    python -m app                                   # shipped model, sqlite:///predictions.db
    python -m app --checkpoint runs/fusion --db sqlite:///history.db --port 7861
    python -m app --share --auth alice:s3cret       # temporary public link, password protected
    python -m app --concurrency 2 --max-queue 64 --max-file-size 20mb   # serving limits (defaults)

The history database is --db, else $SKIN_DB_URL, else sqlite:///predictions.db in the current
directory. --share asks Gradio for a temporary public *.gradio.live link; without internet no link
can be made and the app keeps serving locally. Always combine --share with --auth: anyone with
the link can otherwise use the app and read its prediction history.

Many users at once: --concurrency predictions run at the same time (default 2, one per core of a
small server; the predictor is thread-safe), up to --max-queue more wait, and beyond that a
request is refused at once with "The demo is busy, try again in a moment" instead of waiting
without bound. Uploads above --max-file-size are refused before they are stored.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.ui.common import PREDICT_CONCURRENCY
from app.ui.demo import QUEUE_SIZE
from common.cli import run_cli
from common.errors import DermError
from common.text import DISCLAIMER
from model.onnx_runtime import RUNTIME_HELP, RUNTIMES

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
#: Largest accepted upload: a 60-megapixel dermoscopy photo is well under 20 MB as JPEG or PNG.
DEFAULT_MAX_FILE_SIZE = "20mb"


@dataclass
class Served:
    """Where a launched app can be reached."""

    local_url: str
    share_url: str | None


def parse_auth(text: str) -> tuple[str, str]:
    """``user:password`` → (user, password); the password may itself contain colons."""
    user, sep, password = str(text).partition(":")
    if not sep or not user.strip() or not password:
        raise argparse.ArgumentTypeError(
            f"expected USER:PASSWORD (e.g. --auth alice:s3cret), got {text!r}"
        )
    return user.strip(), password


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m app", description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help="checkpoint folder (default: the shipped model in model/shipped/)",
    )
    p.add_argument(
        "--db",
        default=None,
        help="SQLAlchemy URL of the history database "
        "(default: $SKIN_DB_URL or sqlite:///predictions.db)",
    )
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help=f"interface to listen on (default {DEFAULT_HOST}; 0.0.0.0 = all)",
    )
    p.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    p.add_argument(
        "--share",
        action="store_true",
        help="ask Gradio for a temporary public link (needs internet; use with --auth)",
    )
    p.add_argument(
        "--auth",
        type=parse_auth,
        action="append",
        default=None,
        metavar="USER:PASSWORD",
        help="require this login (repeat for several users)",
    )
    p.add_argument(
        "--no-store-images",
        action="store_true",
        help="store predictions without image thumbnails (privacy)",
    )
    p.add_argument(
        "--concurrency",
        type=_positive_int,
        default=PREDICT_CONCURRENCY,
        help=f"predictions running at the same time (default {PREDICT_CONCURRENCY})",
    )
    p.add_argument(
        "--max-queue",
        type=_positive_int,
        default=QUEUE_SIZE,
        help=f"requests that may wait; more are refused as busy (default {QUEUE_SIZE})",
    )
    p.add_argument(
        "--max-file-size",
        type=_file_size,
        default=DEFAULT_MAX_FILE_SIZE,
        help=f"largest upload, e.g. 20mb or 500kb (default {DEFAULT_MAX_FILE_SIZE})",
    )
    p.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=None,
        help=RUNTIME_HELP,
    )
    return p


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number ≥ 1, got {text!r}")
    return value


_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}


def _file_size(text: str) -> int:
    """``20mb`` / ``500kb`` / ``1048576`` → bytes (Gradio's units, 1 kb = 1024 b)."""
    value = str(text).strip().lower().replace(" ", "")
    number, unit = value, "b"
    for suffix in sorted(_UNITS, key=len, reverse=True):
        if value.endswith(suffix):
            number, unit = value[: -len(suffix)], suffix
            break
    try:
        size = float(number) * _UNITS[unit]
    except ValueError:
        size = 0
    if size < 1:
        raise argparse.ArgumentTypeError(f"expected a size such as 20mb or 500kb, got {text!r}")
    return int(size)


LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}


def exposure_warnings(host: str, share: bool, auth: list[tuple[str, str]] | None) -> list[str]:
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


def launch(
    demo: Any,
    host: str = DEFAULT_HOST,
    port: int | None = DEFAULT_PORT,
    share: bool = False,
    auth: list[tuple[str, str]] | None = None,
    quiet: bool = False,
    max_file_size: int | str | None = DEFAULT_MAX_FILE_SIZE,
) -> Served:
    """Start serving ``demo`` without blocking; falls back to local-only when sharing fails.

    Gradio 6 catches a failed share tunnel itself (prints "Could not create share link" and
    serves locally); older / newer versions may raise instead, so both are handled here.
    """
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
    }
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


def run(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from app.ui.demo import build_demo as make_frontend
    from service.prediction import PredictionService

    service = PredictionService.create(
        args.checkpoint,
        db_url=args.db,
        store_images=not args.no_store_images,
        runtime=args.runtime,
    )
    if service.predictor.runtime != "torch":
        import torch

        # ONNX Runtime runs the network on its own threads; PyTorch is left only the tiny fusion
        # head (metadata ablation), where one thread avoids OpenMP hand-offs between requests.
        torch.set_num_threads(1)
    db_url = service.db.display_url if service.db else "none"
    print(
        f"model {service.predictor.version} on {service.predictor.runtime}; "
        f"history database {db_url}; {args.concurrency} at once, {args.max_queue} may wait, "
        f"uploads up to {args.max_file_size / 1024**2:.0f} MB",
        flush=True,
    )
    demo = make_frontend(service, concurrency=args.concurrency, max_queue=args.max_queue)
    launch(
        demo,
        host=args.host,
        port=args.port,
        share=args.share,
        auth=args.auth,
        max_file_size=args.max_file_size,
    )
    try:
        demo.block_thread()
    finally:
        service.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    """Console-script entry point (``dermfusion-app``)."""
    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
