"""Neutral helpers every layer may import: the user-facing error type, CLI plumbing, plotting.

Nothing here imports another package of this project, so it sits below ``data_pipeline``.
"""
