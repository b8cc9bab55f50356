"""The patch-embedding cache: ViLT visual tokens of every indexed image, in one memory-mapped fp16 file.

Each image's tokens are a contiguous run of rows of ``hidden`` half floats. The file is append-only:
a run is written and synced before the database row that points to it commits, so a crash leaves at
worst unreferenced bytes at the end, never a row without its tokens. Runs that no row references any
longer (deleted or changed files) stay until the cache is rebuilt.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from retriever.errors import IndexDamagedError

DTYPE = np.dtype(np.float16)


class PatchCacheShortError(IndexDamagedError, IndexError):
    """The cache file is missing or holds fewer rows than a read needs (cut short, deleted, replaced).

    A damaged index to the CLI and the API; an ``IndexError`` too, as a read past the end of an array is.
    """

    def __init__(self, path: Path, rows: int, needed: int) -> None:
        state = "is missing" if rows == 0 else f"has {rows} rows"
        super().__init__(f"the patch cache {path} {state}; the index needs {needed}")
        self.path, self.rows_present, self.rows_needed = path, rows, needed


class PatchCache:
    """Append-only store of (tokens, hidden) fp16 arrays addressed by (row offset, row count)."""

    def __init__(self, path: Path, hidden: int) -> None:
        if hidden <= 0:
            raise ValueError(f"hidden size must be positive, got {hidden}")
        self.path = path
        self.hidden = hidden
        self.row_bytes = hidden * DTYPE.itemsize
        self._map: np.memmap | None = None
        self._mapped_rows = 0
        self._mapped_file: tuple[int, int] | None = None

    @property
    def rows(self) -> int:
        """Whole rows in the file (a torn final row from a crash does not count)."""
        try:
            return self.path.stat().st_size // self.row_bytes
        except FileNotFoundError:
            return 0

    @property
    def nbytes(self) -> int:
        """Size of the file on disk."""
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def append(self, arrays: Sequence[np.ndarray]) -> list[tuple[int, int]]:
        """Write arrays of shape (tokens, hidden) and sync them; returns (offset, tokens) for each."""
        for a in arrays:
            if a.ndim != 2 or a.shape[1] != self.hidden:
                raise ValueError(f"expected (tokens, {self.hidden}) arrays, got {a.shape}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        extents: list[tuple[int, int]] = []
        with open(self.path, "ab") as f:
            start = end = f.seek(0, os.SEEK_END)
            try:
                # A crash may have left a torn row; pad it out so every run starts on a row boundary.
                torn = end % self.row_bytes
                if torn:
                    f.write(b"\0" * (self.row_bytes - torn))
                    end += self.row_bytes - torn
                offset = end // self.row_bytes
                for a in arrays:
                    data = np.ascontiguousarray(a, dtype=DTYPE)
                    f.write(data.tobytes())
                    extents.append((offset, data.shape[0]))
                    offset += data.shape[0]
                f.flush()
                os.fsync(f.fileno())
            except OSError:
                # A full disk mid-write: give back what this call wrote, so nothing is left behind.
                with contextlib.suppress(OSError):
                    os.ftruncate(f.fileno(), start)
                raise
        return extents

    def _mapped(self, needed_rows: int) -> np.memmap:
        # One stat per read: another process may have replaced the file (a rebuild) or cut it short,
        # and a map of the old file would hand out another image's tokens without a word.
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            self._map, self._mapped_file = None, None
            raise PatchCacheShortError(self.path, 0, needed_rows) from None
        identity = (st.st_dev, st.st_ino)
        rows = st.st_size // self.row_bytes
        stale = identity != self._mapped_file or rows < self._mapped_rows
        if self._map is None or stale or needed_rows > self._mapped_rows:
            if needed_rows > rows:
                raise PatchCacheShortError(self.path, rows, needed_rows)
            self._map = np.memmap(self.path, dtype=DTYPE, mode="r", shape=(rows, self.hidden))
            self._mapped_rows = rows
            self._mapped_file = identity
        return self._map

    def load(self, extents: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Read-only views (no copies) of the runs at these extents."""
        if not extents:
            return []
        needed = max(o + n for o, n in extents)
        mm = self._mapped(needed)
        return [mm[o : o + n] for o, n in extents]
