"""ViLT made fast in place, beside the reranker that runs it: SDPA attention, oneDNN-fused layers, int8.

The surgery keeps the checkpoint's parameters and state-dict names, so a prepared model still loads and
saves like the original; ``prepare_vilt`` applies it for one precision (chosen by
``retriever.hardware.choose_precision``):

* attention: ViLT's eager self-attention (matmul, softmax, matmul) swapped for
  ``torch.nn.functional.scaled_dot_product_attention`` on the same weights;
* bf16 on a CPU: the encoder's Linears through oneDNN with bias, GELU and residual add fused in;
* int8: the encoder's Linears quantized dynamically.

Nothing here changes process-wide state for good (threads, malloc and the quantized engine are the
program's, set once by ``retriever.hardware.configure_process``).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from .errors import RetrieverError
from .hardware import DTYPES, Precision, int8_engine, malloc_keeps_freed, read_cpu_info

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
    LayerNorm's cast is then a separate pass over the activations. The bf16 stream is the faster; the
    fp32 stream has the smaller logit error against fp32, and the shipped shapes model's Recall@1 is
    the same in both (figures: docs/bench/hardware-choices.md).
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
    #: The program told malloc to keep freed memory (``retriever.hardware.configure_process``; CPU, glibc).
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
      matmul inputs: a smaller logit error, a slower pass (see ``FusedViltLayer``).
      The visual embedding that index time runs stays fp32 either way, so cached tokens never
      depend on the precision searches run in.
    * fp16, bf16 without the fused kernels, and anything on CUDA: fp32 weights under autocast.
    * int8: the encoder's Linear layers quantized dynamically (int8 weights per output channel, int8
      activations per call); the embeddings, pooler and head stay fp32.

    Process-wide state is left as found: malloc's tuning and the thread count are the program's
    (``retriever.hardware.configure_process``); on a CPU the result records whether malloc keeps freed
    activation memory.
    """
    prepared = _prepare(model, precision, device, sdpa=sdpa, fp32_residual=fp32_residual)
    if device.type == "cpu":
        prepared.malloc_keeps_freed = malloc_keeps_freed()
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
    the CPU measured slower than fp32 here, several times slower than the fbgemm/oneDNN kernels behind
    ``quantize_dynamic`` (figures: docs/bench/hardware-choices.md). Revisit when torchao's CPU kernels
    no longer need ``torch.compile``.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    with _quantized_engine(engine), warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning, UserWarning))
        quantize_dynamic(  # type: ignore[no-untyped-call]
            module, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True
        )


@contextmanager
def _quantized_engine(engine: str) -> Iterator[None]:
    """torch's quantized engine set to ``engine`` while weights are packed, then put back as it was.

    Packing reads the process-wide engine; afterwards each dynamic Linear runs through the engine its
    packed weights were made for, whatever the process-wide one says, so the setting need not outlive
    the packing (the program sets it for good, once: ``retriever.hardware.configure_process``).
    """
    previous = torch.backends.quantized.engine
    torch.backends.quantized.engine = engine
    try:
        yield
    finally:
        torch.backends.quantized.engine = previous
