"""The patch-embedding cache: ViLT visual tokens of every indexed image, in one memory-mapped fp16 file.

Each image's tokens are a contiguous run of rows of ``hidden`` half floats. The file is append-only:
a run is written and synced before the database row that points to it commits, so a crash leaves at
worst unreferenced bytes at the end, never a row without its tokens. Runs that no row references any
longer (deleted or changed files) stay until the cache is rebuilt.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

DTYPE = np.dtype(np.float16)


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
            end = f.seek(0, os.SEEK_END)
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
        return extents

    def _mapped(self, needed_rows: int) -> np.memmap:
        if self._map is None or needed_rows > self._mapped_rows:
            rows = self.rows
            if needed_rows > rows:
                raise IndexError(f"patch cache {self.path} has {rows} rows, {needed_rows} needed")
            self._map = np.memmap(self.path, dtype=DTYPE, mode="r", shape=(rows, self.hidden))
            self._mapped_rows = rows
        return self._map

    def load(self, extents: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """Read-only views (no copies) of the runs at these extents."""
        if not extents:
            return []
        needed = max(o + n for o, n in extents)
        mm = self._mapped(needed)
        return [mm[o : o + n] for o, n in extents]
