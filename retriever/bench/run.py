"""The whole run: the machine, the peaks, then parts 1 to 4, in one process, into one ``BenchReport``."""

from __future__ import annotations

import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..hardware import (
    KEEP_FREED_BYTES,
    CpuInfo,
    bench_batch_size,
    configure_plan,
    plan_hardware,
    read_cpu_info,
    resolve_device,
    usable_threads,
)
from .config import BenchConfig
from .indexing import bench_indexing
from .latency import bench_latency
from .models import CPU, build_models, make_reranker
from .peaks import measure_gpu_peaks, measure_peaks
from .report import BenchReport, MachineInfo
from .rerank import bench_rerank
from .sizes import bench_sizes
from .synthetic import write_jpegs
from .timing import StepFn, load_average, no_steps


def machine_info(cpu: CpuInfo, threads: int, device: torch.device = CPU) -> MachineInfo:
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
        load_start=load_average(),
    )


def run_bench(
    cfg: BenchConfig, *, mode: str = "custom", workdir: Path | None = None, on_step: StepFn | None = None
) -> BenchReport:
    """All four parts, in one process, on this machine."""
    started = time.perf_counter()
    step = on_step or no_steps
    cpu = read_cpu_info()
    device = resolve_device(cfg.device)
    batch = bench_batch_size(device, cfg.batch_size)
    # Enough pairs for a few of the engine's batches per timed call.
    cfg = replace(cfg, batch_size=batch, engine_pairs=max(cfg.engine_pairs, 2 * batch))
    # The bench is a program: its one process set-up (threads, malloc, quantized engine) happens here,
    # for the reranker's size, which the configuration fixes before any model is built.
    plan = plan_hardware(
        device,
        cfg.precision,
        hidden=int(cfg.vilt.get("hidden_size", 768)),
        threads=cfg.threads or usable_threads(cpu),
        keep_freed=KEEP_FREED_BYTES if cfg.keep_freed is None else cfg.keep_freed,
        cpu=cpu,
    )
    setup = configure_plan(plan)
    threads = setup.threads or torch.get_num_threads()
    machine = machine_info(cpu, threads, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory(prefix="retriever-bench-", dir=workdir) as tmp:
        root = Path(tmp)
        step("building random-weight models")
        models = build_models(cfg, root, device=device)
        choice = plan.precision_choice
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
    machine = replace(machine, load_end=load_average())
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
