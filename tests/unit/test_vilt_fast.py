"""retriever.vilt_fast: SDPA attention, fused layers and low precision, and their accuracy.

Low precision changes scores, so it is held to tolerances stated against the spread of the fp32
logits (never against float snapshots). With s = std of the fp32 logits over 24 pairs of a small
random ViLT whose logits spread over a few units (errors measured against these tolerances:
docs/bench/hardware-choices.md):

* bf16 (bf16 residual stream, the engine's default on CPUs with AMX/AVX512-BF16):
  max |logit - fp32 logit| <= 0.25 s;
* bf16 with ``fp32_residual``: <= 0.15 s;
* fp16 (autocast): <= 0.1 s;
* int8 dynamic quantization (the engine's choice on AVX2-only CPUs): <= 0.75 s: int8 trades real
  accuracy for speed;

and in every precision two pairs whose fp32 logits differ by more than twice the tolerance keep
their order. fp32 with SDPA must match eager attention to 1e-4 (float rounding of logits of a few units).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from PIL import Image

from retriever.hardware import int8_engine, read_cpu_info
from retriever.rerank import ViltReranker
from retriever.vilt_fast import FusedViltLayer, SdpaSelfAttention, key_padding_bias
from tests.conftest import random_image
from tests.tiny_models import make_vilt_tokenizer

CPU = torch.device("cpu")

TOLERANCE = {"bf16": 0.25, "bf16-fp32-residual": 0.15, "fp16": 0.1, "int8": 0.75}
#: Cached tokens of the test images, the (text, image) pairs, and their fp32 eager logits.
Fp32Scores = tuple[list[np.ndarray], list[tuple[int, int]], np.ndarray]


# -- attention and fused layers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_vilt(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    """A small random ViLT (hidden 64, 4 layers), its weights drawn wide enough that logits spread.

    With the default initializer (std 0.02) every pair's [CLS] ends up nearly the same and logits
    differ by hundredths; std 0.1 and a wide head give a spread of a few units, like a trained head.
    """
    from transformers import ViltConfig, ViltForImageAndTextRetrieval, ViltImageProcessor, ViltProcessor

    tokenizer = make_vilt_tokenizer(tmp_path_factory.mktemp("vocab") / "vocab.txt")
    config = ViltConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=40,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        image_size=384,
        patch_size=32,
        pad_token_id=0,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = ViltForImageAndTextRetrieval(config).eval()  # type: ignore[no-untyped-call]
    with torch.no_grad():
        model.vilt.embeddings.cls_token.normal_(std=0.02)
        model.vilt.embeddings.position_embeddings.normal_(std=0.02)
        for module in (model.vilt.pooler.dense, model.rank_output):
            module.weight.normal_(std=1.0)
    image_processor = ViltImageProcessor(size={"shortest_edge": 128}, size_divisor=32)  # type: ignore[call-arg]
    processor = ViltProcessor(image_processor=image_processor, tokenizer=tokenizer)  # type: ignore[no-untyped-call]
    return model, processor


def _reranker(small_vilt: tuple[object, object], precision: str, **kwargs: object) -> ViltReranker:
    model, processor = small_vilt
    return ViltReranker(
        copy.deepcopy(model),
        processor,
        name="small",
        fingerprint="small",
        device=CPU,
        batch_size=5,
        precision=precision,  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


TEXTS = [
    "a red circle left of a blue square",
    "giraffe eating leaves",
    "a dog",
    "two small green triangles above a large yellow star next to a house",
]


def _images() -> list[Image.Image]:
    # Several shapes, so batches mix token counts and need padding.
    sizes = [(128, 128), (192, 128), (128, 192), (160, 128), (224, 128), (128, 128)]
    return [random_image(i, size) for i, size in enumerate(sizes)]


@pytest.fixture(scope="module")
def fp32_scores(small_vilt: tuple[object, object]) -> Fp32Scores:
    eager = _reranker(small_vilt, "fp32", sdpa=False)
    tokens = [eager.embed_image(img) for img in _images()]
    pairs = [(t, i) for t in range(len(TEXTS)) for i in range(len(tokens))]
    return tokens, pairs, eager.score_pairs(TEXTS, tokens, pairs)


def test_sdpa_matches_eager_attention(small_vilt: tuple[object, object], fp32_scores: Fp32Scores) -> None:
    tokens, pairs, eager = fp32_scores
    sdpa = _reranker(small_vilt, "fp32")
    assert sdpa.attention == "sdpa"
    assert sum(isinstance(m, SdpaSelfAttention) for m in sdpa.model.modules()) == 4
    np.testing.assert_allclose(sdpa.score_pairs(TEXTS, tokens, pairs), eager, atol=1e-4, rtol=0)
    # The swap keeps the parameter names, so state dicts load either way.
    model, _ = small_vilt
    assert set(sdpa.model.state_dict()) == set(model.state_dict())  # type: ignore[attr-defined]


def test_sdpa_follows_weight_edits(small_vilt: tuple[object, object], fp32_scores: Fp32Scores) -> None:
    tokens, pairs, _ = fp32_scores
    sdpa = _reranker(small_vilt, "fp32")
    eager = _reranker(small_vilt, "fp32", sdpa=False)
    before = sdpa.score_pairs(TEXTS, tokens, pairs)
    for rer in (sdpa, eager):
        with torch.no_grad():
            rer.model.vilt.encoder.layer[0].attention.attention.key.weight.mul_(3.0)
    after = sdpa.score_pairs(TEXTS, tokens, pairs)
    assert np.max(np.abs(after - before)) > 1e-3
    np.testing.assert_allclose(after, eager.score_pairs(TEXTS, tokens, pairs), atol=1e-4, rtol=0)


def test_output_attentions_still_works(small_vilt: tuple[object, object]) -> None:
    rer = _reranker(small_vilt, "fp32")
    inputs = rer.processor(images=_images()[0], text=TEXTS[0], return_tensors="pt")
    with torch.inference_mode():
        out = rer.model(**inputs, output_attentions=True)
    assert len(out.attentions) == 4
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones_like(out.attentions[0].sum(-1)))


def test_key_padding_bias() -> None:
    assert key_padding_bias(None) is None
    full = torch.zeros(2, 1, 5, 5)
    assert key_padding_bias(full) is None
    padded = full.clone()
    padded[1, :, :, 3:] = torch.finfo(torch.float32).min
    row = key_padding_bias(padded)
    assert row is not None and row.shape == (2, 1, 1, 5)
    assert torch.equal(row[:, :, 0], padded[:, :, 0])


def test_batches_cap_size_and_padding(small_vilt: tuple[object, object]) -> None:
    rer = _reranker(small_vilt, "fp32")
    rer.batch_size = 4
    lengths = [20, 20, 21, 21, 21, 30, 30, 31, 60]
    batches = rer._batches(list(range(len(lengths))), lengths)
    assert sorted(p for b in batches for p in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 4
        padded = len(batch) * max(lengths[p] for p in batch)
        # One pair alone is never "too padded"; otherwise padding stays within max_padding.
        assert len(batch) == 1 or padded <= sum(lengths[p] for p in batch) * (1 + rer.max_padding)


# -- low precision accuracy ----------------------------------------------------------------------------


def _low_precisions() -> list[str]:
    out = ["bf16", "bf16-fp32-residual", "fp16"]
    if int8_engine(read_cpu_info()) is not None:
        out.append("int8")
    return out


@pytest.mark.parametrize("precision", _low_precisions())
def test_low_precision_logits_within_tolerance(
    small_vilt: tuple[object, object], fp32_scores: Fp32Scores, precision: str
) -> None:
    tokens, pairs, reference = fp32_scores
    if precision == "bf16-fp32-residual":
        rer = _reranker(small_vilt, "bf16", fp32_residual=True)
    else:
        rer = _reranker(small_vilt, precision)
    got = rer.score_pairs(TEXTS, tokens, pairs)
    spread = float(np.std(reference))
    assert spread > 0.5, "the check means something only if pairs really differ"
    tol = TOLERANCE[precision] * spread
    assert np.all(np.isfinite(got))
    assert np.max(np.abs(got - reference)) <= tol, (precision, np.max(np.abs(got - reference)), tol)
    # Clearly separated pairs keep their order.
    gap = reference[:, None] - reference[None, :]
    clear = gap > 2 * tol
    assert np.all((got[:, None] - got[None, :])[clear] > 0)


def test_fp32_residual_stream_is_the_more_accurate_bf16(
    small_vilt: tuple[object, object], fp32_scores: Fp32Scores
) -> None:
    tokens, pairs, reference = fp32_scores
    stream = _reranker(small_vilt, "bf16")
    if not stream.prepared.fused_layers:
        pytest.skip("no oneDNN fusion in this torch: bf16 runs under autocast, with an fp32 stream")
    mixed = _reranker(small_vilt, "bf16", fp32_residual=True)
    assert all(m.fp32_residual for m in mixed.model.modules() if isinstance(m, FusedViltLayer))
    err_stream = np.max(np.abs(stream.score_pairs(TEXTS, tokens, pairs) - reference))
    err_mixed = np.max(np.abs(mixed.score_pairs(TEXTS, tokens, pairs) - reference))
    assert err_mixed < err_stream, (err_mixed, err_stream)


def test_bf16_engine_layers_and_cached_tokens(
    small_vilt: tuple[object, object], fp32_scores: Fp32Scores
) -> None:
    tokens, _, _ = fp32_scores
    rer = _reranker(small_vilt, "bf16")
    assert rer.dtype == torch.bfloat16
    if rer.prepared.fused_layers:
        assert sum(isinstance(m, FusedViltLayer) for m in rer.model.modules()) == 4
    else:
        assert rer.prepared.autocast  # no oneDNN fusion in this torch: bf16 through autocast instead
    # Index-time tokens do not depend on the precision searches run in.
    np.testing.assert_array_equal(rer.embed_image(_images()[0]), tokens[0])
