"""Part 4, sizes: bytes per image on disk in a real index, and the peak memory of the run."""

from __future__ import annotations

import hashlib
import resource
from collections.abc import Sequence
from pathlib import Path

from ..index.store import Encoded, ImageBatch, NewImage
from ..rerank import ViltReranker
from ..search_index import ModelInfo, SearchIndex
from .config import BenchConfig
from .indexing import EncodedImage
from .models import BenchModels
from .report import SizesResult


def bench_sizes(
    cfg: BenchConfig,
    models: BenchModels,
    reranker: ViltReranker,
    encoded: Sequence[EncodedImage],
    home: Path,
) -> SizesResult:
    """Part 4: a real index (SQLite, patch cache, FAISS file) of the indexed images, padded to ``db_rows``."""
    search_index = SearchIndex(home)
    try:
        info = ModelInfo("bench-clip", "bench", models.clip.dim, "bench-vilt", "bench", reranker.hidden)
        search_index.check_models(info, record=True)
        empty_db = search_index.store.database_bytes() or 0
        extents = search_index.patches().append([e.tokens for e in encoded])
        rows = max(cfg.db_rows, len(encoded))
        batch = ImageBatch()
        for i in range(rows):
            e = encoded[i % len(encoded)]
            offset, count = extents[i % len(encoded)]
            # Rows past the real images reuse their tokens: they size the database, not the cache.
            digest = e.digest if i < len(encoded) else hashlib.sha256(f"{e.digest}{i}".encode()).hexdigest()
            batch.upserts.append(
                NewImage(
                    str(home / f"photo-{i:06d}.jpg"),
                    4_000_000,
                    float(i),
                    digest,
                    Encoded(e.vector, e.width, e.height, offset, count),
                )
            )
        search_index.commit(batch, info)
        search_index.save_vectors()
        db = (search_index.store.database_bytes() or 0) - empty_db
        faiss_bytes = sum(p.stat().st_size for p in home.glob("images-*.faiss"))
        patch = search_index.patches().nbytes / len(encoded)
    finally:
        search_index.close()
    per_db = db / rows
    per_vec = faiss_bytes / rows
    return SizesResult(
        patch_cache_bytes_per_image=round(patch, 1),
        vectors_bytes_per_image=round(per_vec, 1),
        database_bytes_per_image=round(per_db, 1),
        total_bytes_per_image=round(patch + per_vec + per_db, 1),
        database=f"SQLite, {rows} rows (growth over an empty database)",
        peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    )
