"""Tests for retriever.index.blobs: the blob-store interface and its local-folder implementation."""

from __future__ import annotations

import errno
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from retriever.errors import IndexDamagedError, ResourceError, RetrieverError
from retriever.index.blobs import (
    BlobNameError,
    BlobNotFoundError,
    BlobStore,
    BlobStoreFullError,
    LocalBlobStore,
    check_name,
)
from tests.conftest import mounted_tmpfs


@pytest.fixture
def store(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "blobs")


def test_is_a_blob_store(store: LocalBlobStore) -> None:
    assert isinstance(store, BlobStore)


def test_put_creates_the_folder_and_get_returns_the_bytes(store: LocalBlobStore) -> None:
    assert not store.folder.exists()
    assert store.list() == []
    data = os.urandom(100_000)
    store.put("seg-000001.rseg", data)
    assert store.get("seg-000001.rseg") == data
    assert store.size("seg-000001.rseg") == len(data)
    assert store.local_path("seg-000001.rseg") == store.folder / "seg-000001.rseg"
    assert sorted(os.listdir(store.folder)) == ["seg-000001.rseg"]  # nothing else left behind


def test_put_takes_any_contiguous_buffer(store: LocalBlobStore) -> None:
    tokens = np.arange(24, dtype=np.float16).reshape(4, 6)
    store.put("a", tokens.data)
    store.put("b", bytearray(b"xyz"))
    store.put("empty", b"")
    assert store.get("a") == tokens.tobytes()
    assert store.get("b") == b"xyz"
    assert store.get("empty") == b"" and store.size("empty") == 0


def test_ranged_get(store: LocalBlobStore) -> None:
    data = bytes(range(256)) * 40
    store.put("x", data)
    assert store.get("x", 10, 20) == data[10:30]
    assert store.get("x", 5000) == data[5000:]
    assert store.get("x", 0, 0) == b""
    # Past the end: fewer bytes, as a file read gives, never an error.
    assert store.get("x", len(data) - 3, 100) == data[-3:]
    assert store.get("x", len(data) + 10, 5) == b""
    with pytest.raises(ValueError):
        store.get("x", -1, 3)
    with pytest.raises(ValueError):
        store.get("x", 0, -3)


def test_put_replaces_a_blob_atomically(store: LocalBlobStore) -> None:
    store.put("x", b"old")
    store.put("x", b"new contents")
    assert store.get("x") == b"new contents"
    assert store.list() == ["x"]


def test_missing_blobs_are_a_damaged_index(store: LocalBlobStore) -> None:
    for call in (lambda: store.get("nope"), lambda: store.size("nope")):
        with pytest.raises(BlobNotFoundError, match="blob nope is missing") as info:
            call()
        assert isinstance(info.value, IndexDamagedError) and isinstance(info.value, LookupError)
    store.put("other", b"1")
    with pytest.raises(BlobNotFoundError):
        store.get("nope", 3, 4)


def test_list_is_sorted_filters_by_prefix_and_shows_only_blobs(store: LocalBlobStore) -> None:
    for name in ("seg-2", "seg-10", "manifest", "seg-1"):
        store.put(name, name.encode())
    # Things in the folder that are not blobs: a write in progress, a hidden file, a folder, a link, a name
    # the store would refuse.
    (store.folder / ".seg-3.abc123.tmp").write_bytes(b"partial")
    (store.folder / ".hidden").write_bytes(b"")
    (store.folder / "sub").mkdir()
    (store.folder / "link").symlink_to(store.folder / "seg-1")
    (store.folder / "has space").write_bytes(b"")
    assert store.list() == ["manifest", "seg-1", "seg-10", "seg-2"]
    assert store.list("seg-") == ["seg-1", "seg-10", "seg-2"]
    assert store.list("seg-1") == ["seg-1", "seg-10"]
    assert store.list("zzz") == []


def test_delete_removes_and_a_missing_blob_is_fine(store: LocalBlobStore) -> None:
    store.put("a", b"1")
    store.put("b", b"2")
    store.delete("a")
    assert store.list() == ["b"]
    store.delete("a")  # again: nothing to do, no error
    store.delete("never-there")
    LocalBlobStore(store.folder / "missing-folder").delete("x")


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("", "empty"),
        ("a/b", "a path"),
        ("../x", "a path"),
        ("/etc/passwd", "a path"),
        ("a\\b", "a path"),
        ("..", "starts with '.'"),
        (".", "starts with '.'"),
        (".hidden", "starts with '.'"),
        (".x.abc.tmp", "starts with '.'"),
        ("has space", "characters"),
        ("tab\there", "characters"),
        ("nul\0", "characters"),
        ("é", "characters"),
        ("x" * 201, "201 characters"),
    ],
)
def test_bad_names_are_refused_by_every_call(store: LocalBlobStore, name: str, why: str) -> None:
    calls: list[Callable[[], object]] = [
        lambda: store.put(name, b"x"),
        lambda: store.get(name),
        lambda: store.size(name),
        lambda: store.delete(name),
        lambda: store.local_path(name),
        lambda: check_name(name),
    ]
    for call in calls:
        with pytest.raises(BlobNameError, match="is not allowed") as info:
            call()
        assert why in str(info.value)
        assert isinstance(info.value, RetrieverError) and isinstance(info.value, ValueError)
    assert not store.folder.exists() or os.listdir(store.folder) == []


@pytest.mark.parametrize("name", ["a", "seg-000001.rseg", "A_b-c.d", "x" * 200, "9", "a..b"])
def test_good_names_are_accepted(store: LocalBlobStore, name: str) -> None:
    store.put(name, b"ok")
    assert store.list() == [name]
    assert store.get(name) == b"ok"


# -- atomic puts ------------------------------------------------------------------------------------


def _fail(exc: BaseException) -> object:
    def fail(*args: object, **kwargs: object) -> None:
        raise exc

    return fail


@pytest.mark.parametrize("step", ["write", "fsync", "replace"])
def test_a_failed_put_leaves_nothing_and_keeps_the_old_blob(
    store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    store.put("kept", b"old")
    monkeypatch.setattr(os, step, _fail(OSError(errno.EIO, "I/O error")))
    for name in ("new", "kept"):
        with pytest.raises(OSError, match="I/O error"):
            store.put(name, b"x" * 10_000)
    monkeypatch.undo()
    assert sorted(os.listdir(store.folder)) == ["kept"]  # no blob, no temporary file
    assert store.get("kept") == b"old"


def test_an_interrupted_put_leaves_nothing(store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "replace", _fail(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        store.put("x", b"data")
    monkeypatch.undo()
    assert os.listdir(store.folder) == []


def test_a_crash_mid_put_leaves_only_a_hidden_temp_that_sweep_removes(
    store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.put("kept", b"old")
    # A crash: the rename never happens and nothing cleans up after it.
    monkeypatch.setattr(os, "replace", _fail(SystemExit()))
    monkeypatch.setattr(os, "unlink", _fail(OSError(errno.EIO, "gone")))
    with pytest.raises(SystemExit):
        store.put("new", b"partial")
    monkeypatch.undo()
    (temp,) = (n for n in os.listdir(store.folder) if n != "kept")
    assert temp.startswith(".new.") and temp.endswith(".tmp")

    assert store.list() == ["kept"]
    with pytest.raises(BlobNotFoundError):
        store.get("new")
    assert store.sweep(older_than_s=3600) == []  # too young: could be a write in progress
    assert store.sweep() == [temp]
    assert os.listdir(store.folder) == ["kept"]
    assert store.sweep() == []
    assert LocalBlobStore(store.folder / "missing").sweep() == []


@pytest.mark.parametrize(("code", "words"), [(errno.ENOSPC, "no space left"), (errno.EDQUOT, "quota")])
def test_a_full_disk_is_a_project_error_and_leaves_nothing(
    store: LocalBlobStore, monkeypatch: pytest.MonkeyPatch, code: int, words: str
) -> None:
    store.put("kept", b"old")
    monkeypatch.setattr(os, "write", _fail(OSError(code, os.strerror(code))))
    with pytest.raises(BlobStoreFullError) as info:
        store.put("kept", b"new")
    monkeypatch.undo()
    exc = info.value
    assert isinstance(exc, ResourceError) and isinstance(exc, OSError) and exc.errno == code
    assert words in str(exc) and "blob kept was not written" in str(exc) and str(store.folder) in str(exc)
    assert "free some space" in str(exc)
    assert os.listdir(store.folder) == ["kept"] and store.get("kept") == b"old"


def test_errors_survive_pickling(tmp_path: Path) -> None:
    for exc in (
        BlobStoreFullError(str(tmp_path), "x", errno.ENOSPC),
        BlobNotFoundError(str(tmp_path), "x"),
        BlobNameError("a/b", "a path"),
    ):
        again = pickle.loads(pickle.dumps(exc))
        assert type(again) is type(exc) and str(again) == str(exc)


# -- a real full disk -------------------------------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 1 MB tmpfs mounted for this test (skipped where this machine does not allow mounting)."""
    with mounted_tmpfs(tmp_path / "disk", "1m") as mount:
        yield mount


def test_a_really_full_disk_leaves_no_partial_blob(tiny_disk: Path) -> None:
    store = LocalBlobStore(tiny_disk / "blobs")
    store.put("small", b"s" * 1000)
    with pytest.raises(BlobStoreFullError, match="no space left on the device") as info:
        store.put("big", os.urandom(2 << 20))
    assert info.value.errno == errno.ENOSPC
    with pytest.raises(BlobStoreFullError):
        store.put("small", os.urandom(2 << 20))  # a replacement that does not fit keeps the old blob
    assert os.listdir(store.folder) == ["small"]
    assert store.list() == ["small"] and store.get("small") == b"s" * 1000
    # The space the failed writes took is given back: a blob that fits still goes in.
    store.put("fits", b"f" * 500_000)
    assert store.get("fits") == b"f" * 500_000
