"""What ``retriever bench`` found: one dataclass per part, ``BenchReport`` over them, and its text form.

Plain data, no torch: the figures go to JSON through ``BenchReport.as_dict`` and to a terminal
through ``format_report``, and nothing else reads them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


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

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return asdict(self)


# -- text form ----------------------------------------------------------------------------------------


def format_report(report: BenchReport) -> str:
    """The report as the terminal table ``retriever bench`` prints: machine, peaks, then parts 1 to 4."""
    lines = _machine_lines(report)
    lines += _rerank_lines(report.rerank)
    lines += _latency_lines(report.latency)
    lines += _indexing_lines(report.indexing)
    lines += _sizes_lines(report.sizes)
    return "\n".join(lines)


def _load_average(avg: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in avg)


def _ms(stage: Stage) -> str:
    return f"{stage.p50_ms:>8.1f} {stage.p95_ms:>8.1f}"


def _machine_lines(report: BenchReport) -> list[str]:
    m = report.machine
    lines = [
        f"retriever bench ({report.mode}) — {report.seconds:.0f} s",
        f"machine: {m.cpu or 'unknown CPU'}; torch {m.torch} dispatches {m.torch_capability}; "
        f"{m.physical_cores} physical cores, {m.usable_cpus} usable CPUs, torch threads {m.threads}",
        f"CPU flags: {', '.join(m.flags) or 'none of interest'}",
        f"models run on: {m.device}",
        f"load average (1/5/15 min): start {_load_average(m.load_start)}, end {_load_average(m.load_end)} "
        f"(timings are shared-machine figures when these exceed {m.physical_cores})",
        "",
        "matmul peak, measured now:",
    ]
    for p in report.peaks:
        m_, k_, n_ = p.shape
        lines.append(f"  {p.dtype:>5}: {p.gflops:8.1f} GFLOP/s  ({p.kernel}, {m_}x{k_}·{k_}x{n_})")
    return lines


def _rerank_lines(r: RerankResult) -> list[str]:
    lines = [
        "",
        "1. rerank throughput (random ViLT of the configured size)",
        f"   engine path: {r.engine_path}; threads {r.threads}",
        f"   precision {r.precision} because: {r.reason}",
        f"   useful FLOPs: {r.flop_formula}",
        f"   {'text':>5} {'image':>5} {'naive/s':>9} {'engine/s':>9} {'ratio':>6} {'GFLOP/pair':>10} "
        f"{'GFLOP/s':>8} {'of peak':>8}",
    ]
    for c in r.cases:
        lines.append(
            f"   {c.text_tokens:>5} {c.image_tokens:>5} {c.naive_pairs_per_s:>9.2f} "
            f"{c.engine_pairs_per_s:>9.2f} {c.speedup:>5.1f}x {c.gflop_per_pair:>10.2f} "
            f"{c.engine_gflops:>8.1f} {c.engine_share_of_peak:>8.1%}"
        )
    lines.append(f"   steps ({r.step_case[0]} text + {r.step_case[1]} image tokens):")
    lines.append(f"   {'pairs/s':>9} {'vs naive':>8} {'GFLOP/s':>8} {'of peak':>8} {'faults/pair':>11}  step")
    for s in r.steps:
        faults = "" if s.page_faults_per_pair is None else f"{s.page_faults_per_pair:,.0f}"
        lines.append(
            f"   {s.pairs_per_s:>9.2f} {s.speedup:>7.1f}x {s.gflops:>8.1f} {s.share_of_peak:>8.1%} "
            f"{faults:>11}  {s.name} [{s.dtype} peak]"
        )
    split = r.time_split
    if split is not None:
        lines.append(
            f"   engine time: matmuls {split.linear_share:.0%} at {split.linear_gflops:.0f} GFLOP/s, "
            f"attention {split.attention_share:.0%} at {split.attention_gflops:.0f} GFLOP/s, "
            f"other {split.other_share:.0%}; with its matmuls at the peak the engine would reach "
            f"{split.ceiling_share_of_peak:.0%} of it"
        )
    lines.append(
        f"   engine logits against fp32: max |diff| {r.max_abs_logit_diff_vs_fp32:.4f}, "
        f"logit std {r.logit_std:.4f}"
    )
    return lines


def _latency_lines(lat: LatencyResult) -> list[str]:
    lines = [
        "",
        "2. query latency, ms (p50 p95)",
        f"   {'N':>7} {'cand':>4} {'index':>12} {'q':>2}  {'encode':>17} {'faiss':>17} {'load':>17} "
        f"{'rerank':>17} {'total':>17}",
    ]
    for row in lat.rows:
        lines.append(
            f"   {row.n:>7} {row.candidates:>4} {row.index:>12} {row.queries:>2}  {_ms(row.encode)} "
            f"{_ms(row.faiss)} {_ms(row.load)} {_ms(row.rerank)} {_ms(row.total)}"
        )
    lines.append(
        f"   approximate index (IVF) from {lat.approx_min_vectors:,} vectors on; recall against exact:"
    )
    for rec in lat.recall:
        recall = ", ".join(f"recall{k} {v:.3f}" for k, v in rec.recall.items())
        lines.append(
            f"   {rec.data:>22}: N={rec.n:,}, {rec.nlist} lists, nprobe {rec.nprobe}: {recall}; "
            f"exact {rec.exact_ms_per_query:.2f} ms/query, IVF {rec.ivf_ms_per_query:.2f} ms/query, "
            f"built in {rec.build_s:.1f} s"
        )
    lines += [f"   note: {note}" for note in lat.notes]
    return lines


def _indexing_lines(ix: IndexingResult) -> list[str]:
    lines = [
        "",
        f"3. indexing throughput: {ix.images} JPEGs of {ix.jpeg_size[0]}x{ix.jpeg_size[1]} "
        f"({ix.mean_file_bytes / 1e6:.1f} MB each)",
    ]
    for path in (ix.naive, ix.engine):
        share = ", ".join(f"{k} {v:.0%}" for k, v in path.share.items())
        lines.append(f"   {path.images_per_s:>7.2f} images/s  {path.name}  ({share})")
    lines.append(f"   engine / naive: {ix.speedup:.2f}x")
    return lines


def _sizes_lines(sz: SizesResult) -> list[str]:
    return [
        "",
        "4. sizes",
        f"   per image on disk: patch cache {sz.patch_cache_bytes_per_image:,.0f} B, "
        f"vectors (FAISS file) {sz.vectors_bytes_per_image:,.0f} B, "
        f"database {sz.database_bytes_per_image:,.0f} B ({sz.database}); "
        f"total {sz.total_bytes_per_image:,.0f} B",
        f"   peak resident memory of this run: {sz.peak_rss_mb:,.0f} MB"
        + ("" if sz.gpu_peak_mb is None else f"; peak GPU memory allocated: {sz.gpu_peak_mb:,.0f} MB"),
    ]
