"""CSV cells that a spreadsheet shows as text, never runs as a formula (CSV injection).

A stored note, a file name or a model version may begin with ``=`` (``=HYPERLINK(...)``); Excel,
LibreOffice and Google Sheets run such a cell as a formula when the CSV is opened. OWASP's rule:
a text cell that starts with ``=``, ``+``, ``-``, ``@``, a tab or a carriage return gets a leading
``'``, which spreadsheets read as "this is text" and hide. Numbers stay numbers: ints and floats
pass unchanged, and so does text that is just a number (``-0.5``, ``+1e-3``), which no
spreadsheet runs. Every CSV the project writes for people goes through :func:`safe_cell`
(:func:`service.history.write_csv_rows` for the History download, ``scripts.query_history
--format csv`` and the batch CSV; :func:`safe_frame` for pandas tables).
"""

from __future__ import annotations

import re
from typing import Any

#: First characters that make a spreadsheet read a cell as a formula (OWASP, CSV injection).
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r")
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def safe_cell(value: Any) -> Any:
    """``value`` as it should be written to a CSV cell: formula-looking text prefixed with ``'``,
    numbers and ``None`` unchanged."""
    if value is None or isinstance(value, (bool, int, float)):
        return value
    text = str(value)
    if text.startswith(FORMULA_PREFIXES) and not _NUMBER.fullmatch(text):
        return "'" + text
    return text


def safe_row(row: Any) -> list[Any]:
    """Every cell of ``row`` through :func:`safe_cell`."""
    return [safe_cell(v) for v in row]


def safe_frame(frame: Any) -> Any:
    """A copy of a pandas ``DataFrame`` whose text cells (and column names) went through
    :func:`safe_cell`; numeric columns are untouched."""
    out = frame.copy()
    for column in out.columns:
        if out[column].dtype.kind not in "biufcmM":  # text (object or string dtype)
            out[column] = out[column].map(safe_cell)
    out.columns = [safe_cell(c) for c in out.columns]
    return out
