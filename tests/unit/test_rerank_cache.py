"""The patch cache changes speed, never the answer: cached-token logits equal ViLT's own forward pass."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retriever.factory import load_reranker
from retriever.index.patches import PatchCache
from retriever.rerank import ViltReranker
from tests.conftest import random_image

TEXTS = [
    "a red circle left of a blue square",
    "giraffe eating leaves",
    "a dog",
    "the small green triangle is above",
]


@pytest.fixture(scope="module")
def reranker(tiny_vilt_dir: Path) -> ViltReranker:
    rer = load_reranker(str(tiny_vilt_dir), torch.device("cpu"))
    # A freshly initialised head maps every pair to nearly the same logit; widen it so that a 1e-3
    # tolerance separates right from wrong.
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for module in (rer.model.vilt.pooler.dense, rer.model.rank_output):
            module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * 1.5)
    return rer


def direct_logit(rer: ViltReranker, image: Image.Image, text: str) -> float:
    inputs = rer.processor(images=image, text=text, return_tensors="pt")
    with torch.inference_mode():
        return float(rer.model(**inputs).logits[0, 0])


def test_cached_logits_equal_direct_forward(reranker: ViltReranker, tmp_path: Path) -> None:
    # Lossless images of different shapes, so batches mix token counts and need padding.
    images = [
        random_image(i, size) for i, size in enumerate([(96, 64), (64, 96), (160, 80), (70, 70), (128, 128)])
    ]
    cache = PatchCache(tmp_path / "p.f16", reranker.hidden)
    extents = cache.append([reranker.embed_image(img) for img in images])
    tokens = cache.load(extents)
    assert len({t.shape[0] for t in tokens}) >= 3, "want several token counts in one batch"

    pairs = [(t, i) for t in range(len(TEXTS)) for i in range(len(images))]
    reranker.batch_size = 7  # awkward, so batches straddle token-count buckets
    cached = reranker.score_pairs(TEXTS, tokens, pairs)
    direct = np.array([direct_logit(reranker, images[i], TEXTS[t]) for t, i in pairs])

    np.testing.assert_allclose(cached, direct, atol=1e-3, rtol=0)
    # The check means something only if pairs really differ by more than the tolerance.
    assert np.ptp(direct) > 0.05


def test_token_order_does_not_matter_but_positions_do(reranker: ViltReranker) -> None:
    image = random_image(7, (128, 96))
    tokens = reranker.embed_image(image)
    perm = np.concatenate([[0], 1 + np.random.default_rng(0).permutation(tokens.shape[0] - 1)])
    pairs = [(0, 0)]
    base = reranker.score_pairs(TEXTS[:1], [tokens], pairs)[0]
    shuffled = reranker.score_pairs(TEXTS[:1], [tokens[perm]], pairs)[0]
    assert abs(base - shuffled) < 1e-4
    # Without position embeddings the logit changes: the cache must hold tokens after position embedding.
    emb = reranker.model.vilt.embeddings
    with torch.no_grad():
        saved = emb.position_embeddings.clone()
        emb.position_embeddings.zero_()
        try:
            no_pos = reranker.embed_image(image)
        finally:
            emb.position_embeddings.copy_(saved)
    assert abs(reranker.score_pairs(TEXTS[:1], [no_pos], pairs)[0] - base) > 1e-3


def test_embed_image_matches_transformers_visual_embed(reranker: ViltReranker) -> None:
    image = random_image(3, (160, 96))
    ours = reranker.embed_image(image)
    inputs = reranker.processor.image_processor(images=[image], return_tensors="pt")
    with torch.inference_mode():
        theirs, mask, _ = reranker.model.vilt.embeddings.visual_embed(
            inputs["pixel_values"], inputs["pixel_mask"], max_image_length=-1
        )
    theirs_np = theirs[0].numpy()
    assert mask.all() and theirs_np.shape == ours.shape
    # transformers draws a random token order; compare as sets of rows (CLS first in both).
    np.testing.assert_allclose(ours[0], theirs_np[0], atol=1e-5)

    def key(a: np.ndarray) -> np.ndarray:
        return a[np.lexsort(a[:, :4].T[::-1])]

    np.testing.assert_allclose(key(ours[1:]), key(theirs_np[1:]), atol=1e-5)
