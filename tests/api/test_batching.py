"""The rerank micro-batcher: concurrent callers share forward passes and get the unbatched scores."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest

from retriever.api.batching import MicroBatcher
from retriever.errors import RetrieverError
from tests.api.conftest import CountingReranker
from tests.conftest import random_image


def _requests(reranker: Any, n: int) -> list[tuple[list[str], list[np.ndarray], list[tuple[int, int]]]]:
    """n different requests: 1 or 2 texts against 2 to 4 images of different token counts."""
    images = [reranker.embed_image(random_image(i, (64 + 16 * (i % 3), 64))) for i in range(6)]
    out = []
    for r in range(n):
        texts = [f"query number {r}", "a red square"][: 1 + r % 2]
        imgs = images[r % 3 : r % 3 + 2 + r % 3]
        pairs = [(t, i) for t in range(len(texts)) for i in range(len(imgs))]
        out.append((texts, imgs, pairs))
    return out


def test_concurrent_callers_share_batches_and_scores(tiny_models: tuple[Any, Any]) -> None:
    _, rer = tiny_models
    n = 8
    requests = _requests(rer, n)
    expected = [rer.score_pairs(*req) for req in requests]
    counting = CountingReranker(rer)
    batcher = MicroBatcher(counting, max_pairs=1000, max_wait_s=0.2)
    results: list[np.ndarray | None] = [None] * n
    start = threading.Barrier(n)

    def call(i: int) -> None:
        start.wait()
        results[i] = batcher.score_pairs(*requests[i])

    threads = [threading.Thread(target=call, args=(i,)) for i in range(n)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        batcher.close()
    assert counting.calls < n
    assert counting.pairs == sum(len(r[2]) for r in requests)
    for got, want in zip(results, expected, strict=True):
        assert got is not None
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)


def test_a_full_batch_does_not_wait(tiny_models: tuple[Any, Any]) -> None:
    _, rer = tiny_models
    texts, images, pairs = _requests(rer, 1)[0]
    # A wait of a minute would time the test out if a batch at max_pairs still waited for more.
    batcher = MicroBatcher(rer, max_pairs=1, max_wait_s=60)
    try:
        np.testing.assert_allclose(
            batcher.score_pairs(texts, images, pairs), rer.score_pairs(texts, images, pairs), atol=1e-5
        )
    finally:
        batcher.close()


class _Broken:
    name, fingerprint, hidden = "broken", "0", 8

    def embed_image(self, image: Any) -> np.ndarray:
        raise NotImplementedError

    def score_pairs(self, *args: Any, **kwargs: Any) -> np.ndarray:
        raise RuntimeError("the model fell over")


def test_errors_reach_every_caller_and_closing_refuses_new_work() -> None:
    batcher = MicroBatcher(_Broken(), max_wait_s=0)
    token = np.zeros((2, 8), np.float32)
    with pytest.raises(RuntimeError, match="fell over"):
        batcher.score_pairs(["a"], [token], [(0, 0)])
    assert batcher.score_pairs(["a"], [token], []).shape == (0,)
    batcher.close()
    with pytest.raises(RetrieverError, match="shut down"):
        batcher.score_pairs(["a"], [token], [(0, 0)])
