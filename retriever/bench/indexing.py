"""Part 3, indexing throughput over large generated JPEGs: draft decoding against full decoding.

Both paths feed the same two encoders (CLIP for the vector, ViLT for the cached tokens), so the
difference is what JPEG draft decoding saves.
"""

from __future__ import annotations

import hashlib
import io
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..images import DEFAULT_DRAFT_SIZE, decode_image
from ..rerank import ViltReranker
from .config import BenchConfig
from .models import BenchModels
from .report import IndexingResult, IndexPath
from .synthetic import synthetic_image
from .timing import sig


@dataclass
class EncodedImage:
    """One indexed image, kept for part 4 to write into a real index."""

    vector: np.ndarray
    tokens: np.ndarray
    width: int
    height: int
    digest: str


def _index_path(
    name: str, files: Sequence[Path], models: BenchModels, reranker: ViltReranker, *, draft: bool
) -> tuple[IndexPath, list[EncodedImage]]:
    spent = {"read": 0.0, "decode": 0.0, "clip": 0.0, "vilt_embed": 0.0}
    out: list[EncodedImage] = []
    for path in files:
        t0 = time.perf_counter()
        data = path.read_bytes()
        t1 = time.perf_counter()
        if draft:
            decoded = decode_image(data, draft_size=DEFAULT_DRAFT_SIZE)
            image, width, height = decoded.image, decoded.width, decoded.height
        else:
            with Image.open(io.BytesIO(data)) as opened:
                image = opened.convert("RGB")
            width, height = image.size
        t2 = time.perf_counter()
        vector = models.clip.encode_images([image])[0]
        t3 = time.perf_counter()
        tokens = reranker.embed_image(image)
        t4 = time.perf_counter()
        for key, dt in zip(spent, (t1 - t0, t2 - t1, t3 - t2, t4 - t3), strict=True):
            spent[key] += dt
        out.append(EncodedImage(vector, tokens, width, height, hashlib.sha256(data).hexdigest()))
    total = sum(spent.values())
    return (
        IndexPath(
            name=name,
            images_per_s=sig(len(files) / total),
            seconds=sig(total),
            share={k: sig(v / total) for k, v in spent.items()},
        ),
        out,
    )


def bench_indexing(
    cfg: BenchConfig, models: BenchModels, reranker: ViltReranker, files: Sequence[Path]
) -> tuple[IndexingResult, list[EncodedImage]]:
    """Part 3: draft decoding feeding both encoders, against a full decode feeding both."""
    models.clip.encode_images([synthetic_image(64, 64, 0)])  # first-call set-up out of the timings
    naive, _ = _index_path("naive: full decode", files, models, reranker, draft=False)
    engine, encoded = _index_path(
        f"engine: JPEG draft decode (shorter side >= {DEFAULT_DRAFT_SIZE})",
        files,
        models,
        reranker,
        draft=True,
    )
    result = IndexingResult(
        images=len(files),
        jpeg_size=cfg.jpeg_size,
        mean_file_bytes=round(float(np.mean([p.stat().st_size for p in files])), 1),
        draft_size=DEFAULT_DRAFT_SIZE,
        engine=engine,
        naive=naive,
        speedup=sig(engine.images_per_s / naive.images_per_s),
    )
    return result, encoded
