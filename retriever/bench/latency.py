"""Part 2, query latency: text encoding, FAISS, cache loading and rerank, p50 and p95, over synthetic
indexes; and the recall the approximate (IVF) index keeps against exact search.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..index.patches import PatchCache
from ..index.vectors import APPROX_MIN_VECTORS, VectorIndex
from ..rerank import ViltReranker
from .config import BenchConfig
from .models import BenchModels
from .report import LatencyResult, LatencyRow, RecallRow
from .synthetic import synthetic_vectors
from .timing import StepFn, no_steps, sig, stage


def _sparse_patch_cache(path: Path, rows: int, hidden: int) -> PatchCache:
    # Sparse: only runs a query reads get real bytes (see _fill_runs), so N=100k needs no 22 GB write.
    path.unlink(missing_ok=True)
    with open(path, "wb") as f:
        f.truncate(rows * hidden * 2)
    return PatchCache(path, hidden)


def _fill_runs(cache: PatchCache, extents: Sequence[tuple[int, int]], seed: int) -> None:
    rng = np.random.default_rng(seed)
    with open(cache.path, "r+b") as f:
        for offset, count in extents:
            f.seek(offset * cache.row_bytes)
            f.write((rng.standard_normal((count, cache.hidden)) * 0.5).astype(np.float16).tobytes())
        f.flush()
        os.fsync(f.fileno())


def _drop_page_cache(path: Path) -> None:
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def measure_recall(
    vectors: np.ndarray, data: str, candidates: Sequence[int], queries: int, seed: int
) -> RecallRow:
    """Recall@c of the engine's IVF recipe against exact search (queries: noisy copies of stored vectors)."""
    rng = np.random.default_rng(seed)
    n, dim = vectors.shape
    picks = vectors[rng.integers(0, n, queries)]
    q = picks + rng.standard_normal(picks.shape).astype(np.float32) * (0.5 / math.sqrt(dim))
    q = np.ascontiguousarray(q / np.linalg.norm(q, axis=1, keepdims=True), dtype=np.float32)
    ids = np.arange(n, dtype=np.int64)
    exact = VectorIndex(dim, approx_min=None)
    exact.add(ids, vectors)
    start = time.perf_counter()
    approx = VectorIndex(dim, approx_min=n)
    approx.add(ids, vectors)
    build = time.perf_counter() - start
    k = max(candidates)
    start = time.perf_counter()
    _, truth = exact.search(q, k)
    exact_ms = (time.perf_counter() - start) / queries * 1e3
    start = time.perf_counter()
    _, found = approx.search(q, k)
    ivf_ms = (time.perf_counter() - start) / queries * 1e3
    recall = {
        f"@{c}": sig(
            float(np.mean([len(set(truth[i, :c]) & set(found[i, :c])) / c for i in range(queries)])), 4
        )
        for c in candidates
    }
    lists = approx.ivf_lists
    if lists is None:  # an add that reaches approx_min always turns the index into IVF
        raise RuntimeError(f"the index of {n} vectors with approx_min={n} stayed exact")
    nlist, nprobe = lists
    return RecallRow(
        data=data,
        n=n,
        nlist=nlist,
        nprobe=nprobe,
        recall=recall,
        exact_ms_per_query=sig(exact_ms),
        ivf_ms_per_query=sig(ivf_ms),
        build_s=sig(build),
    )


def bench_latency(
    cfg: BenchConfig,
    models: BenchModels,
    reranker: ViltReranker,
    workdir: Path,
    on_step: StepFn | None = None,
) -> LatencyResult:
    """Part 2: per-stage p50/p95 of text→image queries over synthetic indexes, and IVF recall."""
    step = on_step or no_steps
    dim = models.clip.dim
    per = cfg.image_tokens_per_entry
    rows: list[LatencyRow] = []
    queries = [f"a photo of a dog {models.words[i]} on a red car" for i in range(cfg.query_reps)]
    models.clip.encode_texts(["warm up"])
    for n in cfg.index_sizes:
        step(f"latency: N={n}")
        index = VectorIndex(dim)
        index.add(np.arange(n, dtype=np.int64), synthetic_vectors(n, dim, clustered=True, seed=n))
        cache = _sparse_patch_cache(workdir / f"latency-{n}.f16", n * per, reranker.hidden)
        qvecs = models.clip.encode_texts(queries)
        k = max(cfg.candidates)
        _, found = index.search(qvecs, k)
        _fill_runs(cache, sorted({(int(i) * per, per) for i in found.ravel() if i >= 0}), seed=n)
        for c in cfg.candidates:
            times: dict[str, list[float]] = {s: [] for s in ("encode", "faiss", "load", "rerank", "total")}
            for query in queries:
                _drop_page_cache(cache.path)
                t0 = time.perf_counter()
                qvec = models.clip.encode_texts([query])
                t1 = time.perf_counter()
                _, ids = index.search(qvec, c)
                t2 = time.perf_counter()
                tokens = cache.load([(int(i) * per, per) for i in ids[0] if i >= 0])
                # Views are lazy; reading every page here puts the disk reads in this stage.
                for t in tokens:
                    t.view(np.uint16).max()
                t3 = time.perf_counter()
                reranker.score_pairs([query], tokens, [(0, j) for j in range(len(tokens))])
                t4 = time.perf_counter()
                for name, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0), strict=True):
                    times[name].append(dt)
            rows.append(
                LatencyRow(
                    n=n,
                    candidates=c,
                    index="exact (flat)" if index.exact else "IVF",
                    queries=len(queries),
                    encode=stage(times["encode"]),
                    faiss=stage(times["faiss"]),
                    load=stage(times["load"]),
                    rerank=stage(times["rerank"]),
                    total=stage(times["total"]),
                )
            )
        cache.path.unlink(missing_ok=True)
    step("latency: IVF recall")
    n = max(cfg.index_sizes)
    recall = [
        measure_recall(
            synthetic_vectors(n, dim, clustered=True, seed=1),
            "clustered",
            cfg.candidates,
            cfg.recall_queries,
            seed=2,
        ),
        measure_recall(
            synthetic_vectors(n, dim, clustered=False, seed=3),
            "uniform on the sphere",
            cfg.candidates,
            cfg.recall_queries,
            seed=4,
        ),
    ]
    notes = [
        "no database lookup: candidates map to cache runs by id (a real search adds one SQL select by id)",
        "patch cache: a sparse file of N x 145 fp16 rows; the runs queries read hold real bytes, and the "
        "page cache is dropped (POSIX_FADV_DONTNEED) before each query, so load times are cold reads",
        f"the engine switches to IVF at {APPROX_MIN_VECTORS:,} vectors; recall is measured by building that "
        f"recipe at N={n:,}",
    ]
    return LatencyResult(rows, recall, APPROX_MIN_VECTORS, notes)
