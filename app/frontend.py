"""Compatibility module: the UI now lives in :mod:`app.ui` (one module per tab,
:func:`app.ui.demo.build_demo` composing them). Existing imports of ``app.frontend`` keep
working through these re-exports; new code imports from :mod:`app.ui` directly."""

from __future__ import annotations

from app.ui.analyse import EXAMPLES_DIR, analyse, diagnose, explain_again
from app.ui.batch import batch_analysis
from app.ui.common import (
    EXPORT_MAX_AGE_S,
    EXPORT_PREFIX,
    OUTPUT_PREFIX,
    PREDICT_CONCURRENCY,
    case_report,
    clean_stale_exports,
    output_file,
)
from app.ui.demo import BUSY_MESSAGE, CSS, QUEUE_SIZE, build_demo, make_frontend
from app.ui.history import confirm_record, delete_record, search_history, show_record

__all__ = [
    "BUSY_MESSAGE",
    "CSS",
    "EXAMPLES_DIR",
    "EXPORT_MAX_AGE_S",
    "EXPORT_PREFIX",
    "OUTPUT_PREFIX",
    "PREDICT_CONCURRENCY",
    "QUEUE_SIZE",
    "analyse",
    "batch_analysis",
    "build_demo",
    "case_report",
    "clean_stale_exports",
    "confirm_record",
    "delete_record",
    "diagnose",
    "explain_again",
    "make_frontend",
    "output_file",
    "search_history",
    "show_record",
]
