"""Exceptions whose messages are shown to users as they are (CLI, app), so they must name the
file, row or column at fault and never need a traceback to be understood."""


class DermError(ValueError):
    """Base class for every user-facing error of this project."""


class DataError(DermError):
    """A dataset folder, CSV or image file is missing, malformed or inconsistent."""


class MetadataError(DermError):
    """Patient metadata (age, sex, body site) that cannot be encoded."""


class ImageError(DermError):
    """An image that cannot be decoded or is unsuitable (empty, too small, too large)."""


class DatabaseError(DermError):
    """The history database cannot be opened, read or written (down, locked, read-only, no
    driver); the message names the database and the fix where there is one."""
