"""Shared CLI plumbing: user-facing errors become one clear line and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from common.errors import DermError


def run_cli(main: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    try:
        return int(main(argv) or 0)
    except DermError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
