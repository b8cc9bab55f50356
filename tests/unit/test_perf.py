"""retriever.perf: CPU features, the precision choice, SDPA and fused layers, and their accuracy.

Low precision changes scores, so it is held to tolerances stated against the spread of the fp32
logits (never against float snapshots). With s = std of the fp32 logits over 24 pairs of a small
random ViLT whose logits spread over a few units (s about 2.4):

* bf16 (bf16 residual stream, the engine's default on CPUs with AMX/AVX512-BF16):
  max |logit - fp32 logit| <= 0.25 s (measured about 0.14 s);
* bf16 with ``fp32_residual``: <= 0.15 s (measured about 0.08 s);
* fp16 (autocast): <= 0.1 s (measured about 0.01 s);
* int8 dynamic quantization (the engine's choice on AVX2-only CPUs): <= 0.75 s (measured about
  0.5 s here, 0.12 s on a ViLT-B-sized random model): int8 trades real accuracy for speed;

and in every precision two pairs whose fp32 logits differ by more than twice the tolerance keep
their order. fp32 with SDPA must match eager attention to 1e-4 (float rounding of logits of a few units).
"""

from __future__ import annotations

import copy
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retriever.errors import RetrieverError
from retriever.index.vectors import VectorIndex
from retriever.perf import (
    CpuInfo,
    FusedViltLayer,
    SdpaSelfAttention,
    choose_precision,
    configure_threads,
    int8_engine,
    keep_freed_memory,
    key_padding_bias,
    parse_cpuinfo,
    read_cpu_info,
    usable_threads,
)
from retriever.rerank import ViltReranker
from tests.conftest import random_image
from tests.tiny_models import make_vilt_tokenizer

CPU = torch.device("cpu")
AMX_FLAGS = "fpu sse2 avx avx2 fma avx512f avx512bw avx512_bf16 avx512_vnni amx_tile amx_bf16 amx_int8"
AVX2_FLAGS = "fpu sse2 avx avx2 fma"

TOLERANCE = {"bf16": 0.25, "bf16-fp32-residual": 0.15, "fp16": 0.1, "int8": 0.75}


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
from retriever.perf import keep_freed_memory
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


# -- attention and fused layers ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_vilt(tmp_path_factory: pytest.TempPathFactory) -> tuple[object, object]:
    """A small random ViLT (hidden 64, 4 layers), its weights drawn wide enough that logits spread.

    With the default initializer (std 0.02) every pair's [CLS] ends up nearly the same and logits
    differ by hundredths; std 0.1 and a wide head give a spread of a few units, like a trained head.
    """
    from transformers import ViltConfig, ViltForImageAndTextRetrieval, ViltImageProcessor, ViltProcessor

    tokenizer = make_vilt_tokenizer(tmp_path_factory.mktemp("vocab") / "vocab.txt")
    config = ViltConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=40,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        image_size=384,
        patch_size=32,
        pad_token_id=0,
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    model = ViltForImageAndTextRetrieval(config).eval()
    with torch.no_grad():
        model.vilt.embeddings.cls_token.normal_(std=0.02)
        model.vilt.embeddings.position_embeddings.normal_(std=0.02)
        for module in (model.vilt.pooler.dense, model.rank_output):
            module.weight.normal_(std=1.0)
    processor = ViltProcessor(
        image_processor=ViltImageProcessor(size={"shortest_edge": 128}, size_divisor=32), tokenizer=tokenizer
    )
    return model, processor


def _reranker(small_vilt: tuple[object, object], precision: str, **kwargs: object) -> ViltReranker:
    model, processor = small_vilt
    return ViltReranker(
        copy.deepcopy(model),
        processor,
        name="small",
        fingerprint="small",
        device=CPU,
        batch_size=5,
        precision=precision,  # type: ignore[arg-type]
        **kwargs,  # type: ignore[arg-type]
    )


TEXTS = [
    "a red circle left of a blue square",
    "giraffe eating leaves",
    "a dog",
    "two small green triangles above a large yellow star next to a house",
]


def _images() -> list[Image.Image]:
    # Several shapes, so batches mix token counts and need padding.
    sizes = [(128, 128), (192, 128), (128, 192), (160, 128), (224, 128), (128, 128)]
    return [random_image(i, size) for i, size in enumerate(sizes)]


@pytest.fixture(scope="module")
def fp32_scores(
    small_vilt: tuple[object, object],
) -> tuple[list[np.ndarray], list[tuple[int, int]], np.ndarray]:
    eager = _reranker(small_vilt, "fp32", sdpa=False)
    tokens = [eager.embed_image(img) for img in _images()]
    pairs = [(t, i) for t in range(len(TEXTS)) for i in range(len(tokens))]
    return tokens, pairs, eager.score_pairs(TEXTS, tokens, pairs)


def test_sdpa_matches_eager_attention(small_vilt: tuple[object, object], fp32_scores: tuple) -> None:
    tokens, pairs, eager = fp32_scores
    sdpa = _reranker(small_vilt, "fp32")
    assert sdpa.attention == "sdpa"
    assert sum(isinstance(m, SdpaSelfAttention) for m in sdpa.model.modules()) == 4
    np.testing.assert_allclose(sdpa.score_pairs(TEXTS, tokens, pairs), eager, atol=1e-4, rtol=0)
    # The swap keeps the parameter names, so state dicts load either way.
    model, _ = small_vilt
    assert set(sdpa.model.state_dict()) == set(model.state_dict())  # type: ignore[attr-defined]


def test_sdpa_follows_weight_edits(small_vilt: tuple[object, object], fp32_scores: tuple) -> None:
    tokens, pairs, _ = fp32_scores
    sdpa = _reranker(small_vilt, "fp32")
    eager = _reranker(small_vilt, "fp32", sdpa=False)
    before = sdpa.score_pairs(TEXTS, tokens, pairs)
    for rer in (sdpa, eager):
        with torch.no_grad():
            rer.model.vilt.encoder.layer[0].attention.attention.key.weight.mul_(3.0)
    after = sdpa.score_pairs(TEXTS, tokens, pairs)
    assert np.max(np.abs(after - before)) > 1e-3
    np.testing.assert_allclose(after, eager.score_pairs(TEXTS, tokens, pairs), atol=1e-4, rtol=0)


def test_output_attentions_still_works(small_vilt: tuple[object, object]) -> None:
    rer = _reranker(small_vilt, "fp32")
    inputs = rer.processor(images=_images()[0], text=TEXTS[0], return_tensors="pt")
    with torch.inference_mode():
        out = rer.model(**inputs, output_attentions=True)
    assert len(out.attentions) == 4
    torch.testing.assert_close(out.attentions[0].sum(-1), torch.ones_like(out.attentions[0].sum(-1)))


def test_key_padding_bias() -> None:
    assert key_padding_bias(None) is None
    full = torch.zeros(2, 1, 5, 5)
    assert key_padding_bias(full) is None
    padded = full.clone()
    padded[1, :, :, 3:] = torch.finfo(torch.float32).min
    row = key_padding_bias(padded)
    assert row is not None and row.shape == (2, 1, 1, 5)
    assert torch.equal(row[:, :, 0], padded[:, :, 0])


def test_batches_cap_size_and_padding(small_vilt: tuple[object, object]) -> None:
    rer = _reranker(small_vilt, "fp32")
    rer.batch_size = 4
    lengths = [20, 20, 21, 21, 21, 30, 30, 31, 60]
    batches = rer._batches(list(range(len(lengths))), lengths)
    assert sorted(p for b in batches for p in b) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 4
        padded = len(batch) * max(lengths[p] for p in batch)
        # One pair alone is never "too padded"; otherwise padding stays within max_padding.
        assert len(batch) == 1 or padded <= sum(lengths[p] for p in batch) * (1 + rer.max_padding)


# -- low precision accuracy ----------------------------------------------------------------------------


def _low_precisions() -> list[str]:
    out = ["bf16", "bf16-fp32-residual", "fp16"]
    if int8_engine(read_cpu_info()) is not None:
        out.append("int8")
    return out


@pytest.mark.parametrize("precision", _low_precisions())
def test_low_precision_logits_within_tolerance(
    small_vilt: tuple[object, object], fp32_scores: tuple, precision: str
) -> None:
    tokens, pairs, reference = fp32_scores
    if precision == "bf16-fp32-residual":
        rer = _reranker(small_vilt, "bf16", fp32_residual=True)
    else:
        rer = _reranker(small_vilt, precision)
    got = rer.score_pairs(TEXTS, tokens, pairs)
    spread = float(np.std(reference))
    assert spread > 0.5, "the check means something only if pairs really differ"
    tol = TOLERANCE[precision] * spread
    assert np.all(np.isfinite(got))
    assert np.max(np.abs(got - reference)) <= tol, (precision, np.max(np.abs(got - reference)), tol)
    # Clearly separated pairs keep their order.
    gap = reference[:, None] - reference[None, :]
    clear = gap > 2 * tol
    assert np.all((got[:, None] - got[None, :])[clear] > 0)


def test_fp32_residual_stream_is_the_more_accurate_bf16(
    small_vilt: tuple[object, object], fp32_scores: tuple
) -> None:
    tokens, pairs, reference = fp32_scores
    stream = _reranker(small_vilt, "bf16")
    if not stream.prepared.fused_layers:
        pytest.skip("no oneDNN fusion in this torch: bf16 runs under autocast, with an fp32 stream")
    mixed = _reranker(small_vilt, "bf16", fp32_residual=True)
    assert all(m.fp32_residual for m in mixed.model.modules() if isinstance(m, FusedViltLayer))
    err_stream = np.max(np.abs(stream.score_pairs(TEXTS, tokens, pairs) - reference))
    err_mixed = np.max(np.abs(mixed.score_pairs(TEXTS, tokens, pairs) - reference))
    assert err_mixed < err_stream, (err_mixed, err_stream)


def test_bf16_engine_layers_and_cached_tokens(small_vilt: tuple[object, object], fp32_scores: tuple) -> None:
    tokens, _, _ = fp32_scores
    rer = _reranker(small_vilt, "bf16")
    assert rer.dtype == torch.bfloat16
    if rer.prepared.fused_layers:
        assert sum(isinstance(m, FusedViltLayer) for m in rer.model.modules()) == 4
    else:
        assert rer.prepared.autocast  # no oneDNN fusion in this torch: bf16 through autocast instead
    # Index-time tokens do not depend on the precision searches run in.
    np.testing.assert_array_equal(rer.embed_image(_images()[0]), tokens[0])


# -- approximate index --------------------------------------------------------------------------------


def test_vector_index_turns_ivf_at_threshold_and_keeps_recall(tmp_path: Path) -> None:
    from retriever.bench import synthetic_vectors

    n, dim = 4000, 32
    x = synthetic_vectors(n, dim, clustered=True, seed=0)
    ids = np.arange(n, dtype=np.int64) * 3
    exact = VectorIndex(dim, approx_min=None)
    exact.add(ids, x)
    approx = VectorIndex(dim, approx_min=3000)
    approx.add(ids[:2000], x[:2000])
    assert approx.exact
    approx.add(ids[2000:], x[2000:])
    assert not approx.exact and len(approx) == n
    queries = x[:50] + np.float32(0.01)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    _, truth = exact.search(queries, 16)
    _, found = approx.search(queries, 16)
    recall = np.mean([len(set(truth[i]) & set(found[i])) / 16 for i in range(50)])
    assert recall >= 0.9
    # Removal, saving and loading work on the IVF index too.
    assert approx.remove(ids[:10]) == 10 and len(approx) == n - 10
    path = tmp_path / "ivf.faiss"
    approx.save(path)
    again = VectorIndex.load(path, dim)
    assert not again.exact and len(again) == n - 10
    _, top = again.search(x[20:21], 1)
    assert top[0, 0] == ids[20]
