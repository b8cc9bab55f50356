"""Part 1, rerank throughput: the engine against the naive path, the steps between, and its accuracy.

The naive path is what a caller without the engine writes: ``ViltProcessor`` on each PIL image, then
the model at batch size 1 in fp32. The engine scores cached fp16 tokens read from a real
``PatchCache`` file, batched, in the precision ``retriever.hardware`` picks.
"""

from __future__ import annotations

import copy
import resource
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..hardware import PrecisionChoice, configure_process, int8_engine, read_cpu_info
from ..index.patches import PatchCache
from ..rerank import ViltReranker
from .config import BenchConfig
from .flops import FLOP_FORMULA, pair_flops
from .models import BenchModels, bench_text, make_reranker
from .peaks import peak_of
from .profiler import time_split
from .report import Peak, RerankCase, RerankResult, Step
from .synthetic import synthetic_image
from .timing import StepFn, best_time, no_steps, sig


def _cached_tokens(
    reranker: ViltReranker, images: Sequence[Image.Image], path: Path, count: int
) -> list[list[np.ndarray]]:
    """Each image's visual tokens written to a real patch cache file, then ``count`` views of each."""
    cache = PatchCache(path, reranker.hidden)
    extents = cache.append([reranker.embed_image(img) for img in images])
    return [cache.load([ext] * count) for ext in extents]


def _minor_faults() -> int:
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def _engine_rate(
    reranker: ViltReranker, text: str, tokens: Sequence[np.ndarray], reps: int
) -> tuple[float, float]:
    """Pairs/s of ``reranker`` on ``text`` against each of ``tokens``, and minor page faults per pair."""
    pairs = [(0, j) for j in range(len(tokens))]
    # One batch warms up every kernel the timed calls use (their shapes are the same).
    first = pairs[: reranker.batch_size]
    faults = _minor_faults()
    seconds = best_time(
        lambda: reranker.score_pairs([text], tokens, pairs),
        reps,
        warmup=lambda: reranker.score_pairs([text], tokens, first),
    )
    faults = _minor_faults() - faults
    return len(pairs) / seconds, faults / (len(first) + max(1, reps) * len(pairs))


def _naive_rate(model: Any, processor: Any, text: str, image: Image.Image, pairs: int, reps: int) -> float:
    # transformers' model and processor carry no usable annotations.
    device = next(model.parameters()).device

    def one() -> None:
        inputs = processor(images=image, text=text, return_tensors="pt").to(device)
        float(model(**inputs).logits[0, 0])  # the score, as a caller would read it

    def run() -> None:
        for _ in range(pairs):
            one()

    with torch.inference_mode():
        seconds = best_time(run, reps, warmup=one)
    return pairs / seconds


def bench_rerank(
    cfg: BenchConfig,
    models: BenchModels,
    engine: ViltReranker,
    peaks: Sequence[Peak],
    threads: int,
    workdir: Path,
    on_step: StepFn | None = None,
) -> RerankResult:
    """Part 1: ``engine`` against the naive path for each (text length, image size), and the steps table."""
    step = on_step or no_steps
    config = models.vilt.config
    choice = PrecisionChoice(engine.precision, engine.precision_reason)
    images = [synthetic_image(w, h, seed=i) for i, (w, h) in enumerate(cfg.image_sizes)]
    device = engine.device
    naive_model = copy.deepcopy(models.vilt).to(device)
    cached = _cached_tokens(engine, images, workdir / "rerank-patches.f16", cfg.engine_pairs)
    dtype_name: str = choice.precision

    cases: list[RerankCase] = []
    for text_tokens in cfg.text_tokens:
        text = bench_text(models, text_tokens)
        for image, tokens in zip(images, cached, strict=True):
            image_tokens = int(tokens[0].shape[0])
            step(f"rerank: {text_tokens} text + {image_tokens} image tokens")
            flops = pair_flops(text_tokens, image_tokens, config)
            naive = _naive_rate(naive_model, models.vilt_processor, text, image, cfg.naive_pairs, cfg.reps)
            fast, _ = _engine_rate(engine, text, tokens, cfg.reps)
            cases.append(
                RerankCase(
                    text_tokens=text_tokens,
                    image_tokens=image_tokens,
                    naive_pairs_per_s=sig(naive),
                    engine_pairs_per_s=sig(fast),
                    speedup=sig(fast / naive),
                    gflop_per_pair=sig(flops / 1e9),
                    engine_gflops=sig(fast * flops / 1e9),
                    engine_share_of_peak=sig(fast * flops / 1e9 / peak_of(peaks, dtype_name)),
                    naive_gflops=sig(naive * flops / 1e9),
                )
            )

    # The steps table, on the first case: what each change adds.
    text_tokens = cfg.text_tokens[0]
    text = bench_text(models, text_tokens)
    tokens = cached[0]
    image_tokens = int(tokens[0].shape[0])
    flops = pair_flops(text_tokens, image_tokens, config)
    base = cases[0].naive_pairs_per_s
    naive_gflops = base * flops / 1e9
    steps = [
        Step(
            "naive: processor + fp32 eager, batch 1",
            "fp32",
            base,
            1.0,
            sig(naive_gflops),
            sig(naive_gflops / peak_of(peaks, "fp32")),
        )
    ]
    fp32 = PrecisionChoice("fp32", "step")
    # fp32 runs several times slower than the engine: one batch per timed call keeps the table affordable.
    fp32_batch = min(cfg.fp32_step_batch or cfg.batch_size, cfg.engine_pairs)

    def add(name: str, dtype: str, reranker: ViltReranker, count: int) -> None:
        step(f"rerank steps: {name}")
        rate, faults = _engine_rate(reranker, text, tokens[:count], cfg.reps)
        gflops = rate * flops / 1e9
        share = gflops / peak_of(peaks, dtype)
        steps.append(Step(name, dtype, sig(rate), sig(rate / base), sig(gflops), sig(share), sig(faults)))

    on_cpu = device.type == "cpu"
    if cfg.extra_steps:
        add(
            "cached tokens, fp32 eager, batch 1",
            "fp32",
            make_reranker(models, fp32, batch_size=1, sdpa=False, device=device),
            2,
        )
    add(
        f"cached tokens, fp32 eager, batches of {fp32_batch}",
        "fp32",
        make_reranker(models, fp32, batch_size=fp32_batch, sdpa=False, device=device),
        fp32_batch,
    )
    fp32_sdpa = make_reranker(models, fp32, batch_size=fp32_batch, device=device)
    add("+ SDPA attention (fp32)", "fp32", fp32_sdpa, fp32_batch)
    if cfg.extra_steps and on_cpu and choice.precision == "bf16":
        mixed = make_reranker(models, choice, batch_size=cfg.batch_size, fp32_residual=True)
        add("+ bf16 weights, oneDNN-fused layers, fp32 residual stream", "bf16", mixed, cfg.engine_pairs)
        del mixed
    cpu_int8 = on_cpu and int8_engine(read_cpu_info()) is not None
    if cfg.extra_steps and cpu_int8 and choice.precision != "int8":
        int8 = PrecisionChoice("int8", "step")
        add(
            "int8 dynamic quantization (not chosen here)",
            "int8",
            make_reranker(models, int8, batch_size=cfg.batch_size),
            cfg.engine_pairs,
        )
    add(f"engine: {engine.prepared.describe()}", dtype_name, engine, cfg.engine_pairs)
    if cfg.extra_steps and on_cpu and threads > 1:
        configure_process(threads=1)
        try:
            add("engine at 1 thread", dtype_name, engine, cfg.engine_pairs)
        finally:
            configure_process(threads=threads)

    split = None
    if on_cpu:  # on a GPU the CPU-side op times say nothing about the kernels
        step("rerank: where the engine's time goes (torch.profiler)")
        split = time_split(engine, text, tokens[: cfg.engine_pairs], text_tokens, peak_of(peaks, dtype_name))

    # Accuracy: distinct images, two texts, engine against the fp32 path.
    step("rerank: engine logits against fp32")
    sizes = cfg.image_sizes
    acc_tokens = [
        engine.embed_image(synthetic_image(*sizes[i % len(sizes)], seed=50 + i))
        for i in range(cfg.accuracy_images)
    ]
    texts = [bench_text(models, text_tokens), bench_text(models, text_tokens, shift=3)]
    pairs = [(t, i) for t in range(len(texts)) for i in range(len(acc_tokens))]
    reference = fp32_sdpa.score_pairs(texts, acc_tokens, pairs)
    got = engine.score_pairs(texts, acc_tokens, pairs)
    return RerankResult(
        precision=choice.precision,
        reason=choice.reason,
        engine_path=engine.prepared.describe(),
        threads=threads,
        flop_formula=FLOP_FORMULA,
        cases=cases,
        steps=steps,
        step_case=(text_tokens, image_tokens),
        max_abs_logit_diff_vs_fp32=sig(float(np.max(np.abs(got - reference)))),
        logit_std=sig(float(np.std(reference))),
        time_split=split,
    )
