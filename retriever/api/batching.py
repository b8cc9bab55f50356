"""Micro-batching of rerank work: concurrent searches share ViLT forward passes.

Every search hands its (text, image tokens) pairs to one ``MicroBatcher``. A single worker thread takes
the first waiting request, gathers more for up to ``max_wait_s`` or until ``max_pairs`` pairs are
waiting, scores the merged pairs with one ``score_pairs`` call, and gives each request its own slice.
A lone search pays at most ``max_wait_s`` of extra latency; a burst of searches pays for one batched
pass instead of one pass each, and the model only ever runs on one thread.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from retriever.errors import RetrieverError
from retriever.rerank import ProgressFn, Reranker


@dataclass
class _Request:
    texts: Sequence[str]
    images: Sequence[np.ndarray]
    pairs: Sequence[tuple[int, int]]
    future: Future[np.ndarray] = field(default_factory=Future)


class MicroBatcher:
    """A ``Reranker`` that merges concurrent ``score_pairs`` calls into shared batches.

    ``embed_image`` is passed straight to the wrapped reranker.
    """

    def __init__(self, reranker: Reranker, *, max_pairs: int = 64, max_wait_s: float = 0.005) -> None:
        if max_pairs < 1:
            raise ValueError(f"max_pairs must be positive, got {max_pairs}")
        self.reranker = reranker
        self.name = reranker.name
        self.fingerprint = reranker.fingerprint
        self.hidden = reranker.hidden
        self.max_pairs = max_pairs
        self.max_wait_s = max_wait_s
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name="rerank-batcher", daemon=True)
        self._thread.start()

    def embed_image(self, image: Image.Image) -> np.ndarray:
        """Visual tokens of one image, from the wrapped reranker."""
        return self.reranker.embed_image(image)

    def score_pairs(
        self,
        texts: Sequence[str],
        images: Sequence[np.ndarray],
        pairs: Sequence[tuple[int, int]],
        on_progress: ProgressFn | None = None,
    ) -> np.ndarray:
        """ITM logit of each (text index, image index) pair, scored in a batch shared with other callers.

        ``on_progress`` is called once, when the scores are in: a shared batch has no per-caller progress.
        """
        if not pairs:
            return np.empty(0, dtype=np.float32)
        request = _Request(list(texts), list(images), list(pairs))
        with self._lock:
            if self._closed:
                raise RetrieverError("the reranker is shut down")
            self._queue.put(request)
        scores = request.future.result()
        if on_progress is not None:
            on_progress(len(pairs), len(pairs))
        return scores

    def close(self) -> None:
        """Stop the worker after the requests already queued; later calls raise ``RetrieverError``."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(None)
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is None:
                return
            batch = [first]
            size = len(first.pairs)
            deadline = time.monotonic() + self.max_wait_s
            while size < self.max_pairs:
                remaining = deadline - time.monotonic()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                    break
                batch.append(item)
                size += len(item.pairs)
            self._score(batch)

    def _score(self, batch: list[_Request]) -> None:
        texts: list[str] = []
        images: list[np.ndarray] = []
        pairs: list[tuple[int, int]] = []
        for request in batch:
            t0, i0 = len(texts), len(images)
            texts.extend(request.texts)
            images.extend(request.images)
            pairs.extend((t0 + t, i0 + i) for t, i in request.pairs)
        try:
            scores = self.reranker.score_pairs(texts, images, pairs)
        except BaseException as exc:  # every waiting caller must hear of it, whatever it is
            for request in batch:
                request.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise
            return
        start = 0
        for request in batch:
            end = start + len(request.pairs)
            request.future.set_result(scores[start:end].copy())
            start = end
