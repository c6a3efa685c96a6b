"""Prediction history: SQLAlchemy models, migrations and queries — rows and bytes only.

``db`` never imports ``model``: the prediction service that fills it lives above both, in
:mod:`service.prediction`. Importing :mod:`db` does not import torch.
"""

from db.models import Base, PredictionRecord
from db.queries import (
    HistoryFilter,
    count_predictions,
    counts_per_class_per_day,
    get_prediction,
    parse_date,
    query_predictions,
)
from db.session import DB_URL_ENV, DEFAULT_DB_URL, Database, make_engine, resolve_db_url

__all__ = [
    "DB_URL_ENV",
    "DEFAULT_DB_URL",
    "Base",
    "Database",
    "HistoryFilter",
    "PredictionRecord",
    "count_predictions",
    "counts_per_class_per_day",
    "get_prediction",
    "make_engine",
    "parse_date",
    "query_predictions",
    "resolve_db_url",
]
