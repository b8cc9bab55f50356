"""``retriever bench``: what the engine achieves on this machine, each figure beside its baseline.

Four measurements, all on random-weight models of the real models' sizes (no download needed):

1. rerank throughput: the engine (cached fp16 tokens from a real ``PatchCache`` file, batched, in the
   precision ``retriever.perf`` picks) against the naive path (``ViltProcessor`` on each PIL image,
   then the model at batch size 1 in fp32), with the useful FLOP rate as a share of the matmul peak
   this machine reaches in the same dtype, measured in the same run; and a table of the steps between;
2. query latency: text encoding, FAISS, cache loading and rerank, p50 and p95, over synthetic indexes;
   and the recall the approximate (IVF) index keeps against exact search;
3. indexing throughput over large generated JPEGs: draft decoding against full decoding;
4. sizes on disk per image, and the peak memory of the run.

Every function returns a dataclass; nothing here prints. Timings depend on what else runs on the
machine, so ``MachineInfo`` carries the load average at the start and the end.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import importlib
import io
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .encoders import ClipEncoder
from .factory import rerank_batch_size, resolve_device
from .images import DEFAULT_DRAFT_SIZE, decode_image
from .index.patches import PatchCache
from .index.store import Encoded, ImageBatch, NewImage
from .index.vectors import APPROX_MIN_VECTORS, VectorIndex
from .library import Library, ModelInfo
from .perf import (
    DTYPES,
    CpuInfo,
    PrecisionChoice,
    choose_precision,
    configure_threads,
    int8_engine,
    onednn_fusion_available,
    onednn_linear,
    quantize_int8,
    read_cpu_info,
    usable_threads,
)
from .rerank import ViltReranker

StepFn = Callable[[str], None]
_CPU = torch.device("cpu")

#: How the useful FLOPs of one (text, image) pair are counted.
FLOP_FORMULA = (
    "per pair, T = real text tokens + real image tokens (no padding): "
    "L * [2*T*(4*H^2 + 2*H*I) + 4*T^2*H] + 2*H^2 + 2*H "
    "(Q, K, V, output and two MLP matmuls; QK^T and attention*V; pooler and ITM head)"
)


# -- configuration ------------------------------------------------------------------------------------


def _vilt_b32() -> dict[str, Any]:
    return {}  # ViltConfig() defaults are ViLT-B/32: hidden 768, 12 layers, 12 heads, MLP 3072


def _clip_b32_text() -> dict[str, Any]:
    return {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8}


def _clip_b32_vision() -> dict[str, Any]:
    return {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 224,
        "patch_size": 32,
    }


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how much. ``full()`` and ``quick()`` are the CLI's; tests pass tiny models."""

    #: ``ViltConfig`` overrides (none: ViLT-B/32) and the ViLT image processor's shorter edge.
    vilt: dict[str, Any] = field(default_factory=_vilt_b32)
    vilt_shortest_edge: int = 384
    #: CLIP text and vision ``CLIPConfig`` overrides (defaults: clip-vit-base-patch32 sizes).
    clip_text: dict[str, Any] = field(default_factory=_clip_b32_text)
    clip_vision: dict[str, Any] = field(default_factory=_clip_b32_vision)
    projection_dim: int = 512
    #: Text lengths in tokens ([CLS] and [SEP] included) and image sizes (width, height).
    text_tokens: tuple[int, ...] = (16, 40)
    image_sizes: tuple[tuple[int, int], ...] = ((384, 384), (576, 384))
    engine_pairs: int = 32
    naive_pairs: int = 4
    reps: int = 2
    batch_size: int = 16
    #: Index sizes, rerank candidates and queries per (size, candidates) for the latency table.
    index_sizes: tuple[int, ...] = (1_000, 10_000, 100_000)
    candidates: tuple[int, ...] = (16, 64)
    query_reps: int = 3
    image_tokens_per_entry: int = 145
    recall_queries: int = 100
    #: Generated JPEGs for the indexing measurement.
    jpeg_count: int = 6
    jpeg_size: tuple[int, int] = (4000, 3000)
    #: Rows written to a real SQLite store to measure its bytes per image.
    db_rows: int = 1000
    #: Matmul shapes (m, k, n) for the peak, and timed repetitions of each.
    peak_shapes: tuple[tuple[int, int, int], ...] = (
        (2048, 2048, 2048),
        (4096, 768, 3072),
        (2576, 768, 3072),
    )
    peak_reps: int = 5
    #: Distinct images scored with two texts, engine against fp32, for the logit difference.
    accuracy_images: int = 8
    precision: str = "auto"
    threads: int | None = None
    #: Where the models run: auto (CUDA when torch sees a GPU), cpu or cuda. Decoding, FAISS and
    #: the patch cache stay on the CPU either way.
    device: str = "auto"
    #: Matmul shapes for the peak on a GPU, where the CPU's are too small to fill the card.
    gpu_peak_shapes: tuple[tuple[int, int, int], ...] = (
        (8192, 8192, 8192),
        (16384, 768, 3072),
        (10304, 768, 3072),
    )
    #: Batch size of the fp32 rows of the steps table (None: ``batch_size``).
    fp32_step_batch: int | None = None
    #: Extra rows of the steps table: cached tokens at batch 1, bf16 with an fp32 residual stream, int8
    #: for comparison, and the engine at 1 thread.
    extra_steps: bool = True

    @classmethod
    def full(cls) -> BenchConfig:
        """The full run: real model sizes, N up to 100k, a few repetitions."""
        return cls()

    @classmethod
    def quick(cls) -> BenchConfig:
        """All four parts, small enough for CI (under a minute on 2 idle cores); same model sizes."""
        return cls(
            text_tokens=(16,),
            engine_pairs=16,
            naive_pairs=1,
            reps=1,
            batch_size=16,
            fp32_step_batch=8,
            index_sizes=(1_000,),
            candidates=(16,),
            query_reps=1,
            recall_queries=20,
            jpeg_count=1,
            db_rows=100,
            peak_shapes=((1024, 768, 3072), (2576, 768, 3072)),
            peak_reps=3,
            accuracy_images=4,
            extra_steps=False,
        )


# -- results ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MachineInfo:
    """The machine and the load on it."""

    cpu: str
    torch_capability: str
    flags: list[str]
    physical_cores: int
    usable_cpus: int
    threads: int
    torch: str
    load_start: tuple[float, float, float]
    load_end: tuple[float, float, float] = (0.0, 0.0, 0.0)
    #: Where the models ran: "cpu", or "cuda: <GPU name>".
    device: str = "cpu"


@dataclass(frozen=True)
class Peak:
    """The best matmul rate this machine reached in one dtype, over the shapes tried."""

    dtype: str
    gflops: float
    shape: tuple[int, int, int]
    kernel: str


@dataclass(frozen=True)
class RerankCase:
    """Naive and engine pairs/s for one text length and image size."""

    text_tokens: int
    image_tokens: int
    naive_pairs_per_s: float
    engine_pairs_per_s: float
    speedup: float
    gflop_per_pair: float
    engine_gflops: float
    engine_share_of_peak: float
    naive_gflops: float


@dataclass(frozen=True)
class Step:
    """One row of the steps table: how the engine's path gets from naive to where it is."""

    name: str
    dtype: str
    pairs_per_s: float
    speedup: float
    gflops: float
    share_of_peak: float
    #: Minor page faults per pair while timed: memory the allocator handed back and took again.
    page_faults_per_pair: float | None = None


@dataclass(frozen=True)
class TimeSplit:
    """Where one engine call spends its time, from a torch.profiler trace of the steps case."""

    #: Share of the traced time in the encoder's matmuls (Linear layers, fused or quantized).
    linear_share: float
    #: Useful GFLOP/s of those matmuls alone.
    linear_gflops: float
    #: Share in attention (SDPA, or the eager QK^T / softmax / attention*V).
    attention_share: float
    attention_gflops: float
    #: Share in everything else: LayerNorm, casts, adds, embeddings, the pooler and head.
    other_share: float
    #: The engine's share of the peak if its matmuls ran at the peak and the rest took as long as
    #: now: how far this machine's other kernels let it go.
    ceiling_share_of_peak: float


@dataclass(frozen=True)
class RerankResult:
    """Part 1."""

    precision: str
    reason: str
    engine_path: str
    threads: int
    flop_formula: str
    cases: list[RerankCase]
    steps: list[Step]
    step_case: tuple[int, int]
    max_abs_logit_diff_vs_fp32: float
    logit_std: float
    time_split: TimeSplit | None = None


@dataclass(frozen=True)
class Stage:
    """p50 and p95 of one stage, in milliseconds."""

    p50_ms: float
    p95_ms: float


@dataclass(frozen=True)
class LatencyRow:
    """Query latency at one index size and candidate count."""

    n: int
    candidates: int
    index: str
    queries: int
    encode: Stage
    faiss: Stage
    load: Stage
    rerank: Stage
    total: Stage


@dataclass(frozen=True)
class RecallRow:
    """Approximate (IVF) against exact search on one synthetic data set."""

    data: str
    n: int
    nlist: int
    nprobe: int
    recall: dict[str, float]
    exact_ms_per_query: float
    ivf_ms_per_query: float
    build_s: float


@dataclass(frozen=True)
class LatencyResult:
    """Part 2."""

    rows: list[LatencyRow]
    recall: list[RecallRow]
    approx_min_vectors: int
    notes: list[str]


@dataclass(frozen=True)
class IndexPath:
    """Images per second of one indexing path and where its time goes."""

    name: str
    images_per_s: float
    seconds: float
    share: dict[str, float]


@dataclass(frozen=True)
class IndexingResult:
    """Part 3."""

    images: int
    jpeg_size: tuple[int, int]
    mean_file_bytes: float
    draft_size: int
    engine: IndexPath
    naive: IndexPath
    speedup: float


@dataclass(frozen=True)
class SizesResult:
    """Part 4."""

    patch_cache_bytes_per_image: float
    vectors_bytes_per_image: float
    database_bytes_per_image: float
    total_bytes_per_image: float
    database: str
    peak_rss_mb: float
    #: Peak GPU memory torch allocated during the run (None on the CPU).
    gpu_peak_mb: float | None = None


@dataclass(frozen=True)
class BenchReport:
    """Everything ``retriever bench`` measured."""

    mode: str
    machine: MachineInfo
    peaks: list[Peak]
    rerank: RerankResult
    latency: LatencyResult
    indexing: IndexingResult
    sizes: SizesResult
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-friendly form."""
        return asdict(self)


# -- helpers ------------------------------------------------------------------------------------------


def _sig(x: float, digits: int = 4) -> float:
    """``x`` to ``digits`` significant digits (tiny test models have tiny figures; none rounds to 0)."""
    return float(f"{x:.{digits}g}")


def _percentile_ms(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q) * 1e3)


def _stage(values: Sequence[float]) -> Stage:
    return Stage(_sig(_percentile_ms(values, 50)), _sig(_percentile_ms(values, 95)))


def _best_time(fn: Callable[[], object], reps: int, warmup: Callable[[], object] | None = None) -> float:
    """The fastest of ``reps`` timed calls, after one untimed call of ``warmup`` (default: ``fn``).

    On a shared machine the minimum is the least disturbed figure.
    """
    (warmup or fn)()
    _synchronize()
    best = math.inf
    for _ in range(max(1, reps)):
        start = time.perf_counter()
        fn()
        _synchronize()
        best = min(best, time.perf_counter() - start)
    return max(best, 1e-9)


def _synchronize() -> None:
    """Wait for queued GPU work, so that a timer around a CUDA call measures the call."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        torch.cuda.synchronize()


def _load() -> tuple[float, float, float]:
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return (0.0, 0.0, 0.0)
    return (round(one, 2), round(five, 2), round(fifteen, 2))


def machine_info(cpu: CpuInfo, threads: int, device: torch.device = _CPU) -> MachineInfo:
    """The machine as the bench sees it, with the load average now."""
    where = "cpu"
    if device.type == "cuda":
        where = f"cuda: {torch.cuda.get_device_name(device)}"
    return MachineInfo(
        device=where,
        cpu=cpu.model_name,
        torch_capability=cpu.capability,
        flags=cpu.relevant_flags(),
        physical_cores=cpu.physical_cores,
        usable_cpus=cpu.usable_cpus,
        threads=threads,
        torch=torch.__version__,
        load_start=_load(),
    )


def pair_flops(text_tokens: int, image_tokens: int, config: Any) -> float:
    """Useful FLOPs of one pair (see ``FLOP_FORMULA``)."""
    t = text_tokens + image_tokens
    h = int(config.hidden_size)
    i = int(config.intermediate_size)
    layers = int(config.num_hidden_layers)
    return float(layers * (2 * t * (4 * h * h + 2 * h * i) + 4 * t * t * h) + 2 * h * h + 2 * h)


def attention_flops(text_tokens: int, image_tokens: int, config: Any) -> float:
    """The attention part of ``pair_flops``: QK^T and attention*V in every layer."""
    t = text_tokens + image_tokens
    return float(int(config.num_hidden_layers) * 4 * t * t * int(config.hidden_size))


_LINEAR_OPS = ("linear", "addmm", "aten::mm", "aten::matmul")
_ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "aten::bmm", "softmax", "baddbmm")


def _op_kind(name: str) -> str:
    lowered = name.lower()
    if any(key in lowered for key in _ATTENTION_OPS):
        return "attention"
    if any(key in lowered for key in _LINEAR_OPS):
        return "linear"
    return "other"


@contextlib.contextmanager
def _stderr_fd_silenced() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def time_split(
    reranker: ViltReranker,
    text: str,
    tokens: Sequence[np.ndarray],
    text_tokens: int,
    peak_gflops: float,
) -> TimeSplit | None:
    """Profile one ``score_pairs`` call and split its time into matmuls, attention and the rest.

    Self CPU time per op on the calling thread: intra-op worker threads run inside the op that
    started them, so the shares are shares of wall time. None when the profiler is unavailable.
    """
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    pairs = [(0, j) for j in range(len(tokens))]
    # The caller has run these shapes already (the steps table), so every kernel is warm.
    # The profiler's C++ side logs its start and stop to file descriptor 2; keep the report clean.
    with _stderr_fd_silenced(), profile(activities=[ProfilerActivity.CPU]) as prof:
        reranker.score_pairs([text], tokens, pairs)
    spent = {"linear": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        spent[_op_kind(event.key)] += float(event.self_cpu_time_total) / 1e6
    total = sum(spent.values())
    if total <= 0:
        return None
    config = reranker.model.config
    image_tokens = int(tokens[0].shape[0])
    flops_all = len(pairs) * pair_flops(text_tokens, image_tokens, config)
    flops_attention = len(pairs) * attention_flops(text_tokens, image_tokens, config)
    flops_linear = flops_all - flops_attention
    at_peak = flops_linear / (peak_gflops * 1e9) + spent["attention"] + spent["other"]
    return TimeSplit(
        linear_share=_sig(spent["linear"] / total),
        linear_gflops=_sig(flops_linear / max(spent["linear"], 1e-9) / 1e9),
        attention_share=_sig(spent["attention"] / total),
        attention_gflops=_sig(flops_attention / max(spent["attention"], 1e-9) / 1e9),
        other_share=_sig(spent["other"] / total),
        ceiling_share_of_peak=_sig(flops_all / at_peak / 1e9 / peak_gflops),
    )


# -- models -------------------------------------------------------------------------------------------


@dataclass
class BenchModels:
    """Random-weight ViLT and CLIP of the configured sizes, with their processors."""

    vilt: Any
    vilt_processor: Any
    clip: ClipEncoder
    words: list[str]


def build_models(
    cfg: BenchConfig, workdir: Path, *, seed: int = 0, device: torch.device = _CPU
) -> BenchModels:
    """A random ``ViltForImageAndTextRetrieval`` (fp32, CPU) and a random CLIP encoder on ``device``."""
    # transformers' constructors carry no usable annotations; go through the module as Any.
    hf: Any = importlib.import_module("transformers")

    from .training.tokenizers import clip_tokenizer, wordpiece_tokenizer

    # Every word is one WordPiece token, so a text of n-2 words is exactly n tokens with [CLS] and [SEP].
    words = [f"tok{i}" for i in range(200)]
    tokenizer = wordpiece_tokenizer(words, workdir / "vilt-vocab.txt", max_length=64)
    torch.manual_seed(seed)
    vilt_config = hf.ViltConfig(**{"vocab_size": len(tokenizer), "pad_token_id": 0, **cfg.vilt})
    vilt = hf.ViltForImageAndTextRetrieval(vilt_config).eval()
    emb = vilt.vilt.embeddings
    with torch.no_grad():
        emb.cls_token.normal_(std=0.02)
        emb.position_embeddings.normal_(std=0.02)
        # A fresh head gives every pair nearly the same logit; widen it (logit std of a few units across
        # pairs, like a trained ITM head) so that precision errors are measured against a real spread.
        for module in (vilt.vilt.pooler.dense, vilt.rank_output):
            module.weight.normal_(std=0.2)
    vilt_processor = hf.ViltProcessor(
        image_processor=hf.ViltImageProcessor(
            size={"shortest_edge": cfg.vilt_shortest_edge}, size_divisor=32
        ),
        tokenizer=tokenizer,
    )

    clip_tok = clip_tokenizer([" ".join(words[:50]), "a photo of a dog on a red car next to a tree"], 120)
    text_config = {
        "vocab_size": len(clip_tok),
        "max_position_embeddings": 77,
        "bos_token_id": clip_tok.bos_token_id,
        "eos_token_id": clip_tok.eos_token_id,
        "pad_token_id": clip_tok.pad_token_id,
        "projection_dim": cfg.projection_dim,
        **cfg.clip_text,
    }
    vision = {"projection_dim": cfg.projection_dim, **cfg.clip_vision}
    clip_config = hf.CLIPConfig(
        text_config=text_config, vision_config=vision, projection_dim=cfg.projection_dim
    )
    clip_model = hf.CLIPModel(clip_config).eval()
    size = int(vision.get("image_size", 224))
    clip_processor = hf.CLIPProcessor(
        image_processor=hf.CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        ),
        tokenizer=clip_tok,
    )
    clip = ClipEncoder(clip_model, clip_processor, name="bench-clip", fingerprint="bench", device=device)
    return BenchModels(vilt, vilt_processor, clip, words)


def make_reranker(
    models: BenchModels,
    choice: PrecisionChoice,
    *,
    batch_size: int,
    sdpa: bool = True,
    fp32_residual: bool = False,
    device: torch.device = _CPU,
) -> ViltReranker:
    """A ``ViltReranker`` on a copy of the bench ViLT, prepared as the engine prepares it."""
    return ViltReranker(
        copy.deepcopy(models.vilt),
        models.vilt_processor,
        name="bench-vilt",
        fingerprint="bench",
        device=device,
        batch_size=batch_size,
        precision=choice.precision,
        precision_reason=choice.reason,
        sdpa=sdpa,
        fp32_residual=fp32_residual,
    )


def _text(models: BenchModels, tokens: int, shift: int = 0) -> str:
    return " ".join(models.words[(7 * j + shift) % len(models.words)] for j in range(tokens - 2))


def synthetic_image(width: int, height: int, seed: int) -> Image.Image:
    """A smooth, photo-like RGB image (coloured blobs over a gradient, a little grain)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    base = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.integers(-6, 7, size=(height, width, 1), dtype=np.int16)
    arr = np.clip(np.asarray(base, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


# -- part 0: matmul peaks -----------------------------------------------------------------------------


def measure_gpu_peaks(cfg: BenchConfig, device: torch.device) -> list[Peak]:
    """The best matmul GFLOP/s per dtype on a CUDA device: fp32 (TF32 as torch is set), fp16, bf16.

    ``a @ b`` on ``cfg.gpu_peak_shapes`` (cuBLAS), ten timed calls after a warm-up, synchronised.
    """
    peaks: list[Peak] = []
    gen = torch.Generator(device=device).manual_seed(0)
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        best: Peak | None = None
        for m, k, n in cfg.gpu_peak_shapes:
            a = torch.randn(m, k, generator=gen, device=device).to(dtype)
            b = torch.randn(k, n, generator=gen, device=device).to(dtype)
            with torch.inference_mode():
                seconds = _best_time(functools.partial(torch.matmul, a, b), max(cfg.peak_reps, 10))
            rate = 2 * m * k * n / seconds / 1e9
            if best is None or rate > best.gflops:
                best = Peak(name, _sig(rate), (m, k, n), "matmul (cuBLAS)")
            del a, b
        if best is not None:
            peaks.append(best)
    torch.cuda.empty_cache()
    return peaks


def measure_peaks(cfg: BenchConfig, cpu: CpuInfo) -> list[Peak]:
    """The best matmul GFLOP/s per dtype over ``cfg.peak_shapes``: fp32, bf16, and int8 where it runs.

    fp32 and bf16 time ``a @ b`` (MKL/oneDNN), bf16 on a CPU with native bf16 also oneDNN's linear
    (the engine's kernel), the faster of the two; int8 times a dynamically quantized Linear of the
    same shape (the kernel the int8 engine runs, quantizing its input on each call). The shapes
    include the engine's own: a batch of 16 pairs of 161 tokens times ViLT-B's MLP weight.
    """
    peaks: list[Peak] = []
    gen = torch.Generator().manual_seed(0)
    dtypes = [("fp32", torch.float32), ("bf16", torch.bfloat16)]
    if cfg.precision == "fp16":
        dtypes.append(("fp16", torch.float16))
    for name, dtype in dtypes:
        best: Peak | None = None
        shapes = cfg.peak_shapes
        if dtype != torch.float32 and not cpu.native_bf16 and cfg.precision != name:
            # Emulated (about 1 GFLOP/s on AVX2): one small matmul shows it without minutes of waiting.
            shapes = ((512, 512, 512),)
        for m, k, n in shapes:
            a = torch.randn(m, k, generator=gen).to(dtype)
            b = torch.randn(k, n, generator=gen).to(dtype)
            kernels: list[tuple[str, Callable[[], object]]] = [
                ("matmul", functools.partial(torch.matmul, a, b))
            ]
            if dtype == torch.bfloat16 and cpu.native_bf16 and onednn_fusion_available():
                # The engine's own bf16 kernel: oneDNN's linear, on the weight in Linear's (n, k) layout.
                w = b.t().contiguous()
                kernels.append(("oneDNN linear", functools.partial(onednn_linear, a, w, None)))
            for kernel, fn in kernels:
                with torch.inference_mode():
                    seconds = _best_time(fn, cfg.peak_reps)
                rate = 2 * m * k * n / seconds / 1e9
                if best is None or rate > best.gflops:
                    best = Peak(name, _sig(rate), (m, k, n), kernel)
        if best is not None:
            peaks.append(best)
    engine = int8_engine(cpu)
    if engine is not None:
        best = None
        for m, k, n in cfg.peak_shapes:
            layer = torch.nn.Sequential(torch.nn.Linear(k, n)).eval()
            quantize_int8(layer, engine)
            x = torch.randn(m, k, generator=gen)
            with torch.inference_mode():
                seconds = _best_time(functools.partial(layer, x), cfg.peak_reps)
            rate = 2 * m * k * n / seconds / 1e9
            if best is None or rate > best.gflops:
                best = Peak("int8", _sig(rate), (m, k, n), f"dynamic quantized Linear ({engine})")
        if best is not None:
            peaks.append(best)
    return peaks


def _peak_of(peaks: Sequence[Peak], dtype: str) -> float:
    for p in peaks:
        if p.dtype == dtype:
            return p.gflops
    return math.nan


# -- part 1: rerank throughput ------------------------------------------------------------------------


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
    seconds = _best_time(
        lambda: reranker.score_pairs([text], tokens, pairs),
        reps,
        warmup=lambda: reranker.score_pairs([text], tokens, first),
    )
    faults = _minor_faults() - faults
    return len(pairs) / seconds, faults / (len(first) + max(1, reps) * len(pairs))


def _naive_rate(model: Any, processor: Any, text: str, image: Image.Image, pairs: int, reps: int) -> float:
    device = next(model.parameters()).device

    def one() -> None:
        inputs = processor(images=image, text=text, return_tensors="pt").to(device)
        float(model(**inputs).logits[0, 0])  # the score, as a caller would read it

    def run() -> None:
        for _ in range(pairs):
            one()

    with torch.inference_mode():
        seconds = _best_time(run, reps, warmup=one)
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
    step = on_step or (lambda _msg: None)
    config = models.vilt.config
    choice = PrecisionChoice(engine.precision, engine.precision_reason)
    images = [synthetic_image(w, h, seed=i) for i, (w, h) in enumerate(cfg.image_sizes)]
    device = engine.device
    naive_model = copy.deepcopy(models.vilt).to(device)
    cached = _cached_tokens(engine, images, workdir / "rerank-patches.f16", cfg.engine_pairs)
    dtype_name: str = choice.precision

    cases: list[RerankCase] = []
    for text_tokens in cfg.text_tokens:
        text = _text(models, text_tokens)
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
                    naive_pairs_per_s=_sig(naive),
                    engine_pairs_per_s=_sig(fast),
                    speedup=_sig(fast / naive),
                    gflop_per_pair=_sig(flops / 1e9),
                    engine_gflops=_sig(fast * flops / 1e9),
                    engine_share_of_peak=_sig(fast * flops / 1e9 / _peak_of(peaks, dtype_name)),
                    naive_gflops=_sig(naive * flops / 1e9),
                )
            )

    # The steps table, on the first case: what each change adds.
    text_tokens = cfg.text_tokens[0]
    text = _text(models, text_tokens)
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
            _sig(naive_gflops),
            _sig(naive_gflops / _peak_of(peaks, "fp32")),
        )
    ]
    fp32 = PrecisionChoice("fp32", "step")
    # fp32 runs 4-8x slower than the engine: one batch per timed call keeps the table affordable.
    fp32_batch = min(cfg.fp32_step_batch or cfg.batch_size, cfg.engine_pairs)

    def add(name: str, dtype: str, reranker: ViltReranker, count: int) -> None:
        step(f"rerank steps: {name}")
        rate, faults = _engine_rate(reranker, text, tokens[:count], cfg.reps)
        gflops = rate * flops / 1e9
        share = gflops / _peak_of(peaks, dtype)
        steps.append(
            Step(name, dtype, _sig(rate), _sig(rate / base), _sig(gflops), _sig(share), _sig(faults))
        )

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
        configure_threads(1)
        try:
            add("engine at 1 thread", dtype_name, engine, cfg.engine_pairs)
        finally:
            configure_threads(threads)

    split = None
    if on_cpu:  # on a GPU the CPU-side op times say nothing about the kernels
        step("rerank: where the engine's time goes (torch.profiler)")
        split = time_split(engine, text, tokens[: cfg.engine_pairs], text_tokens, _peak_of(peaks, dtype_name))

    # Accuracy: distinct images, two texts, engine against the fp32 path.
    step("rerank: engine logits against fp32")
    sizes = cfg.image_sizes
    acc_tokens = [
        engine.embed_image(synthetic_image(*sizes[i % len(sizes)], seed=50 + i))
        for i in range(cfg.accuracy_images)
    ]
    texts = [_text(models, text_tokens), _text(models, text_tokens, shift=3)]
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
        max_abs_logit_diff_vs_fp32=_sig(float(np.max(np.abs(got - reference)))),
        logit_std=_sig(float(np.std(reference))),
        time_split=split,
    )


# -- part 2: query latency ----------------------------------------------------------------------------


def synthetic_vectors(n: int, dim: int, *, clustered: bool, seed: int) -> np.ndarray:
    """Unit vectors: clustered (topics of about 500 vectors, cosine about 0.6 to their centre) or uniform."""
    rng = np.random.default_rng(seed)
    if clustered:
        centres = rng.standard_normal((max(1, n // 500), dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        x = centres[rng.integers(0, len(centres), n)]
        x = x + rng.standard_normal((n, dim)).astype(np.float32) * (1.35 / math.sqrt(dim))
    else:
        x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


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
        f"@{c}": _sig(
            float(np.mean([len(set(truth[i, :c]) & set(found[i, :c])) / c for i in range(queries)])), 4
        )
        for c in candidates
    }
    inner = approx._index
    return RecallRow(
        data=data,
        n=n,
        nlist=int(inner.nlist),
        nprobe=int(inner.nprobe),
        recall=recall,
        exact_ms_per_query=_sig(exact_ms),
        ivf_ms_per_query=_sig(ivf_ms),
        build_s=_sig(build),
    )


def bench_latency(
    cfg: BenchConfig,
    models: BenchModels,
    reranker: ViltReranker,
    workdir: Path,
    on_step: StepFn | None = None,
) -> LatencyResult:
    """Part 2: per-stage p50/p95 of text→image queries over synthetic indexes, and IVF recall."""
    step = on_step or (lambda _msg: None)
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
                    encode=_stage(times["encode"]),
                    faiss=_stage(times["faiss"]),
                    load=_stage(times["load"]),
                    rerank=_stage(times["rerank"]),
                    total=_stage(times["total"]),
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


# -- part 3: indexing ---------------------------------------------------------------------------------


def write_jpegs(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """``count`` photo-like JPEGs of ``size`` (width, height), quality 90."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"photo-{i:03d}.jpg"
        synthetic_image(size[0], size[1], seed=100 + i).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


@dataclass
class _Encoded:
    vector: np.ndarray
    tokens: np.ndarray
    width: int
    height: int
    digest: str


def _index_path(
    name: str, files: Sequence[Path], models: BenchModels, reranker: ViltReranker, *, draft: bool
) -> tuple[IndexPath, list[_Encoded]]:
    spent = {"read": 0.0, "decode": 0.0, "clip": 0.0, "vilt_embed": 0.0}
    out: list[_Encoded] = []
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
        out.append(_Encoded(vector, tokens, width, height, hashlib.sha256(data).hexdigest()))
    total = sum(spent.values())
    return (
        IndexPath(
            name=name,
            images_per_s=_sig(len(files) / total),
            seconds=_sig(total),
            share={k: _sig(v / total) for k, v in spent.items()},
        ),
        out,
    )


def bench_indexing(
    cfg: BenchConfig, models: BenchModels, reranker: ViltReranker, files: Sequence[Path]
) -> tuple[IndexingResult, list[_Encoded]]:
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
        speedup=_sig(engine.images_per_s / naive.images_per_s),
    )
    return result, encoded


# -- part 4: sizes ------------------------------------------------------------------------------------


def bench_sizes(
    cfg: BenchConfig, models: BenchModels, reranker: ViltReranker, encoded: Sequence[_Encoded], home: Path
) -> SizesResult:
    """Part 4: a real index (SQLite, patch cache, FAISS file) of the indexed images, padded to ``db_rows``."""
    library = Library(home)
    try:
        info = ModelInfo("bench-clip", "bench", models.clip.dim, "bench-vilt", "bench", reranker.hidden)
        library.check_models(info, record=True)
        empty_db = library.store.database_bytes() or 0
        extents = library.patches().append([e.tokens for e in encoded])
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
        library.commit(batch, info)
        library.save_vectors()
        db = (library.store.database_bytes() or 0) - empty_db
        faiss_bytes = sum(p.stat().st_size for p in home.glob("images-*.faiss"))
        patch = library.patches().nbytes / len(encoded)
    finally:
        library.close()
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


# -- the whole run ------------------------------------------------------------------------------------


def run_bench(
    cfg: BenchConfig, *, mode: str = "custom", workdir: Path | None = None, on_step: StepFn | None = None
) -> BenchReport:
    """All four parts, in one process, on this machine."""
    started = time.perf_counter()
    step = on_step or (lambda _msg: None)
    cpu = read_cpu_info()
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        # The engine's own batch on a GPU, and enough pairs for a few of them per timed call.
        batch = rerank_batch_size(device)
        cfg = replace(cfg, batch_size=batch, engine_pairs=max(cfg.engine_pairs, 2 * batch))
    threads = configure_threads(cfg.threads or usable_threads(cpu))
    machine = machine_info(cpu, threads, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="retriever-bench-", dir=workdir) as tmp:
        root = Path(tmp)
        step("building random-weight models")
        models = build_models(cfg, root, device=device)
        hidden = int(models.vilt.config.hidden_size)
        choice = choose_precision(device, cfg.precision, hidden=hidden, cpu=cpu)
        step("matmul peaks")
        peaks = measure_gpu_peaks(cfg, device) if device.type == "cuda" else measure_peaks(cfg, cpu)
        engine = make_reranker(models, choice, batch_size=cfg.batch_size, device=device)
        rerank = bench_rerank(cfg, models, engine, peaks, threads, root, step)
        latency = bench_latency(cfg, models, engine, root, step)
        step("indexing")
        files = write_jpegs(root / "photos", cfg.jpeg_count, cfg.jpeg_size)
        indexing, encoded = bench_indexing(cfg, models, engine, files)
        step("sizes")
        sizes = bench_sizes(cfg, models, engine, encoded, root / "index")
    if device.type == "cuda":
        sizes = replace(sizes, gpu_peak_mb=round(torch.cuda.max_memory_allocated(device) / 2**20, 1))
    machine = replace(machine, load_end=_load())
    return BenchReport(
        mode=mode,
        machine=machine,
        peaks=peaks,
        rerank=rerank,
        latency=latency,
        indexing=indexing,
        sizes=sizes,
        seconds=round(time.perf_counter() - started, 1),
    )


__all__ = [
    "DTYPES",
    "FLOP_FORMULA",
    "BenchConfig",
    "BenchReport",
    "bench_indexing",
    "bench_latency",
    "bench_rerank",
    "bench_sizes",
    "build_models",
    "measure_peaks",
    "measure_recall",
    "pair_flops",
    "run_bench",
]
