"""Opening the store's database, and its failures as project errors, in words a user can act on.

The store is the only code that talks SQL; what leaves it is a project error, never the driver's own, so
the CLI and the API map database failures without knowing SQLAlchemy: ``SchemaError`` when the database
cannot be opened (the reason explained, see ``explain``), ``DatabaseFailureError`` when it refuses a read
or write afterwards (see ``translated``).
"""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError

from retriever.errors import DatabaseFailureError, SchemaError

#: Free bytes below which a failed SQLite write is put down to a full disk.
LOW_SPACE_BYTES = 1 << 20

#: The SQL backends the store is tested on.
SUPPORTED_BACKENDS = ("sqlite", "postgresql", "postgres")


def normalize_url(url: str) -> str:
    """Pick the psycopg 3 driver for plain ``postgresql://`` URLs; leave every other URL as it is.

    Raises:
        SchemaError: not a database URL, or one of a backend the store does not support.
    """
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise SchemaError(f"not a database URL: {url!r}") from exc
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED_BACKENDS:
        raise SchemaError(
            f"{backend} databases are not supported: use SQLite (the default, inside the index folder) or "
            "PostgreSQL (--db-url postgresql://user@host/dbname)"
        )
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def display_url(url: str) -> str:
    """The URL with any password hidden."""
    return make_url(url).render_as_string(hide_password=True)


def open_engine(url: str) -> Engine:
    """An engine for a normalized URL: SQLite in WAL mode, so searches read while an index run writes."""
    if url.startswith("sqlite"):
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # WAL lets searches read while an index run writes; NORMAL sync is durable at each
            # checkpoint and never corrupts the database on a crash.
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    return create_engine(url, pool_pre_ping=True)


def immutable_engine(url: str) -> Engine | None:
    """An engine that reads an SQLite file without its WAL files, where that reads everything; else None.

    A reader in WAL mode creates the ``-shm`` file when no connection has it open, so on a full disk (or a
    read-only folder) even a search cannot open the database. With no ``-wal`` file, or one holding no
    frame past its 32-byte header, there is no write that the main file lacks, and SQLite's ``immutable``
    mode reads it without creating anything.
    """
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database:
        return None
    try:
        if os.path.getsize(database + "-wal") > 32:
            return None
    except FileNotFoundError:
        pass
    uri = f"file:{os.path.abspath(database)}?mode=ro&immutable=1"
    return create_engine("sqlite://", creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False))


def database_reason(exc: DatabaseError) -> str:
    """The driver's own first line for a database error ("file is not a database", "disk is full")."""
    text_ = str(exc.orig if exc.orig is not None else exc).strip()
    return text_.splitlines()[0] if text_ else type(exc).__name__


def explain(url: str, exc: DatabaseError) -> str:
    """The driver's reason, or what lies behind it.

    SQLite says "disk I/O error" or "unable to open database file" when it cannot create its journal files,
    so for an SQLite file the folder is looked at too (read-only, not writable, full).
    """
    reason = database_reason(exc)
    parsed = make_url(url)
    database = parsed.database
    if parsed.get_backend_name() == "sqlite" and database:
        folder = os.path.dirname(os.path.abspath(database))
        try:
            free = shutil.disk_usage(folder).free
            read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
        except OSError:
            return reason
        if read_only:
            return f"the file system holding it is read-only ({reason}): choose another --index-dir"
        if not os.access(folder, os.W_OK):
            return f"permission denied on {folder} ({reason}): check who owns it"
        if free < LOW_SPACE_BYTES:
            return (
                f"no space left on the device holding it ({reason}): free some space and run the "
                "command again"
            )
    return reason


@contextmanager
def translated() -> Iterator[None]:
    """Turn the driver's errors inside the block into ``DatabaseFailureError`` (with the driver's reason).

    Only ``DatabaseError`` is translated, as the CLI and the API mapped it before: the driver's other errors
    (a misuse of the API) are bugs, and keep their traceback.
    """
    try:
        yield
    except DatabaseError as exc:
        raise DatabaseFailureError(database_reason(exc)) from exc
