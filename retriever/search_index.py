"""The on-disk index as one object: metadata store, patch cache and vector indexes, kept consistent.

Order of writes, so that an interruption at any point leaves a consistent index:
1. visual tokens are appended to the patch cache and synced;
2. rows (with their prefilter vectors) commit in one database transaction, bumping a generation;
3. the FAISS file for that generation is written (atomically) at the end of a run.
A FAISS file whose generation is not the database's is never used: the index is rebuilt from the
database's vectors. So no FAISS id exists without its row, and no row without its tokens.

``SearchIndexReader`` holds what reading needs (look-ups, vectors, tokens, damage, status);
``SearchIndex`` adds every write, so a view that must only read (the server's search snapshot) has no
write to call by mistake.

An index folder and its database belong together: on the first write both record one random index id
(the folder in ``index.json``, the database in its facts), and a folder opened with a database that
records another id, or none while the folder has one, is refused before anything is read or written.
"""

from __future__ import annotations

import fcntl
import json
import os
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from .errors import (
    IndexDamagedError,
    IndexLockedError,
    IndexMismatchError,
    ModelMismatchError,
    NoIndexError,
    NotFoundError,
    RetrieverError,
)
from .index.database import normalize_url
from .index.patches import PatchCache, PatchCacheShortError
from .index.store import Applied, ImageBatch, ImageRecord, MetadataStore, NoStoreError
from .index.vectors import VectorIndex, load_generation, save_generation

DB_NAME = "retriever.db"
#: The file in an index folder that records which database (by index id) the folder belongs to.
IDENTITY_NAME = "index.json"


@dataclass(frozen=True)
class ModelInfo:
    """Which models built an index."""

    prefilter: str
    prefilter_fingerprint: str
    dim: int
    reranker: str
    reranker_fingerprint: str
    hidden: int

    def as_meta(self) -> dict[str, str]:
        """Key-value form stored in the database."""
        return {
            "prefilter": self.prefilter,
            "prefilter_fingerprint": self.prefilter_fingerprint,
            "dim": str(self.dim),
            "reranker": self.reranker,
            "reranker_fingerprint": self.reranker_fingerprint,
            "hidden": str(self.hidden),
        }


class SearchIndexReader:
    """An index directory (and its database, SQLite inside it unless a URL is given), opened for reading.

    Without ``create`` an existing index is opened without writing anything (no folder or database is
    created): ``NoIndexError`` when there is none. With it, a missing folder and database are created empty
    (what every writer does, and a server at start-up). A FAISS file that is stale is rebuilt in memory
    only: the next writer saves it.
    """

    #: Whether a folder may take a database that holds nothing yet, although it belonged to another one:
    #: only a ``SearchIndex`` opened for a deliberate rebuild, which binds the two on its first write.
    _rebind = False

    def __init__(self, home: Path, db_url: str | None = None, *, create: bool = False) -> None:
        self.home = home
        url = db_url or f"sqlite:///{home / DB_NAME}"
        if not create and (not home.is_dir() or (db_url is None and not (home / DB_NAME).is_file())):
            raise NoIndexError(f"there is no index at {home}: build one with `retriever index FOLDER` first")
        try:
            normalize_url(url)  # an unsupported or malformed URL is refused before anything is created
            if create:
                home.mkdir(parents=True, exist_ok=True)
            self.store = MetadataStore(url, create=create)
        except NoStoreError as exc:
            raise NoIndexError(f"{exc}: build one with `retriever index FOLDER` first") from exc
        try:
            self._check_identity(self._rebind)
        except BaseException:
            self.store.close()
            raise
        self._vectors: dict[str, VectorIndex] = {}
        self._loaded_generation: dict[str, int] = {}
        self._patches: PatchCache | None = None

    def close(self) -> None:
        """Release database connections."""
        self.store.close()

    # -- identity ---------------------------------------------------------------------------------

    def _own_identity(self) -> dict[str, Any] | None:
        try:
            value = json.loads((self.home / IDENTITY_NAME).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            raise IndexDamagedError(
                f"{self.home / IDENTITY_NAME} is unreadable ({exc}); it records which database this index "
                "folder belongs to: restore it, or rebuild the index with `retriever index FOLDER --rebuild`"
            ) from exc
        return value if isinstance(value, dict) and isinstance(value.get("index_id"), str) else None

    def _holds_index_files(self) -> bool:
        return any(self.home.glob("patches-*")) or any(self.home.glob("*.faiss"))

    def _check_identity(self, rebind: bool) -> None:
        meta = self.store.meta()
        theirs = meta.get("index_id")
        own = self._own_identity()
        if own is not None and own["index_id"] == theirs:
            return
        db = self.store.display_url
        db_empty = self.store.count_images() == 0 and self.store.count_texts() == 0
        if rebind and db_empty:
            return  # a deliberate rebuild binds the folder to this (empty) database on its first write
        other_dir = meta.get("index_dir", "another folder")
        if own is None and theirs is not None and other_dir == str(self.home):
            return  # a first write that stopped between recording the id in the database and the folder
        if own is None and theirs is None:
            # An index from before identities, or a new one: bound on the first write. A folder with none
            # of an index's files and a database full of rows is the shared-database case, refused.
            if not db_empty and not self._holds_index_files() and not (self.home / DB_NAME).exists():
                raise IndexMismatchError(
                    f"the database {db} holds an index whose cached tokens are not in {self.home}: each "
                    "index folder needs a database of its own (another --db-url), or give the folder that "
                    "index was built in with --index-dir"
                )
            return
        if own is None:
            raise IndexMismatchError(
                f"the database {db} holds the index of the folder {other_dir}, not of {self.home}: use "
                f"--index-dir {other_dir}, or give {self.home} a database of its own (another --db-url)"
            )
        recorded = own.get("database", "another database")
        if theirs is None:
            raise IndexMismatchError(
                f"the index folder {self.home} belongs to the database {recorded}, but {db} holds no index "
                f"(a new, emptied or replaced database): give --db-url {recorded}, or rebuild on purpose "
                "with `retriever index FOLDER --rebuild`"
            )
        raise IndexMismatchError(
            f"the index folder {self.home} belongs to the database {recorded}, but {db} holds the index of "
            f"the folder {other_dir}: give each index folder its own database, and the folder its own "
            f"--db-url ({recorded})"
        )

    # -- models -----------------------------------------------------------------------------------

    def models(self) -> ModelInfo | None:
        """The models recorded for this index, or None for an index never written to."""
        meta = self.store.meta()
        prefilter, reranker = meta.get("prefilter"), meta.get("reranker")
        if prefilter is None or reranker is None:
            return None
        return ModelInfo(
            prefilter=prefilter,
            prefilter_fingerprint=meta.get("prefilter_fingerprint") or "",
            dim=int(meta.get("dim") or 0),
            reranker=reranker,
            reranker_fingerprint=meta.get("reranker_fingerprint") or "",
            hidden=int(meta.get("hidden") or 0),
        )

    def check_models(self, wanted: ModelInfo) -> None:
        """Refuse models other than the index's (an index with none recorded yet takes any)."""
        have = self.models()
        if have is None:
            return
        problems = []
        if (have.prefilter_fingerprint, have.dim) != (wanted.prefilter_fingerprint, wanted.dim):
            problems.append(
                f"prefilter {have.prefilter} (dim {have.dim}), not {wanted.prefilter} (dim {wanted.dim})"
            )
        if have.reranker_fingerprint != wanted.reranker_fingerprint:
            problems.append(f"reranker {have.reranker}, not {wanted.reranker}")
        if problems:
            raise ModelMismatchError(
                f"the index at {self.home} was built with "
                + " and ".join(problems)
                + ". Use the same models, "
                "or rebuild the index with the new ones on purpose: retriever index DIR --rebuild "
                "(or give another --index-dir)."
            )

    # -- caches -----------------------------------------------------------------------------------

    def patches(self) -> PatchCache:
        """The patch-embedding cache of this index."""
        if self._patches is None:
            info = self.models()
            if info is None or info.hidden <= 0:
                raise RetrieverError("the index has no reranker recorded yet; index some images first")
            self._patches = PatchCache(self.home / f"patches-{info.hidden}.f16", info.hidden)
        return self._patches

    def vectors(self, kind: str = "images") -> VectorIndex:
        """The FAISS index of ``kind`` (images or texts) matching the database, rebuilt if stale."""
        info = self.models()
        if info is None:
            raise RetrieverError("the index is empty: run `retriever index DIR` first")
        gen = self.store.generation(kind)
        if kind in self._vectors and self._loaded_generation.get(kind) == gen:
            return self._vectors[kind]
        index = load_generation(self.home, kind, gen, info.dim)
        if index is None:
            index = self._rebuild_vectors(kind, info.dim)
            self._rebuilt(index, kind, gen)
        self._vectors[kind] = index
        self._loaded_generation[kind] = gen
        return index

    def _rebuild_vectors(self, kind: str, dim: int) -> VectorIndex:
        """A FAISS index of ``kind`` built from the database's vectors."""
        index = VectorIndex(dim)
        ids, vecs = self.store.image_vectors(dim) if kind == "images" else self.store.text_vectors(dim)
        index.add(ids, vecs)
        return index

    def _rebuilt(self, index: VectorIndex, kind: str, generation: int) -> None:
        """Called with an index rebuilt for a generation that had no file: a reader keeps it in memory."""

    def find_texts(self, keys: Sequence[str]) -> dict[str, int]:
        """Row ids of the captions shown (in lists and search hits) under these ids.

        Raises:
            NotFoundError: some keys name no caption; the message names them all.
        """
        found = self.store.find_texts(keys)
        unknown = [k for k in dict.fromkeys(keys) if k not in found]
        if unknown:
            shown = ", ".join(unknown[:10]) + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            raise NotFoundError(
                f"no caption has the id {shown}" if len(unknown) == 1 else f"no captions have the ids {shown}"
            )
        return found

    # -- roots ------------------------------------------------------------------------------------

    def roots(self) -> dict[str, str]:
        """Real path → last time indexed (UTC, ISO 8601) of every file or folder an index run was given."""
        try:
            value = json.loads(self.store.get_meta("roots") or "{}")
        except ValueError:
            return {}
        return {str(k): str(v) for k, v in value.items()} if isinstance(value, dict) else {}

    # -- damage -----------------------------------------------------------------------------------

    def _cache_problem(self) -> str | None:
        if self.models() is None:
            return None
        cache = self.patches()
        needed = self.store.patch_rows_needed()
        have = cache.rows
        if needed <= have:
            return None
        missing = len(self.store.images_beyond(have))
        state = "is missing" if not cache.path.exists() else f"is cut short ({have} of {needed} rows)"
        return (
            f"the patch cache {cache.path} {state}: {missing} images have no cached tokens. "
            "Repair: `retriever index FOLDER` re-encodes them from their files "
            "(or rebuild everything with `retriever index FOLDER --rebuild`)"
        )

    def check(self) -> list[str]:
        """What is damaged in this index, one line each with its repair (empty when all is well)."""
        problem = self._cache_problem()
        return [problem] if problem else []

    def load_tokens(self, records: Sequence[ImageRecord]) -> list[np.ndarray]:
        """The cached visual tokens of these images; ``IndexDamagedError`` when the cache lacks them."""
        try:
            return self.patches().load([(r.patch_offset, r.patch_tokens) for r in records])
        except PatchCacheShortError as exc:
            raise IndexDamagedError(self._cache_problem() or str(exc)) from exc

    # -- status -----------------------------------------------------------------------------------

    def disk_bytes(self) -> int:
        """Bytes of every file in the index directory (the database too, when it is SQLite)."""
        total = 0
        for p in self.home.iterdir():
            try:
                total += p.stat().st_size if p.is_file() else 0
            except OSError:  # removed meanwhile
                continue
        return total

    def status(self) -> dict[str, object]:
        """Counts, models and sizes, as ``retriever status`` reports them."""
        images = self.store.count_images()
        texts = self.store.count_texts()
        info = self.models()
        patch_bytes = self.patches().nbytes if info is not None else 0
        # Per image counts the tokens rows point to, not runs left behind by changed or deleted files.
        live_rows = sum(n for _, n in self.store.patch_extents())
        live_bytes = live_rows * self.patches().row_bytes if info is not None else 0
        return {
            "index_dir": str(self.home),
            "database": self.store.display_url,
            "images": images,
            "texts": texts,
            "models": None
            if info is None
            else {"prefilter": info.prefilter, "dim": info.dim, "reranker": info.reranker},
            "disk_bytes": self.disk_bytes(),
            "database_bytes": self.store.database_bytes(),
            "patch_cache_bytes": patch_bytes,
            "cache_bytes_per_image": round(live_bytes / images) if images else 0,
            "schema_version": self.store.schema_version(),
            "roots": self.roots(),
            "problems": self.check(),
        }


class SearchIndex(SearchIndexReader):
    """An index directory and its database, for reading and writing: every write goes through here.

    ``read_only`` opens an existing index without writing anything (no folder or database is created, no
    stale FAISS file rewritten, the write lock refused): ``NoIndexError`` when there is none. ``rebind`` (a
    deliberate rebuild) lets a folder take a database that holds nothing yet, although the folder belonged
    to another one.
    """

    def __init__(
        self, home: Path, db_url: str | None = None, *, read_only: bool = False, rebind: bool = False
    ) -> None:
        self.read_only = read_only
        self._rebind = rebind
        super().__init__(home, db_url, create=not read_only)
        self._lock_depth = 0

    # -- identity ---------------------------------------------------------------------------------

    def _bind(self, fresh: bool = False) -> None:
        """Record one index id in the folder and the database (at the first write, or anew on a rebuild)."""
        own = self._own_identity()
        theirs = self.store.get_meta("index_id")
        if not fresh and own is not None and own["index_id"] == theirs:
            return
        # Keep the database's id only to finish a first write that stopped before the folder's file.
        index_id = theirs if (theirs and not fresh and own is None) else uuid.uuid4().hex
        record = {
            "index_id": index_id,
            "database": self.store.display_url,
            "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        # Database first: a crash between the two leaves a database id the folder lacks, which the next
        # write (holding the lock) completes, never a folder pointing at a database that does not know it.
        self.store.set_meta({"index_id": index_id, "index_dir": str(self.home)})
        tmp = self.home / (IDENTITY_NAME + ".tmp")
        tmp.write_text(json.dumps(record, indent=1) + "\n")
        os.replace(tmp, self.home / IDENTITY_NAME)

    # -- models -----------------------------------------------------------------------------------

    def check_models(self, wanted: ModelInfo, *, record: bool = False) -> None:
        """Refuse models other than the index's; with ``record``, record them on an index that has none."""
        if record and self.models() is None:
            self.store.set_meta(wanted.as_meta())
            return
        super().check_models(wanted)

    def reset(self, wanted: ModelInfo) -> None:
        """Forget every image and caption and their caches, and record new models (a deliberate rebuild)."""
        self.store.clear_all({**wanted.as_meta(), "roots": "{}"})
        self._bind(fresh=True)
        for f in self.home.glob("patches-*.f16"):
            f.unlink()
        for f in self.home.glob("*.faiss"):
            f.unlink()
        self._vectors.clear()
        self._loaded_generation.clear()
        self._patches = None

    # -- caches -----------------------------------------------------------------------------------

    def _rebuilt(self, index: VectorIndex, kind: str, generation: int) -> None:
        """Save an index rebuilt for a generation that had no file (not when opened read-only)."""
        if not self.read_only:
            save_generation(index, self.home, kind, generation)

    def commit(self, batch: ImageBatch, models: ModelInfo) -> Applied:
        """Commit image rows and apply them to the in-memory FAISS index (saved by ``save_vectors``)."""
        index = self.vectors("images")
        applied = self.store.apply(batch, (models.prefilter, models.reranker))
        index.remove(applied.removed_ids)
        index.add(applied.added_ids, applied.added_vectors)
        self._loaded_generation["images"] = applied.generation
        return applied

    def remove_images(self, ids: list[int], models: ModelInfo) -> int:
        """Delete images by id from the database and the FAISS index; returns how many existed."""
        present = self.store.images(ids)
        if present:
            self.commit(ImageBatch(deletes=list(present)), models)
            self.save_vectors()
        return len(present)

    def commit_texts(self, items: list[tuple[str | None, str, np.ndarray]]) -> int:
        """Add captions, update the texts FAISS index and save it; returns how many were written."""
        index = self.vectors("texts")
        gen, ids, vecs = self.store.add_texts(items)
        index.remove(ids)
        index.add(ids, vecs)
        self._save_texts(index, gen)
        return len(ids)

    def texts_to_write(self, items: Sequence[tuple[str | None, str]]) -> list[tuple[str | None, str]]:
        """Those of ``items`` (ext_id, text) that would change the collection: what is left to encode.

        A caption whose ext_id the collection holds with the same text is left out, so adding the same file
        again encodes and writes nothing. Of an ext_id given more than once the last one counts, in its
        place, as ``commit_texts`` would keep it. Captions without an ext_id are always new.
        """
        last = {ext_id: n for n, (ext_id, _) in enumerate(items) if ext_id is not None}
        unique = [item for n, item in enumerate(items) if item[0] is None or last[item[0]] == n]
        stored = self.store.texts_by_ext_id(ext_id for ext_id, _ in unique if ext_id is not None)
        return [(ext_id, text) for ext_id, text in unique if ext_id is None or stored.get(ext_id) != text]

    def remove_texts(self, ids: Sequence[int]) -> int:
        """Delete captions by row id from the database and the texts FAISS index, saved for the new
        generation; returns how many existed. Takes the write lock (re-entrant, so a caller may hold it)."""
        with self.writer():
            # Loaded before the delete commits: at the old generation, from its file when there is one.
            index = self.vectors("texts") if self.models() is not None else None
            gen, removed = self.store.delete_texts(ids)
            if index is not None:
                index.remove(removed)
                self._save_texts(index, gen)
        return len(removed)

    def clear_texts(self) -> int:
        """Delete every caption from the database and the texts FAISS index, saved (empty) for the new
        generation; returns how many there were. Takes the write lock (re-entrant)."""
        with self.writer():
            info = self.models()
            gen, removed = self.store.clear_texts()
            if info is not None:
                self._save_texts(VectorIndex(info.dim), gen)
        return len(removed)

    def _save_texts(self, index: VectorIndex, generation: int) -> None:
        self._vectors["texts"] = index
        self._loaded_generation["texts"] = generation
        save_generation(index, self.home, "texts", generation)

    def save_vectors(self) -> None:
        """Write the in-memory FAISS indexes for their current generations."""
        for kind, index in self._vectors.items():
            save_generation(index, self.home, kind, self._loaded_generation[kind])

    @contextmanager
    def writer(self) -> Iterator[None]:
        """Hold the index's write lock: one writer at a time, readers never blocked.

        Re-entrant within this object, so a command can take the lock before it loads its models (a second
        writer learns at once that it must wait) and keep it through the run.
        """
        if self.read_only:
            raise RetrieverError(f"the index at {self.home} was opened read-only")
        if self._lock_depth:
            self._lock_depth += 1
            try:
                yield
            finally:
                self._lock_depth -= 1
            return
        path = self.home / "write.lock"
        with open(path, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise IndexLockedError(
                    f"another process is writing to the index at {self.home}; wait for it to finish"
                ) from exc
            self._lock_depth = 1
            try:
                f.seek(0)
                f.truncate()
                f.write(str(os.getpid()))
                f.flush()
                self._bind()
                yield
            finally:
                self._lock_depth = 0
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # -- roots ------------------------------------------------------------------------------------

    def record_roots(self, paths: Sequence[Path]) -> None:
        """Remember that these (real) paths were indexed now."""
        now = datetime.now(UTC).isoformat(timespec="seconds")
        roots = {**self.roots(), **{str(p): now for p in paths}}
        self.store.set_meta({"roots": json.dumps(roots, sort_keys=True)})

    # -- damage -----------------------------------------------------------------------------------

    def drop_images_without_tokens(self) -> list[str]:
        """Delete the rows whose tokens the patch cache lacks (so a run re-encodes them); their paths."""
        info = self.models()
        if info is None:
            return []
        damaged = self.store.images_beyond(self.patches().rows)
        if damaged:
            self.commit(ImageBatch(deletes=[i for i, _ in damaged]), info)
            self.save_vectors()
        return [p for _, p in damaged]
