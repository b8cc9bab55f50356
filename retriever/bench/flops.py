"""How many useful FLOPs one (text, image) pair costs ViLT: the numerator of every GFLOP/s figure."""

from __future__ import annotations

from typing import Protocol

#: How the useful FLOPs of one (text, image) pair are counted.
FLOP_FORMULA = (
    "per pair, T = real text tokens + real image tokens (no padding): "
    "L * [2*T*(4*H^2 + 2*H*I) + 4*T^2*H] + 2*H^2 + 2*H "
    "(Q, K, V, output and two MLP matmuls; QK^T and attention*V; pooler and ITM head)"
)


class LayerSizes(Protocol):
    """The parts of a transformer's configuration (a ``ViltConfig``) the count reads."""

    @property
    def hidden_size(self) -> int: ...

    @property
    def intermediate_size(self) -> int: ...

    @property
    def num_hidden_layers(self) -> int: ...


def pair_flops(text_tokens: int, image_tokens: int, config: LayerSizes) -> float:
    """Useful FLOPs of one pair (see ``FLOP_FORMULA``)."""
    t = text_tokens + image_tokens
    h = int(config.hidden_size)
    i = int(config.intermediate_size)
    layers = int(config.num_hidden_layers)
    return float(layers * (2 * t * (4 * h * h + 2 * h * i) + 4 * t * t * h) + 2 * h * h + 2 * h)


def attention_flops(text_tokens: int, image_tokens: int, config: LayerSizes) -> float:
    """The attention part of ``pair_flops``: QK^T and attention*V in every layer."""
    t = text_tokens + image_tokens
    return float(int(config.num_hidden_layers) * 4 * t * t * int(config.hidden_size))
