"""Typed exceptions. Library code raises these; the CLI and the API map them to exit codes and statuses."""

from __future__ import annotations


class RetrieverError(Exception):
    """Base class of every error this package raises on purpose."""


class ModelNotFoundError(RetrieverError):
    """A model is neither on disk nor reachable on the hub."""


class ModelMismatchError(RetrieverError):
    """The index was built with other models than the ones asked for."""


class ImageDecodeError(RetrieverError):
    """A file could not be decoded as an image (corrupt, truncated, not an image, too large, unreadable)."""


class EmptyQueryError(RetrieverError):
    """A search was asked for with an empty query."""


class IndexLockedError(RetrieverError):
    """Another process is writing to the same index."""


class NotFoundError(RetrieverError):
    """An id or path is not in the index."""


class SchemaError(RetrieverError):
    """The index database has a schema this version cannot read or migrate."""


class NoIndexError(RetrieverError):
    """A command that only reads was pointed at a folder or database that holds no index."""


class IndexMismatchError(RetrieverError):
    """An index folder and a database that do not belong together (each records the other's identity)."""


class IndexDamagedError(RetrieverError):
    """Part of the index is missing or damaged (patch cache cut short, non-finite tokens, broken database)."""


class ResourceError(RetrieverError):
    """The machine refused a write: disk or database full, permission denied, read-only file system."""
