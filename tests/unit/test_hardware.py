"""retriever.hardware: CPU features, the precision choice, the plan, and the one process set-up.

SearchIndex code decides but never changes process-wide state; the program's edge reads ``RETRIEVER_*``
variables and makes the one ``configure_process`` call.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from retriever.cli.common import keep_freed_setting
from retriever.errors import RetrieverError
from retriever.hardware import (
    KEEP_FREED_BYTES,
    CpuInfo,
    choose_precision,
    configure_process,
    configure_threads,
    int8_engine,
    parse_cpuinfo,
    plan_hardware,
    read_cpu_info,
    training_autocast,
    usable_threads,
)

CPU = torch.device("cpu")
AMX_FLAGS = "fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni amx_tile amx_bf16 amx_int8"
AVX2_FLAGS = "fpu sse2 avx avx2 fma"


def _cpuinfo_text(flags: str, topology: list[tuple[int, int]]) -> str:
    blocks = []
    for cpu, (package, core) in enumerate(topology):
        blocks.append(
            f"processor\t: {cpu}\nmodel name\t: Test CPU\nphysical id\t: {package}\ncore id\t\t: {core}\n"
            f"flags\t\t: {flags}\n"
        )
    return "\n".join(blocks)


def _cpu(flags: str, capability: str) -> CpuInfo:
    return CpuInfo(capability=capability, flags=frozenset(flags.split()), physical_cores=2, usable_cpus=2)


def keep_freed_memory() -> bool:
    """What a program does for malloc where it starts: the variable read at the edge, then applied."""
    return configure_process(keep_freed=keep_freed_setting()).malloc_keeps_freed


# -- CPU features and the precision choice -------------------------------------------------------------


def test_parse_cpuinfo_counts_hyperthreads_once() -> None:
    # 4 logical CPUs: two cores with two hyperthreads each.
    flags, cores, model = parse_cpuinfo(_cpuinfo_text(AVX2_FLAGS, [(0, 0), (0, 1), (0, 0), (0, 1)]))
    assert "avx2" in flags and "amx_bf16" not in flags
    assert len(cores) == 4 and len(set(cores.values())) == 2
    assert model == "Test CPU"


def test_read_cpu_info_on_this_machine(tmp_path: Path) -> None:
    info = read_cpu_info()
    assert 1 <= info.physical_cores <= info.usable_cpus
    assert info.capability == torch.backends.cpu.get_cpu_capability()
    # No /proc/cpuinfo (another OS): no flags, and every usable CPU counts as a core.
    bare = read_cpu_info(tmp_path / "missing")
    assert bare.flags == frozenset() and bare.physical_cores == bare.usable_cpus
    assert usable_threads(bare) == bare.physical_cores


def test_auto_picks_bf16_where_the_cpu_has_it() -> None:
    choice = choose_precision(CPU, "auto", hidden=768, cpu=_cpu(AMX_FLAGS, "AVX512"))
    assert choice.precision == "bf16" and "amx_bf16" in choice.reason
    # The flags alone are not enough: torch must dispatch AVX512 kernels.
    assert choose_precision(CPU, "auto", hidden=768, cpu=_cpu(AMX_FLAGS, "AVX2")).precision != "bf16"


def test_auto_without_amx_prefers_vnni_int8_to_avx512_bf16() -> None:
    zen4 = _cpu("fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni", "AVX512")
    cascade_lake = _cpu("fpu sse2 avx avx2 fma avx512f avx512bw avx512_vnni", "AVX512")
    bf16_only = _cpu("fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16", "AVX512")
    if "onednn" not in torch.backends.quantized.supported_engines:
        pytest.skip("this torch has no oneDNN quantized engine")
    for cpu in (zen4, cascade_lake):
        assert int8_engine(cpu) == "onednn"
        choice = choose_precision(CPU, "auto", hidden=768, cpu=cpu)
        assert choice.precision == "int8" and "onednn" in choice.reason
    # AVX512-BF16 without VNNI (no such CPU is sold, but the rule must not depend on that): bf16.
    assert int8_engine(bf16_only) in ("x86", "fbgemm")
    assert choose_precision(CPU, "auto", hidden=768, cpu=bf16_only).precision == "bf16"
    # Plain AVX2 keeps fbgemm, whose kernels need no VNNI.
    assert int8_engine(_cpu(AVX2_FLAGS, "AVX2")) in ("x86", "fbgemm")


def test_auto_on_avx2_only_is_int8_or_fp32() -> None:
    cpu = _cpu(AVX2_FLAGS, "AVX2")
    choice = choose_precision(CPU, "auto", hidden=768, cpu=cpu)
    expected = "int8" if int8_engine(cpu) is not None else "fp32"
    assert choice.precision == expected
    assert choose_precision(CPU, "auto", hidden=768, cpu=_cpu("fpu sse2", "DEFAULT")).precision == "fp32"


def test_small_models_stay_fp32() -> None:
    assert choose_precision(CPU, "auto", hidden=32, cpu=_cpu(AMX_FLAGS, "AVX512")).precision == "fp32"


def test_explicit_precision_and_cuda() -> None:
    cpu = _cpu(AVX2_FLAGS, "AVX2")
    forced = choose_precision(CPU, "bf16", cpu=cpu)
    assert forced.precision == "bf16" and "emulate" in forced.reason
    assert choose_precision(CPU, "fp32", cpu=_cpu(AMX_FLAGS, "AVX512")).precision == "fp32"
    assert choose_precision(torch.device("cuda"), "auto").precision == "fp16"
    with pytest.raises(RetrieverError):
        choose_precision(torch.device("cuda"), "int8")
    with pytest.raises(RetrieverError):
        choose_precision(CPU, "fp8")


_FAULTS_SCRIPT = """
import resource, sys, torch
from retriever.cli.common import keep_freed_setting
from retriever.hardware import configure_process
def keep_freed_memory():
    return configure_process(keep_freed=keep_freed_setting()).malloc_keeps_freed
if sys.argv[1] == "keep":
    assert keep_freed_memory()
for _ in range(8):  # 64 MB buffers, allocated and freed until the heap reaches its steady state
    torch.ones(16 << 20)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    torch.ones(16 << 20)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt tuning is glibc-only")
def test_keep_freed_memory_stops_refaulting_activations() -> None:
    def faults(mode: str) -> int:
        env = {k: v for k, v in os.environ.items() if k != "RETRIEVER_KEEP_FREED_MB"}
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS_SCRIPT, mode], capture_output=True, text=True, check=True, env=env
        )
        return int(out.stdout.split()[-1])

    # 10 x 64 MB of 4 KiB pages: about 164k faults when every buffer comes fresh from the kernel.
    # Kept memory is reused; the heap may still grow once or twice before it settles (a 64-byte
    # aligned request needs a little more than the chunk the last one freed).
    default, kept = faults("default"), faults("keep")
    assert default > 80_000
    assert kept < default / 4, (kept, default)


def test_keep_freed_memory_can_be_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETRIEVER_KEEP_FREED_MB", "0")
    assert keep_freed_memory() is False
    monkeypatch.setenv("RETRIEVER_KEEP_FREED_MB", "lots")
    with pytest.raises(RetrieverError, match="RETRIEVER_KEEP_FREED_MB"):
        keep_freed_memory()


def test_configure_threads_sets_torch() -> None:
    before = torch.get_num_threads()
    try:
        assert configure_threads(1) == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


# -- the plan, training, and the edge ---------------------------------------------------------------------


def test_plan_gives_every_decision_and_its_reason() -> None:
    amx = _cpu(AMX_FLAGS, "AVX512")
    plan = plan_hardware("cpu", cpu=amx)
    assert plan.device == CPU and plan.device_reason == "asked for"
    assert plan.precision_choice == choose_precision(CPU, "auto", hidden=768, cpu=amx)
    assert (plan.batch_size, plan.candidates) == (16, 20)
    assert plan.threads is not None and 1 <= plan.threads <= amx.physical_cores
    assert plan.keep_freed_bytes == KEEP_FREED_BYTES
    assert plan.quantized_engine == int8_engine(amx)
    assert len(plan.describe()) == 6 and all(": " in line for line in plan.describe())
    assert plan_hardware("cpu", hidden=32, cpu=amx).precision == "fp32"
    assert plan_hardware("cpu", keep_freed=0, threads=3, cpu=amx).keep_freed_bytes == 0
    assert plan_hardware("cpu", threads=3, cpu=amx).threads == 3
    # A device given as such needs no GPU to plan for: the GPU's own numbers, the process left alone.
    gpu = plan_hardware(torch.device("cuda"))
    assert (gpu.precision, gpu.batch_size, gpu.candidates) == ("fp16", 64, 100)
    assert gpu.threads is None and gpu.keep_freed_bytes == 0 and gpu.quantized_engine is None
    with pytest.raises(RetrieverError, match="unknown device"):
        plan_hardware("tpu")


def test_training_autocast_follows_the_rerank_bf16_rule() -> None:
    amx, avx2 = _cpu(AMX_FLAGS, "AVX512"), _cpu(AVX2_FLAGS, "AVX2")
    assert training_autocast(CPU, "auto", cpu=amx) == torch.bfloat16
    assert training_autocast(CPU, "auto", cpu=_cpu(AMX_FLAGS, "AVX2")) is None  # torch must dispatch AVX512
    assert training_autocast(CPU, "auto", cpu=avx2) is None
    assert training_autocast(CPU, "fp32", cpu=amx) is None
    assert training_autocast(CPU, "bf16", cpu=avx2) == torch.bfloat16
    assert training_autocast(CPU, "auto") == (torch.bfloat16 if read_cpu_info().native_bf16 else None)


def test_configure_process_applies_what_it_is_given() -> None:
    threads, engine = torch.get_num_threads(), torch.backends.quantized.engine
    try:
        nothing = configure_process()
        assert (nothing.threads, nothing.malloc_keeps_freed, nothing.quantized_engine) == (None, False, None)
        assert torch.get_num_threads() == threads
        other = next(e for e in torch.backends.quantized.supported_engines if e not in (engine, "none"))
        done = configure_process(threads=1, quantized_engine=other)
        assert done.threads == 1 and torch.get_num_threads() == 1
        assert done.quantized_engine == other and torch.backends.quantized.engine == other
    finally:
        torch.set_num_threads(threads)
        torch.backends.quantized.engine = engine


def test_loading_a_reranker_leaves_the_process_alone(
    tiny_vilt_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from retriever.factory import load_reranker

    # SearchIndex code never reads the variable: a value the edge would refuse goes unnoticed here.
    monkeypatch.setenv("RETRIEVER_KEEP_FREED_MB", "lots")
    threads, engine = torch.get_num_threads(), torch.backends.quantized.engine
    wanted = int8_engine(read_cpu_info())
    precisions = ["auto", "fp32"] + (["int8"] if wanted is not None else [])
    for precision in precisions:
        rer = load_reranker(str(tiny_vilt_dir), CPU, precision)
        assert rer.batch_size == 16
        assert torch.get_num_threads() == threads
        assert torch.backends.quantized.engine == engine
    if wanted is not None and wanted != engine:
        assert rer.prepared.int8_engine == wanted  # packed for its own engine, the process's untouched


def test_every_device_option_reads_retriever_device() -> None:
    import typer.main

    from retriever.cli.app import app

    def commands(group: object) -> list[object]:
        found = []
        for command in getattr(group, "commands", {}).values():
            found += [command, *commands(command)]
        return found

    with_device = [
        (command, param)
        for command in commands(typer.main.get_command(app))
        for param in getattr(command, "params", [])
        if param.name == "device"
    ]
    names = {getattr(command, "name", "") for command, _ in with_device}
    assert {"index", "search", "eval", "train", "serve", "bench"} <= names
    for command, param in with_device:
        assert param.envvar == "RETRIEVER_DEVICE", command
