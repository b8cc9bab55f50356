"""One home for hardware decisions: which device, precision, batch size and thread count, and why.

Every choice is made at run time from what this process sees (torch's dispatch level, the CPU flags in
``/proc/cpuinfo``, the CPUs it may run on, the GPU torch finds), never from a constant, so one build serves
an AMX server, an AVX2-only CI runner and a CUDA box:

* device: ``auto`` is CUDA when torch sees a GPU, else the CPU;
* precision: bf16 on AMX; int8 dynamic quantization of the encoder's Linear layers on other x86 CPUs
  (through oneDNN where they have VNNI int8 dot products, fbgemm on plain AVX2), AVX512-BF16 without
  AMX included, because there a VNNI int8 dot product does twice the multiply-adds of a bf16 one;
  bf16 where a CPU has native bf16 and no int8 engine; fp16 on CUDA; fp32 otherwise. Small models
  (hidden size below ``LOW_PRECISION_MIN_HIDDEN``) stay fp32. Training autocasts to bf16 by the same
  native-bf16 rule (``training_autocast``);
* batch size and default rerank candidates: by device;
* threads: one torch intra-op thread per usable physical core, never above what torch started with.

``plan_hardware`` makes all of these at once and says why (``HardwarePlan``). Nothing here reads the
environment, and only ``configure_process`` (with ``configure_threads`` and ``keep_freed_bytes`` under it)
changes process-wide state: a program calls it once where it starts (the CLI, the server, the bench).
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, cast

import torch

from .errors import RetrieverError

Precision = Literal["fp32", "bf16", "fp16", "int8"]
#: What ``precision=`` accepts: ``auto`` or one precision.
PRECISION_CHOICES: tuple[str, ...] = ("auto", "fp32", "bf16", "fp16", "int8")

#: Compute dtype of each precision (int8 quantizes weights; its activations stay fp32).
DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "int8": torch.float32,
}

#: Below this hidden size ``auto`` stays fp32: such models already rerank fast in fp32, their matmuls are
#: too small for the low-precision kernels to win back the conversions, and low precision would save
#: milliseconds per query while still costing accuracy (figures: docs/bench/hardware-choices.md).
LOW_PRECISION_MIN_HIDDEN = 256

#: Rerank candidates by default: a ViLT-B/32 pair costs tens of times more on a small CPU than on a GPU.
DEFAULT_CANDIDATES_CPU = 20
DEFAULT_CANDIDATES_GPU = 100
#: Pairs per rerank forward pass: 16 fills a CPU's matmul units (the best of the sizes tried, see
#: docs/bench/hardware-choices.md); a GPU needs more rows than 16 x ~200 tokens to fill its SMs.
RERANK_BATCH_CPU = 16
RERANK_BATCH_GPU = 64
#: Pairs one merged call of the server's rerank batcher may hold, on any device: the reranker cuts them
#: into its own device batches, so this bounds how long one request's pairs wait behind others'.
MERGED_RERANK_PAIRS = 64

_NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
_INT8_DOT_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


# -- the CPU ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CpuInfo:
    """What the CPU offers this process."""

    #: torch's kernel dispatch level (``torch.backends.cpu.get_cpu_capability()``): DEFAULT, AVX2, AVX512...
    capability: str
    #: Feature flags from ``/proc/cpuinfo`` (empty where that file does not exist).
    flags: frozenset[str]
    #: Physical cores among the CPUs this process may run on (hyperthread siblings counted once).
    physical_cores: int
    #: Logical CPUs this process may run on (affinity mask, capped by a cgroup CPU quota).
    usable_cpus: int
    model_name: str = ""

    @property
    def native_bf16(self) -> bool:
        """bf16 matmuls run in hardware (AMX tiles or AVX512-BF16 dot products) and torch uses AVX512."""
        return self.capability.startswith("AVX512") and any(f in self.flags for f in _NATIVE_BF16_FLAGS)

    def relevant_flags(self) -> list[str]:
        """The flags that matter for the precision choice, in a fixed order."""
        wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "avx512_fp16")
        return [f for f in (*wanted, "amx_tile", "amx_bf16", "amx_int8") if f in self.flags]


def parse_cpuinfo(text: str) -> tuple[frozenset[str], dict[int, tuple[str, str]], str]:
    """Flags, (physical id, core id) per logical CPU, and model name from the text of ``/proc/cpuinfo``."""
    flags: set[str] = set()
    cores: dict[int, tuple[str, str]] = {}
    model = ""
    for block in text.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.splitlines():
            key, sep, value = line.partition(":")
            if sep:
                fields[key.strip()] = value.strip()
        if "processor" not in fields:
            continue
        if not flags:
            flags.update(fields.get("flags", "").split())
        model = model or fields.get("model name", "")
        try:
            cpu = int(fields["processor"])
        except ValueError:
            continue
        # Without topology fields (some VMs, non-x86) every logical CPU counts as its own core.
        cores[cpu] = (fields.get("physical id", "0"), fields.get("core id", str(cpu)))
    return frozenset(flags), cores, model


def _cgroup_cpu_limit() -> int | None:
    """CPUs a cgroup quota allows (v2 ``cpu.max`` or v1 ``cfs_quota_us``), or None when unlimited."""
    try:
        quota, period = [*Path("/sys/fs/cgroup/cpu.max").read_text().split(), "100000"][:2]
    except OSError:
        try:
            quota = Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text().strip()
            period = Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text().strip()
        except OSError:
            return None
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    return max(1, math.ceil(q / p)) if q > 0 and p > 0 else None


def read_cpu_info(cpuinfo: Path = Path("/proc/cpuinfo")) -> CpuInfo:
    """This machine's ``CpuInfo``."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        text = ""
    flags, cores, model = parse_cpuinfo(text)
    try:
        allowed = set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        allowed = set(range(os.cpu_count() or 1))
    usable = len(allowed)
    limit = _cgroup_cpu_limit()
    if limit is not None:
        usable = min(usable, limit)
    physical = len({cores[c] for c in allowed if c in cores}) or usable
    return CpuInfo(
        capability=torch.backends.cpu.get_cpu_capability(),
        flags=flags,
        physical_cores=max(1, min(physical, usable)),
        usable_cpus=max(1, usable),
        model_name=model,
    )


# -- precision ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a model runs in, and why."""

    precision: Precision
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of activations."""
        return DTYPES[self.precision]


def int8_engine(cpu: CpuInfo) -> str | None:
    """The quantized engine for int8 dynamic Linear layers on this CPU, or None when there is none.

    oneDNN where the CPU has int8 dot products (AMX tiles, AVX512-VNNI, AVX-VNNI): it quantizes
    activations to the full int8 range and measured faster than fbgemm there. Elsewhere fbgemm (what
    the ``x86`` engine picks for dynamic quantization), whose AVX2 kernels need no VNNI.
    """
    engines = set(torch.backends.quantized.supported_engines)
    if cpu.flags & set(_INT8_DOT_FLAGS) and "onednn" in engines:
        return "onednn"
    if "avx2" not in cpu.flags:
        return None
    for engine in ("x86", "fbgemm"):
        if engine in engines:
            return engine
    return None


def choose_precision(
    device: torch.device, requested: str = "auto", *, hidden: int = 768, cpu: CpuInfo | None = None
) -> PrecisionChoice:
    """The precision for a model of this hidden size on ``device``: ``requested``, or the best for ``auto``.

    Raises:
        RetrieverError: an unknown precision, or int8 where it cannot run (CUDA, or a CPU without
            AVX2). bf16 or fp16 asked of a CPU without native bf16 runs, emulated; the reason says so.
    """
    if requested not in PRECISION_CHOICES:
        raise RetrieverError(f"unknown precision {requested!r}: use {', '.join(PRECISION_CHOICES)}")
    if device.type == "cuda":
        if requested == "int8":
            raise RetrieverError("int8 dynamic quantization runs on the CPU only; use fp16 or bf16 on CUDA")
        if requested != "auto":
            return PrecisionChoice(cast(Precision, requested), "asked for")
        return PrecisionChoice("fp16", "CUDA: tensor cores run fp16 at many times the fp32 rate")
    cpu = cpu or read_cpu_info()
    flags = ", ".join(cpu.relevant_flags()) or "none of the AVX/AMX flags"
    if requested != "auto":
        note = ""
        if requested in ("bf16", "fp16") and not cpu.native_bf16:
            note = f"; this CPU ({flags}) emulates it, expect it to be slow"
        if requested == "int8" and int8_engine(cpu) is None:
            raise RetrieverError(
                f"int8 needs a quantized engine with AVX2 or better kernels; this CPU has {flags}"
            )
        return PrecisionChoice(cast(Precision, requested), "asked for" + note)
    if hidden < LOW_PRECISION_MIN_HIDDEN:
        return PrecisionChoice(
            "fp32",
            f"hidden size {hidden} < {LOW_PRECISION_MIN_HIDDEN}: matmuls too small to gain from bf16/int8",
        )
    engine = int8_engine(cpu)
    if cpu.native_bf16 and "amx_bf16" in cpu.flags:
        return PrecisionChoice(
            "bf16", f"torch dispatches {cpu.capability} and the CPU has {flags}: bf16 matmuls on AMX tiles"
        )
    if cpu.native_bf16 and engine != "onednn":
        return PrecisionChoice(
            "bf16", f"torch dispatches {cpu.capability} and the CPU has {flags}: native bf16 dot products"
        )
    if cpu.native_bf16:
        return PrecisionChoice(
            "int8",
            f"torch dispatches {cpu.capability} and the CPU has {flags}, no AMX: a VNNI int8 dot product "
            f"does twice the multiply-adds of an AVX512-BF16 one; int8 dynamic quantization of Linear "
            f"layers through {engine}",
        )
    if engine is not None:
        return PrecisionChoice(
            "int8",
            f"no native bf16 (flags: {flags}; torch dispatches {cpu.capability}): "
            f"int8 dynamic quantization of Linear layers through {engine}",
        )
    return PrecisionChoice("fp32", f"no native bf16 and no int8 kernels (flags: {flags})")


def training_autocast(
    device: torch.device, precision: str = "auto", *, cpu: CpuInfo | None = None
) -> torch.dtype | None:
    """The autocast dtype training runs under: bf16 where the hardware multiplies bf16 natively, else
    None (fp32). ``precision`` is ``auto``, ``fp32`` or ``bf16``.

    On a CPU the rule is the rerank's (``CpuInfo.native_bf16``): AVX2 emulates bf16, slowly. Training
    never picks int8 or fp16: both need loss scaling or quantization-aware steps it does not have.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    cpu = cpu or read_cpu_info()
    return torch.bfloat16 if cpu.native_bf16 else None


# -- device, batch sizes, candidates --------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when a GPU is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RetrieverError("--device cuda was asked for, but torch sees no CUDA GPU")
    if name not in ("cpu", "cuda"):
        raise RetrieverError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def default_candidates(device: torch.device) -> int:
    """How many prefilter candidates the rerank scores by default on this device."""
    return DEFAULT_CANDIDATES_GPU if device.type == "cuda" else DEFAULT_CANDIDATES_CPU


def rerank_batch_size(device: torch.device) -> int:
    """Pairs per ViLT forward pass on this device."""
    return RERANK_BATCH_GPU if device.type == "cuda" else RERANK_BATCH_CPU


def bench_batch_size(device: torch.device, cpu_batch: int) -> int:
    """Pairs per forward pass the bench times: its configured ``cpu_batch`` on a CPU, the engine's own
    batch (``rerank_batch_size``) on a GPU, which the bench's CPU-sized batches would leave half idle."""
    return rerank_batch_size(device) if device.type == "cuda" else cpu_batch


# -- threads and memory -----------------------------------------------------------------------------------


def usable_threads(cpu: CpuInfo | None = None) -> int:
    """Intra-op threads that fit: one per usable physical core (hyperthreads share a core's matmul units)."""
    cpu = cpu or read_cpu_info()
    return max(1, cpu.physical_cores)


def choose_threads(
    device: torch.device, cpu: CpuInfo | None, requested: int | None = None
) -> tuple[int | None, str]:
    """torch's intra-op thread count for models on ``device`` (None: leave it as it is), and why."""
    if requested is not None:
        return max(1, requested), "asked for"
    if device.type != "cpu" or cpu is None:
        return None, "the GPU runs the models: torch's own thread count is left as it is"
    usable, current = usable_threads(cpu), torch.get_num_threads()
    if current <= usable:
        # A deliberate OMP_NUM_THREADS (or a busy, shared machine's operator) wins.
        return current, f"what torch started with ({current}), not above the {usable} usable physical cores"
    return usable, f"one per usable physical core ({usable}): more would only oversubscribe them"


def configure_threads(threads: int) -> int:
    """Set torch's (and FAISS's) intra-op thread count; returns it.

    torch and FAISS each bring an OpenMP pool. They never run at the same time here, but a pool wider
    than the cores makes their threads time-slice each other at every parallel region's barrier.
    """
    threads = max(1, threads)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:  # the storage layer is optional for the model code
        pass
    return threads


#: Freed memory glibc's malloc keeps for reuse by default (see ``keep_freed_bytes``); programs take
#: another amount from the environment variable ``KEEP_FREED_ENV`` at their edge (0 turns it off).
KEEP_FREED_BYTES = 256 << 20
KEEP_FREED_ENV = "RETRIEVER_KEEP_FREED_MB"
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3
#: The amounts ``keep_freed_bytes`` made malloc keep in this process (a record of process state).
_KEPT: set[int] = set()


def parse_keep_freed_mb(raw: str | None) -> int:
    """Bytes from a ``RETRIEVER_KEEP_FREED_MB`` value in MB (None or blank: ``KEEP_FREED_BYTES``; 0: off).

    The caller reads the variable; this only checks it, so a bad value names the variable either way.
    """
    text = (raw or "").strip()
    try:
        nbytes = int(float(text) * (1 << 20)) if text else KEEP_FREED_BYTES
    except ValueError as exc:
        raise RetrieverError(f"{KEEP_FREED_ENV}={text!r}: give a number of MB (0 turns it off)") from exc
    return max(0, nbytes)


@functools.cache
def keep_freed_bytes(nbytes: int) -> bool:
    """Make glibc's malloc keep up to ``nbytes`` of freed memory for reuse; returns whether it could.

    A ViLT-B forward pass allocates and frees activations of several MB per layer. glibc's defaults
    serve those from fresh ``mmap`` calls (or trim the heap after each free), so every pass faults
    every page in again and the kernel zeroes it, a measurable share of the rerank time; with these
    settings the pages are reused. The cost is that the process keeps up to ``nbytes`` (plus what it
    holds) after a burst. Process-wide, like the thread count; a no-op (False) off Linux/glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    settings = ((_M_MMAP_THRESHOLD, nbytes), (_M_TRIM_THRESHOLD, 2 * nbytes), (_M_TOP_PAD, nbytes))
    # musl and other libcs export a mallopt that accepts nothing (returns 0).
    kept = all(mallopt(option, value) == 1 for option, value in settings)
    if kept:
        _KEPT.add(nbytes)
    return kept


def malloc_keeps_freed() -> bool:
    """Whether ``keep_freed_bytes`` tuned malloc in this process (it reads state, changes none)."""
    return bool(_KEPT)


# -- the plan -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HardwarePlan:
    """Every hardware decision for running the models in this process, each with its reason."""

    device: torch.device
    device_reason: str
    precision: Precision
    precision_reason: str
    #: Pairs per rerank forward pass.
    batch_size: int
    batch_reason: str
    #: Prefilter candidates a search reranks by default.
    candidates: int
    candidates_reason: str
    #: torch's (and FAISS's) intra-op threads; None leaves the count torch started with.
    threads: int | None
    threads_reason: str
    #: Freed memory malloc keeps for reuse (0: malloc left alone).
    keep_freed_bytes: int
    memory_reason: str
    #: The quantized engine int8 layers run through on this CPU (None: no int8 here).
    quantized_engine: str | None
    cpu: CpuInfo | None = None

    @property
    def precision_choice(self) -> PrecisionChoice:
        """The precision and its reason, as ``choose_precision`` gives them."""
        return PrecisionChoice(self.precision, self.precision_reason)

    def describe(self) -> list[str]:
        """One line per decision: what, then why."""
        threads = "unchanged" if self.threads is None else str(self.threads)
        memory = f"{self.keep_freed_bytes >> 20} MB" if self.keep_freed_bytes else "untouched"
        return [
            f"device {self.device}: {self.device_reason}",
            f"precision {self.precision}: {self.precision_reason}",
            f"rerank batch {self.batch_size}: {self.batch_reason}",
            f"rerank candidates {self.candidates}: {self.candidates_reason}",
            f"threads {threads}: {self.threads_reason}",
            f"malloc keeps freed memory {memory}: {self.memory_reason}",
        ]


def plan_hardware(
    device: str | torch.device = "auto",
    precision: str = "auto",
    *,
    hidden: int = 768,
    threads: int | None = None,
    keep_freed: int = KEEP_FREED_BYTES,
    cpu: CpuInfo | None = None,
) -> HardwarePlan:
    """The plan for a model of this hidden size (ViLT-B's by default) on ``device`` (a name as
    ``resolve_device`` takes it, or a device). ``threads`` overrides the thread choice; ``keep_freed``
    is the freed memory malloc may keep on a CPU (the program reads it from ``KEEP_FREED_ENV``).

    Raises:
        RetrieverError: a device torch cannot use, or a precision that cannot run there.
    """
    if isinstance(device, torch.device):
        dev, device_reason = device, "given"
    else:
        dev = resolve_device(device)
        seen = "sees a CUDA GPU" if dev.type == "cuda" else "sees no CUDA GPU"
        device_reason = f"auto: torch {seen}" if device == "auto" else "asked for"
    on_cpu = dev.type == "cpu"
    if on_cpu and cpu is None:
        cpu = read_cpu_info()
    choice = choose_precision(dev, precision, hidden=hidden, cpu=cpu)
    n_threads, threads_reason = choose_threads(dev, cpu if on_cpu else None, threads)
    if not on_cpu:
        keep, memory_reason = 0, "activations live on the GPU"
    elif keep_freed <= 0:
        keep, memory_reason = 0, f"turned off ({KEEP_FREED_ENV}=0)"
    else:
        keep = keep_freed
        memory_reason = "each rerank pass frees and reallocates activations of several MB: reuse, not refault"
    where = "a GPU" if dev.type == "cuda" else "a CPU"
    return HardwarePlan(
        device=dev,
        device_reason=device_reason,
        precision=choice.precision,
        precision_reason=choice.reason,
        batch_size=rerank_batch_size(dev),
        batch_reason=f"what fills {where}'s matmul units without waiting for more pairs",
        candidates=default_candidates(dev),
        candidates_reason=f"what {where} reranks within an interactive query's time",
        threads=n_threads,
        threads_reason=threads_reason,
        keep_freed_bytes=keep,
        memory_reason=memory_reason,
        quantized_engine=int8_engine(cpu) if on_cpu and cpu is not None else None,
        cpu=cpu if on_cpu else None,
    )


# -- process-wide effects ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProcessSetup:
    """What ``configure_process`` did."""

    #: torch's intra-op threads now, or None where they were left alone.
    threads: int | None
    #: malloc keeps freed memory for reuse after this call.
    malloc_keeps_freed: bool
    #: torch's quantized engine now, or None where it was left alone.
    quantized_engine: str | None


def configure_process(
    *, threads: int | None = None, keep_freed: int = 0, quantized_engine: str | None = None
) -> ProcessSetup:
    """Apply the process-wide settings, all of them here: torch's and FAISS's thread count, malloc's
    keep-freed tuning (``keep_freed`` bytes; 0 leaves malloc alone) and torch's quantized engine.

    A program calls it once where it starts, with a ``HardwarePlan``'s values; library code never does,
    so loading a model leaves the process as it found it. Arguments left at their defaults change nothing.
    """
    applied = configure_threads(threads) if threads is not None else None
    kept = keep_freed > 0 and keep_freed_bytes(keep_freed)
    engine = None
    if quantized_engine is not None and quantized_engine in torch.backends.quantized.supported_engines:
        torch.backends.quantized.engine = quantized_engine
        engine = quantized_engine
    return ProcessSetup(threads=applied, malloc_keeps_freed=kept, quantized_engine=engine)


def configure_plan(plan: HardwarePlan) -> ProcessSetup:
    """``configure_process`` with a plan's threads, malloc tuning and quantized engine."""
    return configure_process(
        threads=plan.threads, keep_freed=plan.keep_freed_bytes, quantized_engine=plan.quantized_engine
    )
