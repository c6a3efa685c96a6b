"""The prediction service and its presentation helpers, above ``db/`` and ``model/``.

- :mod:`service.prediction`: the one validate → predict → attribute → store path;
- :mod:`service.render`: heatmap overlays, charts, thumbnails and PNG encoding;
- :mod:`service.history`: the one serializer of a stored history row (JSON, table, CSV, detail).
"""
