"""The metadata store: image and caption rows in SQLite (embedded default) or PostgreSQL, via SQLAlchemy."""

from __future__ import annotations

import os
import shutil
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import (
    Connection,
    Engine,
    Table,
    create_engine,
    delete,
    event,
    func,
    insert,
    inspect,
    select,
    text,
    update,
)
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError, DatabaseError
from sqlalchemy.orm import Session

from .schema import SCHEMA_VERSION, Base, ImageRow, Meta, TextRow


class StoreError(Exception):
    """The database cannot be opened, or holds a schema this version cannot migrate."""


class NoStoreError(StoreError):
    """The database exists but holds no store (and was not to be given one)."""


#: Free bytes below which a failed SQLite write is put down to a full disk.
LOW_SPACE_BYTES = 1 << 20


def database_reason(exc: DatabaseError) -> str:
    """The driver's own first line for a database error ("file is not a database", "disk is full")."""
    text_ = str(exc.orig if exc.orig is not None else exc).strip()
    return text_.splitlines()[0] if text_ else type(exc).__name__


@dataclass(frozen=True)
class ImageRecord:
    """An indexed image, without its vector."""

    id: int
    path: str
    size: int
    mtime: float
    content_hash: str
    width: int
    height: int
    indexed_at: datetime
    prefilter_model: str
    reranker_model: str
    patch_offset: int
    patch_tokens: int


@dataclass(frozen=True)
class TextRecord:
    """A caption of the text collection."""

    id: int
    ext_id: str | None
    text: str

    @property
    def shown_id(self) -> str:
        """The id lists and search hits show, and removal takes: the ext_id, or the row id without one."""
        return self.ext_id if self.ext_id is not None else str(self.id)


@dataclass(frozen=True)
class FileState:
    """What the store knows of a file, to decide whether it changed."""

    id: int
    size: int
    mtime: float
    content_hash: str


@dataclass(frozen=True)
class Encoded:
    """What a file's content encodes to; shared by every file with the same content hash."""

    vector: np.ndarray
    width: int
    height: int
    patch_offset: int
    patch_tokens: int


@dataclass(frozen=True)
class NewImage:
    """An image to insert, or to update in place when ``replace_id`` is set."""

    path: str
    size: int
    mtime: float
    content_hash: str
    encoded: Encoded
    replace_id: int | None = None


@dataclass
class ImageBatch:
    """One transaction's worth of index changes."""

    upserts: list[NewImage] = field(default_factory=list)
    deletes: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class Applied:
    """The ids a committed batch added (with their vectors) and removed, and the new generation."""

    generation: int
    added_ids: np.ndarray
    added_vectors: np.ndarray
    removed_ids: np.ndarray


#: Ids or keys per ``IN (...)`` list, well below SQLite's and PostgreSQL's limits on bound parameters.
_IN_CHUNK = 500

#: The SQL backends the store is tested on.
SUPPORTED_BACKENDS = ("sqlite", "postgresql", "postgres")


def normalize_url(url: str) -> str:
    """Pick the psycopg 3 driver for plain ``postgresql://`` URLs; leave every other URL as it is."""
    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise StoreError(f"not a database URL: {url!r}") from exc
    backend = parsed.get_backend_name()
    if backend not in SUPPORTED_BACKENDS:
        raise StoreError(
            f"{backend} databases are not supported: use SQLite (the default, inside the index folder) or "
            "PostgreSQL (--db-url postgresql://user@host/dbname)"
        )
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def _migrate_1_to_2(conn: Connection) -> None:
    # Version 1 indexed images only; version 2 adds the caption collection for image→text search.
    TextRow.__table__.create(conn, checkfirst=True)  # type: ignore[attr-defined]


def _migrate_2_to_3(conn: Connection) -> None:
    # Version 3 never reuses an id: a client holding the id of a deleted image must not get another
    # image under it. PostgreSQL sequences never go back; SQLite reuses the largest rowid after a delete
    # unless the table is declared AUTOINCREMENT, which only a new table can be, so the tables are copied.
    # Ids deleted before this step above the largest remaining one cannot be known any more.
    if conn.dialect.name != "sqlite":
        return
    tables: tuple[Table, ...] = (ImageRow.__table__, TextRow.__table__)  # type: ignore[assignment]
    for table in tables:
        old = f"{table.name}_v2"
        conn.execute(text(f'ALTER TABLE "{table.name}" RENAME TO "{old}"'))
        for index in table.indexes:
            conn.execute(text(f'DROP INDEX IF EXISTS "{index.name}"'))
        table.create(conn)
        columns = ", ".join(f'"{c.name}"' for c in table.columns)
        conn.execute(text(f'INSERT INTO "{table.name}" ({columns}) SELECT {columns} FROM "{old}"'))
        conn.execute(text(f'DROP TABLE "{old}"'))


#: MIGRATIONS[v] upgrades a database at schema version v to v + 1, inside one transaction.
MIGRATIONS: dict[int, Callable[[Connection], None]] = {1: _migrate_1_to_2, 2: _migrate_2_to_3}


def _vec_bytes(vector: np.ndarray) -> bytes:
    return np.ascontiguousarray(vector, dtype=np.float32).tobytes()


def _vectors(rows: Sequence[tuple[int, bytes]], dim: int) -> tuple[np.ndarray, np.ndarray]:
    ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
    if not rows:
        return ids, np.zeros((0, dim), dtype=np.float32)
    vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), -1)
    return ids, vecs


def _image_record(row: ImageRow) -> ImageRecord:
    return ImageRecord(
        id=row.id,
        path=row.path,
        size=row.size,
        mtime=row.mtime,
        content_hash=row.content_hash,
        width=row.width,
        height=row.height,
        indexed_at=row.indexed_at,
        prefilter_model=row.prefilter_model,
        reranker_model=row.reranker_model,
        patch_offset=row.patch_offset,
        patch_tokens=row.patch_tokens,
    )


class MetadataStore:
    """Rows of images and captions, and the index's key-value facts, in one SQL database."""

    def __init__(self, url: str, *, create: bool = True) -> None:
        """Open (and migrate) the database; with ``create=False`` a database holding no store is refused
        with ``NoStoreError`` instead of getting the tables."""
        self.url = normalize_url(url)
        self.engine: Engine = self._create_engine(self.url)
        try:
            try:
                self._ensure_schema(create)
            except DatabaseError:
                if create or not self._reopen_immutable():
                    raise
                self._ensure_schema(create)
        except DatabaseError as exc:
            # OperationalError (cannot connect, disk full) and the rest ("file is not a database",
            # "database disk image is malformed") alike: one line that names the database.
            self.engine.dispose()
            raise StoreError(f"cannot open the database {self.display_url}: {self.explain(exc)}") from exc
        except StoreError:
            self.engine.dispose()
            raise

    def _reopen_immutable(self) -> bool:
        """Open an SQLite file for reading without its WAL files, where that reads everything.

        A reader in WAL mode creates the ``-shm`` file when no connection has it open, so on a full disk
        (or a read-only folder) even a search cannot open the database. With no ``-wal`` file, or one
        holding no frame past its 32-byte header, there is no write that the main file lacks, and SQLite's
        ``immutable`` mode reads it without creating anything.
        """
        database = make_url(self.url).database
        if self.backend != "sqlite" or not database:
            return False
        try:
            if os.path.getsize(database + "-wal") > 32:
                return False
        except FileNotFoundError:
            pass
        self.engine.dispose()
        uri = f"file:{os.path.abspath(database)}?mode=ro&immutable=1"
        self.engine = create_engine(
            "sqlite://", creator=lambda: sqlite3.connect(uri, uri=True, check_same_thread=False)
        )
        return True

    def explain(self, exc: DatabaseError) -> str:
        """The driver's reason, or what lies behind it: SQLite says "disk I/O error" or "unable to open
        database file" when it cannot create its journal files, so for an SQLite file the folder is looked
        at too (read-only, not writable, full)."""
        reason = database_reason(exc)
        database = make_url(self.url).database
        if self.backend == "sqlite" and database:
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

    @property
    def display_url(self) -> str:
        """The URL with any password hidden."""
        return make_url(self.url).render_as_string(hide_password=True)

    @property
    def backend(self) -> str:
        """The SQL dialect's name: ``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    @staticmethod
    def _create_engine(url: str) -> Engine:
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

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    # -- schema -----------------------------------------------------------------------------------

    def _ensure_schema(self, create: bool) -> None:
        with self.engine.begin() as conn:
            if not inspect(conn).has_table(Meta.__tablename__):
                if not create:
                    raise NoStoreError(f"the database {self.display_url} holds no index")
                Base.metadata.create_all(conn)
                conn.execute(insert(Meta), [{"key": "schema_version", "value": str(SCHEMA_VERSION)}])
                return
            version = int(
                conn.execute(select(Meta.value).where(Meta.key == "schema_version")).scalar_one_or_none() or 1
            )
            if version > SCHEMA_VERSION:
                raise StoreError(
                    f"the index database has schema version {version}, newer than this retriever "
                    f"understands ({SCHEMA_VERSION}); upgrade retriever"
                )
            if version == SCHEMA_VERSION:
                return  # nothing to write: opening an index must not need a writable disk
            while version < SCHEMA_VERSION:
                MIGRATIONS[version](conn)
                version += 1
            self._set_meta(conn, "schema_version", str(version))

    def schema_version(self) -> int:
        """The schema version recorded in the database."""
        value = self.get_meta("schema_version")
        return int(value) if value is not None else 0

    # -- meta -------------------------------------------------------------------------------------

    @staticmethod
    def _set_meta(conn: Connection, key: str, value: str) -> None:
        done = conn.execute(update(Meta).where(Meta.key == key).values(value=value)).rowcount
        if not done:
            conn.execute(insert(Meta), [{"key": key, "value": value}])

    def meta(self) -> dict[str, str]:
        """Every fact about the index, in one query."""
        with self.engine.connect() as conn:
            return {r.key: r.value for r in conn.execute(select(Meta.key, Meta.value))}

    def get_meta(self, key: str) -> str | None:
        """One fact about the index, or None."""
        with self.engine.connect() as conn:
            return conn.execute(select(Meta.value).where(Meta.key == key)).scalar_one_or_none()

    def set_meta(self, values: dict[str, str]) -> None:
        """Record facts about the index, in one transaction."""
        with self.engine.begin() as conn:
            for key, value in values.items():
                self._set_meta(conn, key, value)

    def generation(self, kind: str = "images") -> int:
        """A counter bumped by every committed change to the vectors of ``kind`` (images or texts)."""
        value = self.get_meta(f"{kind}_generation")
        return int(value) if value is not None else 0

    def _bump(self, conn: Connection, kind: str) -> int:
        current = conn.execute(
            select(Meta.value).where(Meta.key == f"{kind}_generation")
        ).scalar_one_or_none()
        gen = int(current or 0) + 1
        self._set_meta(conn, f"{kind}_generation", str(gen))
        return gen

    # -- images -----------------------------------------------------------------------------------

    def file_states(self, under: str | None = None, *, path: str | None = None) -> dict[str, FileState]:
        """Path → state of every indexed file, of those under the folder ``under``, or of one ``path``."""
        stmt = select(ImageRow.id, ImageRow.path, ImageRow.size, ImageRow.mtime, ImageRow.content_hash)
        if under is not None:
            prefix = under.rstrip("/") + "/"
            stmt = stmt.where(func.substr(ImageRow.path, 1, len(prefix)) == prefix)
        if path is not None:
            stmt = stmt.where(ImageRow.path == path)
        with self.engine.connect() as conn:
            return {r.path: FileState(r.id, r.size, r.mtime, r.content_hash) for r in conn.execute(stmt)}

    def encoded_by_hash(self, hashes: Iterable[str]) -> dict[str, Encoded]:
        """Stored encodings for any of these content hashes (renamed or duplicate files reuse them)."""
        wanted = list(set(hashes))
        found: dict[str, Encoded] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(wanted), _IN_CHUNK):
                stmt = select(
                    ImageRow.content_hash,
                    ImageRow.vector,
                    ImageRow.width,
                    ImageRow.height,
                    ImageRow.patch_offset,
                    ImageRow.patch_tokens,
                ).where(ImageRow.content_hash.in_(wanted[start : start + _IN_CHUNK]))
                for r in conn.execute(stmt):
                    found[r.content_hash] = Encoded(
                        np.frombuffer(r.vector, dtype=np.float32),
                        r.width,
                        r.height,
                        r.patch_offset,
                        r.patch_tokens,
                    )
        return found

    def apply(self, batch: ImageBatch, models: tuple[str, str]) -> Applied:
        """Commit a batch of inserts, in-place updates and deletes in one transaction."""
        now = datetime.now(UTC)
        prefilter_model, reranker_model = models
        removed: list[int] = list(batch.deletes)
        added: list[tuple[int, np.ndarray]] = []
        with Session(self.engine) as session, session.begin():
            if batch.deletes:
                session.execute(delete(ImageRow).where(ImageRow.id.in_(batch.deletes)))
            for item in batch.upserts:
                values = {
                    "path": item.path,
                    "size": item.size,
                    "mtime": item.mtime,
                    "content_hash": item.content_hash,
                    "width": item.encoded.width,
                    "height": item.encoded.height,
                    "indexed_at": now,
                    "prefilter_model": prefilter_model,
                    "reranker_model": reranker_model,
                    "vector": _vec_bytes(item.encoded.vector),
                    "patch_offset": item.encoded.patch_offset,
                    "patch_tokens": item.encoded.patch_tokens,
                }
                target = item.replace_id if item.replace_id not in batch.deletes else None
                stmt = update(ImageRow).where(ImageRow.id == target).values(**values)
                if target is not None and session.connection().execute(stmt).rowcount:
                    removed.append(target)
                    row_id = target
                else:  # a new file, or a replaced row that no longer exists: insert
                    row = ImageRow(**values)
                    session.add(row)
                    session.flush()
                    row_id = row.id
                added.append((row_id, item.encoded.vector))
            gen = self._bump(session.connection(), "images")
        dim = added[0][1].shape[0] if added else 0
        return Applied(
            generation=gen,
            added_ids=np.array([a[0] for a in added], dtype=np.int64),
            added_vectors=(
                np.stack([a[1] for a in added]).astype(np.float32)
                if added
                else np.zeros((0, dim), np.float32)
            ),
            removed_ids=np.array(removed, dtype=np.int64),
        )

    def delete_images(self, ids: Sequence[int]) -> int:
        """Remove images by id; returns the new generation."""
        with self.engine.begin() as conn:
            conn.execute(delete(ImageRow).where(ImageRow.id.in_(list(ids))))
            return self._bump(conn, "images")

    def images(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        """Records of these ids that still exist."""
        if not len(ids):
            return {}
        with Session(self.engine) as session:
            rows = session.scalars(select(ImageRow).where(ImageRow.id.in_([int(i) for i in ids])))
            return {r.id: _image_record(r) for r in rows}

    def image_vectors(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids and prefilter vectors of every image, to rebuild the vector index."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(ImageRow.id, ImageRow.vector).order_by(ImageRow.id)).all()
        return _vectors([(r[0], r[1]) for r in rows], dim)

    def count_images(self) -> int:
        """Number of indexed images."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(ImageRow)).scalar_one())

    def patch_rows_needed(self) -> int:
        """How many patch cache rows the rows reference: the end of the furthest extent (0 when empty)."""
        end = ImageRow.patch_offset + ImageRow.patch_tokens
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.coalesce(func.max(end), 0))).scalar_one())

    def images_beyond(self, rows: int) -> list[tuple[int, str]]:
        """(id, path) of every image whose tokens end past ``rows`` patch cache rows."""
        stmt = select(ImageRow.id, ImageRow.path).where(ImageRow.patch_offset + ImageRow.patch_tokens > rows)
        with self.engine.connect() as conn:
            return [(int(r.id), str(r.path)) for r in conn.execute(stmt.order_by(ImageRow.id))]

    def clear(self) -> None:
        """Delete every image and caption (the facts stay), in one transaction."""
        with self.engine.begin() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                if table.name != Meta.__tablename__:
                    conn.execute(table.delete())

    def patch_extents(self) -> list[tuple[int, int]]:
        """Distinct (offset, tokens) of patch cache entries still referenced by some row."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(ImageRow.patch_offset, ImageRow.patch_tokens).distinct()).all()
        return [(int(r[0]), int(r[1])) for r in rows]

    # -- texts ------------------------------------------------------------------------------------

    def add_texts(
        self, items: Sequence[tuple[str | None, str, np.ndarray]]
    ) -> tuple[int, np.ndarray, np.ndarray]:
        """Insert captions (ext_id, text, vector); an existing ext_id is replaced.

        Returns the new texts generation, the ids whose vectors changed or were added, and those vectors.
        """
        now = datetime.now(UTC)
        last: dict[str, int] = {e: n for n, (e, _, _) in enumerate(items) if e is not None}
        items = [it for n, it in enumerate(items) if it[0] is None or last[it[0]] == n]
        ids: list[int] = []
        with Session(self.engine) as session, session.begin():
            for ext_id, caption, vector in items:
                existing = None
                if ext_id is not None:
                    existing = session.scalars(select(TextRow).where(TextRow.ext_id == ext_id)).one_or_none()
                if existing is not None:
                    existing.text = caption
                    existing.vector = _vec_bytes(vector)
                    existing.added_at = now
                    session.flush()
                    ids.append(existing.id)
                else:
                    row = TextRow(ext_id=ext_id, text=caption, vector=_vec_bytes(vector), added_at=now)
                    session.add(row)
                    session.flush()
                    ids.append(row.id)
            gen = self._bump(session.connection(), "texts")
        vecs = (
            np.stack([v for _, _, v in items]).astype(np.float32) if items else np.zeros((0, 0), np.float32)
        )
        return gen, np.array(ids, dtype=np.int64), vecs

    def texts(self, ids: Sequence[int]) -> dict[int, TextRecord]:
        """Captions of these ids that still exist."""
        if not len(ids):
            return {}
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(TextRow.id, TextRow.ext_id, TextRow.text).where(TextRow.id.in_([int(i) for i in ids]))
            )
            return {r.id: TextRecord(r.id, r.ext_id, r.text) for r in rows}

    def text_vectors(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids and prefilter vectors of every caption."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(TextRow.id, TextRow.vector).order_by(TextRow.id)).all()
        return _vectors([(r[0], r[1]) for r in rows], dim)

    def count_texts(self) -> int:
        """Number of captions in the collection."""
        with self.engine.connect() as conn:
            return int(conn.execute(select(func.count()).select_from(TextRow)).scalar_one())

    def list_texts(self, limit: int | None = None) -> list[TextRecord]:
        """Captions in the order they were first added, the first ``limit`` of them when given."""
        stmt = select(TextRow.id, TextRow.ext_id, TextRow.text).order_by(TextRow.id)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self.engine.connect() as conn:
            return [TextRecord(r.id, r.ext_id, r.text) for r in conn.execute(stmt)]

    def texts_by_ext_id(self, ext_ids: Iterable[str]) -> dict[str, str]:
        """ext_id → stored text, for those of ``ext_ids`` the collection holds."""
        wanted = list(set(ext_ids))
        found: dict[str, str] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(wanted), _IN_CHUNK):
                stmt = select(TextRow.ext_id, TextRow.text).where(
                    TextRow.ext_id.in_(wanted[start : start + _IN_CHUNK])
                )
                found.update((str(r.ext_id), r.text) for r in conn.execute(stmt))
        return found

    def find_texts(self, keys: Iterable[str]) -> dict[str, int]:
        """Shown id → row id, for those of ``keys`` that name a caption; unknown keys are left out.

        A caption is shown (in lists and search hits) by its ext_id, or by its row id when it has none, so a
        key matches the ext_id first, and a key of digits the row id of a caption without an ext_id.
        """
        wanted = list(dict.fromkeys(keys))
        found: dict[str, int] = {}
        with self.engine.connect() as conn:
            for start in range(0, len(wanted), _IN_CHUNK):
                stmt = select(TextRow.ext_id, TextRow.id).where(
                    TextRow.ext_id.in_(wanted[start : start + _IN_CHUNK])
                )
                found.update((str(r.ext_id), int(r.id)) for r in conn.execute(stmt))
            # Keys by the row id they spell ("7" and "007" alike); 18 digits stay within a 64-bit integer.
            by_number: dict[int, list[str]] = {}
            for k in wanted:
                if k not in found and k.isascii() and k.isdigit() and len(k) <= 18:
                    by_number.setdefault(int(k), []).append(k)
            numbers = list(by_number)
            for start in range(0, len(numbers), _IN_CHUNK):
                by_id = select(TextRow.id).where(
                    TextRow.id.in_(numbers[start : start + _IN_CHUNK]), TextRow.ext_id.is_(None)
                )
                for row_id in conn.execute(by_id).scalars():
                    found.update(dict.fromkeys(by_number[row_id], row_id))
        return found

    def delete_texts(self, ids: Sequence[int]) -> tuple[int, np.ndarray]:
        """Delete captions by row id in one transaction (missing ids are ignored), bumping the texts
        generation; returns the new generation and the ids that were deleted."""
        wanted = sorted({int(i) for i in ids})
        removed: list[int] = []
        with self.engine.begin() as conn:
            for start in range(0, len(wanted), _IN_CHUNK):
                chunk = wanted[start : start + _IN_CHUNK]
                present = conn.execute(select(TextRow.id).where(TextRow.id.in_(chunk))).scalars()
                removed += [int(i) for i in present]
                conn.execute(delete(TextRow).where(TextRow.id.in_(chunk)))
            gen = self._bump(conn, "texts")
        return gen, np.array(removed, dtype=np.int64)

    def clear_texts(self) -> tuple[int, np.ndarray]:
        """Delete every caption in one transaction, bumping the texts generation; returns the new generation
        and the ids that were deleted."""
        with self.engine.begin() as conn:
            removed = [int(i) for i in conn.execute(select(TextRow.id)).scalars()]
            conn.execute(delete(TextRow))
            gen = self._bump(conn, "texts")
        return gen, np.array(removed, dtype=np.int64)

    def database_bytes(self) -> int | None:
        """Size of the database on disk, where the backend can tell."""
        with self.engine.connect() as conn:
            if self.backend == "postgresql":
                return int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one())
            if self.backend == "sqlite":
                pages = conn.execute(text("PRAGMA page_count")).scalar_one()
                size = conn.execute(text("PRAGMA page_size")).scalar_one()
                return int(pages) * int(size)
        return None
