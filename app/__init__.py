"""The DermFusion Gradio app (research and education only — not a diagnosis).

``make_frontend(service)`` in :mod:`app.frontend` builds the UI around a
:class:`service.prediction.PredictionService`; ``python -m app`` (:mod:`app.__main__`) serves it.
"""
