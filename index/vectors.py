"""FAISS vector index over L2-normalized float32 vectors, keyed by database ids.

The database holds every vector; the index file is a cache of them named after the database's
generation counter (``images-<gen>.faiss``), so a file from before the last committed change is
recognised as stale and rebuilt instead of being trusted.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import faiss
import numpy as np


class VectorIndex:
    """Exact inner-product search over vectors with int64 ids (cosine, for normalized vectors)."""

    def __init__(self, dim: int) -> None:
        if dim <= 0:
            raise ValueError(f"dimension must be positive, got {dim}")
        self.dim = dim
        # The SWIG wrapper's stubs do not know the numpy overloads faiss adds at import time.
        self._index: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under these ids (ids must not be present already)."""
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or vectors.shape[0] != len(ids):
            raise ValueError(f"expected ({len(ids)}, {self.dim}) vectors, got {vectors.shape}")
        self._index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))

    def remove(self, ids: np.ndarray) -> int:
        """Remove these ids; returns how many were present."""
        if len(ids) == 0:
            return 0
        return int(self._index.remove_ids(np.ascontiguousarray(ids, dtype=np.int64)))

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-k (scores, ids) per query row, best first; missing slots hold id -1."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"expected (n, {self.dim}) queries, got {queries.shape}")
        k = max(1, min(k, max(len(self), 1)))
        scores, ids = self._index.search(queries, k)
        return scores, ids

    def save(self, path: Path) -> None:
        """Write the index atomically (a reader never sees a half-written file)."""
        tmp = path.with_name(path.name + ".tmp")
        faiss.write_index(self._index, str(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: Path, dim: int) -> VectorIndex:
        """Read an index written by ``save``."""
        index = faiss.read_index(str(path))
        if index.d != dim:
            raise ValueError(f"{path} holds {index.d}-dimensional vectors, expected {dim}")
        obj = cls.__new__(cls)
        obj.dim = dim
        obj._index = index
        return obj


def generation_path(folder: Path, kind: str, generation: int) -> Path:
    """Where the index of ``kind`` (images or texts) at a database generation lives."""
    return folder / f"{kind}-{generation}.faiss"


def load_generation(folder: Path, kind: str, generation: int, dim: int) -> VectorIndex | None:
    """The saved index of ``kind`` at this generation, or None when it is missing or unreadable."""
    path = generation_path(folder, kind, generation)
    if not path.exists():
        return None
    try:
        return VectorIndex.load(path, dim)
    except (RuntimeError, ValueError):
        return None


def save_generation(index: VectorIndex, folder: Path, kind: str, generation: int) -> Path:
    """Save the index for this generation and delete the files of older ones."""
    path = generation_path(folder, kind, generation)
    index.save(path)
    for old in folder.glob(f"{kind}-*.faiss"):
        if old != path:
            old.unlink(missing_ok=True)
    return path
