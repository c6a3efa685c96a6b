"""The one version number of DermFusion (the package, the app, ``/healthz``, the REST API and
newly written checkpoints report it); ``pyproject.toml`` reads it from here."""

__version__ = "3.0.0"
