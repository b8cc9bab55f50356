"""Tests for retriever.index.vectors: FAISS search against brute force, persistence by generation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from retriever.index.vectors import VectorIndex, generation_path, load_generation, save_generation

SCORE_ATOL = 1e-5
#: Two brute-force scores closer than this count as tied: either id is a correct answer there.
TIE_GAP = 1e-4


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    out: np.ndarray = (x / norms).astype(np.float32)
    return out


def _all_ids(index: VectorIndex) -> np.ndarray:
    """Every id in the index, found through search alone."""
    if len(index) == 0:
        return np.zeros(0, dtype=np.int64)
    _, ids = index.search(np.ones((1, index.dim), dtype=np.float32), len(index) + 3)
    return np.sort(ids[0][ids[0] >= 0])


def _assert_matches_brute_force(
    scores: np.ndarray,
    ids: np.ndarray,
    queries: np.ndarray,
    base_ids: np.ndarray,
    base: np.ndarray,
    k: int,
) -> None:
    """FAISS (scores, ids) against an exact numpy top-k over (base_ids, base)."""
    n = len(base_ids)
    kk = min(k, n)
    assert scores.shape == ids.shape == (len(queries), kk)
    truth = queries.astype(np.float64) @ base.astype(np.float64).T  # (q, n)
    row_of = {int(i): row for i, row in zip(base_ids, range(n), strict=True)}
    for q in range(len(queries)):
        order = np.argsort(-truth[q], kind="stable")
        expected_scores = truth[q][order[:kk]]
        np.testing.assert_allclose(scores[q], expected_scores, rtol=0, atol=SCORE_ATOL)
        got = ids[q]
        assert len(set(got.tolist())) == kk, f"duplicate ids in row {q}: {got}"
        # Every returned id is in the index and carries the score FAISS reports for it.
        for j, i in enumerate(got.tolist()):
            assert i in row_of, f"id {i} is not in the index"
            assert abs(truth[q][row_of[i]] - scores[q][j]) <= SCORE_ATOL
        # Where a rank is clearly separated from its neighbours (and from rank k+1), the id must match.
        padded = np.concatenate([[np.inf], truth[q][order], [-np.inf]])
        for j in range(kk):
            s = padded[j + 1]
            if s - padded[j + 2] > TIE_GAP and padded[j] - s > TIE_GAP:
                assert got[j] == base_ids[order[j]], f"rank {j} of query {q}"


@pytest.mark.parametrize(
    ("n", "dim", "k"),
    [
        (1, 8, 1),
        (1, 8, 5),
        (7, 3, 3),
        (7, 3, 50),
        (100, 16, 1),
        (257, 17, 10),
        (1023, 64, 32),
        (1025, 129, 1025),
        (33, 1, 4),  # dim 1: every score is ±1, so nearly everything is tied
    ],
)
def test_search_equals_brute_force(n: int, dim: int, k: int) -> None:
    rng = np.random.default_rng(n * 1000 + dim)
    base = _unit(rng, n, dim)
    ids = np.arange(n, dtype=np.int64)
    index = VectorIndex(dim)
    index.add(ids, base)
    assert len(index) == n
    queries = _unit(rng, 11, dim)
    scores, got = index.search(queries, k)
    _assert_matches_brute_force(scores, got, queries, ids, base, k)


def test_search_queries_are_indexed_vectors_find_themselves() -> None:
    rng = np.random.default_rng(5)
    base = _unit(rng, 200, 32)
    index = VectorIndex(32)
    index.add(np.arange(200, dtype=np.int64), base)
    scores, ids = index.search(base, 1)
    np.testing.assert_array_equal(ids[:, 0], np.arange(200))
    np.testing.assert_allclose(scores[:, 0], 1.0, rtol=0, atol=SCORE_ATOL)


def test_search_accepts_float64_and_non_contiguous_queries() -> None:
    rng = np.random.default_rng(6)
    base = _unit(rng, 50, 12)
    index = VectorIndex(12)
    index.add(np.arange(50, dtype=np.int64), base.astype(np.float64))
    queries = np.asfortranarray(_unit(rng, 6, 12).astype(np.float64))
    scores, ids = index.search(queries, 5)
    _assert_matches_brute_force(scores, ids, queries, np.arange(50), base, 5)


def test_empty_index_search_returns_no_ids() -> None:
    index = VectorIndex(4)
    assert len(index) == 0
    _, ids = index.search(np.ones((3, 4), dtype=np.float32), 10)
    assert ids.shape[0] == 3
    assert (ids == -1).all()


def test_add_and_remove_then_search_equals_brute_force_over_remaining() -> None:
    rng = np.random.default_rng(11)
    n, dim = 600, 24
    base = _unit(rng, n, dim)
    ids = np.arange(n, dtype=np.int64) * 3 + 1
    index = VectorIndex(dim)
    index.add(ids[:400], base[:400])
    index.add(ids[400:], base[400:])  # a second add extends the first
    removed = rng.choice(ids, size=230, replace=False)
    absent = np.array([0, 2, 10**9], dtype=np.int64)  # never added
    assert index.remove(np.concatenate([removed, absent])) == len(removed)
    assert index.remove(removed[:5]) == 0  # already gone
    assert index.remove(np.zeros(0, dtype=np.int64)) == 0
    keep = ~np.isin(ids, removed)
    assert len(index) == int(keep.sum())
    np.testing.assert_array_equal(_all_ids(index), np.sort(ids[keep]))
    queries = _unit(rng, 9, dim)
    for k in (1, 7, 1000):
        scores, got = index.search(queries, k)
        _assert_matches_brute_force(scores, got, queries, ids[keep], base[keep], k)
    # Re-adding removed ids with new vectors makes them searchable again under the new vectors.
    fresh = _unit(rng, 5, dim)
    index.add(removed[:5], fresh)
    scores, got = index.search(fresh, 1)
    np.testing.assert_array_equal(got[:, 0], removed[:5])
    np.testing.assert_allclose(scores[:, 0], 1.0, rtol=0, atol=SCORE_ATOL)


def test_add_of_nothing_is_a_no_op() -> None:
    index = VectorIndex(5)
    index.add(np.zeros(0, dtype=np.int64), np.zeros((0, 5), dtype=np.float32))
    assert len(index) == 0


def test_large_sparse_int64_ids() -> None:
    rng = np.random.default_rng(12)
    n, dim = 300, 16
    ids = np.unique(rng.integers(2**40, 2**62, size=n, dtype=np.int64))
    ids = np.concatenate([ids, np.array([2**63 - 1, 2**31, 2**32 + 1], dtype=np.int64)])
    rng.shuffle(ids)
    base = _unit(rng, len(ids), dim)
    index = VectorIndex(dim)
    index.add(ids, base)
    np.testing.assert_array_equal(_all_ids(index), np.sort(ids))
    queries = _unit(rng, 8, dim)
    scores, got = index.search(queries, 20)
    _assert_matches_brute_force(scores, got, queries, ids, base, 20)
    # Each indexed vector finds its own (huge) id.
    scores, got = index.search(base, 1)
    np.testing.assert_array_equal(got[:, 0], ids)
    assert index.remove(ids[:10]) == 10
    keep = np.ones(len(ids), dtype=bool)
    keep[:10] = False
    scores, got = index.search(queries, 20)
    _assert_matches_brute_force(scores, got, queries, ids[keep], base[keep], 20)


def test_save_load_round_trip_is_atomic(tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    dim = 20
    ids = rng.choice(10**12, size=150, replace=False).astype(np.int64)
    base = _unit(rng, 150, dim)
    index = VectorIndex(dim)
    index.add(ids, base)
    index.remove(ids[:15])
    path = tmp_path / "images-4.faiss"
    index.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images-4.faiss"]  # no .tmp left behind
    loaded = VectorIndex.load(path, dim)
    assert loaded.dim == dim
    assert len(loaded) == 135
    np.testing.assert_array_equal(_all_ids(loaded), np.sort(ids[15:]))
    queries = _unit(rng, 7, dim)
    scores, got = loaded.search(queries, 12)
    _assert_matches_brute_force(scores, got, queries, ids[15:], base[15:], 12)
    # Saving over an existing file replaces it, still without leftovers.
    loaded.add(ids[:15], base[:15])
    loaded.save(path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images-4.faiss"]
    assert len(VectorIndex.load(path, dim)) == 150


def test_load_with_wrong_dimension_raises(tmp_path: Path) -> None:
    index = VectorIndex(6)
    index.add(np.arange(3, dtype=np.int64), np.eye(6, dtype=np.float32)[:3])
    path = tmp_path / "x.faiss"
    index.save(path)
    with pytest.raises(ValueError, match="6-dimensional"):
        VectorIndex.load(path, 7)


def test_generation_path_names_kind_and_generation(tmp_path: Path) -> None:
    assert generation_path(tmp_path, "images", 12) == tmp_path / "images-12.faiss"
    assert generation_path(tmp_path, "texts", 0) == tmp_path / "texts-0.faiss"


def test_load_generation_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(14)
    base = _unit(rng, 40, 8)
    index = VectorIndex(8)
    index.add(np.arange(40, dtype=np.int64) + 100, base)
    path = save_generation(index, tmp_path, "images", 3)
    assert path == generation_path(tmp_path, "images", 3)
    loaded = load_generation(tmp_path, "images", 3, 8)
    assert loaded is not None
    np.testing.assert_array_equal(_all_ids(loaded), np.arange(40) + 100)


def test_load_generation_missing_returns_none(tmp_path: Path) -> None:
    index = VectorIndex(8)
    save_generation(index, tmp_path, "images", 3)
    assert load_generation(tmp_path, "images", 4, 8) is None  # other generation
    assert load_generation(tmp_path, "texts", 3, 8) is None  # other kind
    assert load_generation(tmp_path / "nowhere", "images", 3, 8) is None


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "wrong_dim"])
def test_load_generation_unreadable_returns_none(tmp_path: Path, damage: str) -> None:
    rng = np.random.default_rng(15)
    index = VectorIndex(8)
    index.add(np.arange(30, dtype=np.int64), _unit(rng, 30, 8))
    path = save_generation(index, tmp_path, "images", 2)
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(bytes(rng.integers(0, 256, size=len(good), dtype=np.uint8)))
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    else:
        assert load_generation(tmp_path, "images", 2, 9) is None
        return
    assert load_generation(tmp_path, "images", 2, 8) is None


def test_save_generation_deletes_older_generations_of_same_kind_only(tmp_path: Path) -> None:
    index = VectorIndex(4)
    index.add(np.arange(2, dtype=np.int64), np.eye(4, dtype=np.float32)[:2])
    for gen in (1, 2, 10):
        save_generation(index, tmp_path, "images", gen)
    save_generation(index, tmp_path, "texts", 1)
    (tmp_path / "unrelated.txt").write_text("keep me")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images-10.faiss", "texts-1.faiss", "unrelated.txt"]
    save_generation(index, tmp_path, "images", 11)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images-11.faiss", "texts-1.faiss", "unrelated.txt"]
    assert load_generation(tmp_path, "images", 10, 4) is None
    assert load_generation(tmp_path, "images", 11, 4) is not None
    assert load_generation(tmp_path, "texts", 1, 4) is not None


def test_shape_errors_raise_value_error() -> None:
    with pytest.raises(ValueError):
        VectorIndex(0)
    with pytest.raises(ValueError):
        VectorIndex(-3)
    index = VectorIndex(4)
    with pytest.raises(ValueError):
        index.add(np.arange(2, dtype=np.int64), np.zeros((2, 5), dtype=np.float32))  # wrong dim
    with pytest.raises(ValueError):
        index.add(np.arange(3, dtype=np.int64), np.zeros((2, 4), dtype=np.float32))  # count mismatch
    with pytest.raises(ValueError):
        index.add(np.arange(4, dtype=np.int64), np.zeros(4, dtype=np.float32))  # 1-D
    with pytest.raises(ValueError):
        index.add(np.arange(2, dtype=np.int64), np.zeros((2, 4, 1), dtype=np.float32))  # 3-D
    assert len(index) == 0  # nothing half-added
    index.add(np.arange(2, dtype=np.int64), np.eye(4, dtype=np.float32)[:2])
    with pytest.raises(ValueError):
        index.search(np.zeros(4, dtype=np.float32), 1)  # 1-D query
    with pytest.raises(ValueError):
        index.search(np.zeros((1, 3), dtype=np.float32), 1)  # wrong dim


def test_vector_index_turns_ivf_at_threshold_and_keeps_recall(tmp_path: Path) -> None:
    from retriever.bench.synthetic import synthetic_vectors

    n, dim = 4000, 32
    x = synthetic_vectors(n, dim, clustered=True, seed=0)
    ids = np.arange(n, dtype=np.int64) * 3
    exact = VectorIndex(dim, approx_min=None)
    exact.add(ids, x)
    approx = VectorIndex(dim, approx_min=3000)
    approx.add(ids[:2000], x[:2000])
    assert approx.exact
    approx.add(ids[2000:], x[2000:])
    assert not approx.exact and len(approx) == n
    queries = x[:50] + np.float32(0.01)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _, truth = exact.search(queries, 16)
    _, found = approx.search(queries, 16)
    recall = np.mean([len(set(truth[i]) & set(found[i])) / 16 for i in range(50)])
    assert recall >= 0.9
    # Removal, saving and loading work on the IVF index too.
    assert approx.remove(ids[:10]) == 10 and len(approx) == n - 10
    path = tmp_path / "ivf.faiss"
    approx.save(path)
    again = VectorIndex.load(path, dim)
    assert not again.exact and len(again) == n - 10
    _, top = again.search(x[20:21], 1)
    assert top[0, 0] == ids[20]
