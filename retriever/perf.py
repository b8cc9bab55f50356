"""How the ViLT rerank runs fast on the machine at hand: CPU features, precision, threads, attention kernel.

Every choice is made at run time from what this process sees (torch's dispatch level, the CPU flags in
``/proc/cpuinfo``, the CPUs it may run on), never from a constant, so one build serves an AMX server
and an AVX2-only CI runner:

* precision: bf16 on AMX; int8 dynamic quantization of the encoder's Linear layers on other x86
  CPUs (through oneDNN where they have VNNI int8 dot products, fbgemm on plain AVX2), AVX512-BF16
  without AMX included, because there VNNI's int8 rate is twice the bf16 one; bf16 where a CPU has
  native bf16 and no int8 engine; fp16 on CUDA; fp32 otherwise. Small models (hidden size below
  ``LOW_PRECISION_MIN_HIDDEN``) stay fp32: their matmuls are too small for the faster kernels to
  win back the conversions;
* threads: one torch intra-op thread per usable physical core;
* attention: ViLT's eager self-attention (matmul, softmax, matmul) swapped for
  ``torch.nn.functional.scaled_dot_product_attention`` on the same weights.
"""

from __future__ import annotations

import ctypes
import functools
import math
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn

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

#: Below this hidden size ``auto`` stays fp32: such models already rerank hundreds to thousands of
#: pairs per second in fp32, so low precision would save milliseconds per query and still cost
#: accuracy. Measured on one Sapphire Rapids core, batches of 16 pairs: hidden 128 (4 layers) fp32
#: 320-2100 pairs/s, bf16 1.6-2.6x that; hidden 256 (6 layers) fp32 83 pairs/s, bf16 3.4x;
#: ViLT-B/32 (768, 12 layers) fp32 5.4 pairs/s, bf16 4.0x, int8 3.3x.
LOW_PRECISION_MIN_HIDDEN = 256

_NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
_INT8_DOT_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


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
    activations to the full int8 range and measured faster than fbgemm there (2-core AMD EPYC with
    AVX512-VNNI, ViLT-B/32: 17.2 against 15.1 pairs/s). Elsewhere fbgemm (what the ``x86`` engine
    picks for dynamic quantization), whose AVX2 kernels need no VNNI.
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


def usable_threads(cpu: CpuInfo | None = None) -> int:
    """Intra-op threads that fit: one per usable physical core (hyperthreads share a core's matmul units)."""
    cpu = cpu or read_cpu_info()
    return max(1, cpu.physical_cores)


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


#: Freed memory glibc's malloc keeps for reuse once ``keep_freed_memory`` ran (see there), unless the
#: environment variable ``RETRIEVER_KEEP_FREED_MB`` says otherwise (0 turns the tuning off).
KEEP_FREED_BYTES = 256 << 20
KEEP_FREED_ENV = "RETRIEVER_KEEP_FREED_MB"
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """``keep_freed_bytes`` with ``RETRIEVER_KEEP_FREED_MB`` (default 256; 0: leave malloc alone)."""
    raw = os.environ.get(KEEP_FREED_ENV, "").strip()
    try:
        nbytes = int(float(raw) * (1 << 20)) if raw else KEEP_FREED_BYTES
    except ValueError as exc:
        raise RetrieverError(f"{KEEP_FREED_ENV}={raw!r}: give a number of MB (0 turns it off)") from exc
    return nbytes > 0 and keep_freed_bytes(nbytes)


@functools.cache
def keep_freed_bytes(nbytes: int) -> bool:
    """Make glibc's malloc keep up to ``nbytes`` of freed memory for reuse; returns whether it could.

    A ViLT-B forward pass allocates and frees activations of several MB per layer. glibc's defaults
    serve those from fresh ``mmap`` calls (or trim the heap after each free), so every pass faults
    every page in again and the kernel zeroes it: measured on a 2-core AMD EPYC with int8, about
    310k minor page faults per 32 pairs and 10% of the rerank time; with these settings, none. The
    cost is that the process keeps up to ``nbytes`` (plus what it holds) after a burst. Process-wide,
    like the thread count; a no-op (False) off Linux/glibc.
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
    return all(mallopt(option, value) == 1 for option, value in settings)


# -- attention ------------------------------------------------------------------------------------


def _version(tensor: torch.Tensor) -> int:
    try:
        return int(tensor._version)
    except RuntimeError:  # inference tensors (made under inference_mode) keep no version counter
        return -1


class SdpaSelfAttention(nn.Module):
    """ViLT's self-attention computed by ``scaled_dot_product_attention``, on the eager module's own Linears.

    ``query``, ``key`` and ``value`` are the original modules (the same parameters, so state dicts and
    later weight edits carry over). For plain Linears the three projections run as one matmul on a
    concatenated weight, rebuilt whenever a parameter changes (torch bumps a tensor's ``_version`` on
    every in-place write).
    """

    def __init__(self, eager: Any) -> None:
        super().__init__()
        self.query: nn.Module = eager.query
        self.key: nn.Module = eager.key
        self.value: nn.Module = eager.value
        self.num_attention_heads = int(eager.num_attention_heads)
        self.attention_head_size = int(eager.attention_head_size)
        self.all_head_size = int(eager.all_head_size)
        #: Run the fused QKV projection through oneDNN (set by ``fuse_vilt_layers`` on bf16 CPU models):
        #: bias added in the kernel, where ``addmm`` first copies it into every output row.
        self.onednn_linear = False
        self._fused: tuple[tuple[int, ...], torch.Tensor, torch.Tensor | None] | None = None

    def _fused_weight(self) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        mods = (self.query, self.key, self.value)
        if not all(type(m) is nn.Linear for m in mods):
            return None
        linears = cast(tuple[nn.Linear, nn.Linear, nn.Linear], mods)
        params: list[torch.Tensor] = [m.weight for m in linears]
        biases = [m.bias for m in linears]
        has_bias = all(b is not None for b in biases)
        if has_bias:
            params += [cast(torch.Tensor, b) for b in biases]
        elif any(b is not None for b in biases):
            return None
        key = tuple(v for p in params for v in (p.data_ptr(), _version(p), p.dtype.itemsize))
        if self._fused is None or self._fused[0] != key:
            with torch.no_grad():
                weight = torch.cat([m.weight for m in linears]).detach()
                bias = torch.cat([cast(torch.Tensor, b) for b in biases]).detach() if has_bias else None
            self._fused = (key, weight, bias)
        return self._fused[1], self._fused[2]

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Same inputs and outputs as ``ViltSelfAttention.forward``."""
        b, t, _ = hidden_states.shape
        heads, size = self.num_attention_heads, self.attention_head_size
        fused = self._fused_weight()
        if fused is not None:
            project = onednn_linear if self.onednn_linear else nn.functional.linear
            qkv = project(hidden_states, fused[0], fused[1])
            q, k, v = qkv.view(b, t, 3, heads, size).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q, k, v = (
                m(hidden_states).view(b, t, heads, size).transpose(1, 2) for m in self.query_key_value()
            )
        if output_attentions:
            scores = q @ k.transpose(-1, -2) / math.sqrt(size)
            if attention_mask is not None:
                scores = scores + attention_mask
            probs = scores.softmax(dim=-1)
            context = probs @ v
        else:
            context = nn.functional.scaled_dot_product_attention(
                q, k, v, attn_mask=key_padding_bias(attention_mask)
            )
        context = context.transpose(1, 2).reshape(b, t, self.all_head_size)
        return (context, probs) if output_attentions else (context,)

    def query_key_value(self) -> tuple[nn.Module, nn.Module, nn.Module]:
        """The three projection modules."""
        return self.query, self.key, self.value


def key_padding_bias(mask: torch.Tensor | None) -> torch.Tensor | None:
    """ViLT's (b, 1, q, k) additive padding mask as (b, 1, 1, k), or None when nothing is masked.

    The mask comes from key padding only (ViLT attends bidirectionally), so every query row is the
    same as row 0, the text [CLS], which is never padding. One row broadcasts over the queries, and
    with no padding at all SDPA takes its unmasked kernel.
    """
    if mask is None:
        return None
    row = mask[:, :, :1, :] if mask.dim() == 4 else mask
    if mask.dtype == torch.bool:
        return None if bool(row.all()) else row
    return None if not bool((row != 0).any()) else row


def use_sdpa_attention(model: nn.Module) -> int:
    """Swap every eager ViLT self-attention in ``model`` for ``SdpaSelfAttention``; returns how many."""
    swapped = 0
    for module in list(model.modules()):
        inner = getattr(module, "attention", None)
        if isinstance(inner, nn.Module) and type(inner).__name__ == "ViltSelfAttention":
            module.attention = SdpaSelfAttention(inner)
            swapped += 1
    return swapped


# -- oneDNN fused layers (CPU, bf16) -------------------------------------------------------------------


def onednn_fusion_available() -> bool:
    """torch has oneDNN's linear-with-post-op kernels (``torch.ops.mkldnn._linear_pointwise``).

    That op is what torch.compile's CPU backend emits for Linear+GELU and Linear+add; it is internal
    to torch, so it is probed rather than assumed, and ``fuse_vilt_layers`` checks its numbers once.
    """
    ops = getattr(torch.ops, "mkldnn", None)
    return (
        bool(torch.backends.mkldnn.is_available())  # type: ignore[no-untyped-call]
        and ops is not None
        and hasattr(ops, "_linear_pointwise")
    )


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear`` through oneDNN (``mkldnn._linear_pointwise``): the bias added inside the kernel."""
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    return out


def _linear_gelu(x: torch.Tensor, dense: nn.Linear) -> torch.Tensor:
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(x, dense.weight, dense.bias, "gelu", [], "none")
    return out


def _linear_add(x: torch.Tensor, residual: torch.Tensor, dense: nn.Linear) -> torch.Tensor:
    out: torch.Tensor = torch.ops.mkldnn._linear_pointwise.binary(
        x, residual, dense.weight, dense.bias, "add"
    )
    return out


class FusedViltLayer(nn.Module):
    """A ``ViltLayer`` whose Linears run through oneDNN with the bias, GELU and residual add fused in.

    It holds the original layer's submodules under their own names (so the state dict is unchanged)
    and runs the same computation: pre-norm attention plus residual, then pre-norm MLP plus residual.
    In bf16 each unfused elementwise pass (bias, GELU, add) costs a tenth of its matmul's time.

    The residual stream is bf16 by default, so both residual adds fuse into their Linears. With
    ``fp32_residual`` it stays fp32 and only matmul inputs are rounded to bf16: each add and each
    LayerNorm's cast is then a separate pass over the activations. Measured on a random ViLT-B/32,
    2 Sapphire Rapids cores: bf16 stream about 13% faster; max logit error against fp32 about 0.23
    of the logits' std against 0.08 with the fp32 stream; Recall@1 of the shipped shapes model the
    same in both (87.5/86.6 on 1000 images).
    """

    def __init__(self, layer: Any, *, fp32_residual: bool = False) -> None:
        super().__init__()
        self.attention: Any = layer.attention
        self.intermediate: Any = layer.intermediate
        self.output: Any = layer.output
        self.layernorm_before: Any = layer.layernorm_before
        self.layernorm_after: Any = layer.layernorm_after
        self._eager_forward = type(layer).forward
        self.fp32_residual = fp32_residual

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, ...]:
        """Same inputs and outputs as ``ViltLayer.forward``."""
        low = self.attention.output.dense.weight.dtype
        if output_attentions:
            with torch.autocast(hidden_states.device.type, dtype=low):
                out: tuple[torch.Tensor, ...] = self._eager_forward(self, hidden_states, attention_mask, True)
            return out
        x = hidden_states
        if not self.fp32_residual:
            x = x.to(low)
            context = self.attention.attention(self.layernorm_before(x), attention_mask)[0]
            x = _linear_add(context, x, self.attention.output.dense)
            h = _linear_gelu(self.layernorm_after(x), self.intermediate.dense)
            return (_linear_add(h, x, self.output.dense),)
        x = x.float()
        context = self.attention.attention(self.layernorm_before(x).to(low), attention_mask)[0]
        dense = self.attention.output.dense
        x = x + onednn_linear(context, dense.weight, dense.bias)
        h = _linear_gelu(self.layernorm_after(x).to(low), self.intermediate.dense)
        dense = self.output.dense
        return (x + onednn_linear(h, dense.weight, dense.bias),)


def _fusable(layer: Any) -> bool:
    try:
        act = layer.intermediate.intermediate_act_fn
        denses = (layer.attention.output.dense, layer.intermediate.dense, layer.output.dense)
    except AttributeError:
        return False
    # Only exact (erf) GELU maps onto oneDNN's "gelu" post-op with algorithm "none".
    exact_gelu = type(act).__name__ == "GELUActivation" and getattr(act, "act", None) is nn.functional.gelu
    return exact_gelu and all(type(d) is nn.Linear for d in denses)


def _fusion_works(dtype: torch.dtype) -> bool:
    """One tiny Linear+GELU and Linear+add through oneDNN, compared with the unfused ops."""
    try:
        gen = torch.Generator().manual_seed(0)
        dense = nn.Linear(32, 32).to(dtype)
        x = torch.randn(2, 3, 32, generator=gen).to(dtype)
        with torch.inference_mode():
            got = _linear_add(_linear_gelu(x, dense), x, dense).float()
            want = (dense(nn.functional.gelu(dense(x))) + x).float()
    except (RuntimeError, NotImplementedError):
        return False
    return bool(torch.allclose(got, want, atol=0.1, rtol=0.05))


def _can_fuse(model: nn.Module, dtype: torch.dtype) -> bool:
    layers = [m for m in model.modules() if type(m).__name__ == "ViltLayer"]
    return (
        bool(layers)
        and all(_fusable(m) for m in layers)
        and onednn_fusion_available()
        and _fusion_works(dtype)
    )


def fuse_vilt_layers(model: nn.Module, *, fp32_residual: bool = False) -> int:
    """Swap every ``ViltLayer`` under ``model`` for ``FusedViltLayer``; returns how many.

    Check ``onednn_fusion_available`` first; the layers' Linear weights must already be in the
    low-precision dtype. SDPA attention modules under ``model`` run their QKV projection through
    oneDNN too.
    """
    for module in model.modules():
        if isinstance(module, SdpaSelfAttention):
            module.onednn_linear = True
    fused = 0
    for module in list(model.modules()):
        layers = getattr(module, "layer", None)
        if not isinstance(layers, nn.ModuleList):
            continue
        for i, layer in enumerate(layers):
            if type(layer).__name__ == "ViltLayer" and _fusable(layer):
                layers[i] = FusedViltLayer(layer, fp32_residual=fp32_residual)
                fused += 1
    return fused


# -- precision --------------------------------------------------------------------------------------


def _cls_row_in_fp32(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    # The pooler reads row 0 only; casting that row alone keeps the head in fp32 for a few hundred bytes.
    hidden_states = args[0]
    return (hidden_states[:, :1].float(), *args[1:])


@dataclass
class PreparedModel:
    """What ``prepare_vilt`` did to a model."""

    precision: Precision
    attention: str
    autocast: bool
    int8_engine: str | None = None
    swapped: int = 0
    fused_layers: int = 0
    #: ``keep_freed_memory`` took effect (CPU, glibc).
    malloc_keeps_freed: bool = False

    def describe(self) -> str:
        """One line: precision, attention kernel and fusions."""
        parts = [self.precision, f"attention {self.attention}"]
        if self.autocast:
            parts.append("autocast")
        if self.int8_engine:
            parts.append(f"int8 engine {self.int8_engine}")
        if self.fused_layers:
            parts.append(f"{self.fused_layers} layers with oneDNN-fused bias/GELU/residual")
        if self.malloc_keeps_freed:
            parts.append("malloc keeps freed memory")
        return ", ".join(parts)


def prepare_vilt(
    model: Any, precision: Precision, device: torch.device, *, sdpa: bool = True, fp32_residual: bool = False
) -> PreparedModel:
    """Make a ``ViltForImageAndTextRetrieval`` fast in place: SDPA attention, then the precision.

    * fp32: weights as they are.
    * bf16 on a CPU whose torch has oneDNN's fused kernels: the encoder's Linear weights in bf16,
      every layer a ``FusedViltLayer`` with a bf16 residual stream (fp32 LayerNorm parameters,
      fp32 embeddings and pooler/ITM head). ``fp32_residual`` keeps the stream fp32 and rounds only
      matmul inputs: about a third of the logit error, about 12% slower (see ``FusedViltLayer``).
      The visual embedding that index time runs stays fp32 either way, so cached tokens never
      depend on the precision searches run in.
    * fp16, bf16 without the fused kernels, and anything on CUDA: fp32 weights under autocast.
    * int8: the encoder's Linear layers quantized dynamically (int8 weights per output channel, int8
      activations per call); the embeddings, pooler and head stay fp32.

    On a CPU, malloc is also told to keep freed activation memory (``keep_freed_memory``).
    """
    prepared = _prepare(model, precision, device, sdpa=sdpa, fp32_residual=fp32_residual)
    if device.type == "cpu":
        prepared.malloc_keeps_freed = keep_freed_memory()
    return prepared


def _prepare(
    model: Any, precision: Precision, device: torch.device, *, sdpa: bool, fp32_residual: bool
) -> PreparedModel:
    swapped = use_sdpa_attention(model) if sdpa else 0
    attention = "sdpa" if swapped else "eager"
    if precision == "fp32":
        return PreparedModel(precision, attention, autocast=False, swapped=swapped)
    if precision == "int8":
        if device.type != "cpu":
            raise RetrieverError("int8 dynamic quantization runs on the CPU only")
        engine = int8_engine(read_cpu_info())
        if engine is None:
            raise RetrieverError("int8 dynamic quantization has no engine on this CPU")
        quantize_int8(model.vilt.encoder, engine)
        return PreparedModel(precision, attention, autocast=False, int8_engine=engine, swapped=swapped)
    dtype = DTYPES[precision]
    if device.type != "cpu" or precision != "bf16" or not _can_fuse(model, dtype):
        return PreparedModel(precision, attention, autocast=True, swapped=swapped)
    encoder = model.vilt.encoder
    encoder.to(dtype)
    for module in encoder.modules():
        if isinstance(module, nn.LayerNorm):
            module.float()
    fused = fuse_vilt_layers(model, fp32_residual=fp32_residual)
    # Without the fp32 stream the final LayerNorm hands on bf16; the pooler and head read [CLS] in fp32.
    model.vilt.pooler.register_forward_pre_hook(_cls_row_in_fp32)
    return PreparedModel(precision, attention, autocast=False, swapped=swapped, fused_layers=fused)


def quantize_int8(module: nn.Module, engine: str) -> None:
    """Quantize the Linear layers under ``module`` dynamically to int8, in place.

    ``torch.ao.quantization.quantize_dynamic`` is deprecated in favour of torchao, but torchao's
    int8 dynamic-activation config runs its matmul through ``torch._int_mm`` in eager mode, which on
    the CPU measured slower than fp32 here (about 85 against 120 GFLOP/s on a 768x3072 layer); the
    fbgemm/oneDNN kernels behind ``quantize_dynamic`` ran at 320-515 GFLOP/s. Revisit when torchao's
    CPU kernels no longer need ``torch.compile``.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    # The engine is process-wide; dynamic Linears dispatch on the engine their weights were packed for.
    torch.backends.quantized.engine = engine
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        quantize_dynamic(  # type: ignore[no-untyped-call]
            module, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )
