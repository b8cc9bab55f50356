"""The matmul peak this machine reaches now, per dtype: the denominator of every share-of-peak figure.

Measured in the same run as the engine, so that both figures see the same clocks and the same load.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import torch

from ..hardware import CpuInfo, int8_engine
from ..vilt_fast import onednn_fusion_available, onednn_linear, quantize_int8
from .config import BenchConfig
from .report import Peak
from .timing import best_time, sig


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
                seconds = best_time(functools.partial(torch.matmul, a, b), max(cfg.peak_reps, 10))
            rate = 2 * m * k * n / seconds / 1e9
            if best is None or rate > best.gflops:
                best = Peak(name, sig(rate), (m, k, n), "matmul (cuBLAS)")
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
            # Emulated in software and slow: one small matmul shows it without minutes of waiting.
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
                    seconds = best_time(fn, cfg.peak_reps)
                rate = 2 * m * k * n / seconds / 1e9
                if best is None or rate > best.gflops:
                    best = Peak(name, sig(rate), (m, k, n), kernel)
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
                seconds = best_time(functools.partial(layer, x), cfg.peak_reps)
            rate = 2 * m * k * n / seconds / 1e9
            if best is None or rate > best.gflops:
                best = Peak("int8", sig(rate), (m, k, n), f"dynamic quantized Linear ({engine})")
        if best is not None:
            peaks.append(best)
    return peaks


def peak_of(peaks: Sequence[Peak], dtype: str) -> float:
    """The measured peak GFLOP/s in ``dtype``; NaN when it was not measured."""
    for p in peaks:
        if p.dtype == dtype:
            return p.gflops
    return math.nan
