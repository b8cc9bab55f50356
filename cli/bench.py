"""``retriever bench``: rerank throughput, query latency, indexing throughput and sizes on this machine."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from .common import errors_as_messages, quiet_transformers
from .options import Device, JsonOut


def _load(avg: tuple[float, float, float]) -> str:
    return "/".join(f"{x:.2f}" for x in avg)


def _ms(stage: Any) -> str:
    return f"{stage.p50_ms:>8.1f} {stage.p95_ms:>8.1f}"


def _report_text(report: Any) -> str:
    m = report.machine
    r = report.rerank
    lines = [
        f"retriever bench ({report.mode}) — {report.seconds:.0f} s",
        f"machine: {m.cpu or 'unknown CPU'}; torch {m.torch} dispatches {m.torch_capability}; "
        f"{m.physical_cores} physical cores, {m.usable_cpus} usable CPUs, torch threads {m.threads}",
        f"CPU flags: {', '.join(m.flags) or 'none of interest'}",
        f"models run on: {m.device}",
        f"load average (1/5/15 min): start {_load(m.load_start)}, end {_load(m.load_end)} "
        f"(timings are shared-machine figures when these exceed {m.physical_cores})",
        "",
        "matmul peak, measured now:",
    ]
    for p in report.peaks:
        m_, k_, n_ = p.shape
        lines.append(f"  {p.dtype:>5}: {p.gflops:8.1f} GFLOP/s  ({p.kernel}, {m_}x{k_}·{k_}x{n_})")
    lines += [
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
    lat = report.latency
    lines += [
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
    lines += [f"   note: {n}" for n in lat.notes]
    ix = report.indexing
    lines += [
        "",
        f"3. indexing throughput: {ix.images} JPEGs of {ix.jpeg_size[0]}x{ix.jpeg_size[1]} "
        f"({ix.mean_file_bytes / 1e6:.1f} MB each)",
    ]
    for path in (ix.naive, ix.engine):
        share = ", ".join(f"{k} {v:.0%}" for k, v in path.share.items())
        lines.append(f"   {path.images_per_s:>7.2f} images/s  {path.name}  ({share})")
    lines.append(f"   engine / naive: {ix.speedup:.2f}x")
    sz = report.sizes
    lines += [
        "",
        "4. sizes",
        f"   per image on disk: patch cache {sz.patch_cache_bytes_per_image:,.0f} B, "
        f"vectors (FAISS file) {sz.vectors_bytes_per_image:,.0f} B, "
        f"database {sz.database_bytes_per_image:,.0f} B ({sz.database}); "
        f"total {sz.total_bytes_per_image:,.0f} B",
        f"   peak resident memory of this run: {sz.peak_rss_mb:,.0f} MB"
        + ("" if sz.gpu_peak_mb is None else f"; peak GPU memory allocated: {sz.gpu_peak_mb:,.0f} MB"),
    ]
    return "\n".join(lines)


def bench_command(
    quick: Annotated[
        bool, typer.Option("--quick", help="A small run of every part (under a minute on 2 cores), for CI.")
    ] = False,
    precision: Annotated[
        str, typer.Option("--precision", help="Engine precision: auto, fp32, bf16, fp16 or int8.")
    ] = "auto",
    threads: Annotated[
        int | None,
        typer.Option(
            "--threads", min=1, help="torch threads. Default: one per physical core.", show_default=False
        ),
    ] = None,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            "--work-dir", help="Where scratch files go. Default: the system temp dir.", show_default=False
        ),
    ] = None,
    device: Device = "auto",
    json_out: JsonOut = False,
) -> None:
    """Measure rerank throughput, query latency, indexing throughput and sizes, each beside its baseline."""
    from dataclasses import replace

    from retriever.bench import BenchConfig, run_bench

    # The bench tokenizes while torch runs its own thread pool; tokenizers' pool on top would oversubscribe.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_transformers()
    cfg = BenchConfig.quick() if quick else BenchConfig.full()
    cfg = replace(cfg, precision=precision, threads=threads, device=device)

    def on_step(message: str) -> None:
        if not json_out:
            typer.echo(f"… {message}", err=True)

    with errors_as_messages():
        report = run_bench(cfg, mode="quick" if quick else "full", workdir=work_dir, on_step=on_step)
    if json_out:
        typer.echo(json.dumps(report.as_dict()))
    else:
        typer.echo(_report_text(report))
