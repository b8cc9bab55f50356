"""retriever.bench and ``retriever bench``: every part runs and reports well-formed figures.

Tiny models keep this fast. Nothing here judges a timing: only structure, and that every figure is
a finite number (rates and sizes positive).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from typer.testing import CliRunner

from retriever.bench import BenchConfig, BenchReport, pair_flops, run_bench

TINY = BenchConfig(
    vilt={
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "intermediate_size": 64,
        "image_size": 384,
        "patch_size": 32,
        "max_position_embeddings": 40,
    },
    vilt_shortest_edge=64,
    clip_text={"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2},
    clip_vision={
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": 32,
        "patch_size": 8,
    },
    projection_dim=32,
    text_tokens=(8, 12),
    image_sizes=((64, 64), (96, 64)),
    engine_pairs=4,
    naive_pairs=1,
    reps=1,
    batch_size=4,
    index_sizes=(200, 400),
    candidates=(4, 8),
    query_reps=2,
    image_tokens_per_entry=5,
    recall_queries=5,
    jpeg_count=2,
    jpeg_size=(320, 240),
    db_rows=20,
    peak_shapes=((64, 64, 64),),
    peak_reps=1,
    accuracy_images=2,
    threads=1,
)


def _numbers(value: Any, path: str = "") -> list[tuple[str, float]]:
    """Every number in a nested dict/list, with where it sits."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [(path, float(value))]
    if isinstance(value, dict):
        return [n for k, v in value.items() for n in _numbers(v, f"{path}.{k}")]
    if isinstance(value, list | tuple):
        return [n for i, v in enumerate(value) for n in _numbers(v, f"{path}[{i}]")]
    return []


# Figures that may be zero: a logit difference (fp32 engine against fp32), the share of time spent
# reading a file from the page cache, shares of a peak the naive row is not measured against, page
# faults once malloc keeps freed memory.
MAY_BE_ZERO = ("max_abs_logit_diff", "share.read", "load_start", "load_end", "faiss.p", "page_faults")


def _check(report: BenchReport) -> dict[str, Any]:
    data = report.as_dict()
    json.dumps(data, allow_nan=False)  # strict JSON: no NaN or infinity anywhere
    for where, number in _numbers(data):
        assert math.isfinite(number), where
        if any(key in where for key in MAY_BE_ZERO):
            assert number >= 0, where
        else:
            assert number > 0, where
    return data


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory: pytest.TempPathFactory) -> BenchReport:
    return run_bench(TINY, mode="test", workdir=tmp_path_factory.mktemp("bench"))


def test_report_structure(tiny_report: BenchReport) -> None:
    data = _check(tiny_report)
    assert set(data) == {"mode", "machine", "peaks", "rerank", "latency", "indexing", "sizes", "seconds"}
    r = tiny_report.rerank
    # The tiny model is below the size where low precision pays: auto keeps it fp32.
    assert r.precision == "fp32" and "hidden size" in r.reason
    assert len(r.cases) == len(TINY.text_tokens) * len(TINY.image_sizes)
    assert {c.image_tokens for c in r.cases} == {5, 7}  # 2x2 and 3x2 patches, plus the image CLS
    assert r.steps[0].name.startswith("naive")
    assert [s.name.startswith("engine:") for s in r.steps].count(True) == 1
    assert not any("1 thread" in s.name for s in r.steps)  # the bench already runs at one thread
    assert {p.dtype for p in tiny_report.peaks} >= {"fp32", "bf16"}
    split = r.time_split
    assert split is not None
    assert math.isclose(split.linear_share + split.attention_share + split.other_share, 1.0, abs_tol=0.01)
    assert split.ceiling_share_of_peak > 0
    lat = tiny_report.latency
    assert [(row.n, row.candidates) for row in lat.rows] == [(200, 4), (200, 8), (400, 4), (400, 8)]
    assert all(row.index == "exact (flat)" and row.queries == 2 for row in lat.rows)
    assert {rec.data for rec in lat.recall} == {"clustered", "uniform on the sphere"}
    assert all(set(rec.recall) == {"@4", "@8"} and 0 <= min(rec.recall.values()) <= 1 for rec in lat.recall)
    ix = tiny_report.indexing
    assert ix.images == 2 and set(ix.engine.share) == {"read", "decode", "clip", "vilt_embed"}
    assert math.isclose(sum(ix.naive.share.values()), 1.0, abs_tol=0.01)
    # 320x240 JPEGs resized to 85x64, cut down to multiples of 32: 2x2 patches and CLS, 32 fp16 per row.
    assert tiny_report.sizes.patch_cache_bytes_per_image == 5 * 32 * 2


def test_bf16_engine_rows(tmp_path: Path) -> None:
    from dataclasses import replace

    cfg = replace(
        TINY, precision="bf16", text_tokens=(8,), index_sizes=(200,), candidates=(4,), extra_steps=False
    )
    report = run_bench(cfg, mode="test", workdir=tmp_path)
    _check(report)
    assert report.rerank.precision == "bf16"
    assert [s.dtype for s in report.rerank.steps if s.name.startswith("engine:")] == ["bf16"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without a GPU")
def test_cuda_without_a_gpu_is_a_clear_error(tmp_path: Path) -> None:
    from dataclasses import replace

    from retriever.errors import RetrieverError

    with pytest.raises(RetrieverError, match="no CUDA GPU"):
        run_bench(replace(TINY, device="cuda"), mode="test", workdir=tmp_path)


def test_op_kinds() -> None:
    from retriever.bench.profiler import _op_kind

    assert _op_kind("mkldnn::_linear_pointwise") == "linear"
    assert _op_kind("quantized::linear_dynamic") == "linear"
    assert _op_kind("aten::addmm") == "linear"
    assert _op_kind("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert _op_kind("aten::softmax") == "attention"
    assert _op_kind("aten::native_layer_norm") == "other"
    assert _op_kind("aten::copy_") == "other"


def test_pair_flops_formula() -> None:
    class Config:
        hidden_size = 768
        intermediate_size = 3072
        num_hidden_layers = 12

    # ViLT-B/32, 16 text + 145 image tokens: about 28.3 GFLOP per pair.
    t, h, i = 161, 768, 3072
    expected = 12 * (2 * t * (4 * h * h + 2 * h * i) + 4 * t * t * h) + 2 * h * h + 2 * h
    assert pair_flops(16, 145, Config()) == expected
    assert 28.0e9 < expected < 28.7e9


def test_cli_prints_table_and_json(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from dataclasses import replace

    from retriever.cli.app import app

    small = replace(TINY, text_tokens=(8,), index_sizes=(200,), candidates=(4,), extra_steps=False)
    monkeypatch.setattr(BenchConfig, "quick", classmethod(lambda cls: small))
    runner = CliRunner()
    result = runner.invoke(app, ["bench", "--quick", "--json", "--work-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["mode"] == "quick" and data["rerank"]["cases"]
    result = runner.invoke(app, ["bench", "--quick", "--work-dir", str(tmp_path)])
    assert result.exit_code == 0, result.output
    for heading in ("1. rerank throughput", "2. query latency", "3. indexing throughput", "4. sizes"):
        assert heading in result.stdout
    assert "load average" in result.stdout
