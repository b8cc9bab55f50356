"""Tests for retriever.index.segments: the sealed, checksummed segment format and its reader."""

from __future__ import annotations

import mmap
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from retriever.errors import IndexDamagedError
from retriever.index import segments
from retriever.index.blobs import BlobStore, LocalBlobStore
from retriever.index.segments import (
    ALIGN,
    END_MAGIC,
    HEADER_SIZE,
    MAGIC,
    Segment,
    SegmentDamagedError,
    SegmentRecordMissingError,
    SegmentVersionError,
    SegmentWriter,
    check_segment,
)

HIDDEN = 12
CODEC = 3
NAME = "seg-000001.rseg"


class RemoteStore:
    """A store with no local files (as object storage will be): every read is a ranged ``get``, recorded."""

    def __init__(self, inner: LocalBlobStore) -> None:
        self.inner = inner
        self.gets: list[tuple[str, int, int | None]] = []

    def put(self, name: str, data: bytes | bytearray | memoryview) -> None:
        self.inner.put(name, data)

    def get(self, name: str, offset: int = 0, length: int | None = None) -> bytes:
        self.gets.append((name, offset, length))
        return self.inner.get(name, offset, length)

    def list(self, prefix: str = "") -> list[str]:
        return self.inner.list(prefix)

    def delete(self, name: str) -> None:
        self.inner.delete(name)

    def size(self, name: str) -> int:
        return self.inner.size(name)

    def local_path(self, name: str) -> Path | None:
        return None


def _records(seed: int, count: int) -> list[tuple[bytes, int]]:
    """fp16 tokens of random lengths (a few empty), as a codec would encode them."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        n = int(rng.integers(0, 40)) if rng.random() > 0.05 else 0
        out.append((rng.standard_normal((n, HIDDEN)).astype(np.float16).tobytes(), n))
    return out


def _sealed(records: list[tuple[bytes, int]]) -> bytes:
    writer = SegmentWriter(CODEC, HIDDEN)
    for i, (payload, n) in enumerate(records):
        assert writer.add(payload, n) == i
    assert len(writer) == len(records)
    expected = writer.nbytes
    data = writer.seal()
    assert len(data) == expected
    return data


@pytest.fixture
def local(tmp_path: Path) -> LocalBlobStore:
    return LocalBlobStore(tmp_path / "segments")


@pytest.fixture
def remote(local: LocalBlobStore) -> RemoteStore:
    return RemoteStore(local)


@pytest.fixture(params=["local", "remote"])
def store(request: pytest.FixtureRequest, local: LocalBlobStore, remote: RemoteStore) -> BlobStore:
    return local if request.param == "local" else remote


def test_round_trip_of_many_records(store: BlobStore) -> None:
    records = _records(1, 300)
    store.put(NAME, _sealed(records))
    with Segment(store, NAME) as seg:
        assert (len(seg), seg.codec_id, seg.hidden) == (300, CODEC, HIDDEN)
        assert seg.mapped is isinstance(store, LocalBlobStore)
        for i in [*range(300), 299, 0, 150]:  # any order, repeated
            payload, n = seg.record(i)
            assert isinstance(payload, memoryview) and payload.readonly
            assert bytes(payload) == records[i][0] and n == records[i][1] == seg.n_tokens(i)
            tokens = np.frombuffer(payload, dtype=np.float16).reshape(n, HIDDEN)
            np.testing.assert_array_equal(tokens.tobytes(), records[i][0])
        assert seg.verify() == []
    assert check_segment(store, NAME) == []


def test_an_empty_segment(store: BlobStore) -> None:
    store.put(NAME, SegmentWriter(0, 1).seal())
    with Segment(store, NAME) as seg:
        assert len(seg) == 0 and seg.verify() == []
        with pytest.raises(SegmentRecordMissingError):
            seg.record(0)


def test_the_layout_byte_by_byte(local: LocalBlobStore) -> None:
    payloads = [b"\x01" * 10, b"", b"\x02" * 64, b"\x03" * 65]
    writer = SegmentWriter(CODEC, HIDDEN)
    for i, p in enumerate(payloads):
        writer.add(p, i + 1)
    data = writer.seal()

    assert data[0:4] == MAGIC == b"RSEG"
    version, codec, hidden, count, table_offset = struct.unpack_from("<HHIIQ", data, 4)
    assert (version, codec, hidden, count) == (1, CODEC, HIDDEN, 4)
    assert data[24:60] == bytes(36)
    assert struct.unpack_from("<I", data, 60)[0] == zlib.crc32(data[:60])
    # Payloads at 64, each at the next multiple of 64, zeros between; the table after the last one.
    offsets = [64, 128, 128, 192]
    for p, at in zip(payloads, offsets, strict=True):
        assert data[at : at + len(p)] == p
    assert data[74:128] == bytes(54) and data[192 + 65 : 320] == bytes(320 - 257)
    assert table_offset == 320
    for i, (p, at) in enumerate(zip(payloads, offsets, strict=True)):
        entry = struct.unpack_from("<QIIII", data, table_offset + 24 * i)
        assert entry == (at, len(p), i + 1, zlib.crc32(p), 0)
    footer_at = table_offset + 24 * 4
    crc, reserved, end = struct.unpack_from("<II8s", data, footer_at)
    assert crc == zlib.crc32(data[:64] + data[table_offset:footer_at]) and reserved == 0
    assert end == END_MAGIC == b"RSEG-END" and len(data) == footer_at + 16


def test_local_payloads_are_views_of_the_memory_map(local: LocalBlobStore) -> None:
    records = _records(2, 20)
    local.put(NAME, _sealed(records))
    seg = Segment(local, NAME)
    i = next(i for i, (_, n) in enumerate(records) if n > 0)
    payload, n = seg.record(i)
    assert isinstance(payload.obj, mmap.mmap)  # a view of the map, not a copy
    tokens = np.frombuffer(payload, dtype=np.float16).reshape(n, HIDDEN)
    base: object = tokens
    while isinstance(base, np.ndarray):  # the reshape's base is the flat array, whose base is the view
        base = base.base
    assert isinstance(base, memoryview) and isinstance(base.obj, mmap.mmap)
    assert not tokens.flags.writeable
    assert tokens.ctypes.data % ALIGN == 0  # aligned for any dtype a codec views it as
    again = np.frombuffer(seg.record(i).payload, dtype=np.float16)
    assert np.shares_memory(tokens, again)
    seg.close()


def test_without_a_local_path_each_record_is_one_ranged_get(remote: RemoteStore) -> None:
    records = _records(3, 50)
    remote.put(NAME, _sealed(records))
    seg = Segment(remote, NAME)
    assert not seg.mapped
    opening = list(remote.gets)
    assert len(opening) == 2 and opening[0] == (NAME, 0, HEADER_SIZE)  # header, then table and footer
    remote.gets.clear()
    payload, _ = seg.record(17)
    assert not isinstance(payload.obj, mmap.mmap)
    (only,) = remote.gets
    assert only[0] == NAME and only[2] == len(records[17][0])
    assert remote.inner.get(NAME, only[1], only[2]) == records[17][0]


def test_verify_without_a_local_path_reads_in_chunks(
    remote: RemoteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    records = _records(4, 100)
    data = bytearray(_sealed(records))
    damaged = [3, 50, 99]
    seg_offsets = [struct.unpack_from("<Q", data, _table_offset(data) + 24 * i)[0] for i in range(100)]
    for i in damaged:
        if records[i][1] == 0:
            continue
        data[seg_offsets[i]] ^= 0xFF
    remote.put(NAME, bytes(data))
    monkeypatch.setattr(segments, "_VERIFY_CHUNK", 4096)
    seg = Segment(remote, NAME)
    remote.gets.clear()
    problems = seg.verify()
    assert [p.record for p in problems] == [i for i in damaged if records[i][1]]
    assert 1 < len(remote.gets) < 100  # several records per request


def _table_offset(data: bytes | bytearray) -> int:
    offset: int = struct.unpack_from("<Q", data, 16)[0]
    return offset


# -- damage -----------------------------------------------------------------------------------------


def _assert_names_the_repair(exc: SegmentDamagedError, record: int | None = None) -> None:
    message = str(exc)
    assert isinstance(exc, IndexDamagedError)
    assert NAME in message and "retriever check --repair" in message
    if record is not None:
        assert f"record {record}" in message and exc.record == record


def test_a_flipped_payload_byte_costs_only_that_record(store: BlobStore) -> None:
    records = _records(5, 30)
    data = bytearray(_sealed(records))
    victim = next(i for i in range(10, 30) if records[i][1] > 0)
    at = struct.unpack_from("<Q", data, _table_offset(data) + 24 * victim)[0]
    data[at + len(records[victim][0]) // 2] ^= 0x10
    store.put(NAME, bytes(data))

    seg = Segment(store, NAME)  # the header and the table are fine: it opens
    with pytest.raises(SegmentDamagedError, match="checksum does not match") as info:
        seg.record(victim)
    _assert_names_the_repair(info.value, victim)
    for i in range(30):
        if i != victim:
            assert bytes(seg.record(i).payload) == records[i][0]
    assert bytes(seg.record(victim, verify=False).payload) != records[victim][0]
    (problem,) = seg.verify()
    assert problem.record == victim
    assert [p.record for p in check_segment(store, NAME)] == [victim]


def _place(store: BlobStore, data: bytes) -> None:
    """Write a segment's file directly: a ``put`` per case (two fsyncs) would make the loops below slow."""
    local = store.inner if isinstance(store, RemoteStore) else store
    assert isinstance(local, LocalBlobStore)
    folder = local.folder
    folder.mkdir(parents=True, exist_ok=True)
    (folder / NAME).write_bytes(data)


def _every_structural_byte(data: bytes) -> list[int]:
    table = _table_offset(data)
    return [*range(HEADER_SIZE), *range(table, len(data))]


def test_any_flipped_byte_of_the_header_table_or_footer_is_caught(store: BlobStore) -> None:
    data = _sealed(_records(6, 5))
    for at in _every_structural_byte(data):
        damaged = bytearray(data)
        damaged[at] ^= 0x01
        _place(store, bytes(damaged))
        with pytest.raises(SegmentDamagedError) as info:
            Segment(store, NAME)
        _assert_names_the_repair(info.value)
        assert info.value.record is None or 0 <= info.value.record < 5
        (problem,) = check_segment(store, NAME)
        assert str(problem) == str(info.value)


@pytest.mark.parametrize(
    ("at", "words"),
    [
        (0, "not a segment"),
        (4, "format version"),
        (6, "header checksum"),  # codec id
        (8, "header checksum"),  # hidden size
        (12, "header checksum"),  # record count
        (16, "header checksum"),  # table offset
        (30, "header checksum"),  # reserved
        (61, "header checksum"),  # the checksum itself
    ],
)
def test_header_damage_says_what(store: BlobStore, at: int, words: str) -> None:
    data = bytearray(_sealed(_records(7, 3)))
    data[at] ^= 0x04
    store.put(NAME, bytes(data))
    with pytest.raises(SegmentDamagedError, match=words) as info:
        Segment(store, NAME)
    _assert_names_the_repair(info.value)


def test_a_newer_format_version_says_so(store: BlobStore) -> None:
    data = bytearray(_sealed(_records(8, 3)))
    struct.pack_into("<H", data, 4, 2)
    store.put(NAME, bytes(data))
    with pytest.raises(SegmentVersionError, match=r"format version 2.*reads 1.*upgrade") as info:
        Segment(store, NAME)
    _assert_names_the_repair(info.value)


def test_a_table_or_footer_flip_is_caught(store: BlobStore) -> None:
    data = _sealed(_records(9, 4))
    table = _table_offset(data)
    for at, words in [
        (table + 2, "table checksum"),
        (len(data) - 20, "table checksum"),
        (len(data) - 1, "not its end"),
        (len(data) - 12, "not its end"),
    ]:
        damaged = bytearray(data)
        damaged[at] ^= 0x40
        store.put(NAME, bytes(damaged))
        with pytest.raises(SegmentDamagedError, match=words):
            Segment(store, NAME)


def test_a_truncated_segment_is_cut_short(store: BlobStore) -> None:
    data = _sealed(_records(10, 10))
    table = _table_offset(data)
    for size in (0, 1, 10, HEADER_SIZE - 1, HEADER_SIZE, HEADER_SIZE + 100, table, table + 30, len(data) - 1):
        _place(store, data[:size])
        with pytest.raises(SegmentDamagedError, match="cut short") as info:
            Segment(store, NAME)
        _assert_names_the_repair(info.value)


def test_bytes_after_the_end_are_damage(store: BlobStore) -> None:
    store.put(NAME, _sealed(_records(11, 3)) + b"\0")
    with pytest.raises(SegmentDamagedError, match="bytes after its end"):
        Segment(store, NAME)


def test_a_missing_segment_is_damage(store: BlobStore) -> None:
    with pytest.raises(SegmentDamagedError, match="missing") as info:
        Segment(store, NAME)
    _assert_names_the_repair(info.value)


def test_a_table_pointing_outside_the_payloads_is_caught(store: BlobStore) -> None:
    # A writer bug rather than bit rot: checksums that match around a record placed over the table.
    data = bytearray(_sealed([(b"abc", 1), (b"defg", 2)]))
    table = _table_offset(data)
    struct.pack_into("<Q", data, table + 24, table - 2)
    struct.pack_into("<I", data, table + 48, zlib.crc32(bytes(data[:64]) + bytes(data[table : table + 48])))
    store.put(NAME, bytes(data))
    with pytest.raises(SegmentDamagedError, match="outside the payloads") as info:
        Segment(store, NAME)
    _assert_names_the_repair(info.value, 1)


def test_a_record_past_the_end(store: BlobStore) -> None:
    store.put(NAME, _sealed(_records(12, 3)))
    seg = Segment(store, NAME)
    for i in (3, 100, -1):
        with pytest.raises(SegmentRecordMissingError, match="holds 3") as info:
            seg.record(i)
        assert isinstance(info.value, IndexError)
        _assert_names_the_repair(info.value, i)
    with pytest.raises(SegmentRecordMissingError):
        seg.n_tokens(3)


def test_errors_survive_pickling() -> None:
    for exc in (
        SegmentDamagedError(NAME, "its checksum does not match its bytes", 4),
        SegmentRecordMissingError(NAME, "past the end", 9),
        SegmentVersionError(NAME, "format version 9"),
    ):
        again = pickle.loads(pickle.dumps(exc))
        assert type(again) is type(exc) and str(again) == str(exc) and again.record == exc.record


# -- closing and the writer -------------------------------------------------------------------------


def test_closing_is_safe_with_views_held_and_twice(local: LocalBlobStore) -> None:
    records = _records(13, 5)
    local.put(NAME, _sealed(records))
    seg = Segment(local, NAME)
    held = np.frombuffer(seg.record(2).payload, dtype=np.float16)
    seg.close()
    seg.close()
    assert held.tobytes() == records[2][0]  # the view stays valid after close
    with pytest.raises(ValueError, match="closed"):
        seg.record(0)
    del held
    with Segment(local, NAME) as again:
        again.record(1)
    with pytest.raises(ValueError, match="closed"):
        again.record(1)


def test_a_replaced_blob_does_not_change_an_open_segment(local: LocalBlobStore) -> None:
    first = _records(14, 4)
    local.put(NAME, _sealed(first))
    seg = Segment(local, NAME)
    local.put(NAME, _sealed(_records(15, 4)))  # (segments are never replaced; a reader survives it anyway)
    assert [bytes(seg.record(i).payload) for i in range(4)] == [p for p, _ in first]


def test_the_writer_refuses_bad_input() -> None:
    for codec, hidden in ((-1, 4), (1 << 16, 4), (1, 0), (1, 1 << 32)):
        with pytest.raises(ValueError):
            SegmentWriter(codec, hidden)
    writer = SegmentWriter(1, 4)
    with pytest.raises(ValueError):
        writer.add(b"x", -1)
    writer.add(np.zeros(3, dtype=np.float16).data, 1)  # any buffer, stored as its bytes
    writer.seal()
    with pytest.raises(RuntimeError, match="sealed"):
        writer.add(b"x", 1)
