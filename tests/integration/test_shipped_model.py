"""The model shipped in the package retrieves for real: the rerank beats the prefilter on twins."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retriever.datasets.karpathy import load_karpathy
from retriever.datasets.shapes import generate
from retriever.evaluate import evaluate
from retriever.factory import load_prefilter, load_reranker, preset

# Measured on this very set (seed 424242, 120 images): prefilter R@1 54.2 (TR) / 53.7 (IR), rerank
# 94.2 / 95.8 (ITM alone 90.8 / 86.7). The floor leaves room for float differences between CPUs,
# not for a worse model.
FLOOR_R1 = 88.0


@pytest.mark.slow
def test_shipped_shapes_model_reranks_twins(tmp_path: Path) -> None:
    pre_dir, re_dir = preset("shapes")
    assert Path(pre_dir, "config.json").exists() and Path(re_dir, "config.json").exists(), "model not shipped"
    # A seed the training data never used (training: dataset seed 101).
    data = generate(tmp_path / "test", 120, seed=424242, split="test", workers=1)
    split = load_karpathy(data, split="test")
    cpu = torch.device("cpu")
    result = evaluate(split, load_prefilter(pre_dir, cpu), load_reranker(re_dir, cpu), candidates=16)
    assert result.rerank is not None
    pre, rer = result.prefilter, result.rerank
    # Twins share every word, so a bag-of-words prefilter is capped; the single-stream rerank is not.
    assert rer.ir_r1 > pre.ir_r1 and rer.tr_r1 > pre.tr_r1, (pre, rer)
    assert rer.ir_r1 >= FLOOR_R1 and rer.tr_r1 >= FLOOR_R1, (rer, FLOOR_R1)
