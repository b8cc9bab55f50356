"""The search stage: FAISS prefilter, then the ViLT image-text-matching rerank of the top candidates."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
import numpy.typing as npt
from PIL import Image

from .encoders import DualEncoder
from .errors import EmptyQueryError, IndexDamagedError, QueryTooLongError, RetrieverError
from .rerank import ProgressFn, Reranker
from .search_index import SearchIndexReader

MAX_QUERY_CHARS = 1000


def fused_score(itm_logit: npt.ArrayLike, cosine: npt.ArrayLike, logit_scale: float) -> np.ndarray:
    """The rerank's ranking score: the ITM logit plus the prefilter's own logit (scale x cosine).

    BLIP ranks its top-k the same way (ITM score + ITC similarity). The two stages err differently:
    ViLT binds words to objects (twins), the dual encoder is sure of which words an image holds, and
    the sum keeps both. No weight is tuned: the prefilter's learned temperature converts its cosine
    into a logit. ``--itm-only`` ranks by the ITM logit alone (the ALBEF protocol).
    """
    return np.asarray(itm_logit, dtype=np.float32) + np.float32(logit_scale) * np.asarray(cosine, np.float32)


@dataclass(frozen=True)
class Hit:
    """One result. After a rerank, ``score`` is the fused score (see ``fused_score``) and
    ``rerank_score`` the ViLT ITM logit alone; without one, ``score`` is the prefilter cosine."""

    id: int
    score: float
    prefilter_score: float
    rerank_score: float | None = None
    path: str | None = None
    text: str | None = None
    ext_id: str | None = None


@dataclass
class SearchResult:
    """Ranked hits and where the time went (seconds per stage)."""

    query: str
    hits: list[Hit]
    timings: dict[str, float] = field(default_factory=dict)


class _Clock:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = self.timings.get(name, 0.0) + now - self._t
        self._t = now


def clean_query(text: str) -> str:
    """Collapse whitespace; refuse an empty or over-long query."""
    query = " ".join(text.split())
    if not query:
        raise EmptyQueryError("the query is empty: give some words to search for")
    if len(query) > MAX_QUERY_CHARS:
        raise QueryTooLongError(f"the query is {len(query)} characters long; the limit is {MAX_QUERY_CHARS}")
    return query


def _check_k(k: int, candidates: int) -> int:
    """The number of candidates to rerank: never fewer than ``k``, so a search asked for ``k`` results
    returns ``k`` (when the index holds that many), all ranked the same way."""
    if k < 1:
        raise RetrieverError(f"k must be at least 1, got {k}")
    if candidates < 1:
        raise RetrieverError(f"candidates must be at least 1, got {candidates}")
    return max(candidates, k)


def _prefilter(
    search_index: SearchIndexReader, kind: str, query: np.ndarray, n: int
) -> list[tuple[int, float]]:
    scores, ids = search_index.vectors(kind).search(query[None, :], n)
    return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]


def _rank(hits: list[Hit], k: int) -> list[Hit]:
    return sorted(hits, key=lambda h: (-h.score, -h.prefilter_score, h.id))[:k]


def search_text(
    search_index: SearchIndexReader,
    prefilter: DualEncoder,
    reranker: Reranker | None,
    query: str,
    *,
    k: int = 10,
    candidates: int = 100,
    on_progress: ProgressFn | None = None,
    fuse: bool = True,
) -> SearchResult:
    """Text→image: the top ``max(candidates, k)`` by prefilter cosine, reranked by ViLT ITM (unless no
    reranker), so ``k`` results come back when the index holds that many."""
    query = clean_query(query)
    candidates = _check_k(k, candidates)
    clock = _Clock()
    qvec = prefilter.encode_texts([query])[0]
    clock.lap("encode")
    found = _prefilter(search_index, "images", qvec, candidates if reranker else k)
    records = search_index.store.images([i for i, _ in found])
    hits = [Hit(i, s, s, path=records[i].path) for i, s in found if i in records]
    clock.lap("prefilter")
    if reranker is None or not hits:
        return SearchResult(query, _rank(hits, k), clock.timings)
    hits = hits[:candidates]
    tokens = search_index.load_tokens([records[h.id] for h in hits])
    clock.lap("load")
    logits = reranker.score_pairs([query], tokens, [(0, j) for j in range(len(hits))], on_progress)
    clock.lap("rerank")
    _check_finite(logits, [f"image {h.id} ({h.path})" for h in hits])
    hits = _reranked(hits, logits, prefilter.logit_scale if fuse else 0.0)
    return SearchResult(query, _rank(hits, k), clock.timings)


def _check_finite(logits: np.ndarray, names: list[str]) -> None:
    """Damaged cached tokens (NaN or inf) give non-finite scores: name the images instead of ranking them."""
    bad = [name for name, ok in zip(names, np.isfinite(logits), strict=True) if not ok]
    if bad:
        shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
        raise IndexDamagedError(
            f"the cached tokens of {shown} are damaged (their scores are not finite). Repair: rebuild the "
            "index with `retriever index FOLDER --rebuild`"
        )


def _reranked(hits: list[Hit], logits: np.ndarray, logit_scale: float) -> list[Hit]:
    cosines = np.array([h.prefilter_score for h in hits], dtype=np.float32)
    fused = fused_score(logits, cosines, logit_scale)
    return [
        replace(h, score=float(f), rerank_score=float(s)) for h, s, f in zip(hits, logits, fused, strict=True)
    ]


def search_image(
    search_index: SearchIndexReader,
    prefilter: DualEncoder,
    image: Image.Image,
    *,
    k: int = 10,
    label: str = "",
) -> SearchResult:
    """Image→image by prefilter similarity (ViLT has no image-image head)."""
    _check_k(k, 1)
    clock = _Clock()
    qvec = prefilter.encode_images([image])[0]
    clock.lap("encode")
    found = _prefilter(search_index, "images", qvec, k)
    records = search_index.store.images([i for i, _ in found])
    hits = [Hit(i, s, s, path=records[i].path) for i, s in found if i in records]
    clock.lap("prefilter")
    return SearchResult(label, _rank(hits, k), clock.timings)


def search_image_texts(
    search_index: SearchIndexReader,
    prefilter: DualEncoder,
    reranker: Reranker | None,
    image: Image.Image,
    *,
    k: int = 10,
    candidates: int = 100,
    label: str = "",
    on_progress: Callable[[int, int], None] | None = None,
    fuse: bool = True,
) -> SearchResult:
    """Image→text over the caption collection: prefilter, then ViLT with the image's tokens computed once."""
    candidates = _check_k(k, candidates)
    clock = _Clock()
    if search_index.store.count_texts() == 0:
        raise RetrieverError("the caption collection is empty: add captions with `retriever texts add FILE`")
    qvec = prefilter.encode_images([image])[0]
    clock.lap("encode")
    found = _prefilter(search_index, "texts", qvec, candidates if reranker else k)
    records = search_index.store.texts([i for i, _ in found])
    hits = [Hit(i, s, s, text=records[i].text, ext_id=records[i].ext_id) for i, s in found if i in records]
    clock.lap("prefilter")
    if reranker is None or not hits:
        return SearchResult(label, _rank(hits, k), clock.timings)
    hits = hits[:candidates]
    image_tokens = reranker.embed_image(image)
    clock.lap("embed")
    texts = [h.text or "" for h in hits]
    logits = reranker.score_pairs(texts, [image_tokens], [(j, 0) for j in range(len(hits))], on_progress)
    clock.lap("rerank")
    if not np.isfinite(logits).all():
        raise IndexDamagedError(
            "the reranker gave non-finite scores for this image; the model may be damaged"
        )
    hits = _reranked(hits, logits, prefilter.logit_scale if fuse else 0.0)
    return SearchResult(label, _rank(hits, k), clock.timings)
