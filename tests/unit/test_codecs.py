"""Tests for retriever.index.codecs: round trips, error bounds against the input, refusals.

The property tests use hypothesis (installed with the dev extras, through schemathesis): shapes and
seeds are drawn by hypothesis, the values by a seeded numpy generator, so a failure replays exactly.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from retriever.errors import IndexDamagedError, RetrieverError
from retriever.index.codecs import (
    CODECS,
    DEFAULT_CODEC,
    FP16_MAX,
    Codec,
    CorruptTokensError,
    Int4Codec,
    Int8Codec,
    UnencodableTokensError,
    UnknownCodecError,
    codec_by_id,
    codec_by_name,
)

ALL = list(CODECS.values())
QUANTIZED = [c for c in ALL if isinstance(c, Int8Codec | Int4Codec)]
#: Relative slack on the half-a-step bound: x / scale is rounded to float32 before ``rint``.
SLACK = 1e-5
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _ids(codecs: list[Codec]) -> list[str]:
    return [c.name for c in codecs]


def _tokens(seed: int, n: int, hidden: int, dtype: type[np.floating], magnitude: float) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, hidden)) * magnitude
    return np.clip(x, -FP16_MAX, FP16_MAX).astype(dtype)


def _scales(codec: Codec, buf: bytes, n: int, hidden: int) -> npt.NDArray[np.float64]:
    """Each value's scale as stored in ``buf``: (n, hidden), repeated over a token or a group."""
    if isinstance(codec, Int8Codec):
        per_token = np.frombuffer(buf, dtype="<f2", count=n).astype(np.float64)
        return np.repeat(per_token[:, None], hidden, axis=1)
    assert isinstance(codec, Int4Codec)
    groups = math.ceil(hidden / codec.group)
    grouped = np.frombuffer(buf, dtype="<f2", count=n * groups).astype(np.float64).reshape(n, groups)
    return np.repeat(grouped, codec.group, axis=1)[:, :hidden]


def _check_round_trip(codec: Codec, tokens: np.ndarray) -> None:
    """Size, shape, dtype, and the error bound of ``codec`` on ``tokens``."""
    n, hidden = tokens.shape
    buf = codec.encode(tokens)
    assert len(buf) == codec.encoded_size(n, hidden)
    got = codec.decode(buf, n, hidden)
    assert got.shape == (n, hidden)
    assert got.flags.c_contiguous
    x = tokens.astype(np.float64)
    if codec.name == "fp16":
        assert got.dtype == np.float16
        np.testing.assert_array_equal(got, tokens.astype(np.float16))
        return
    assert got.dtype == np.float32
    assert np.isfinite(got).all()
    scales = _scales(codec, buf, n, hidden)
    qmax = Int8Codec.qmax if isinstance(codec, Int8Codec) else Int4Codec.qmax
    # Scales cover the largest value they serve, and are at most one fp16 step above what it needs.
    if isinstance(codec, Int8Codec):
        absmax = np.repeat(np.abs(x).max(axis=1, keepdims=True), hidden, axis=1)
    else:
        assert isinstance(codec, Int4Codec)
        groups = math.ceil(hidden / codec.group)
        padded = np.zeros((n, groups * codec.group))
        padded[:, :hidden] = np.abs(x)
        per_group = padded.reshape(n, groups, codec.group).max(axis=2)
        absmax = np.repeat(per_group, codec.group, axis=1)[:, :hidden]
    assert (scales * qmax >= absmax * (1 - 1e-7)).all()
    tiny = float(np.nextafter(np.float16(0), np.float16(1)))
    assert (scales <= absmax / qmax * (1 + 2.0**-10) + tiny).all()
    err = np.abs(got.astype(np.float64) - x)
    assert (err <= scales / 2 * (1 + SLACK)).all(), float((err / scales).max())


# -- the registry and the sizes ----------------------------------------------------------------------


def test_registry_names_and_ids_are_unique_and_round_trip() -> None:
    assert len({c.id for c in ALL}) == len(ALL)
    assert all(c.id > 0 for c in ALL), "0 is never a codec: a zeroed header must not pass for one"
    for codec in ALL:
        assert codec_by_id(codec.id) is codec
        assert codec_by_name(codec.name) is codec
    assert DEFAULT_CODEC in CODECS


def test_unknown_codecs_are_project_errors() -> None:
    with pytest.raises(UnknownCodecError, match="unknown token codec id 99") as info:
        codec_by_id(99)
    assert isinstance(info.value, RetrieverError)
    with pytest.raises(UnknownCodecError, match="int3"):
        codec_by_name("int3")


@pytest.mark.parametrize("n, hidden", [(193, 768), (145, 768), (217, 768), (1, 1), (7, 100), (73, 128)])
def test_encoded_sizes_follow_the_formulas(n: int, hidden: int) -> None:
    assert codec_by_name("fp16").encoded_size(n, hidden) == 2 * n * hidden
    assert codec_by_name("int8").encoded_size(n, hidden) == n * (hidden + 2)
    for group in (32, 64):
        want = n * (math.ceil(hidden / 2) + 2 * math.ceil(hidden / group))
        assert codec_by_name(f"int4-g{group}").encoded_size(n, hidden) == want


def test_default_codec_meets_the_size_target_for_a_4_3_photo() -> None:
    # The target: at most 100 KB for a 4:3 photo at ViLT-B/32 size (1 + 16 x 12 tokens of 768).
    assert codec_by_name(DEFAULT_CODEC).encoded_size(193, 768) <= 100 * 1024


# -- round trips and error bounds --------------------------------------------------------------------


@pytest.mark.parametrize("codec", ALL, ids=_ids(ALL))
@given(
    n=st.integers(1, 300),
    groups=st.integers(1, 16),
    seed=st.integers(0, 2**32 - 1),
    dtype=st.sampled_from([np.float16, np.float32]),
    log_magnitude=st.floats(-6, 4),
)
@PROPERTY
def test_round_trip_on_random_tokens(
    codec: Codec, n: int, groups: int, seed: int, dtype: type[np.floating], log_magnitude: float
) -> None:
    # hidden 64 .. 1024 in multiples of 64: whole groups for every int4 codec.
    _check_round_trip(codec, _tokens(seed, n, 64 * groups, dtype, 10.0**log_magnitude))


@pytest.mark.parametrize("codec", ALL, ids=_ids(ALL))
@given(
    n=st.integers(1, 40),
    hidden=st.integers(1, 200),
    seed=st.integers(0, 2**32 - 1),
    log_magnitude=st.floats(-3, 3),
)
@PROPERTY
def test_round_trip_with_any_hidden_size(
    codec: Codec, n: int, hidden: int, seed: int, log_magnitude: float
) -> None:
    # Odd sizes and sizes that are no multiple of the group are padded to whole groups, not refused.
    _check_round_trip(codec, _tokens(seed, n, hidden, np.float32, 10.0**log_magnitude))


@pytest.mark.parametrize("codec", ALL, ids=_ids(ALL))
@given(
    tokens=hnp.arrays(
        dtype=st.sampled_from([np.float16, np.float32]),
        shape=hnp.array_shapes(min_dims=2, max_dims=2, min_side=1, max_side=70),
        elements=st.floats(-FP16_MAX, FP16_MAX, allow_nan=False, width=16),
    )
)
@PROPERTY
def test_round_trip_on_arbitrary_finite_values(codec: Codec, tokens: np.ndarray) -> None:
    # Subnormals, zeros, +-65504 and repeated values side by side, as hypothesis likes to draw them.
    _check_round_trip(codec, tokens)


@pytest.mark.parametrize("codec", ALL, ids=_ids(ALL))
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_extreme_values(codec: Codec, dtype: type[np.floating]) -> None:
    extremes = np.array([[FP16_MAX, -FP16_MAX] * 32, [0.0] * 64, [-FP16_MAX] + [1e-3] * 63], dtype=dtype)
    _check_round_trip(codec, extremes)
    got = codec.decode(codec.encode(extremes), *extremes.shape)
    # float32 out: within half a step of +-65504, which may lie past fp16's range (never inf).
    assert np.isfinite(got).all()
    assert not got[1].any(), "an all-zero token decodes to zeros"


@pytest.mark.parametrize("codec", ALL, ids=_ids(ALL))
def test_all_zero_tokens_decode_to_zeros(codec: Codec) -> None:
    zeros = np.zeros((5, 96), dtype=np.float32)
    got = codec.decode(codec.encode(zeros), 5, 96)
    assert not got.any()


def test_one_outlier_dimension_costs_only_its_own_group() -> None:
    # ViLT tokens can have a few dimensions far larger than the rest. One scale per token spreads the
    # outlier's step over every dimension; one per group keeps it to the outlier's own group.
    rng = np.random.default_rng(7)
    tokens = rng.standard_normal((50, 768)).astype(np.float32)
    tokens[:, 5] = 300.0
    for codec in QUANTIZED:
        _check_round_trip(codec, tokens)
    err8 = np.abs(codec_by_name("int8").decode(codec_by_name("int8").encode(tokens), 50, 768) - tokens)
    for name in ("int4-g32", "int4-g64"):
        int4 = codec_by_name(name)
        assert isinstance(int4, Int4Codec)
        err4 = np.abs(int4.decode(int4.encode(tokens), 50, 768) - tokens)
        rest = err4[:, int4.group :]  # every group but the outlier's
        assert rest.max() < err8[:, int4.group :].max(), name
        assert rest.max() <= np.abs(tokens[:, int4.group :]).max() / 7 / 2 * (1 + 2.0**-10 + SLACK)


def test_fp16_decoding_is_a_view_of_the_buffer() -> None:
    codec = codec_by_name("fp16")
    tokens = _tokens(3, 9, 32, np.float32, 2.0)
    buf = bytearray(codec.encode(tokens))
    got = codec.decode(buf, 9, 32)
    buf[0:2] = np.float16(42.0).tobytes()
    assert got[0, 0] == 42.0, "a view, not a copy"


@pytest.mark.parametrize("codec", ALL, ids=_ids(ALL))
def test_decode_takes_memoryviews_of_a_larger_buffer(codec: Codec) -> None:
    tokens = _tokens(4, 11, 96, np.float32, 3.0)
    buf = codec.encode(tokens)
    mapped = bytearray(b"\xff" * 7 + buf + b"\xee" * 5)  # like a slice of a mapped file
    view = memoryview(mapped)[7 : 7 + len(buf)]
    np.testing.assert_array_equal(codec.decode(view, 11, 96), codec.decode(buf, 11, 96))


@pytest.mark.parametrize("codec", ALL, ids=_ids(ALL))
def test_non_contiguous_tokens_are_encoded_as_their_values(codec: Codec) -> None:
    tokens = _tokens(5, 64, 40, np.float32, 1.0)
    strided = tokens.T[:, ::2]  # (40, 32), neither C nor F contiguous
    assert codec.encode(strided) == codec.encode(np.ascontiguousarray(strided))


# -- refusals -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ALL, ids=_ids(ALL))
@pytest.mark.parametrize("dtype", [np.float16, np.float32])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_tokens_are_refused(codec: Codec, dtype: type[np.floating], bad: float) -> None:
    tokens = np.ones((4, 64), dtype=dtype)
    tokens[2, 17] = bad
    with pytest.raises(UnencodableTokensError, match="finite") as info:
        codec.encode(tokens)
    assert isinstance(info.value, RetrieverError)


@pytest.mark.parametrize("codec", ALL, ids=_ids(ALL))
def test_values_beyond_fp16_range_are_refused(codec: Codec) -> None:
    tokens = np.ones((2, 64), dtype=np.float32)
    tokens[1, 3] = -70000.0
    with pytest.raises(UnencodableTokensError, match="out of range"):
        codec.encode(tokens)


@pytest.mark.parametrize("codec", ALL, ids=_ids(ALL))
@pytest.mark.parametrize(
    "tokens",
    [
        np.ones((3, 64), dtype=np.float64),
        np.ones((3, 64), dtype=np.int32),
        np.ones(64, dtype=np.float32),
        np.ones((2, 3, 64), dtype=np.float32),
        np.ones((0, 64), dtype=np.float32),
        np.ones((3, 0), dtype=np.float32),
        [[1.0, 2.0]],
    ],
    ids=["float64", "int32", "1-d", "3-d", "no tokens", "no dims", "a list"],
)
def test_wrong_shapes_and_dtypes_are_refused(codec: Codec, tokens: object) -> None:
    with pytest.raises(UnencodableTokensError):
        codec.encode(tokens)  # type: ignore[arg-type]


@pytest.mark.parametrize("codec", ALL, ids=_ids(ALL))
def test_buffers_of_the_wrong_size_are_refused_as_damage(codec: Codec) -> None:
    tokens = _tokens(6, 10, 128, np.float32, 1.0)
    buf = codec.encode(tokens)
    for wrong in (buf[:-1], buf + b"\0", b"", buf[: len(buf) // 2]):
        with pytest.raises(CorruptTokensError, match=f"{codec.name} tokens") as info:
            codec.decode(wrong, 10, 128)
        assert isinstance(info.value, IndexDamagedError)
    with pytest.raises(CorruptTokensError):
        codec.decode(buf, 11, 128)  # a token count the bytes do not hold
    with pytest.raises(UnencodableTokensError):
        codec.decode(buf, 0, 128)
