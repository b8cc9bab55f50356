"""``retriever bench``: what the engine achieves on this machine, each figure beside its baseline.

Four measurements, all on random-weight models of the real models' sizes (no download needed):

1. rerank throughput (``rerank``): the engine (cached fp16 tokens from a real ``PatchCache`` file,
   batched, in the precision ``retriever.hardware`` picks) against the naive path (``ViltProcessor`` on
   each PIL image, then the model at batch size 1 in fp32), with the useful FLOP rate (``flops``) as a
   share of the matmul peak this machine reaches in the same dtype, measured in the same run
   (``peaks``); a table of the steps between, and where the engine's time goes (``profiler``);
2. query latency (``latency``): text encoding, FAISS, cache loading and rerank, p50 and p95, over
   synthetic indexes; and the recall the approximate (IVF) index keeps against exact search;
3. indexing throughput (``indexing``) over large generated JPEGs: draft decoding against full decoding;
4. sizes on disk per image, and the peak memory of the run (``sizes``).

``config`` says what to measure, ``models`` and ``synthetic`` build the inputs, ``run`` runs it all,
and every part returns a dataclass of ``report``; nothing here prints (``format_report`` gives the
text). Timings depend on what else runs on the machine, so ``MachineInfo`` carries the load average at
the start and the end.

The configuration, the report, the FLOP count and the synthetic data import no torch and no engine;
the measuring functions load on first use, so that a test importing ``retriever.bench.synthetic``
does not pull in the harness.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from .config import BenchConfig
from .flops import FLOP_FORMULA, pair_flops
from .report import BenchReport, format_report

if TYPE_CHECKING:
    from .indexing import bench_indexing
    from .latency import bench_latency, measure_recall
    from .models import build_models
    from .peaks import measure_peaks
    from .rerank import bench_rerank
    from .run import run_bench
    from .sizes import bench_sizes

#: The names that load their module on first use, and where they live.
_LAZY = {
    "bench_indexing": "indexing",
    "bench_latency": "latency",
    "measure_recall": "latency",
    "build_models": "models",
    "measure_peaks": "peaks",
    "bench_rerank": "rerank",
    "run_bench": "run",
    "bench_sizes": "sizes",
}


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f".{module}", __name__), name)


__all__ = [
    "FLOP_FORMULA",
    "BenchConfig",
    "BenchReport",
    "bench_indexing",
    "bench_latency",
    "bench_rerank",
    "bench_sizes",
    "build_models",
    "format_report",
    "measure_peaks",
    "measure_recall",
    "pair_flops",
    "run_bench",
]
