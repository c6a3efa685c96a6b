"""The one place that selects matplotlib's non-interactive backend.

Plots are written to files from training, evaluation, reports and the app's worker threads; a GUI
backend would fail on a headless server or from a non-main thread, so everything goes through here.
"""

from __future__ import annotations

from types import ModuleType


def pyplot() -> ModuleType:
    """``matplotlib.pyplot`` with the Agg backend selected (imported lazily: it is slow to load)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
