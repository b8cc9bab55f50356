"""Tests for retriever.bench.codecs without models: the codec-wrapped reranker, the error and the text."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from PIL import Image

from retriever.bench.codecs import (
    CodecBenchResult,
    CodecRow,
    CodedReranker,
    ImageSize,
    LogitError,
    format_codecs,
    logit_error,
)
from retriever.index.codecs import codec_by_name
from retriever.metrics import RecallResult
from retriever.rerank import ProgressFn


class SumReranker:
    """Scores a pair by the sum of the image's tokens: what it was handed shows in the score."""

    name = "sum"
    fingerprint = "sum-1"
    hidden = 64
    precision = "fp32"

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def embed_image(self, image: Image.Image) -> np.ndarray:
        return np.full((3, self.hidden), 0.5, dtype=np.float32)

    def score_pairs(
        self,
        texts: Sequence[str],
        images: Sequence[np.ndarray],
        pairs: Sequence[tuple[int, int]],
        on_progress: ProgressFn | None = None,
    ) -> np.ndarray:
        self.seen = list(images)
        return np.array([float(np.sum(images[i], dtype=np.float64)) for _, i in pairs], dtype=np.float32)


@pytest.mark.parametrize("name", ["fp16", "int8", "int4-g32"])
def test_coded_reranker_scores_decoded_tokens(name: str) -> None:
    codec = codec_by_name(name)
    inner = SumReranker()
    coded = CodedReranker(inner, codec)
    assert coded.fingerprint == f"sum-1+{name}" and coded.hidden == 64 and coded.precision == "fp32"
    rng = np.random.default_rng(0)
    images = [rng.standard_normal((n, 64)).astype(np.float16) for n in (5, 9, 2)]
    got = coded.score_pairs(["a", "b"], images, [(0, 0), (1, 2)])
    for seen, i in zip((inner.seen[0], inner.seen[2]), (0, 2), strict=True):
        np.testing.assert_array_equal(seen, codec.decode(codec.encode(images[i]), *images[i].shape))
    assert inner.seen[1] is images[1], "an image no pair uses is not decoded"
    want = [float(np.sum(inner.seen[0], dtype=np.float64)), float(np.sum(inner.seen[2], dtype=np.float64))]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # A second call reuses the bytes encoded the first time.
    coded.score_pairs(["a"], images, [(0, 0)])
    assert len(coded._encoded) == 2


def test_logit_error_is_relative_to_the_reference_spread() -> None:
    reference = np.array([0.0, 2.0, 4.0, 6.0])
    err = logit_error(reference, reference + np.array([0.0, 0.5, -1.0, 0.0]))
    assert err.pairs == 4 and err.max_abs == 1.0 and err.mean_abs == 0.375
    assert err.max_rel == pytest.approx(1.0 / np.std(reference), rel=1e-3)


def _row(name: str, tr: float, lost: int = 0) -> CodecRow:
    codec = codec_by_name(name)
    recall = RecallResult(tr, 99.0, 100.0, 90.0, 99.0, 100.0)
    error = LogitError(10, 0.1, 0.01, 0.2, 0.02)
    return CodecRow(
        codec=name,
        codec_id=codec.id,
        bytes_per_token=codec.encoded_size(1000, 768) / 1000,
        bytes_per_image=(codec.encoded_size(145, 768), codec.encoded_size(193, 768)),
        encode_ms=1.0,
        decode_ms=0.1,
        rerank_ms=100.0,
        random_error=error,
        shapes_error=error,
        recall=recall,
        recall_itm=None,
        tr_lost=lost,
        tr_gained=0,
        ir_lost=0,
        ir_gained=0,
    )


def test_format_lists_every_codec_against_fp16() -> None:
    result = CodecBenchResult(
        hidden=768,
        sizes=(ImageSize(384, 384, 145), ImageSize(640, 480, 193)),
        timing_tokens=193,
        engine_precision="int8",
        random_logit_std=1.0,
        shapes_images=300,
        shapes_texts=1500,
        shapes_seed=271828,
        candidates=16,
        shapes_precision="fp32",
        shapes_logit_std=10.0,
        prefilter=RecallResult(50.0, 80.0, 90.0, 50.0, 80.0, 90.0),
        rows=(_row("fp16", 95.0), _row("int4-g32", 94.0, lost=3)),
        seconds=12.0,
    )
    text = format_codecs(result)
    assert "| int4-g32 | 3 | 432 | 62,640 (61.2 KB) | 83,376 (81.4 KB) |" in text
    assert "| int4-g32 | 94.00 | 90.00 | -1.00 | +0.00 | 3/0 | 0/0 | - | - |" in text
    assert result.as_dict()["rows"][1]["codec"] == "int4-g32"
