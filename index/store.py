"""The metadata store: image and caption rows in SQLite (embedded default) or PostgreSQL, via SQLAlchemy."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
from sqlalchemy import Connection, Engine, delete, func, insert, inspect, select, text, update
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import Session, defer

from retriever.errors import SchemaError, StoreError

from .database import display_url, explain, immutable_engine, normalize_url, open_engine, translated
from .migrations import MIGRATIONS
from .schema import SCHEMA_VERSION, Base, ImageRow, Meta, TextRow


class NoStoreError(StoreError):
    """The database exists but holds no store (and was not to be given one)."""


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
    """Rows of images and captions, and the index's key-value facts, in one SQL database.

    The only code that talks SQL: callers get records and numbers, and project errors for failures
    (``SchemaError`` at opening, ``DatabaseFailureError`` afterwards), never the driver's own.
    """

    def __init__(self, url: str, *, create: bool = True) -> None:
        """Open (and migrate) the database; with ``create=False`` a database holding no store is refused
        with ``NoStoreError`` instead of getting the tables."""
        self.url = normalize_url(url)
        self.engine: Engine = open_engine(self.url)
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
            raise SchemaError(
                f"cannot open the database {self.display_url}: {explain(self.url, exc)}"
            ) from exc
        except StoreError:
            self.engine.dispose()
            raise

    def _reopen_immutable(self) -> bool:
        """Read an SQLite file without its WAL files where that reads everything (``immutable_engine``)."""
        engine = immutable_engine(self.url)
        if engine is None:
            return False
        self.engine.dispose()
        self.engine = engine
        return True

    @property
    def display_url(self) -> str:
        """The URL with any password hidden."""
        return display_url(self.url)

    @property
    def backend(self) -> str:
        """The SQL dialect's name: ``sqlite`` or ``postgresql``."""
        return self.engine.dialect.name

    def close(self) -> None:
        """Release the database connections."""
        self.engine.dispose()

    # -- connections: every query below runs in one of these, so no driver error leaves the store ----

    @contextmanager
    def _reading(self) -> Iterator[Connection]:
        with translated(), self.engine.connect() as conn:
            yield conn

    @contextmanager
    def _writing(self) -> Iterator[Connection]:
        """One transaction, committed when the block ends without an error."""
        with translated(), self.engine.begin() as conn:
            yield conn

    @contextmanager
    def _session(self) -> Iterator[Session]:
        """An ORM session in one transaction, committed when the block ends without an error."""
        with translated(), Session(self.engine) as session, session.begin():
            yield session

    # -- schema -----------------------------------------------------------------------------------

    def _ensure_schema(self, create: bool) -> None:
        # The driver's errors stay untranslated here: the constructor explains them (``explain``).
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
                raise SchemaError(
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
        with self._reading() as conn:
            return {r.key: r.value for r in conn.execute(select(Meta.key, Meta.value))}

    def get_meta(self, key: str) -> str | None:
        """One fact about the index, or None."""
        with self._reading() as conn:
            return conn.execute(select(Meta.value).where(Meta.key == key)).scalar_one_or_none()

    def set_meta(self, values: dict[str, str]) -> None:
        """Record facts about the index, in one transaction."""
        with self._writing() as conn:
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
        with self._reading() as conn:
            return {r.path: FileState(r.id, r.size, r.mtime, r.content_hash) for r in conn.execute(stmt)}

    def encoded_by_hash(self, hashes: Iterable[str]) -> dict[str, Encoded]:
        """Stored encodings for any of these content hashes (renamed or duplicate files reuse them)."""
        wanted = list(set(hashes))
        found: dict[str, Encoded] = {}
        with self._reading() as conn:
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
        with self._session() as session:
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
        with self._writing() as conn:
            conn.execute(delete(ImageRow).where(ImageRow.id.in_(list(ids))))
            return self._bump(conn, "images")

    def images(self, ids: Sequence[int]) -> dict[int, ImageRecord]:
        """Records of these ids that still exist."""
        if not len(ids):
            return {}
        with self._session() as session:
            rows = session.scalars(select(ImageRow).where(ImageRow.id.in_([int(i) for i in ids])))
            return {r.id: _image_record(r) for r in rows}

    def image_page(self, offset: int, limit: int) -> list[ImageRecord]:
        """Up to ``limit`` records in id order, from the ``offset``-th on (their vectors are not read)."""
        stmt = (
            select(ImageRow).options(defer(ImageRow.vector)).order_by(ImageRow.id).offset(offset).limit(limit)
        )
        with self._session() as session:
            return [_image_record(r) for r in session.scalars(stmt)]

    def image_vectors(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids and prefilter vectors of every image, to rebuild the vector index."""
        with self._reading() as conn:
            rows = conn.execute(select(ImageRow.id, ImageRow.vector).order_by(ImageRow.id)).all()
        return _vectors([(r[0], r[1]) for r in rows], dim)

    def count_images(self) -> int:
        """Number of indexed images."""
        with self._reading() as conn:
            return int(conn.execute(select(func.count()).select_from(ImageRow)).scalar_one())

    def patch_rows_needed(self) -> int:
        """How many patch cache rows the rows reference: the end of the furthest extent (0 when empty)."""
        end = ImageRow.patch_offset + ImageRow.patch_tokens
        with self._reading() as conn:
            return int(conn.execute(select(func.coalesce(func.max(end), 0))).scalar_one())

    def images_beyond(self, rows: int) -> list[tuple[int, str]]:
        """(id, path) of every image whose tokens end past ``rows`` patch cache rows."""
        stmt = select(ImageRow.id, ImageRow.path).where(ImageRow.patch_offset + ImageRow.patch_tokens > rows)
        with self._reading() as conn:
            return [(int(r.id), str(r.path)) for r in conn.execute(stmt.order_by(ImageRow.id))]

    def clear_all(self, facts: dict[str, str]) -> None:
        """Delete every image and caption, move both generations on and record ``facts``, in one
        transaction (a deliberate rebuild): a crash leaves the old index or the emptied one, not a mix.

        The generations move on rather than restart, so no FAISS file of the old index is taken for one
        of the new.
        """
        with self._writing() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                if table.name != Meta.__tablename__:
                    conn.execute(table.delete())
            for kind in ("images", "texts"):
                self._bump(conn, kind)
            for key, value in facts.items():
                self._set_meta(conn, key, value)

    def patch_extents(self) -> list[tuple[int, int]]:
        """Distinct (offset, tokens) of patch cache entries still referenced by some row."""
        with self._reading() as conn:
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
        with self._session() as session:
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
        with self._reading() as conn:
            rows = conn.execute(
                select(TextRow.id, TextRow.ext_id, TextRow.text).where(TextRow.id.in_([int(i) for i in ids]))
            )
            return {r.id: TextRecord(r.id, r.ext_id, r.text) for r in rows}

    def text_vectors(self, dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids and prefilter vectors of every caption."""
        with self._reading() as conn:
            rows = conn.execute(select(TextRow.id, TextRow.vector).order_by(TextRow.id)).all()
        return _vectors([(r[0], r[1]) for r in rows], dim)

    def count_texts(self) -> int:
        """Number of captions in the collection."""
        with self._reading() as conn:
            return int(conn.execute(select(func.count()).select_from(TextRow)).scalar_one())

    def list_texts(self, limit: int | None = None) -> list[TextRecord]:
        """Captions in the order they were first added, the first ``limit`` of them when given."""
        stmt = select(TextRow.id, TextRow.ext_id, TextRow.text).order_by(TextRow.id)
        if limit is not None:
            stmt = stmt.limit(limit)
        with self._reading() as conn:
            return [TextRecord(r.id, r.ext_id, r.text) for r in conn.execute(stmt)]

    def texts_by_ext_id(self, ext_ids: Iterable[str]) -> dict[str, str]:
        """ext_id → stored text, for those of ``ext_ids`` the collection holds."""
        wanted = list(set(ext_ids))
        found: dict[str, str] = {}
        with self._reading() as conn:
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
        with self._reading() as conn:
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
        with self._writing() as conn:
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
        with self._writing() as conn:
            removed = [int(i) for i in conn.execute(select(TextRow.id)).scalars()]
            conn.execute(delete(TextRow))
            gen = self._bump(conn, "texts")
        return gen, np.array(removed, dtype=np.int64)

    def database_bytes(self) -> int | None:
        """Size of the database on disk, where the backend can tell."""
        with self._reading() as conn:
            if self.backend == "postgresql":
                return int(conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one())
            if self.backend == "sqlite":
                pages = conn.execute(text("PRAGMA page_count")).scalar_one()
                size = conn.execute(text("PRAGMA page_size")).scalar_one()
                return int(pages) * int(size)
        return None

    def integrity_problems(self) -> list[str]:
        """What the database itself finds wrong with its file (SQLite's quick check); a server database
        (PostgreSQL) guards its own pages, so nothing is asked of it here."""
        if self.backend != "sqlite":
            return []
        with self._reading() as conn:
            found = [str(r[0]) for r in conn.execute(text("PRAGMA quick_check"))]
        return [] if found == ["ok"] else found
