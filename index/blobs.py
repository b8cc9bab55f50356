"""Blob storage: named, immutable byte strings behind one small interface (``put``, ranged ``get``, ``list``,
``delete``, ``size``).

The patch cache is a set of sealed segment files (``segments.py``). They are reached only through this
interface so that the storage behind it can change without anything above it changing: a local folder
today (``LocalBlobStore``), object storage when an index outgrows one machine. So the interface promises
only what object stores promise too: a ``put`` is atomic (a reader sees the whole blob or none of it) and
durable when it returns, a ``get`` may ask for a byte range, names are flat. ``local_path`` is the one
concession to a local folder: where a blob is a file, a reader may memory-map it instead of copying it.
"""

from __future__ import annotations

import builtins
import contextlib
import errno
import os
import re
import secrets
import time
from pathlib import Path
from typing import Protocol, runtime_checkable

from retriever.errors import IndexDamagedError, ResourceError, RetrieverError

#: Letters, digits, ``.``, ``_`` and ``-``, not starting with ``.``: safe as a file name on every file system
#: and as an object key on every object store, never a path (no ``/``, no ``..``), never hidden (a leading
#: ``.`` is kept for the temporary files of writes in progress, so they can never collide with a blob).
_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}")

#: Temporary files are ``.<name>.<random>.tmp``: hidden, so ``list`` never shows them and no name matches.
_TMP_SUFFIX = ".tmp"

#: Errors that mean the disk (or the user's share of it) is full.
_FULL = {errno.ENOSPC, errno.EDQUOT}


class BlobNameError(RetrieverError, ValueError):
    """A blob name that is not allowed (a path, hidden, empty, too long, or with other characters).

    A ``ValueError`` too: a bad name is a bug in the caller, never a state of the store.
    """

    def __init__(self, name: str, why: str) -> None:
        super().__init__(
            f"blob name {name!r} is not allowed ({why}): use letters, digits, '.', '_' and '-', "
            "not starting with '.', at most 200 characters"
        )
        self.name, self.why = name, why

    def __reduce__(self) -> tuple[type[BlobNameError], tuple[str, str]]:
        return type(self), (self.name, self.why)


class BlobNotFoundError(IndexDamagedError, LookupError):
    """A blob asked for by name is not in the store.

    Blobs are read because something in the index points to them, so a missing one is a damaged index.
    """

    def __init__(self, where: str, name: str) -> None:
        super().__init__(f"blob {name} is missing from {where}")
        self.where, self.name = where, name

    def __reduce__(self) -> tuple[type[BlobNotFoundError], tuple[str, str]]:
        return type(self), (self.where, self.name)


class BlobStoreFullError(ResourceError, OSError):
    """A ``put`` found no space left (a full disk or an exhausted quota); nothing of the blob was kept.

    An ``OSError`` with the original errno as well, so code that rolls back on any refused write (and the
    errno-based advice of the CLI and the API) treats it as the refused write it is.
    """

    def __init__(self, where: str, name: str, code: int = errno.ENOSPC) -> None:
        what = "the disk quota is exhausted" if code == errno.EDQUOT else "no space left on the device"
        message = (
            f"{what} holding {where}: blob {name} was not written (nothing of it was kept); "
            "free some space and run the command again"
        )
        OSError.__init__(self, code, message, where)
        self.message, self.where, self.name, self.code = message, where, name, code

    def __str__(self) -> str:
        return self.message

    def __reduce__(self) -> tuple[type[BlobStoreFullError], tuple[str, str, int]]:
        return type(self), (self.where, self.name, self.code)


@runtime_checkable
class BlobStore(Protocol):
    """Named, immutable blobs. Every implementation keeps these promises, so callers rely on nothing else.

    - ``put`` is atomic and durable: until it returns, readers see the old blob (or none); once it returns,
      the whole new blob, also after a crash or a power cut. A failed ``put`` leaves nothing visible.
    - ``get`` returns ``length`` bytes from ``offset`` (all the rest when ``length`` is None), fewer only
      where the blob ends sooner, as a file read does; a missing blob raises ``BlobNotFoundError``.
    - ``list`` returns the names with ``prefix``, sorted, never a write in progress.
    - ``delete`` of a missing blob does nothing (a retried clean-up must not fail).
    - ``local_path`` is the blob's file where the store is a local folder (for memory-mapping), else None.
    """

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None: ...

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes: ...

    def list(self, prefix: str = "") -> list[str]: ...

    def delete(self, name: str) -> None: ...

    def size(self, name: str) -> int: ...

    def local_path(self, name: str) -> Path | None: ...


def check_name(name: str) -> str:
    """``name`` if it is an allowed blob name, else ``BlobNameError`` saying why."""
    if not isinstance(name, str) or not name:
        raise BlobNameError(str(name), "empty" if name == "" else "not a string")
    if "/" in name or "\\" in name or os.path.isabs(name):
        raise BlobNameError(name, "a path, not a name")
    if name.startswith("."):
        raise BlobNameError(name, "starts with '.'")
    if len(name) > 200:
        raise BlobNameError(name, f"{len(name)} characters")
    if not _NAME.fullmatch(name):
        raise BlobNameError(name, "characters other than letters, digits, '.', '_' and '-'")
    return name


def _is_temp(entry: str) -> bool:
    return entry.startswith(".") and entry.endswith(_TMP_SUFFIX)


class LocalBlobStore:
    """Blobs as files in one folder, which the store owns (other files there are not its business).

    A ``put`` writes a hidden temporary file, syncs it, renames it over the name and syncs the folder: the
    rename is atomic, and the two syncs make the contents and then the name durable, in that order. A crash
    mid-``put`` leaves at worst a hidden temporary file, which ``list`` ignores and ``sweep`` removes.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def __repr__(self) -> str:
        return f"LocalBlobStore({str(self.folder)!r})"

    def _path(self, name: str) -> Path:
        return self.folder / check_name(name)

    def local_path(self, name: str) -> Path | None:
        """The blob's file (which may not exist): readers memory-map it rather than copy it."""
        return self._path(name)

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        """Write the blob atomically and durably (see the class); replaces a blob of the same name."""
        path = self._path(name)
        self._make_folder()
        tmp = self.folder / f".{name}.{secrets.token_hex(6)}{_TMP_SUFFIX}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(data).cast("B")
                while view:
                    view = view[os.write(fd, view) :]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
        except BaseException as exc:
            # Whatever stopped the write (a full disk, an interrupt), no partial blob and no temporary file
            # stay behind; were even this unlink to fail, the file is hidden and ``sweep`` removes it.
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            if isinstance(exc, OSError) and exc.errno in _FULL:
                raise BlobStoreFullError(str(self.folder), name, exc.errno) from exc
            raise
        self._sync_folder()

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        """``length`` bytes from ``offset`` (the rest of the blob when None); fewer where the blob ends."""
        if offset < 0 or (length is not None and length < 0):
            raise ValueError(f"a range needs offset >= 0 and length >= 0, got {offset}, {length}")
        path = self._path(name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise BlobNotFoundError(str(self.folder), name) from None
        try:
            if length is None:
                length = max(0, os.fstat(fd).st_size - offset)
            chunks: list[bytes] = []
            done = 0
            while done < length:
                chunk = os.pread(fd, length - done, offset + done)
                if not chunk:
                    break
                chunks.append(chunk)
                done += len(chunk)
        finally:
            os.close(fd)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def size(self, name: str) -> int:
        """The blob's length in bytes."""
        try:
            return self._path(name).stat().st_size
        except FileNotFoundError:
            raise BlobNotFoundError(str(self.folder), name) from None

    def list(self, prefix: str = "") -> list[str]:
        """Names of the blobs starting with ``prefix``, sorted; writes in progress and other files are not."""
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return []
        names = []
        for entry in entries:
            if entry.name.startswith(prefix) and _NAME.fullmatch(entry.name):
                with contextlib.suppress(OSError):  # removed meanwhile: not listed
                    if entry.is_file(follow_symlinks=False):
                        names.append(entry.name)
        return sorted(names)

    def delete(self, name: str) -> None:
        """Remove the blob, durably; a missing one is not an error (a repeated clean-up must not fail)."""
        try:
            self._path(name).unlink()
        except FileNotFoundError:
            return
        self._sync_folder()

    def sweep(self, older_than_s: float = 0.0) -> builtins.list[str]:  # (``list`` is the method above)
        """Remove temporary files that crashed writes left behind (older than ``older_than_s``); their names.

        A temporary file of a write still in progress looks the same, so call this where no other process
        is writing (under the index's writer lock), or with an age no write takes.
        """
        try:
            entries = list(os.scandir(self.folder))
        except FileNotFoundError:
            return []
        now = time.time()
        removed = []
        for entry in entries:
            if not _is_temp(entry.name):
                continue
            with contextlib.suppress(FileNotFoundError):
                if now - entry.stat(follow_symlinks=False).st_mtime >= older_than_s:
                    os.unlink(entry.path)
                    removed.append(entry.name)
        if removed:
            self._sync_folder()
        return sorted(removed)

    def _make_folder(self) -> None:
        if self.folder.is_dir():
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        # The new folder's own name must be durable too, or a crash could lose every blob put into it.
        _fsync_dir(self.folder.parent)

    def _sync_folder(self) -> None:
        _fsync_dir(self.folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
