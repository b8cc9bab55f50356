"""Typed exceptions. SearchIndex code raises these; the CLI and the API map them to exit codes and statuses.

A leaf module: it imports nothing from the project, so every layer (``retriever.index`` included) can raise
these without importing anything above it.
"""

from __future__ import annotations


class RetrieverError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelNotFoundError(RetrieverError):
    """A model is neither on disk nor reachable on the hub."""


class ModelMismatchError(RetrieverError):
    """The index was built with other models than the ones asked for."""


class ImageDecodeError(RetrieverError):
    """A file could not be decoded as an image (corrupt, truncated, not an image, too large, unreadable)."""


class BadQueryError(RetrieverError):
    """A search query that cannot be searched for; the CLI and the API refuse every kind alike."""


class EmptyQueryError(BadQueryError):
    """A search was asked for with an empty query."""


class QueryTooLongError(BadQueryError):
    """A search was asked for with a query longer than the search accepts."""


class IndexLockedError(RetrieverError):
    """Another process is writing to the same index."""


class NotFoundError(RetrieverError):
    """An id or path is not in the index."""


class StoreError(RetrieverError):
    """The index database failed; the subclasses say whether at opening or afterwards."""


class SchemaError(StoreError):
    """The index database cannot be opened: a bad URL, an unreachable or damaged database, or a schema this
    version cannot read or migrate."""


class DatabaseFailureError(StoreError):
    """The database refused a read or write after it was opened (locked, full, damaged, unreachable).

    ``reason`` is the driver's own first line, which the CLI and the API put into their own words.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(f"database error: {reason}")
        self.reason = reason

    def __reduce__(self) -> tuple[type[DatabaseFailureError], tuple[str]]:
        # Rebuilt from the reason, not the message (a worker process hands it back pickled).
        return type(self), (self.reason,)


class NoIndexError(RetrieverError):
    """A command that only reads was pointed at a folder or database that holds no index."""


class IndexMismatchError(RetrieverError):
    """An index folder and a database that do not belong together (each records the other's identity)."""


class IndexDamagedError(RetrieverError):
    """Part of the index is missing or damaged (patch cache cut short, non-finite tokens, broken database)."""


class ResourceError(RetrieverError):
    """The machine refused a write: disk or database full, permission denied, read-only file system."""
