"""The on-disk index as one object: metadata store, patch cache and vector indexes, kept consistent.

Order of writes, so that an interruption at any point leaves a consistent index:
1. visual tokens are appended to the patch cache and synced;
2. rows (with their prefilter vectors) commit in one database transaction, bumping a generation;
3. the FAISS file for that generation is written (atomically) at the end of a run.
A FAISS file whose generation is not the database's is never used: the index is rebuilt from the
database's vectors. So no FAISS id exists without its row, and no row without its tokens.
"""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import IndexLockedError, ModelMismatchError, RetrieverError, SchemaError
from .index.patches import PatchCache
from .index.store import Applied, ImageBatch, MetadataStore, StoreError
from .index.vectors import VectorIndex, load_generation, save_generation

DB_NAME = "retriever.db"


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


class Library:
    """An index directory (and its database, SQLite inside it unless a URL is given)."""

    def __init__(self, home: Path, db_url: str | None = None) -> None:
        self.home = home
        home.mkdir(parents=True, exist_ok=True)
        url = db_url or f"sqlite:///{home / DB_NAME}"
        try:
            self.store = MetadataStore(url)
        except StoreError as exc:
            raise SchemaError(str(exc)) from exc
        self._vectors: dict[str, VectorIndex] = {}
        self._loaded_generation: dict[str, int] = {}
        self._patches: PatchCache | None = None

    def close(self) -> None:
        """Release database connections."""
        self.store.close()

    # -- models -----------------------------------------------------------------------------------

    def models(self) -> ModelInfo | None:
        """The models recorded for this index, or None for an index never written to."""
        get = self.store.get_meta
        prefilter, reranker = get("prefilter"), get("reranker")
        if prefilter is None or reranker is None:
            return None
        return ModelInfo(
            prefilter=prefilter,
            prefilter_fingerprint=get("prefilter_fingerprint") or "",
            dim=int(get("dim") or 0),
            reranker=reranker,
            reranker_fingerprint=get("reranker_fingerprint") or "",
            hidden=int(get("hidden") or 0),
        )

    def check_models(self, wanted: ModelInfo, *, record: bool) -> None:
        """Refuse models other than the index's; record them on an index that has none yet."""
        have = self.models()
        if have is None:
            if record:
                self.store.set_meta(wanted.as_meta())
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

    def reset(self, wanted: ModelInfo) -> None:
        """Forget every image and caption and their caches, and record new models (a deliberate rebuild)."""
        from .index.schema import Base

        with self.store.engine.begin() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                if table.name != "retriever_meta":
                    conn.execute(table.delete())
        gens = {f"{k}_generation": str(self.store.generation(k) + 1) for k in ("images", "texts")}
        self.store.set_meta({**wanted.as_meta(), **gens})
        for f in self.home.glob("patches-*.f16"):
            f.unlink()
        for f in self.home.glob("*.faiss"):
            f.unlink()
        self._vectors.clear()
        self._loaded_generation.clear()
        self._patches = None

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
            index = VectorIndex(info.dim)
            ids, vecs = (
                self.store.image_vectors(info.dim) if kind == "images" else self.store.text_vectors(info.dim)
            )
            index.add(ids, vecs)
            save_generation(index, self.home, kind, gen)
        self._vectors[kind] = index
        self._loaded_generation[kind] = gen
        return index

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
        self._loaded_generation["texts"] = gen
        save_generation(index, self.home, "texts", gen)
        return len(ids)

    def save_vectors(self) -> None:
        """Write the in-memory FAISS indexes for their current generations."""
        for kind, index in self._vectors.items():
            save_generation(index, self.home, kind, self._loaded_generation[kind])

    @contextmanager
    def writer(self) -> Iterator[None]:
        """Hold the index's write lock: one writer at a time, readers never blocked."""
        path = self.home / "write.lock"
        with open(path, "a+") as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError as exc:
                raise IndexLockedError(
                    f"another process is writing to the index at {self.home}; wait for it to finish"
                ) from exc
            f.seek(0)
            f.truncate()
            f.write(str(os.getpid()))
            f.flush()
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    # -- status -----------------------------------------------------------------------------------

    def disk_bytes(self) -> int:
        """Bytes of every file in the index directory (the database too, when it is SQLite)."""
        return sum(p.stat().st_size for p in self.home.iterdir() if p.is_file())

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
        }
