"""Tests for retriever.index.patches: the append-only, memory-mapped fp16 patch-embedding cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retriever.index.patches import DTYPE, PatchCache

HIDDEN = 12


def _arrays(seed: int, tokens: list[int], hidden: int = HIDDEN) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((t, hidden)) * 4).astype(np.float32) for t in tokens]


def _cache(tmp_path: Path, hidden: int = HIDDEN) -> PatchCache:
    return PatchCache(tmp_path / "sub" / f"patches-{hidden}.f16", hidden)


def test_append_then_load_equals_fp16_rounding(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    arrays = _arrays(1, [5, 1, 17, 3])
    arrays.append(np.asfortranarray(_arrays(2, [6])[0].astype(np.float64)))  # other dtype and layout
    extents = cache.append(arrays)
    assert cache.path.exists()  # the parent folder is created
    loaded = cache.load(extents)
    assert len(loaded) == len(arrays)
    for a, got in zip(arrays, loaded, strict=True):
        assert got.dtype == np.float16
        assert got.shape == a.shape
        np.testing.assert_array_equal(got, a.astype(np.float16))


def test_extents_are_contiguous_across_appends(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    assert cache.rows == 0
    assert cache.nbytes == 0
    first = cache.append(_arrays(1, [4, 2, 9]))
    assert first == [(0, 4), (4, 2), (6, 9)]
    second = cache.append(_arrays(2, [3, 1]))
    assert second == [(15, 3), (18, 1)]
    assert cache.rows == 19
    assert cache.nbytes == 19 * HIDDEN * DTYPE.itemsize
    # A new cache object over the same file continues where the file ends.
    again = PatchCache(cache.path, HIDDEN)
    assert again.append(_arrays(3, [2])) == [(19, 2)]


def test_extents_address_the_right_rows_in_any_order(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    arrays = _arrays(4, [3, 8, 1, 5, 2])
    extents = cache.append(arrays)
    order = [4, 0, 2, 4, 1, 3]
    loaded = cache.load([extents[i] for i in order])
    for i, got in zip(order, loaded, strict=True):
        np.testing.assert_array_equal(got, arrays[i].astype(np.float16))
    # Whole-file view equals the concatenation of every run.
    (whole,) = cache.load([(0, cache.rows)])
    np.testing.assert_array_equal(whole, np.concatenate(arrays).astype(np.float16))


def test_loads_are_read_only_views_without_copies(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    arrays = _arrays(5, [6, 4])
    extents = cache.append(arrays)
    a1, b1 = cache.load(extents)
    a2, (whole,) = cache.load(extents[:1])[0], cache.load([(0, 10)])
    for view in (a1, b1, a2, whole):
        assert isinstance(view, np.memmap)
        assert not view.flags.owndata
        assert not view.flags.writeable
    # Two loads of the same run, and a run and the whole file, share the same mapped bytes.
    assert np.shares_memory(a1, a2)
    assert np.shares_memory(a1, whole)
    assert np.shares_memory(b1, whole)
    assert not np.shares_memory(a1, b1)
    with pytest.raises(ValueError):
        a1[0, 0] = 1.0
    np.testing.assert_array_equal(a1, arrays[0].astype(np.float16))


def test_torn_trailing_row_is_padded_and_earlier_data_intact(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    first = _arrays(6, [3, 4])
    extents = cache.append(first)
    row_bytes = HIDDEN * DTYPE.itemsize
    # A crash mid-write leaves a few bytes of a row that was never finished.
    with open(cache.path, "ab") as f:
        f.write(b"\xde\xad\xbe\xef\x01")
    assert cache.nbytes == 7 * row_bytes + 5
    assert cache.rows == 7  # the torn row does not count
    np.testing.assert_array_equal(cache.load(extents)[1], first[1].astype(np.float16))
    second = _arrays(7, [2, 5])
    new_extents = cache.append(second)
    assert new_extents == [(8, 2), (10, 5)]  # the torn row is padded out and skipped
    assert cache.nbytes == 15 * row_bytes
    assert cache.rows == 15
    for a, got in zip(first + second, cache.load(extents + new_extents), strict=True):
        np.testing.assert_array_equal(got, a.astype(np.float16))


def test_cache_remaps_after_growing(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    first = _arrays(8, [5])
    (e1,) = cache.append(first)
    (got1,) = cache.load([e1])  # maps the 5-row file
    np.testing.assert_array_equal(got1, first[0].astype(np.float16))
    second = _arrays(9, [7, 2])
    e2 = cache.append(second)
    got2 = cache.load(e2)  # needs rows beyond the first mapping
    for a, got in zip(second, got2, strict=True):
        np.testing.assert_array_equal(got, a.astype(np.float16))
    np.testing.assert_array_equal(cache.load([e1])[0], first[0].astype(np.float16))
    np.testing.assert_array_equal(got1, first[0].astype(np.float16))  # the old view stays valid


def test_other_cache_object_sees_appends(tmp_path: Path) -> None:
    writer = _cache(tmp_path)
    reader = PatchCache(writer.path, HIDDEN)
    first = _arrays(10, [2])
    e1 = writer.append(first)
    np.testing.assert_array_equal(reader.load(e1)[0], first[0].astype(np.float16))
    second = _arrays(11, [3])
    e2 = writer.append(second)
    np.testing.assert_array_equal(reader.load(e2)[0], second[0].astype(np.float16))


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((3, HIDDEN + 1), dtype=np.float32),
        np.zeros((3, HIDDEN - 1), dtype=np.float32),
        np.zeros(HIDDEN, dtype=np.float32),
        np.zeros((2, HIDDEN, 1), dtype=np.float32),
    ],
    ids=["wide", "narrow", "1d", "3d"],
)
def test_wrong_shapes_raise_and_write_nothing(tmp_path: Path, bad: np.ndarray) -> None:
    cache = _cache(tmp_path)
    good = _arrays(12, [2])
    cache.append(good)
    size = cache.nbytes
    with pytest.raises(ValueError):
        cache.append([*_arrays(13, [4]), bad])  # a valid array before the bad one is not written either
    assert cache.nbytes == size


def test_non_positive_hidden_raises(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        PatchCache(tmp_path / "p.f16", 0)
    with pytest.raises(ValueError):
        PatchCache(tmp_path / "p.f16", -4)


def test_loading_past_the_end_raises_index_error(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    with pytest.raises(IndexError):
        cache.load([(0, 1)])  # no file yet
    cache.append(_arrays(14, [4, 3]))
    cache.load([(0, 7)])  # the whole file is fine (and maps it)
    with pytest.raises(IndexError):
        cache.load([(0, 8)])
    with pytest.raises(IndexError):
        cache.load([(7, 1)])
    with pytest.raises(IndexError):
        cache.load([(0, 2), (6, 5)])
    # A torn partial row is not loadable either.
    with open(cache.path, "ab") as f:
        f.write(b"\x00" * (HIDDEN * DTYPE.itemsize - 1))
    with pytest.raises(IndexError):
        cache.load([(7, 1)])


def test_load_of_no_extents_is_empty(tmp_path: Path) -> None:
    cache = _cache(tmp_path)
    assert cache.load([]) == []
