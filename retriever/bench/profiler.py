"""Where one engine call spends its time: a torch.profiler trace split into matmuls, attention and the rest.

Shows how far the engine could go on this machine: its share of the peak if the matmuls alone ran
at the peak.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator, Sequence

import numpy as np

from ..rerank import ViltReranker
from .flops import attention_flops, pair_flops
from .report import TimeSplit
from .timing import sig

_LINEAR_OPS = ("linear", "addmm", "aten::mm", "aten::matmul")
_ATTENTION_OPS = ("scaled_dot_product", "flash_attention", "aten::bmm", "softmax", "baddbmm")


def _op_kind(name: str) -> str:
    lowered = name.lower()
    if any(key in lowered for key in _ATTENTION_OPS):
        return "attention"
    if any(key in lowered for key in _LINEAR_OPS):
        return "linear"
    return "other"


@contextlib.contextmanager
def _stderr_fd_silenced() -> Iterator[None]:
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def time_split(
    reranker: ViltReranker,
    text: str,
    tokens: Sequence[np.ndarray],
    text_tokens: int,
    peak_gflops: float,
) -> TimeSplit | None:
    """Profile one ``score_pairs`` call and split its time into matmuls, attention and the rest.

    Self CPU time per op on the calling thread: intra-op worker threads run inside the op that
    started them, so the shares are shares of wall time. None when the profiler is unavailable.
    """
    try:
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    pairs = [(0, j) for j in range(len(tokens))]
    # The caller has run these shapes already (the steps table), so every kernel is warm.
    # The profiler's C++ side logs its start and stop to file descriptor 2; keep the report clean.
    with _stderr_fd_silenced(), profile(activities=[ProfilerActivity.CPU]) as prof:
        reranker.score_pairs([text], tokens, pairs)
    spent = {"linear": 0.0, "attention": 0.0, "other": 0.0}
    for event in prof.key_averages():
        spent[_op_kind(event.key)] += float(event.self_cpu_time_total) / 1e6
    total = sum(spent.values())
    if total <= 0:
        return None
    config = reranker.model.config
    image_tokens = int(tokens[0].shape[0])
    flops_all = len(pairs) * pair_flops(text_tokens, image_tokens, config)
    flops_attention = len(pairs) * attention_flops(text_tokens, image_tokens, config)
    flops_linear = flops_all - flops_attention
    at_peak = flops_linear / (peak_gflops * 1e9) + spent["attention"] + spent["other"]
    return TimeSplit(
        linear_share=sig(spent["linear"] / total),
        linear_gflops=sig(flops_linear / max(spent["linear"], 1e-9) / 1e9),
        attention_share=sig(spent["attention"] / total),
        attention_gflops=sig(flops_attention / max(spent["attention"], 1e-9) / 1e9),
        other_share=sig(spent["other"] / total),
        ceiling_share_of_peak=sig(flops_all / at_peak / 1e9 / peak_gflops),
    )
