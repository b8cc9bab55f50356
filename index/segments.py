"""Patch-cache segments: sealed files of records (one image's encoded tokens each), checked as they are read.

A segment is written once, whole (``SegmentWriter.seal``, then ``BlobStore.put``), and never changed, so a
reader needs no lock and a crash can never leave half a segment. Every record carries its own CRC-32: a
rerank read checks only the few records it reads, and a flipped bit in one image's tokens costs that image,
not the segment. The header and the record table carry CRCs of their own, checked when a segment opens.

The segment knows a codec only by its id (and the hidden size): it stores and returns encoded bytes, and
decoding them is the caller's business, so a new codec needs no new segment format.

Layout (little-endian; ``N`` records; every payload and the table start at a multiple of 64 bytes, so a
memory-mapped payload is aligned for any dtype a codec views it as)::

    offset        size  field
    0             4     magic b"RSEG"
    4             2     format version (1)
    6             2     codec id
    8             4     hidden size
    12            4     record count N
    16            8     table offset T
    24            36    reserved, zero
    60            4     CRC-32 of bytes 0..60 (the header above)
    64            ...   record payloads, each at a multiple of 64, zero bytes between them
    T             24*N  record table, per record: payload offset u64, payload length u32, n_tokens u32,
                        CRC-32 of the payload u32, reserved u32 (zero)
    T+24*N        4     CRC-32 of the header (64 bytes) followed by the table
    T+24*N+4      4     reserved, zero
    T+24*N+8      8     end magic b"RSEG-END"; the file ends here (size = T + 24*N + 16)
"""

from __future__ import annotations

import contextlib
import mmap
import os
import struct
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

from retriever.errors import IndexDamagedError

from .blobs import BlobNotFoundError, BlobStore

MAGIC = b"RSEG"
END_MAGIC = b"RSEG-END"
FORMAT_VERSION = 1
HEADER_SIZE = 64
ALIGN = 64
REPAIR = "run `retriever check --repair`"

_HEADER = struct.Struct("<4sHHIIQ")  # magic, version, codec id, hidden, count, table offset
_HEADER_CRC = struct.Struct("<I")
_HEADER_CRC_AT = HEADER_SIZE - _HEADER_CRC.size
_FOOTER = struct.Struct("<II8s")  # CRC of header + table, reserved, end magic
ENTRY = np.dtype(
    [("offset", "<u8"), ("length", "<u4"), ("n_tokens", "<u4"), ("crc", "<u4"), ("reserved", "<u4")]
)

_U16, _U32 = (1 << 16) - 1, (1 << 32) - 1
#: ``verify`` over a store without files reads this much per ``get`` (one request per many records).
_VERIFY_CHUNK = 64 << 20


class SegmentDamagedError(IndexDamagedError):
    """A segment that cannot be read as written: cut short, overwritten, or a record whose bytes changed.

    The message names the segment (and the record, where only one is damaged) and the repair command.
    """

    def __init__(self, segment: str, problem: str, record: int | None = None) -> None:
        where = f"patch segment {segment}" if record is None else f"patch segment {segment}, record {record},"
        super().__init__(f"{where} is damaged: {problem}; {REPAIR}")
        self.segment, self.problem, self.record = segment, problem, record

    def __reduce__(self) -> tuple[type[SegmentDamagedError], tuple[str, str, int | None]]:
        # Rebuilt from its parts, not the message (a worker process hands it back pickled).
        return type(self), (self.segment, self.problem, self.record)


class SegmentRecordMissingError(SegmentDamagedError, IndexError):
    """A record number past the segment's end: the index points to a record the segment does not hold.

    An ``IndexError`` too, as a read past the end of a sequence is.
    """


class SegmentVersionError(SegmentDamagedError):
    """A segment in a format version this code does not read: written by a newer version, or damaged."""


class Record(NamedTuple):
    """One record: its encoded payload (a read-only view, of the memory map where there is one) and the
    number of tokens it encodes (the codec needs it to decode)."""

    payload: memoryview
    n_tokens: int


def _align(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class SegmentWriter:
    """Collects records in memory and seals them into one segment's bytes, to be ``put`` whole."""

    def __init__(self, codec_id: int, hidden: int) -> None:
        if not 0 <= codec_id <= _U16:
            raise ValueError(f"codec id must be within 0..{_U16}, got {codec_id}")
        if not 0 < hidden <= _U32:
            raise ValueError(f"hidden size must be within 1..{_U32}, got {hidden}")
        self.codec_id, self.hidden = codec_id, hidden
        self._parts: list[bytes] = []
        self._entries: list[tuple[int, int, int, int, int]] = []
        self._end = HEADER_SIZE
        self._sealed = False

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def nbytes(self) -> int:
        """The size the segment would have if sealed now (to cut segments at a target size)."""
        return _align(self._end) + ENTRY.itemsize * len(self._entries) + _FOOTER.size

    def add(self, payload: bytes | bytearray | memoryview, n_tokens: int) -> int:
        """Append one record (the codec's encoded bytes and how many tokens they hold); its record number."""
        if self._sealed:
            raise RuntimeError("the segment is sealed: start a new SegmentWriter")
        if not 0 <= n_tokens <= _U32:
            raise ValueError(f"n_tokens must be within 0..{_U32}, got {n_tokens}")
        if len(self._entries) == _U32:
            raise ValueError(f"a segment holds at most {_U32} records")
        data = payload if isinstance(payload, bytes) else memoryview(payload).cast("B").tobytes()
        if len(data) > _U32:
            raise ValueError(f"a record holds at most {_U32} bytes, got {len(data)}")
        offset = _align(self._end)
        if offset > self._end:
            self._parts.append(bytes(offset - self._end))
        self._parts.append(data)
        self._entries.append((offset, len(data), n_tokens, zlib.crc32(data), 0))
        self._end = offset + len(data)
        return len(self._entries) - 1

    def seal(self) -> bytes:
        """The finished segment; the writer takes no more records."""
        self._sealed = True
        table_offset = _align(self._end)
        table = np.array(self._entries, dtype=ENTRY).tobytes()
        header = _header(self.codec_id, self.hidden, len(self._entries), table_offset)
        footer = _FOOTER.pack(zlib.crc32(table, zlib.crc32(header)), 0, END_MAGIC)
        return b"".join([header, *self._parts, bytes(table_offset - self._end), table, footer])


def _header(codec_id: int, hidden: int, count: int, table_offset: int) -> bytes:
    fields = _HEADER.pack(MAGIC, FORMAT_VERSION, codec_id, hidden, count, table_offset)
    head = fields + bytes(_HEADER_CRC_AT - len(fields))
    return head + _HEADER_CRC.pack(zlib.crc32(head))


class Segment:
    """A sealed segment opened for reading: header and table checked, records read (and checked) on demand.

    Where the store has the segment as a local file, the file is memory-mapped and a record's payload is a
    view of the map: no copy, and only the pages read are loaded. Elsewhere each record is one ranged
    ``get``. The map stays open until ``close`` (or until the last payload view handed out is gone).
    """

    def __init__(self, store: BlobStore, name: str) -> None:
        self.store, self.name = store, name
        self._map: mmap.mmap | None = None
        self._closed = False
        path = store.local_path(name)
        if path is not None:
            self._map, head, size = self._open_file(path)
        else:
            head, size = self._get(0, HEADER_SIZE), -1  # the size is checked when the table is read
        try:
            self._parse(head, size)
        except BaseException:
            self.close()
            raise

    def _open_file(self, path: Path) -> tuple[mmap.mmap | None, bytes, int]:
        """The file's map, its header bytes and its size; no map for a file too short to hold a header."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise self._damaged("the file is missing") from None
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_SIZE:  # (an empty file cannot even be mapped)
                return None, os.pread(fd, size, 0), size
            mm = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
            return mm, mm[:HEADER_SIZE], size
        finally:
            os.close(fd)

    def _get(self, offset: int, length: int) -> bytes:
        try:
            return self.store.get(self.name, offset, length)
        except BlobNotFoundError:
            raise self._damaged("the file is missing") from None

    def _damaged(self, problem: str, record: int | None = None) -> SegmentDamagedError:
        return SegmentDamagedError(self.name, problem, record)

    def _parse(self, head: bytes, size: int) -> None:
        if len(head) < HEADER_SIZE:
            raise self._damaged(f"the file is cut short ({len(head)} bytes, less than its header)")
        magic, version, codec_id, hidden, count, table_offset = _HEADER.unpack_from(head)
        if magic != MAGIC:
            raise self._damaged(f"it does not start with {MAGIC!r} (found {magic!r}): not a segment")
        if version != FORMAT_VERSION:
            raise SegmentVersionError(
                self.name,
                f"format version {version}, and this version of retriever reads {FORMAT_VERSION} "
                "(upgrade retriever if a newer one wrote it)",
            )
        (stored,) = _HEADER_CRC.unpack_from(head, _HEADER_CRC_AT)
        if zlib.crc32(head[:_HEADER_CRC_AT]) != stored:
            raise self._damaged("its header checksum does not match")
        if table_offset < HEADER_SIZE or table_offset % ALIGN:
            raise self._damaged(f"its header points to a record table at byte {table_offset}")
        table_len = ENTRY.itemsize * count
        expected = table_offset + table_len + _FOOTER.size
        if self._map is not None:
            if size != expected:
                raise self._size_damage(size, expected)
            tail = self._map[table_offset:expected]
        else:
            # One byte more than the segment should have: a longer answer means bytes after its end.
            tail = self._get(table_offset, table_len + _FOOTER.size + 1)
            if len(tail) != table_len + _FOOTER.size:
                raise self._size_damage(table_offset + len(tail), expected)
        table = tail[:table_len]
        crc, reserved, end_magic = _FOOTER.unpack_from(tail, table_len)
        if end_magic != END_MAGIC or reserved:
            raise self._damaged(f"its last 12 bytes are not {bytes(4) + END_MAGIC!r}: not its end")
        if zlib.crc32(table, zlib.crc32(head[:HEADER_SIZE])) != crc:
            raise self._damaged("its record table checksum does not match")
        entries = np.frombuffer(table, dtype=ENTRY)
        offsets, lengths = entries["offset"], entries["length"].astype(np.uint64)
        bad = (offsets < HEADER_SIZE) | (offsets > table_offset) | (lengths > table_offset - offsets)
        if bad.any():
            i = int(np.argmax(bad))
            raise self._damaged(f"its table places the record outside the payloads (byte {offsets[i]})", i)
        self.codec_id, self.hidden, self.nbytes = int(codec_id), int(hidden), expected
        self._offsets: list[int] = offsets.tolist()
        self._lengths: list[int] = entries["length"].tolist()
        self._n_tokens: list[int] = entries["n_tokens"].tolist()
        self._crcs: list[int] = entries["crc"].tolist()

    def _size_damage(self, size: int, expected: int) -> SegmentDamagedError:
        if size < expected:
            return self._damaged(f"the file is cut short ({size} bytes, its header says {expected})")
        return self._damaged(f"the file has bytes after its end ({size} bytes, its header says {expected})")

    def __len__(self) -> int:
        return len(self._offsets)

    def __repr__(self) -> str:
        return f"Segment({self.name!r}, records={len(self)}, codec_id={self.codec_id}, hidden={self.hidden})"

    def __enter__(self) -> Segment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def mapped(self) -> bool:
        """Whether payloads are views of a memory map (zero-copy) rather than bytes read per record."""
        return self._map is not None

    def n_tokens(self, i: int) -> int:
        """How many tokens record ``i`` holds, without reading it."""
        self._check_index(i)
        return self._n_tokens[i]

    def _check_index(self, i: int) -> None:
        if self._closed:
            raise ValueError(f"patch segment {self.name} is closed")
        if not 0 <= i < len(self._offsets):
            raise SegmentRecordMissingError(
                self.name, f"the index asks for record {i}, and the segment holds {len(self._offsets)}", i
            )

    def record(self, i: int, *, verify: bool = True) -> Record:
        """Record ``i``: its payload (a view of the map where there is one) and its token count.

        Its CRC is checked unless ``verify`` is False: a damaged record raises ``SegmentDamagedError``, and
        the segment's other records stay readable.
        """
        self._check_index(i)
        offset, length = self._offsets[i], self._lengths[i]
        if self._map is not None:
            payload = memoryview(self._map)[offset : offset + length]
        else:
            data = self._get(offset, length)
            if len(data) != length:
                raise self._damaged(f"the file is cut short inside the record ({len(data)} of {length})", i)
            payload = memoryview(data)
        if verify and zlib.crc32(payload) != self._crcs[i]:
            raise self._damaged("its checksum does not match its bytes", i)
        return Record(payload, self._n_tokens[i])

    def verify(self) -> list[SegmentDamagedError]:
        """Check every record's CRC (for ``retriever check``); the damaged records, empty when all are sound.

        The header and the table were checked when the segment opened.
        """
        problems: list[SegmentDamagedError] = []
        if self._map is not None or len(self) == 0:
            for i in range(len(self)):
                try:
                    self.record(i)
                except SegmentDamagedError as exc:
                    problems.append(exc)
            return problems
        # No file to map: read many records per request rather than one request per record.
        order = sorted(range(len(self)), key=self._offsets.__getitem__)
        ends = [o + n for o, n in zip(self._offsets, self._lengths, strict=True)]
        start = 0
        while start < len(order):
            first = self._offsets[order[start]]
            stop = start + 1  # at least one record per request, however large
            while stop < len(order) and ends[order[stop]] - first <= _VERIFY_CHUNK:
                stop += 1
            chunk = memoryview(self._get(first, max(ends[i] for i in order[start:stop]) - first))
            for i in order[start:stop]:
                lo = self._offsets[i] - first
                data = chunk[lo : lo + self._lengths[i]]
                if len(data) != self._lengths[i]:
                    problems.append(self._damaged("the file is cut short inside the record", i))
                elif zlib.crc32(data) != self._crcs[i]:
                    problems.append(self._damaged("its checksum does not match its bytes", i))
            start = stop
        return sorted(problems, key=lambda exc: exc.record or 0)

    def close(self) -> None:
        """Release the memory map; safe to call twice, and while payload views are still held.

        A held view keeps its pages mapped (and valid) until it is dropped; the segment reads no more.
        """
        self._closed = True
        mm, self._map = self._map, None
        if mm is not None:
            # Views still exported: the map is unmapped when the last of them is dropped.
            with contextlib.suppress(BufferError):
                mm.close()


def check_segment(store: BlobStore, name: str) -> list[SegmentDamagedError]:
    """Every problem of one segment, for ``retriever check``: the one that stops it opening, or each damaged
    record. Empty when the segment is sound."""
    try:
        segment = Segment(store, name)
    except SegmentDamagedError as exc:
        return [exc]
    with segment:
        return segment.verify()
