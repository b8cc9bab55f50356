"""`retriever eval` and `retriever train` on small generated shapes sets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from retriever.datasets.karpathy import load_karpathy
from retriever.datasets.shapes import generate
from retriever.evaluate import evaluate
from retriever.factory import load_prefilter, load_reranker
from retriever.metrics import recall_at_k
from retriever.training.build import SmallConfig
from retriever.training.loop import RerankSampling
from retriever.training.run import TrainRequest, train

# Models small enough to train a few steps in a test.
TINY = SmallConfig(vilt_hidden=32, vilt_layers=1, vilt_heads=2, clip_hidden=32, clip_layers=1, clip_heads=2)


@pytest.fixture(scope="module")
def shapes_test(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate(tmp_path_factory.mktemp("shapes_test"), 16, seed=7, split="test", workers=1)


def test_eval_matrices_and_recalls_agree(
    shapes_test: Path, tiny_models: tuple[Any, Any], tmp_path: Path
) -> None:
    pre, rer = tiny_models
    split = load_karpathy(shapes_test, split="test")
    calls: list[int] = []
    original = rer.score_pairs

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls.append(len(args[2]))
        return original(*args, **kwargs)

    rer.score_pairs = counting
    try:
        res = evaluate(split, pre, rer, candidates=4, brute_force=True, work_dir=tmp_path / "work")
        again = evaluate(split, pre, rer, candidates=4, brute_force=True, work_dir=tmp_path / "work")
    finally:
        del rer.score_pairs
    n_img, n_txt = 16, 80
    assert res.rerank_t2i is not None and res.rerank_i2t is not None and res.brute_force_scores is not None
    assert res.prefilter_scores.shape == (n_txt, n_img)
    # ViLT scored exactly the top 4 of each query: 4 finite entries per row, -inf elsewhere.
    assert (np.isfinite(res.rerank_t2i).sum(axis=1) == 4).all()
    assert (np.isfinite(res.rerank_i2t).sum(axis=1) == 4).all()
    top = np.argsort(-res.prefilter_scores, axis=1, kind="stable")[:, :4]
    assert (np.isfinite(np.take_along_axis(res.rerank_t2i, top, axis=1))).all()
    # Reranked scores of the same pair agree with brute force (same model, same pair).
    finite = np.isfinite(res.rerank_t2i)
    np.testing.assert_allclose(res.rerank_t2i[finite], res.brute_force_scores[finite], atol=1e-4)
    # The rerank ranks as searches do: ITM logit + the prefilter's logit; ITM alone is reported too.
    scale = pre.logit_scale
    assert scale > 0 and res.rerank_score == "itm+prefilter"
    fused_t2i = res.rerank_t2i + scale * res.prefilter_scores
    fused_i2t = res.rerank_i2t + scale * res.prefilter_scores.T
    assert res.rerank == recall_at_k(fused_t2i, split.text_image, fused_i2t)
    assert res.rerank_itm_only == recall_at_k(res.rerank_t2i, split.text_image, res.rerank_i2t)
    assert res.prefilter == recall_at_k(res.prefilter_scores, split.text_image)
    assert res.brute_force_pairs == n_img * n_txt
    assert res.rerank_pairs <= n_txt * 4 + n_img * 4
    # The second run found every pair score checkpointed and scored nothing again.
    assert sum(calls) == res.rerank_pairs + res.brute_force_pairs
    assert again.rerank == res.rerank and again.brute_force == res.brute_force

    out = res.as_dict()
    assert set(out["prefilter"]) == {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum"}
    assert out["rerank"]["candidates"] == 4 and out["rerank"]["pairs"] == res.rerank_pairs
    res.save_scores(tmp_path / "s.npz")
    saved = np.load(tmp_path / "s.npz")
    w = float(saved["prefilter_logit_scale"])
    fused = recall_at_k(
        saved["rerank_t2i"] + w * saved["prefilter"],
        saved["text_image"],
        saved["rerank_i2t"] + w * saved["prefilter"].T,
    )
    assert fused == res.rerank
    assert out["rerank_itm_only"] == res.as_dict()["rerank_itm_only"]
    itm = evaluate(split, pre, rer, candidates=4, work_dir=tmp_path / "work", fuse=False)
    assert itm.rerank == res.rerank_itm_only and itm.rerank_itm_only is None and itm.rerank_score == "itm"


@pytest.mark.slow
def test_train_exports_loadable_models_and_resumes(tmp_path: Path) -> None:
    data = generate(tmp_path / "train", 24, seed=3, split="train", workers=1)
    small = TINY
    req = TrainRequest(
        dataset=data,
        out=tmp_path / "out",
        prefilter_steps=3,
        reranker_steps=3,
        prefilter_batch=8,
        sampling=RerankSampling(captions=4, hard=2, random=1, pool=8),
        small=small,
        seed=0,
        precision="fp32",
    )
    out = train(req, command="test")
    record = json.loads((out / "TRAINING.json").read_text())
    assert record["images"] == 24 and record["reranker_steps"] == 3 and record["seed"] == 0
    cpu = torch.device("cpu")
    pre = load_prefilter(str(out / "prefilter"), cpu)
    rer = load_reranker(str(out / "reranker"), cpu)
    vec = pre.encode_texts(["a small red circle left of a large blue square"])
    assert vec.shape == (1, small.projection_dim) and np.isclose(np.linalg.norm(vec), 1, atol=1e-5)
    weights = {k: v.clone() for k, v in rer.model.state_dict().items()}
    # A second run finds both stages finished and changes nothing.
    train(req, command="test")
    again = load_reranker(str(out / "reranker"), cpu)
    assert all(torch.equal(weights[k], v) for k, v in again.model.state_dict().items())


@pytest.mark.slow
def test_fine_tune_from_checkpoints_with_mined_negatives_both_ways(tmp_path: Path) -> None:
    data = generate(tmp_path / "train", 32, seed=5, split="train", workers=1)
    small = TINY
    # curriculum_accuracy=0: mined negatives (images per caption, captions per image) from step one.
    sampling = RerankSampling(
        captions=4, hard=2, random=1, pool=8, text_hard=2, text_random=1, text_pool=16, curriculum_accuracy=0
    )
    base = TrainRequest(
        dataset=data,
        out=tmp_path / "base",
        prefilter_steps=2,
        reranker_steps=2,
        prefilter_batch=8,
        sampling=sampling,
        small=small,
        precision="fp32",
    )
    first = train(base, command="base")
    tuned = train(
        TrainRequest(
            dataset=data,
            out=tmp_path / "tuned",
            prefilter_init=str(first / "prefilter"),
            reranker_init=str(first / "reranker"),
            prefilter_steps=2,
            reranker_steps=2,
            prefilter_batch=8,
            sampling=sampling,
            precision="fp32",
            seed=1,
        ),
        command="tuned",
    )
    record = json.loads((tuned / "TRAINING.json").read_text())
    # Fine-tuning defaults to gentler rates, and records how its starting point was made.
    assert record["prefilter_lr"] == 1e-5 and record["reranker_lr"] == 1e-4
    assert record["init_training"]["reranker"]["command"] == "base"
    cpu = torch.device("cpu")
    before = load_reranker(str(first / "reranker"), cpu).model.state_dict()
    after = load_reranker(str(tuned / "reranker"), cpu).model.state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)
