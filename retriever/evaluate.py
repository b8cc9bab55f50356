"""Recall@K on a Karpathy-format split: the prefilter alone, prefilter then ViLT rerank, and brute force.

The protocol is ALBEF/BLIP's: the dual encoder ranks every caption against every image; ViLT then
scores only the top ``candidates`` of each query, in both directions, and ranks them by the ITM logit
plus the prefilter's logit (``search.fused_score``, what searches return; BLIP's rule), and also by the
ITM logit alone (ALBEF's).
Pair scores are checkpointed as they are computed, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .datasets.karpathy import KarpathySplit
from .encoders import DualEncoder
from .errors import RetrieverError
from .images import read_and_decode
from .metrics import RecallResult, recall_at_k
from .rerank import Reranker
from .search import fused_score

#: Above this many pairs, brute force is called out as impractical (hours of CPU for ViLT-B/32).
BRUTE_FORCE_WARN_PAIRS = 200_000

StageFn = Callable[[str, int, int], None]


@dataclass
class EvalResult:
    """Recalls per stage, pair counts and seconds per stage, plus the matrices they came from."""

    images: int
    texts: int
    prefilter: RecallResult
    rerank: RecallResult | None
    brute_force: RecallResult | None
    candidates: int
    rerank_pairs: int
    brute_force_pairs: int
    seconds: dict[str, float] = field(default_factory=dict)
    text_image: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    prefilter_scores: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    rerank_t2i: np.ndarray | None = None
    rerank_i2t: np.ndarray | None = None
    brute_force_scores: np.ndarray | None = None
    #: How ``rerank`` ranks: "itm+prefilter" (``search.fused_score``, what searches return) or "itm".
    rerank_score: str = "itm+prefilter"
    prefilter_logit_scale: float = 0.0
    #: With the fused score, the same candidates ranked by the ITM logit alone (the ALBEF protocol).
    rerank_itm_only: RecallResult | None = None

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` form."""
        out: dict[str, Any] = {
            "images": self.images,
            "texts": self.texts,
            "prefilter": _rounded(self.prefilter.as_dict()),
        }
        if self.rerank is not None:
            out["rerank"] = {
                **_rounded(self.rerank.as_dict()),
                "candidates": self.candidates,
                "pairs": self.rerank_pairs,
                "score": self.rerank_score,
            }
        if self.rerank_itm_only is not None:
            out["rerank_itm_only"] = _rounded(self.rerank_itm_only.as_dict())
        if self.brute_force is not None:
            out["brute_force"] = {**_rounded(self.brute_force.as_dict()), "pairs": self.brute_force_pairs}
        out["seconds"] = {k: round(v, 3) for k, v in self.seconds.items()}
        return out

    def save_scores(self, path: Path) -> None:
        """Write what the metrics were computed from, so anyone can recompute them."""
        arrays: dict[str, np.ndarray] = {
            "text_image": self.text_image,
            "prefilter": self.prefilter_scores,
            # The fused rerank ranks by rerank + prefilter_logit_scale * prefilter (0 when ITM only).
            "prefilter_logit_scale": np.array(self.prefilter_logit_scale, dtype=np.float32),
        }
        if self.rerank_t2i is not None and self.rerank_i2t is not None:
            arrays["rerank_t2i"] = self.rerank_t2i
            arrays["rerank_i2t"] = self.rerank_i2t
        if self.brute_force_scores is not None:
            arrays["brute_force"] = self.brute_force_scores
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(path, **arrays)  # type: ignore[arg-type]


def _rounded(d: dict[str, float]) -> dict[str, float]:
    return {k: round(v, 2) for k, v in d.items()}


class _PairCache:
    """Pair scores computed so far, saved every chunk, keyed by (stage, model, split)."""

    def __init__(self, path: Path | None, n: int) -> None:
        self.path = path
        self.scores = np.full(n, np.nan, dtype=np.float32)
        if path is not None and path.exists():
            saved = np.load(path)
            if saved.shape == self.scores.shape:
                self.scores = saved

    def save(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_suffix(".tmp.npy")
            np.save(tmp, self.scores)
            tmp.replace(self.path)


def _score_pairs(
    reranker: Reranker,
    texts: Sequence[str],
    tokens: Sequence[np.ndarray],
    pairs: np.ndarray,
    cache: _PairCache,
    stage: str,
    on_stage: StageFn | None,
    chunk: int = 4096,
) -> np.ndarray:
    todo = np.flatnonzero(np.isnan(cache.scores))
    done = len(pairs) - len(todo)
    for start in range(0, len(todo), chunk):
        idx = todo[start : start + chunk]
        base = done

        def progress(k: int, _total: int, base: int = base) -> None:
            if on_stage is not None:
                on_stage(stage, base + k, len(pairs))

        chunk_pairs = [(int(t), int(i)) for t, i in pairs[idx]]
        cache.scores[idx] = reranker.score_pairs(texts, tokens, chunk_pairs, progress)
        done += len(idx)
        cache.save()
    return cache.scores


def evaluate(
    split: KarpathySplit,
    prefilter: DualEncoder,
    reranker: Reranker | None,
    *,
    candidates: int = 128,
    brute_force: bool = False,
    work_dir: Path | None = None,
    on_stage: StageFn | None = None,
    fuse: bool = True,
) -> EvalResult:
    """Recall@1/5/10 in both directions for each stage.

    With ``fuse`` the rerank ranks its candidates as searches do (``search.fused_score``) and the
    ITM-only ranking is reported beside it; without, by the ITM logit alone.
    """
    if candidates < 1:
        raise RetrieverError(f"candidates must be at least 1, got {candidates}")
    missing = split.missing_images()
    if missing:
        raise RetrieverError(f"{len(missing)} images of the split are missing, e.g. {missing[0]}")
    seconds: dict[str, float] = {}
    n_img, texts = len(split.images), split.texts
    key = hashlib.sha256(
        repr(
            (
                prefilter.fingerprint,
                reranker.fingerprint if reranker else "",
                # Scores of one precision must not be reused for another.
                getattr(reranker, "precision", ""),
                [str(i.path) for i in split.images],
            )
        ).encode()
    ).hexdigest()[:16]
    cache_dir = work_dir / key if work_dir is not None else None

    t0 = time.perf_counter()
    img_vecs = np.zeros((n_img, prefilter.dim), dtype=np.float32)
    tokens: list[np.ndarray] = []
    batch: list[Any] = []
    starts: list[int] = []
    for i, img in enumerate(split.images):
        decoded = read_and_decode(img.path)[1].image
        if reranker is not None:
            tokens.append(reranker.embed_image(decoded).astype(np.float16))
        batch.append(decoded)
        starts.append(i)
        if len(batch) == 32 or i == n_img - 1:
            img_vecs[starts[0] : starts[0] + len(batch)] = prefilter.encode_images(batch)
            batch, starts = [], []
        if on_stage is not None:
            on_stage("encode images", i + 1, n_img)
    txt_vecs = prefilter.encode_texts(texts)
    seconds["encode"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pre = txt_vecs @ img_vecs.T  # (T, I)
    pre_result = recall_at_k(pre, split.text_image)
    seconds["prefilter"] = time.perf_counter() - t0
    result = EvalResult(
        images=n_img,
        texts=len(texts),
        prefilter=pre_result,
        rerank=None,
        brute_force=None,
        candidates=candidates,
        rerank_pairs=0,
        brute_force_pairs=0,
        seconds=seconds,
        text_image=split.text_image,
        prefilter_scores=pre,
    )
    if reranker is None:
        return result

    t0 = time.perf_counter()
    k_img, k_txt = min(candidates, n_img), min(candidates, len(texts))
    top_img = np.argsort(-pre, axis=1, kind="stable")[:, :k_img]  # (T, k)
    top_txt = np.argsort(-pre.T, axis=1, kind="stable")[:, :k_txt]  # (I, k)
    t2i_pairs = np.stack([np.repeat(np.arange(len(texts)), k_img), top_img.ravel()], axis=1)
    i2t_pairs = np.stack([top_txt.ravel(), np.repeat(np.arange(n_img), k_txt)], axis=1)
    # Both directions share pairs; score each distinct pair once.
    all_pairs, inverse = np.unique(np.concatenate([t2i_pairs, i2t_pairs]), axis=0, return_inverse=True)
    cache = _PairCache(cache_dir / f"rerank-{candidates}.npy" if cache_dir else None, len(all_pairs))
    scores = _score_pairs(reranker, texts, tokens, all_pairs, cache, "rerank", on_stage)[inverse.ravel()]
    t2i = np.full((len(texts), n_img), -np.inf, dtype=np.float32)
    t2i[t2i_pairs[:, 0], t2i_pairs[:, 1]] = scores[: len(t2i_pairs)]
    i2t = np.full((n_img, len(texts)), -np.inf, dtype=np.float32)
    i2t[i2t_pairs[:, 1], i2t_pairs[:, 0]] = scores[len(t2i_pairs) :]
    if fuse:
        scale = prefilter.logit_scale
        fused_t2i, fused_i2t = fused_score(t2i, pre, scale), fused_score(i2t, pre.T, scale)
        result.rerank = recall_at_k(fused_t2i, split.text_image, fused_i2t)
        result.rerank_itm_only = recall_at_k(t2i, split.text_image, i2t)
        result.prefilter_logit_scale = scale
    else:
        result.rerank = recall_at_k(t2i, split.text_image, i2t)
        result.rerank_score = "itm"
    result.rerank_t2i, result.rerank_i2t = t2i, i2t
    result.rerank_pairs = len(all_pairs)
    seconds["rerank"] = time.perf_counter() - t0

    if brute_force:
        t0 = time.perf_counter()
        every = np.stack(
            np.meshgrid(np.arange(len(texts)), np.arange(n_img), indexing="ij"), axis=-1
        ).reshape(-1, 2)
        cache = _PairCache(cache_dir / "brute.npy" if cache_dir else None, len(every))
        full = _score_pairs(reranker, texts, tokens, every, cache, "brute force", on_stage).reshape(
            len(texts), n_img
        )
        result.brute_force = recall_at_k(full, split.text_image)
        result.brute_force_scores = full
        result.brute_force_pairs = len(every)
        seconds["brute_force"] = time.perf_counter() - t0
    return result
