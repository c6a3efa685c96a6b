"""How a served app is configured: command-line flags first, then ``DERMFUSION_*`` environment
variables, then defaults — so a container is configured by its environment and a person at a
terminal by flags, with one parser and one table of settings (:data:`VARIABLES`).

Secrets: a login is read from ``--auth`` / ``$DERMFUSION_AUTH`` or from a secrets file
(``--auth-file`` / ``$DERMFUSION_AUTH_FILE``, one ``USER:PASSWORD`` per line, e.g. a Docker or
Compose secret). No error message, log line or ``repr`` repeats a password: a malformed entry
is named by where it came from (variable, file and line), never by its text.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from app.ui.common import PREDICT_CONCURRENCY
from app.ui.demo import QUEUE_SIZE
from common.errors import DermError
from model.onnx_runtime import RUNTIME_ENV, RUNTIMES

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
#: Largest accepted upload: a 60-megapixel dermoscopy photo is well under 20 MB as JPEG or PNG.
DEFAULT_MAX_FILE_SIZE = "20mb"
#: Predictions running at once and requests that may wait: the UI's own defaults.
DEFAULT_CONCURRENCY = PREDICT_CONCURRENCY
DEFAULT_MAX_QUEUE = QUEUE_SIZE
#: Seconds a client waits before its next login is checked, after its first failed one; each
#: further failure doubles it, up to :data:`MAX_LOGIN_DELAY_S`.
DEFAULT_LOGIN_DELAY_S = 1.0
MAX_LOGIN_DELAY_S = 30.0
#: Seconds SIGTERM waits for in-flight requests before the server closes anyway.
DEFAULT_DRAIN_TIMEOUT_S = 30.0


class ConfigError(DermError):
    """A flag or ``DERMFUSION_*`` variable whose value cannot be used."""


@dataclass(frozen=True)
class Variable:
    """One setting: its flag, its environment variable and what it means."""

    dest: str
    flag: str
    env: str
    help: str


#: Every setting that the environment can give, in ``--help`` order.
VARIABLES: tuple[Variable, ...] = (
    Variable("checkpoint", "--checkpoint", "DERMFUSION_CHECKPOINT", "checkpoint folder"),
    Variable("db", "--db", "DERMFUSION_DB_URL", "SQLAlchemy URL of the history database"),
    Variable(
        "db_password_file",
        "--db-password-file",
        "DERMFUSION_DB_PASSWORD_FILE",
        "file holding the database password",
    ),
    Variable("host", "--host", "DERMFUSION_HOST", "interface to listen on"),
    Variable("port", "--port", "DERMFUSION_PORT", "port to listen on"),
    Variable("share", "--share", "DERMFUSION_SHARE", "1: ask Gradio for a public link"),
    Variable("auth", "--auth", "DERMFUSION_AUTH", "USER:PASSWORD logins, comma-separated"),
    Variable("auth_file", "--auth-file", "DERMFUSION_AUTH_FILE", "file of USER:PASSWORD lines"),
    Variable("root_path", "--root-path", "DERMFUSION_ROOT_PATH", "sub-path behind a proxy"),
    Variable("max_file_size", "--max-file-size", "DERMFUSION_MAX_FILE_SIZE", "largest upload"),
    Variable("concurrency", "--concurrency", "DERMFUSION_CONCURRENCY", "predictions at once"),
    Variable("max_queue", "--max-queue", "DERMFUSION_MAX_QUEUE", "requests that may wait"),
    Variable("store_images", "--no-store-images", "DERMFUSION_STORE_IMAGES", "0: no thumbnails"),
    Variable("runtime", "--runtime", RUNTIME_ENV, "auto / onnx / int8 / torch"),
    Variable(
        "login_delay", "--login-delay", "DERMFUSION_LOGIN_DELAY", "first failed-login delay (s)"
    ),
    Variable(
        "drain_timeout",
        "--drain-timeout",
        "DERMFUSION_DRAIN_TIMEOUT",
        "SIGTERM's wait for requests (s)",
    ),
)
ENV: dict[str, str] = {v.dest: v.env for v in VARIABLES}


@dataclass(frozen=True)
class Settings:
    """What ``python -m app`` serves with, resolved from flags, environment and defaults."""

    checkpoint: Path | None = None
    #: May hold the database password (from ``--db-password-file``): never shown by ``repr``.
    db: str | None = field(default=None, repr=False)
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    share: bool = False
    #: ``(user, password)`` pairs; empty: no login. Never shown by ``repr``.
    auth: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    root_path: str = ""
    max_file_size: int = 20 * 1024**2
    concurrency: int = DEFAULT_CONCURRENCY
    max_queue: int = DEFAULT_MAX_QUEUE
    store_images: bool = True
    runtime: str | None = None
    login_delay: float = DEFAULT_LOGIN_DELAY_S
    drain_timeout: float = DEFAULT_DRAIN_TIMEOUT_S

    @property
    def users(self) -> list[str]:
        return [user for user, _ in self.auth]


# --- parsers (each raises ValueError with a message that never repeats a secret) --------------


def parse_auth(text: str) -> tuple[str, str]:
    """``user:password`` → (user, password); the password may itself contain colons."""
    user, sep, password = str(text).partition(":")
    if not sep or not user.strip() or not password:
        # the value is not repeated: it may be a password typed in the wrong place
        raise ValueError("expected USER:PASSWORD (e.g. alice:s3cret)")
    return user.strip(), password


def parse_auth_list(text: str) -> list[tuple[str, str]]:
    """``alice:pw1,bob:pw2`` → pairs (a password containing a comma needs the secrets file)."""
    return [parse_auth(item) for item in str(text).split(",") if item.strip()]


def read_auth_file(path: Path | str) -> list[tuple[str, str]]:
    """``USER:PASSWORD`` per line; blank lines and lines starting with ``#`` are skipped."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"cannot read {path} ({type(exc).__name__})") from None
    pairs = []
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            pairs.append(parse_auth(line))
        except ValueError:
            raise ValueError(f"{path} line {number}: expected USER:PASSWORD") from None
    if not pairs:
        raise ValueError(f"{path} holds no USER:PASSWORD line")
    return pairs


def positive_int(text: str) -> int:
    try:
        value = int(str(text).strip())
    except ValueError:
        value = 0
    if value < 1:
        raise ValueError(f"expected a whole number ≥ 1, got {text!r}")
    return value


def port_number(text: str) -> int:
    value = positive_int(text)
    if value > 65535:
        raise ValueError(f"expected a port from 1 to 65535, got {text!r}")
    return value


def seconds(text: str) -> float:
    try:
        value = float(str(text).strip())
    except ValueError:
        value = -1.0
    if not 0 <= value <= 3600:
        raise ValueError(f"expected seconds from 0 to 3600, got {text!r}")
    return value


_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3}


def file_size(text: str) -> int:
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
        raise ValueError(f"expected a size such as 20mb or 500kb, got {text!r}")
    return int(size)


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def boolean(text: str) -> bool:
    value = str(text).strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"expected 1 / 0 (or true / false), got {text!r}")


def root_path(text: str) -> str:
    """``dermfusion/`` → ``/dermfusion``; a full ``https://host/sub`` URL is kept as given (Gradio
    accepts both); empty: served at the root."""
    value = str(text).strip()
    if value.startswith(("http://", "https://")):
        return value.rstrip("/")
    if any(c in value for c in " ?#\\"):
        raise ValueError(f"expected a path such as /dermfusion, got {text!r}")
    value = value.strip("/")
    return f"/{value}" if value else ""


def runtime_name(text: str) -> str:
    value = str(text).strip().lower()
    if value not in RUNTIMES:
        raise ValueError(f"expected one of {', '.join(RUNTIMES)}, got {text!r}")
    return value


def _argparse_type(parse: Callable[[str], Any]) -> Callable[[str], Any]:
    """``parse`` for argparse: its ValueError becomes argparse's one-line usage error."""

    def convert(text: str) -> Any:
        try:
            return parse(text)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    convert.__name__ = parse.__name__
    return convert


# --- the parser ----------------------------------------------------------------------------------


def _with_env(dest: str, text: str) -> str:
    return f"{text} [${ENV[dest]}]"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Every serving flag, each naming its environment variable in ``--help``. Defaults are None
    here: :func:`resolve` tells "not given" (use the environment) from a given value."""
    p.add_argument(
        "--checkpoint",
        type=Path,
        default=None,
        help=_with_env("checkpoint", "checkpoint folder (default: the shipped model)"),
    )
    p.add_argument(
        "--db",
        default=None,
        help=_with_env(
            "db",
            "SQLAlchemy URL of the history database, e.g. postgresql://user:pw@db/dermfusion "
            "(default: $SKIN_DB_URL or sqlite:///predictions.db)",
        ),
    )
    p.add_argument(
        "--db-password-file",
        type=Path,
        default=None,
        metavar="FILE",
        help=_with_env(
            "db_password_file",
            "the database password, read from FILE (e.g. a Docker secret) into the --db URL",
        ),
    )
    p.add_argument(
        "--host",
        default=None,
        help=_with_env("host", f"interface to listen on (default {DEFAULT_HOST}; 0.0.0.0 = all)"),
    )
    p.add_argument(
        "--port",
        type=_argparse_type(port_number),
        default=None,
        help=_with_env("port", f"port (default {DEFAULT_PORT})"),
    )
    p.add_argument(
        "--share",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=_with_env(
            "share", "ask Gradio for a temporary public link (needs internet; use with --auth)"
        ),
    )
    p.add_argument(
        "--auth",
        type=_argparse_type(parse_auth),
        action="append",
        default=None,
        metavar="USER:PASSWORD",
        help=_with_env(
            "auth", "require this login (repeat for several users; env: comma-separated)"
        ),
    )
    p.add_argument(
        "--auth-file",
        type=Path,
        default=None,
        metavar="FILE",
        help=_with_env(
            "auth_file",
            "read logins from FILE, one USER:PASSWORD per line (# comments), e.g. a Docker secret",
        ),
    )
    p.add_argument(
        "--root-path",
        type=_argparse_type(root_path),
        default=None,
        metavar="PATH",
        help=_with_env(
            "root_path",
            "the sub-path a reverse proxy serves the app under, e.g. /dermfusion (default: none)",
        ),
    )
    p.add_argument(
        "--no-store-images",
        dest="store_images",
        action="store_false",
        default=None,
        help=_with_env(
            "store_images", "store predictions without image thumbnails (privacy; env: 0)"
        ),
    )
    p.add_argument(
        "--concurrency",
        type=_argparse_type(positive_int),
        default=None,
        help=_with_env(
            "concurrency", f"predictions running at the same time (default {DEFAULT_CONCURRENCY})"
        ),
    )
    p.add_argument(
        "--max-queue",
        type=_argparse_type(positive_int),
        default=None,
        help=_with_env(
            "max_queue",
            f"requests that may wait; more are refused as busy (default {DEFAULT_MAX_QUEUE})",
        ),
    )
    p.add_argument(
        "--max-file-size",
        type=_argparse_type(file_size),
        default=None,
        help=_with_env(
            "max_file_size",
            f"largest upload, e.g. 20mb or 500kb (default {DEFAULT_MAX_FILE_SIZE})",
        ),
    )
    p.add_argument(
        "--runtime",
        type=_argparse_type(runtime_name),
        default=None,
        metavar="{" + ",".join(RUNTIMES) + "}",
        help=_with_env(
            "runtime",
            "auto: ONNX Runtime when the checkpoint has a valid export, else PyTorch (default); "
            "onnx / int8 / torch force one (int8: faster, not accuracy-neutral)",
        ),
    )
    p.add_argument(
        "--login-delay",
        type=_argparse_type(seconds),
        default=None,
        metavar="SECONDS",
        help=_with_env(
            "login_delay",
            f"after a client's failed login its next one waits this long, doubling per failure "
            f"up to {MAX_LOGIN_DELAY_S:.0f} s (default {DEFAULT_LOGIN_DELAY_S:g}; 0: off)",
        ),
    )
    p.add_argument(
        "--drain-timeout",
        type=_argparse_type(seconds),
        default=None,
        metavar="SECONDS",
        help=_with_env(
            "drain_timeout",
            f"on SIGTERM, wait up to this long for in-flight requests "
            f"(default {DEFAULT_DRAIN_TIMEOUT_S:g})",
        ),
    )


def environment_help() -> str:
    """The ``--help`` epilog: each environment variable and the flag it stands for."""
    width = max(len(v.env) for v in VARIABLES)
    lines = ["environment variables (a flag given on the command line wins):"]
    lines += [f"  {v.env.ljust(width)}  {v.flag}: {v.help}" for v in VARIABLES]
    return "\n".join(lines)


# --- resolution ----------------------------------------------------------------------------------

#: How each variable's text becomes a value (the flags' ``type=`` parse the same way).
_ENV_PARSERS: dict[str, Callable[[str], Any]] = {
    "checkpoint": Path,
    "db": str,
    "db_password_file": Path,
    "host": str,
    "port": port_number,
    "share": boolean,
    "root_path": root_path,
    "max_file_size": file_size,
    "concurrency": positive_int,
    "max_queue": positive_int,
    "store_images": boolean,
    "runtime": runtime_name,
    "login_delay": seconds,
    "drain_timeout": seconds,
}


def _from_env(dest: str, environ: Mapping[str, str]) -> Any:
    text = environ.get(ENV[dest])
    if text is None or (not text.strip() and dest not in ("share", "store_images")):
        return None
    try:
        return _ENV_PARSERS[dest](text)
    except ValueError as exc:
        raise ConfigError(f"${ENV[dest]}: {exc}.") from None


def _auth(args: argparse.Namespace, environ: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """Flags win as a whole: ``--auth`` / ``--auth-file`` given → the environment's logins are
    not read. Either source may combine an inline list and a file."""
    pairs: list[tuple[str, str]] = []
    if args.auth or args.auth_file:
        pairs += args.auth or []
        if args.auth_file:
            try:
                pairs += read_auth_file(args.auth_file)
            except ValueError as exc:
                raise ConfigError(f"--auth-file: {exc}.") from None
    else:
        inline, path = environ.get(ENV["auth"], ""), environ.get(ENV["auth_file"], "")
        try:
            pairs += parse_auth_list(inline)
        except ValueError as exc:
            raise ConfigError(f"${ENV['auth']}: {exc} (comma-separated).") from None
        if path.strip():
            try:
                pairs += read_auth_file(path.strip())
            except ValueError as exc:
                raise ConfigError(f"${ENV['auth_file']}: {exc}.") from None
    users = [user for user, _ in pairs]
    duplicate = next((u for u in users if users.count(u) > 1), None)
    if duplicate is not None:
        raise ConfigError(f"The login {duplicate!r} is given twice; give each user once.")
    return tuple(pairs)


def _with_password(url: str | None, password_file: Path | None) -> str | None:
    """``url`` with the password read from ``password_file`` (:func:`db.session.
    with_password_file`, which the CLIs use too)."""
    if password_file is None:
        return url
    if not url:
        raise ConfigError(
            f"${ENV['db_password_file']} / --db-password-file needs a database URL "
            f"(${ENV['db']} or --db) to put the password into."
        )
    from db.session import with_password_file

    try:
        return with_password_file(url, password_file)
    except DermError as exc:
        raise ConfigError(str(exc)) from None


def resolve(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> Settings:
    """Flags > environment > defaults, validated (:class:`ConfigError` names the variable)."""
    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for dest in _ENV_PARSERS:
        given = getattr(args, dest, None)
        values[dest] = given if given is not None else _from_env(dest, environ)
    values["auth"] = _auth(args, environ)
    values["db"] = _with_password(values["db"], values.pop("db_password_file"))
    if values["max_file_size"] is None:
        values["max_file_size"] = file_size(DEFAULT_MAX_FILE_SIZE)
    return Settings(**{k: v for k, v in values.items() if v is not None})
