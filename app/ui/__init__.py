"""The Gradio user interface, one module per tab (FastChat-style).

:mod:`app.ui.analyse`, :mod:`app.ui.batch`, :mod:`app.ui.history`, :mod:`app.ui.agreement` and
:mod:`app.ui.about` each hold one ``build_*_ui()`` and that tab's module-level handlers;
:mod:`app.ui.common` holds what several tabs share (error pop-ups, ids, output files, exports,
the history filters); :func:`app.ui.demo.build_demo` composes the tabs and configures the queue.
"""
