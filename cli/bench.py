"""``retriever bench``: rerank throughput, query latency, indexing throughput and sizes on this machine."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from .common import errors_as_messages, keep_freed_setting, quiet_transformers
from .options import Device, JsonOut


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

    from retriever.bench import BenchConfig, format_report, run_bench

    # The bench tokenizes while torch runs its own thread pool; tokenizers' pool on top would oversubscribe.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_transformers()
    cfg = BenchConfig.quick() if quick else BenchConfig.full()
    cfg = replace(cfg, precision=precision, threads=threads, device=device, keep_freed=keep_freed_setting())

    def on_step(message: str) -> None:
        if not json_out:
            typer.echo(f"… {message}", err=True)

    with errors_as_messages():
        report = run_bench(cfg, mode="quick" if quick else "full", workdir=work_dir, on_step=on_step)
    if json_out:
        typer.echo(json.dumps(report.as_dict()))
    else:
        typer.echo(format_report(report))
