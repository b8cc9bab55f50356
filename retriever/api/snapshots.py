"""The index as searches see it: immutable FAISS snapshots swapped whole, a thread-safe patch cache.

The server writes through one ``SearchIndex`` (index jobs, deletes, captions) and reads through a
``IndexSnapshot``, a ``SearchIndexReader`` with no write to call. The writer changes its FAISS index in
place, batch by batch; a search must never see half of such a change, so readers never touch the writer's
index. A reader builds its own index for a database generation and never changes it afterwards; when the
generation moves on, a new index replaces the old one, and a search that still holds the old one finishes
on it undisturbed. Ids that a snapshot still holds but the database no longer does are dropped by the
searches (they look every hit up).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retriever.errors import RetrieverError
from retriever.index.patches import PatchCache
from retriever.index.vectors import VectorIndex, generation_path, load_generation
from retriever.search_index import SearchIndexReader


@dataclass(frozen=True)
class _Snapshot:
    generation: int
    index: VectorIndex
    # While a writer is mid-run, rebuilds from the database are spaced out to this monotonic time.
    next_rebuild: float


class _SharedPatchCache(PatchCache):
    """A ``PatchCache`` whose reads may run on many threads (its memory map grows under a lock)."""

    def __init__(self, path: Path, hidden: int) -> None:
        super().__init__(path, hidden)
        self._lock = threading.Lock()

    def load(self, extents: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Read-only views of the runs at these extents."""
        with self._lock:
            return super().load(extents)


class IndexSnapshot(SearchIndexReader):
    """A read-only view of an index for concurrent searches (see the module docstring).

    A generation whose FAISS file the writer has saved is loaded from it. A generation without one means
    a writer is between batches: the index is rebuilt from the database's vectors, but at most once per
    ``min_refresh_s`` (or ten times the last rebuild's duration, if longer), serving the previous snapshot
    meanwhile, so a long index run does not turn every search into a rebuild.

    It opens an existing index only (``NoIndexError`` otherwise): the server's writer creates it first.
    """

    def __init__(self, home: Path, db_url: str | None = None, *, min_refresh_s: float = 1.0) -> None:
        super().__init__(home, db_url)
        self.min_refresh_s = min_refresh_s
        self._snapshots: dict[str, _Snapshot] = {}
        self._build_lock = threading.Lock()
        self._patch_lock = threading.Lock()
        self._shared_patches: _SharedPatchCache | None = None

    def vectors(self, kind: str = "images") -> VectorIndex:
        """The newest snapshot of the FAISS index of ``kind``; never modified once returned."""
        info = self.models()
        if info is None:
            raise RetrieverError("the index is empty: run `retriever index DIR` first")
        generation = self.store.generation(kind)
        snap = self._snapshots.get(kind)
        if snap is not None and snap.generation == generation:
            return snap.index
        saved = generation_path(self.home, kind, generation).exists()
        if snap is not None and not saved and time.monotonic() < snap.next_rebuild:
            return snap.index
        # One reader builds; the others keep answering from the previous snapshot if there is one.
        if snap is None:
            self._build_lock.acquire()
        elif not self._build_lock.acquire(blocking=False):
            return snap.index
        try:
            snap = self._snapshots.get(kind)
            if snap is not None and snap.generation == generation:
                return snap.index
            started = time.monotonic()
            index = load_generation(self.home, kind, generation, info.dim)
            if index is None:
                index = self._rebuild_vectors(kind, info.dim)
            now = time.monotonic()
            pause = max(self.min_refresh_s, 10 * (now - started))
            self._snapshots[kind] = _Snapshot(generation, index, now + pause)
            return index
        finally:
            self._build_lock.release()

    def patches(self) -> PatchCache:
        """The patch cache, safe to read from many threads at once."""
        with self._patch_lock:
            base = super().patches()
            if self._shared_patches is None or self._shared_patches.path != base.path:
                self._shared_patches = _SharedPatchCache(base.path, base.hidden)
            return self._shared_patches
