"""FAISS vector index over L2-normalized float32 vectors, keyed by database ids.

The database holds every vector; the index file is a cache of them named after the database's
generation counter (``images-<gen>.faiss``), so a file from before the last committed change is
recognised as stale and rebuilt instead of being trusted.

Search is exact (a flat scan) until the index reaches ``APPROX_MIN_VECTORS``; from then on it is an
inverted-file index (IVF), which scans the ``nprobe`` lists nearest the query instead of everything.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
from pathlib import Path
from typing import Any

import faiss
import numpy as np

#: From this many vectors on, adding switches the index to IVF. Below it a flat scan costs a small
#: share of a CPU rerank's time (docs/bench/hardware-choices.md), so an approximate index would trade
#: recall for nothing.
APPROX_MIN_VECTORS = 1_000_000
#: IVF lists scanned per query, as a share of all lists (at least ``MIN_NPROBE``).
NPROBE_SHARE = 1 / 16
MIN_NPROBE = 16


class VectorIndex:
    """Inner-product search over vectors with int64 ids (cosine, for normalized vectors).

    Exact below ``approx_min`` vectors; an add that reaches it turns the index into an IVF index
    (``sqrt(n)`` lists), which stays approximate from then on. ``approx_min=None`` keeps it exact.
    """

    def __init__(self, dim: int, *, approx_min: int | None = APPROX_MIN_VECTORS) -> None:
        if dim <= 0:
            raise ValueError(f"dimension must be positive, got {dim}")
        self.dim = dim
        self.approx_min = approx_min
        # The SWIG wrapper's stubs do not know the numpy overloads faiss adds at import time.
        self._index: Any = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    @property
    def exact(self) -> bool:
        """False once the index is an IVF index."""
        return not isinstance(faiss.downcast_index(self._index), faiss.IndexIVF)

    @property
    def ivf_lists(self) -> tuple[int, int] | None:
        """(lists, lists scanned per query) of the IVF index; None while the index is exact."""
        inner = faiss.downcast_index(self._index)
        if not isinstance(inner, faiss.IndexIVF):
            return None
        return int(inner.nlist), int(inner.nprobe)

    def __len__(self) -> int:
        return int(self._index.ntotal)

    def ids(self) -> np.ndarray:
        """Every id the index holds, sorted (for checking it against the database)."""
        inner = faiss.downcast_index(self._index)
        if isinstance(inner, faiss.IndexIVF):
            lists: Any = inner.invlists
            parts = [
                faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).copy()
                for i in range(inner.nlist)
                if lists.list_size(i)
            ]
            found = np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)
        else:
            found = faiss.vector_to_array(self._index.id_map)
        return np.sort(found.astype(np.int64))

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Add vectors under these ids (ids must not be present already)."""
        if len(ids) == 0:
            return
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim or vectors.shape[0] != len(ids):
            raise ValueError(f"expected ({len(ids)}, {self.dim}) vectors, got {vectors.shape}")
        self._index.add_with_ids(vectors, np.ascontiguousarray(ids, dtype=np.int64))
        if self.approx_min is not None and len(self) >= self.approx_min and self.exact:
            self._index = _to_ivf(self._index, self.dim)

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
        try:
            try:
                faiss.write_index(self._index, str(tmp))
            except RuntimeError as exc:
                # faiss reports a failed write (a full disk, mostly) as a RuntimeError with its own text;
                # the OS's reason is the one a user can act on.
                free = shutil.disk_usage(path.parent).free
                code = errno.ENOSPC if free < 1 << 20 else errno.EIO
                raise OSError(code, os.strerror(code), str(tmp)) from exc
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path, dim: int) -> VectorIndex:
        """Read an index written by ``save``."""
        index = faiss.read_index(str(path))
        if index.d != dim:
            raise ValueError(f"{path} holds {index.d}-dimensional vectors, expected {dim}")
        obj = cls.__new__(cls)
        obj.dim = dim
        obj.approx_min = APPROX_MIN_VECTORS
        obj._index = index
        return obj


def _to_ivf(flat: Any, dim: int) -> Any:
    """The vectors and ids of an ``IndexIDMap2(IndexFlatIP)`` in a trained ``IndexIVFFlat``."""
    n = int(flat.ntotal)
    ids = faiss.vector_to_array(flat.id_map).astype(np.int64)
    vectors = faiss.downcast_index(flat.index).reconstruct_n(0, n)
    nlist = max(1, int(math.sqrt(n)))
    ivf = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, nlist, faiss.METRIC_INNER_PRODUCT)
    # k-means on 64 vectors per list (faiss samples 256) and 10 rounds: training then costs less than
    # assigning every vector to its list (docs/bench/hardware-choices.md).
    ivf.cp.max_points_per_centroid = 64
    ivf.cp.niter = 10
    ivf.train(vectors)
    ivf.add_with_ids(vectors, ids)
    ivf.nprobe = max(MIN_NPROBE, int(nlist * NPROBE_SHARE))
    return ivf


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
