"""Codecs for the cached visual tokens: how one image's (tokens, hidden) array becomes bytes and back.

The patch cache holds every indexed image's ViLT visual tokens, and it is the index's largest part, so
how a token is stored sets the index's size. Each codec here trades bytes for a bounded error:

- ``fp16`` (id 1): the tokens as little-endian half floats, what the cache has always stored. Decoding
  is a zero-copy view. Bytes per token: ``2 * hidden``.
- ``int8`` (id 2): symmetric 8-bit integers, one fp16 scale per token (its absolute maximum / 127).
  Bytes per token: ``hidden + 2``. Error: at most half the token's scale per value.
- ``int4-g32`` (id 3) and ``int4-g64`` (id 4): symmetric 4-bit integers in -7..7, two per byte, one fp16
  scale per group of G consecutive dimensions of a token (the group's absolute maximum / 7). Bytes per
  token: ``ceil(hidden / 2) + 2 * ceil(hidden / G)``. Error: at most half the group's scale per value.
  A few dimensions of a token can be far larger than the rest (outliers); a per-group scale confines
  the precision they cost to their own group, where a per-token scale would coarsen every dimension.

For a 4:3 photo at ViLT-B/32 size (193 tokens of 768) that is 193 * 1536 bytes in fp16, 193 * 770 in
int8, 193 * 432 in int4-g32 and 193 * 408 in int4-g64. The default (``DEFAULT_CODEC``) was chosen by
measurement: ``retriever.bench.codecs`` measures, ``docs/bench/codecs.md`` holds one run's figures.

Every encoded array is laid out the same way: the scales first (tokens x groups little-endian fp16,
none for fp16), then the values, row by row (int4: two's complement nibbles, the even dimension in the
low nibble). A codec's size is a function of (tokens, hidden) alone,
so the reader needs nothing but the codec id, the token count and the hidden size, which the segment
header and the database hold.

Scales are rounded up to the next fp16, never down, so that no value quantizes past the largest
integer and the error bound holds exactly; an all-zero token gets the smallest positive fp16 as its
scale (it decodes to zeros). Tokens must be finite and within fp16's range (|x| <= 65504) whatever the
codec: they are what the cache stores as fp16 today, and a codec that took what fp16 cannot hold
would make the codecs disagree on what a valid token is. The integer codecs decode to float32: the
reranker copies tokens into float32 anyway, and each decoded value (integer times fp16 scale) is exact
in float32, where fp16 would round it again (and a value within half a step of 65504 may decode just
past fp16's range: finite in float32, infinite if cast to fp16).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Final

import numpy as np
import numpy.typing as npt

from retriever.errors import IndexDamagedError, RetrieverError

__all__ = [
    "CODECS",
    "DEFAULT_CODEC",
    "FP16_MAX",
    "Codec",
    "CodecError",
    "CorruptTokensError",
    "Fp16Codec",
    "Int4Codec",
    "Int8Codec",
    "UnencodableTokensError",
    "UnknownCodecError",
    "codec_by_id",
    "codec_by_name",
]

#: The largest finite fp16; every codec refuses values beyond it.
FP16_MAX: Final = 65504.0
_F16 = np.dtype("<f2")
_TINY_F16 = np.float16(np.nextafter(np.float16(0), np.float16(1)))

Buffer = bytes | bytearray | memoryview


class CodecError(RetrieverError):
    """Tokens a codec cannot store, bytes it did not write, or a codec this version does not know."""


class UnencodableTokensError(CodecError, ValueError):
    """Tokens refused by ``encode``: not a 2-D float16/float32 array, empty, or not finite within fp16."""


class CorruptTokensError(CodecError, IndexDamagedError):
    """Bytes ``decode`` cannot have written for this shape (cut short or too long): a damaged index."""


class UnknownCodecError(CodecError, LookupError):
    """A codec id or name this version does not know (an index written by a newer version, or damage)."""


class Codec(ABC):
    """One way to store an image's (tokens, hidden) visual tokens as bytes.

    ``encode`` and ``decode`` check their input here, once for every codec; subclasses implement only
    the arithmetic (``_encode``, ``_decode``) on checked input.
    """

    #: The name ``--codec`` options and reports use.
    name: str
    #: The number segment headers store; never reused for another format (0 is never a codec, so a
    #: zeroed header cannot pass for one).
    id: int

    @abstractmethod
    def encoded_size(self, n_tokens: int, hidden: int) -> int:
        """Bytes ``encode`` writes for ``n_tokens`` tokens of ``hidden`` dimensions."""

    def encode(self, tokens: npt.NDArray[np.floating]) -> bytes:
        """``tokens`` (n, hidden), float16 or float32, as bytes.

        Raises:
            UnencodableTokensError: not a 2-D float16/float32 array with at least one token and one
                dimension, or a value that is NaN, infinite or beyond fp16's range.
        """
        return self._encode(_checked_tokens(tokens))

    def decode(self, buf: Buffer, n_tokens: int, hidden: int) -> npt.NDArray[np.floating]:
        """The (n_tokens, hidden) tokens ``buf`` holds: float16 for ``fp16``, float32 for the others.

        Raises:
            UnencodableTokensError: a non-positive ``n_tokens`` or ``hidden``.
            CorruptTokensError: ``buf`` is not exactly ``encoded_size(n_tokens, hidden)`` bytes.
        """
        if n_tokens < 1 or hidden < 1:
            raise UnencodableTokensError(f"cannot decode {n_tokens} tokens of {hidden} dimensions")
        nbytes = buf.nbytes if isinstance(buf, memoryview) else len(buf)
        expected = self.encoded_size(n_tokens, hidden)
        if nbytes != expected:
            raise CorruptTokensError(
                f"{self.name} tokens ({n_tokens} x {hidden}) take {expected} bytes, got {nbytes}"
            )
        return self._decode(buf, n_tokens, hidden)

    @abstractmethod
    def _encode(self, tokens: npt.NDArray[np.floating]) -> bytes: ...

    @abstractmethod
    def _decode(self, buf: Buffer, n_tokens: int, hidden: int) -> npt.NDArray[np.floating]: ...

    def __repr__(self) -> str:
        return f"<codec {self.name} (id {self.id})>"


def _checked_tokens(tokens: npt.NDArray[np.floating]) -> npt.NDArray[np.floating]:
    if not isinstance(tokens, np.ndarray):
        raise UnencodableTokensError(f"tokens must be a numpy array, got {type(tokens).__name__}")
    if tokens.dtype not in (np.float16, np.float32):
        raise UnencodableTokensError(f"tokens must be float16 or float32, got {tokens.dtype}")
    if tokens.ndim != 2 or tokens.shape[0] < 1 or tokens.shape[1] < 1:
        raise UnencodableTokensError(f"tokens must be a non-empty (tokens, hidden) array, got {tokens.shape}")
    if tokens.dtype == np.float16:
        # All-ones exponent bits: an infinity or a NaN (numpy's fp16 arithmetic is slow; bits are not).
        fine = not np.any((tokens.view(np.uint16) & np.uint16(0x7C00)) == np.uint16(0x7C00))
    else:
        # NaN fails every comparison, so these two reductions catch it too.
        fine = float(np.max(tokens)) <= FP16_MAX and float(np.min(tokens)) >= -FP16_MAX
    if not fine:
        bad = "NaN" if np.isnan(tokens).any() else "infinite" if np.isinf(tokens).any() else "out of range"
        raise UnencodableTokensError(
            f"tokens must be finite and within +-{FP16_MAX:g} (fp16's range); these hold {bad} values"
        )
    return tokens


def _scales(absmax: npt.NDArray[np.float32], qmax: int) -> npt.NDArray[np.float16]:
    """fp16 scales at least ``absmax / qmax``: rounded up, and never zero."""
    exact = absmax / np.float32(qmax)
    scales = exact.astype(_F16)
    low = scales.astype(np.float32) < exact
    scales[low] = np.nextafter(scales[low], np.float16(np.inf))
    return np.maximum(scales, _TINY_F16)


class Fp16Codec(Codec):
    """Half floats, as the patch cache has always stored them; decoding is a view of the bytes."""

    name = "fp16"
    id = 1

    def encoded_size(self, n_tokens: int, hidden: int) -> int:
        return 2 * n_tokens * hidden

    def _encode(self, tokens: npt.NDArray[np.floating]) -> bytes:
        return np.ascontiguousarray(tokens, dtype=_F16).tobytes()

    def _decode(self, buf: Buffer, n_tokens: int, hidden: int) -> npt.NDArray[np.floating]:
        return np.frombuffer(buf, dtype=_F16, count=n_tokens * hidden).reshape(n_tokens, hidden)


class Int8Codec(Codec):
    """Symmetric int8 with one fp16 scale per token (absolute maximum / 127)."""

    name = "int8"
    id = 2
    qmax = 127

    def encoded_size(self, n_tokens: int, hidden: int) -> int:
        return n_tokens * (hidden + 2)

    def _encode(self, tokens: npt.NDArray[np.floating]) -> bytes:
        x = tokens.astype(np.float32, copy=False)
        scales = _scales(np.max(np.abs(x), axis=1), self.qmax)
        q: npt.NDArray[np.float32] = np.rint(x / scales.astype(np.float32)[:, None])
        np.clip(q, -self.qmax, self.qmax, out=q)
        return scales.tobytes() + q.astype(np.int8).tobytes()

    def _decode(self, buf: Buffer, n_tokens: int, hidden: int) -> npt.NDArray[np.floating]:
        scales = np.frombuffer(buf, dtype=_F16, count=n_tokens)
        q = np.frombuffer(buf, dtype=np.int8, count=n_tokens * hidden, offset=2 * n_tokens)
        out = q.reshape(n_tokens, hidden).astype(np.float32)
        out *= scales.astype(np.float32)[:, None]
        return out


class Int4Codec(Codec):
    """Symmetric 4-bit values (-7..7), two per byte, with one fp16 scale per group of ``group`` dims.

    A hidden size that is not a multiple of the group (or is odd) is padded with zeros to whole groups
    for the arithmetic; only ``ceil(hidden / 2)`` bytes per token are stored, and the last group's
    scale covers the dimensions it has.
    """

    qmax = 7

    def __init__(self, group: int, codec_id: int) -> None:
        if group < 2 or group % 2:
            raise ValueError(f"group size must be even and at least 2, got {group}")
        self.group = group
        self.name = f"int4-g{group}"
        self.id = codec_id

    def _groups(self, hidden: int) -> int:
        return -(-hidden // self.group)

    def encoded_size(self, n_tokens: int, hidden: int) -> int:
        return n_tokens * ((hidden + 1) // 2 + 2 * self._groups(hidden))

    def _encode(self, tokens: npt.NDArray[np.floating]) -> bytes:
        n, hidden = tokens.shape
        groups = self._groups(hidden)
        x = np.zeros((n, groups * self.group), dtype=np.float32)
        x[:, :hidden] = tokens
        grouped = x.reshape(n, groups, self.group)
        scales = _scales(np.max(np.abs(grouped), axis=2), self.qmax)
        q = np.rint(grouped / scales.astype(np.float32)[:, :, None])
        np.clip(q, -self.qmax, self.qmax, out=q)
        # Two's complement nibbles: an int8 in -7..7 keeps its low four bits.
        nib = q.astype(np.int8).view(np.uint8).reshape(n, -1) & np.uint8(0xF)
        packed = nib[:, 0::2] | (nib[:, 1::2] << np.uint8(4))
        return scales.tobytes() + np.ascontiguousarray(packed[:, : (hidden + 1) // 2]).tobytes()

    def _decode(self, buf: Buffer, n_tokens: int, hidden: int) -> npt.NDArray[np.floating]:
        groups = self._groups(hidden)
        half = (hidden + 1) // 2
        scales = np.frombuffer(buf, dtype=_F16, count=n_tokens * groups).reshape(n_tokens, groups)
        packed = np.frombuffer(buf, dtype=np.uint8, count=n_tokens * half, offset=2 * n_tokens * groups)
        # Arithmetic shifts of the bytes as int8 sign-extend each nibble (measured ~6x faster than a
        # 256-entry lookup table on numpy's fancy indexing).
        signed = packed.reshape(n_tokens, half).view(np.int8)
        q = np.empty((n_tokens, groups * self.group), dtype=np.int8)
        q[:, 2 * half :] = 0
        q[:, 0 : 2 * half : 2] = (signed << np.int8(4)) >> np.int8(4)
        q[:, 1 : 2 * half : 2] = signed >> np.int8(4)
        out = q.reshape(n_tokens, groups, self.group).astype(np.float32)
        out *= scales.astype(np.float32)[:, :, None]
        flat = out.reshape(n_tokens, groups * self.group)
        return flat if hidden == flat.shape[1] else np.ascontiguousarray(flat[:, :hidden])


#: Every codec by name; ids are what segment headers store and must never be reused.
CODECS: Final[dict[str, Codec]] = {
    codec.name: codec
    for codec in (Fp16Codec(), Int8Codec(), Int4Codec(group=32, codec_id=3), Int4Codec(group=64, codec_id=4))
}
_BY_ID: Final[dict[int, Codec]] = {codec.id: codec for codec in CODECS.values()}

#: The codec new caches use: the one measured to meet the issue's targets (at most 100 KB for a 4:3 photo
#: at ViLT-B/32 size, the shipped model's Recall@1 within 0.5 points of fp16, no slower rerank) with
#: the smaller error of the two group sizes; the figures are in ``docs/bench/codecs.md``.
DEFAULT_CODEC: Final = "int4-g32"


def codec_by_id(codec_id: int) -> Codec:
    """The codec a segment header names.

    Raises:
        UnknownCodecError: an id no codec of this version has.
    """
    try:
        return _BY_ID[codec_id]
    except KeyError:
        known = ", ".join(f"{c.id} ({c.name})" for c in _BY_ID.values())
        raise UnknownCodecError(f"unknown token codec id {codec_id}; this version knows {known}") from None


def codec_by_name(name: str) -> Codec:
    """The codec called ``name`` (``fp16``, ``int8``, ``int4-g32``, ``int4-g64``).

    Raises:
        UnknownCodecError: a name no codec of this version has.
    """
    try:
        return CODECS[name]
    except KeyError:
        raise UnknownCodecError(f"unknown token codec {name!r}; choose one of {', '.join(CODECS)}") from None
