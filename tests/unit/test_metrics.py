"""Recall@K against a brute-force pure-Python reference, with ties, -inf and five captions per image."""

from __future__ import annotations

import math

import numpy as np
import pytest

from retriever.metrics import MetricsError, RecallResult, image_ranks, recall_at_k, text_ranks

KS = (1, 5, 10)


def _first_right(candidates: list[tuple[float, bool]]) -> int:
    """Position of the first right candidate once sorted by score, wrong ones first among equals."""
    ordered = sorted(candidates, key=lambda c: (-c[0], c[1]))
    return next(position for position, (_, right) in enumerate(ordered) if right)


def reference(
    t2i: list[list[float]], text_image: list[int], i2t: list[list[float]] | None = None
) -> dict[str, float]:
    """Recall@K the slow way: sort every query's candidates and look for a right one."""
    n_texts, n_images = len(t2i), len(t2i[0])
    if i2t is None:
        i2t = [[t2i[t][i] for t in range(n_texts)] for i in range(n_images)]
    ir = [_first_right([(t2i[t][i], i == text_image[t]) for i in range(n_images)]) for t in range(n_texts)]
    tr = [_first_right([(i2t[i][t], text_image[t] == i) for t in range(n_texts)]) for i in range(n_images)]
    out = {}
    for k in KS:
        out[f"tr_r{k}"] = 100.0 * sum(r < k for r in tr) / n_images
        out[f"ir_r{k}"] = 100.0 * sum(r < k for r in ir) / n_texts
    out["rsum"] = sum(out.values())
    return out


def _five_each(n_images: int) -> np.ndarray:
    return np.repeat(np.arange(n_images), 5)


def _assert_matches(result: RecallResult, expected: dict[str, float]) -> None:
    got = result.as_dict()
    assert set(got) == {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum"}
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=1e-9), key


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("chunk_rows", [None, 1, 3, 7])
def test_random_scores_with_ties_and_unscored_pairs_match_reference(
    seed: int, chunk_rows: int | None
) -> None:
    rng = np.random.default_rng(seed)
    n_images = int(rng.integers(3, 25))
    # Varying caption counts per image (COCO has some with 6 or 7), shuffled caption order.
    text_image = rng.permutation(np.repeat(np.arange(n_images), rng.integers(1, 7, size=n_images)))
    n_texts = text_image.size
    # Few distinct values, so ties are everywhere; some pairs unscored.
    t2i = rng.integers(0, 4, size=(n_texts, n_images)).astype(np.float64)
    t2i[rng.random(t2i.shape) < 0.2] = -np.inf
    result = recall_at_k(t2i, text_image, chunk_rows=chunk_rows)
    _assert_matches(result, reference(t2i.tolist(), text_image.tolist()))


@pytest.mark.parametrize("seed", range(4))
def test_separate_i2t_scores_are_used_for_text_retrieval(seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    text_image = _five_each(13)
    t2i = rng.integers(0, 5, size=(65, 13)).astype(np.float32)
    i2t = rng.integers(0, 5, size=(13, 65)).astype(np.float32)
    i2t[rng.random(i2t.shape) < 0.3] = -np.inf
    result = recall_at_k(t2i, text_image, i2t, chunk_rows=4)
    _assert_matches(result, reference(t2i.tolist(), text_image.tolist(), i2t.tolist()))


def _albef_style(t2i: np.ndarray, text_image: np.ndarray) -> dict[str, float]:
    """The argsort loops of ALBEF's `itm_eval`; identical to ours when no scores tie."""
    i2t = t2i.T
    tr = np.array(
        [
            min(np.where(np.argsort(row)[::-1] == t)[0][0] for t in np.flatnonzero(text_image == i))
            for i, row in enumerate(i2t)
        ]
    )
    ir = np.array([np.where(np.argsort(row)[::-1] == text_image[t])[0][0] for t, row in enumerate(t2i)])
    out = {}
    for k in KS:
        out[f"tr_r{k}"] = 100.0 * float(np.mean(tr < k))
        out[f"ir_r{k}"] = 100.0 * float(np.mean(ir < k))
    return out


def test_without_ties_matches_albef_argsort() -> None:
    rng = np.random.default_rng(7)
    text_image = _five_each(40)
    t2i = rng.standard_normal((200, 40))
    t2i[np.arange(200), text_image] += 1.5  # some signal, so recalls are neither 0 nor 100
    result = recall_at_k(t2i, text_image)
    expected = _albef_style(t2i, text_image)
    _assert_matches(result, expected)
    assert 0 < result.ir_r1 < 100 and 0 < result.tr_r1 < 100


def test_perfect_scores_give_600() -> None:
    text_image = _five_each(12)
    t2i = np.where(text_image[:, None] == np.arange(12)[None, :], 1.0, 0.0)
    result = recall_at_k(t2i, text_image)
    assert result.as_dict() == {
        **dict.fromkeys(["tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10"], 100.0),
        "rsum": 600.0,
    }


def test_constant_scores_give_zero_not_hundred() -> None:
    text_image = _five_each(12)
    result = recall_at_k(np.zeros((60, 12)), text_image)
    assert result.rsum == 0.0
    # Ranks: every other candidate ties and counts against the right one.
    assert (image_ranks(np.zeros((60, 12)), text_image) == 11).all()
    assert (text_ranks(np.zeros((12, 60)), text_image) == 55).all()


def test_any_of_five_captions_in_top_k_counts_for_text_retrieval() -> None:
    n_images = 12
    text_image = _five_each(n_images)
    i2t = np.zeros((n_images, 60))
    i2t[0, 40:50] = 5.0  # ten captions of images 8 and 9 above four of image 0's captions
    i2t[0, 2] = 10.0  # but image 0's third caption is the best of all
    i2t[1, 20:30] = 5.0  # ten wrong captions ahead of every caption of image 1 (all zero)
    ranks = text_ranks(i2t, text_image)
    assert ranks[0] == 0
    assert ranks[1] == 10 + 45  # ten above, and the 45 other wrong ones tie at zero
    tr_only = recall_at_k(i2t.T, text_image, i2t)
    # Image 0 is a hit at every K; the other images tie with 55 wrong captions and miss.
    assert tr_only.tr_r1 == pytest.approx(100 / n_images)


def test_own_captions_tied_at_the_top_do_not_push_each_other_down() -> None:
    text_image = _five_each(3)
    i2t = np.zeros((3, 15))
    i2t[0, 0:5] = 1.0
    assert text_ranks(i2t, text_image)[0] == 0


def test_tie_with_a_wrong_candidate_counts_against_the_right_one() -> None:
    text_image = _five_each(20)
    t2i = np.zeros((100, 20))
    t2i[0, 0] = 1.0
    t2i[0, 7] = 1.0  # a wrong image with the same score as the right one
    t2i[0, 8:10] = 2.0
    assert image_ranks(t2i, text_image)[0] == 3


def test_unscored_right_answer_ranks_after_all_scored_ones() -> None:
    text_image = _five_each(20)
    t2i = np.zeros((100, 20))
    t2i[0, 0] = -np.inf
    t2i[0, 15:] = -np.inf
    # 14 finite wrong images above, 5 wrong -inf ones tied: rank 19, a miss even at 10.
    assert image_ranks(t2i, text_image)[0] == 19
    t2i[1, 1] = 0.5
    t2i[1, 2:] = -np.inf
    assert image_ranks(t2i, text_image)[1] == 1  # only image 0 (score 0) is above


def test_float32_and_integer_scores_accepted() -> None:
    text_image = _five_each(6)
    rng = np.random.default_rng(3)
    scores = rng.integers(0, 3, size=(30, 6))
    expected = reference(scores.astype(float).tolist(), text_image.tolist())
    _assert_matches(recall_at_k(scores, text_image), expected)
    _assert_matches(recall_at_k(scores.astype(np.float32), text_image), expected)


def test_default_chunking_equals_one_chunk_on_a_larger_matrix() -> None:
    rng = np.random.default_rng(11)
    n_images = 1500
    text_image = _five_each(n_images)
    t2i = rng.integers(0, 50, size=(5 * n_images, n_images)).astype(np.float32)
    whole = recall_at_k(t2i, text_image, chunk_rows=10**6)
    assert recall_at_k(t2i, text_image) == whole
    assert recall_at_k(t2i, text_image, chunk_rows=37) == whole


def test_rsum_and_as_dict() -> None:
    result = RecallResult(1.0, 2.0, 3.0, 4.0, 5.0, 6.0)
    assert result.rsum == 21.0
    assert result.as_dict()["rsum"] == 21.0
    assert list(result.as_dict()) == ["tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum"]


@pytest.mark.parametrize(
    ("scores", "text_image", "message"),
    [
        (np.zeros((10, 2)), np.repeat(np.arange(2), 4), "one entry per caption"),
        (np.zeros((10, 3)), np.repeat(np.arange(2), 5), "image 2 has no caption"),
        (np.zeros((10, 2)), np.repeat(np.arange(1, 3), 5), "outside"),
        (np.zeros((10, 2)), np.repeat(np.arange(2), 5).astype(float), "integers"),
        (np.zeros(10), np.repeat(np.arange(2), 5), "2-D"),
        (np.full((10, 2), math.nan), np.repeat(np.arange(2), 5), "NaN"),
    ],
)
def test_inconsistent_inputs_raise(scores: np.ndarray, text_image: np.ndarray, message: str) -> None:
    with pytest.raises(MetricsError, match=message):
        recall_at_k(scores, text_image)


def test_i2t_of_the_wrong_shape_raises() -> None:
    text_image = _five_each(2)
    with pytest.raises(MetricsError):
        recall_at_k(np.zeros((10, 2)), text_image, np.zeros((10, 2)))
