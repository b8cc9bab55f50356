"""Token codecs measured: what each codec of ``retriever.index.codecs`` costs in bytes, time and accuracy.

For each codec, against fp16 (what the patch cache stores today):

- bytes per image at the bench's image sizes on a ViLT-B/32-sized model, with the token counts ViLT's
  own processor and visual embedding give (``ViltReranker.embed_image``), not assumed ones;
- encode and decode time per image (the fastest of a few calls), and the time to decode and rerank 16
  candidates in the engine's precision, since decoding is now on a query's path;
- the logit error against fp16 tokens relative to the spread (standard deviation) of the fp16 logits,
  on a random-weight ViLT-B/32 (``bench.models``; its widened head gives the spread, so that spread is
  artificial, and its tokens, random patch projections, have none of a trained model's outlier
  dimensions) and on the shipped shapes model over every pair its rerank scores;
- Recall@1 of the shipped shapes model on a fresh shapes test set (a seed training never used), both
  directions, ranked as searches rank (ITM + prefilter) and by the ITM logit alone, with the cached
  tokens passed through the codec (``evaluate`` as ``retriever eval`` runs it, the reranker wrapped).

Not part of ``run_bench`` (yet): ``python -m retriever.bench.codecs`` runs it alone and prints it.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..datasets.karpathy import load_karpathy
from ..datasets.shapes import generate
from ..evaluate import EvalResult, evaluate
from ..factory import load_prefilter, load_reranker
from ..hardware import (
    KEEP_FREED_BYTES,
    PrecisionChoice,
    configure_plan,
    plan_hardware,
    read_cpu_info,
    usable_threads,
)
from ..index.codecs import CODECS, Codec, codec_by_name
from ..metrics import RecallResult, image_ranks, text_ranks
from ..presets import preset
from ..rerank import ProgressFn, Reranker
from ..search import fused_score
from .config import BenchConfig
from .models import CPU, bench_text, build_models, make_reranker
from .synthetic import synthetic_image
from .timing import StepFn, best_time, no_steps, sig

#: A 4:3 photo, the size the issue's per-image target is stated for (1 + 16 x 12 tokens at ViLT-B/32).
PHOTO_4_3 = (640, 480)
#: A shapes test-set seed that neither training (101) nor any test (0, 2-7, 31337, 90210, 424242) uses.
FRESH_SEED = 271828
#: Candidates the rerank timing scores per query (what a CPU search reranks by default).
TIMED_CANDIDATES = 16


@dataclass(frozen=True)
class ImageSize:
    """One image size (width, height) and the visual tokens ViLT makes of it."""

    width: int
    height: int
    tokens: int


@dataclass(frozen=True)
class LogitError:
    """|logit with decoded tokens - logit with fp16 tokens| over ``pairs`` pairs, absolute and as a share
    of the fp16 logits' standard deviation (the spread a ranking has to keep apart)."""

    pairs: int
    max_abs: float
    mean_abs: float
    max_rel: float
    mean_rel: float


@dataclass(frozen=True)
class CodecRow:
    """One codec's figures."""

    codec: str
    codec_id: int
    #: Bytes per token at the bench model's hidden size, and per image for each of ``CodecBenchResult.sizes``.
    bytes_per_token: float
    bytes_per_image: tuple[int, ...]
    #: Per image of ``CodecBenchResult.timing_tokens`` tokens: from float32 tokens, and back from bytes.
    encode_ms: float
    decode_ms: float
    #: Decoding then reranking ``TIMED_CANDIDATES`` candidates in the engine's precision (fastest call).
    rerank_ms: float
    random_error: LogitError
    shapes_error: LogitError
    #: The shapes model's recalls: ranked as searches rank (ITM + prefilter), and by ITM alone.
    recall: RecallResult
    recall_itm: RecallResult | None
    #: Queries whose R@1 hit this codec loses or gains against fp16 (ranked as searches rank): a net
    #: difference of one or two queries is within what any change to the logits does.
    tr_lost: int
    tr_gained: int
    ir_lost: int
    ir_gained: int


@dataclass(frozen=True)
class CodecBenchResult:
    """Every codec's figures and what they were measured on."""

    hidden: int
    sizes: tuple[ImageSize, ...]
    timing_tokens: int
    engine_precision: str
    random_logit_std: float
    shapes_images: int
    shapes_texts: int
    shapes_seed: int
    candidates: int
    shapes_precision: str
    shapes_logit_std: float
    prefilter: RecallResult
    rows: tuple[CodecRow, ...]
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        """The ``--json`` form."""
        return asdict(self)


class CodedReranker:
    """A ``Reranker`` whose cached tokens go through a codec before each rerank, as an index that stores
    them with that codec hands them over: encoded once, decoded at every ``score_pairs``."""

    def __init__(self, inner: Reranker, codec: Codec) -> None:
        self.inner = inner
        self.codec = codec
        self.name = inner.name
        self.fingerprint = f"{inner.fingerprint}+{codec.name}"
        self.hidden = inner.hidden
        self.precision: str = getattr(inner, "precision", "")
        self._encoded: dict[int, tuple[np.ndarray, bytes]] = {}

    def embed_image(self, image: Image.Image) -> np.ndarray:
        return self.inner.embed_image(image)

    def _bytes(self, tokens: np.ndarray) -> bytes:
        # Keyed by the array's identity, the array kept alive with it: evaluate holds one per image.
        hit = self._encoded.get(id(tokens))
        if hit is None or hit[0] is not tokens:
            hit = (tokens, self.codec.encode(tokens))
            self._encoded[id(tokens)] = hit
        return hit[1]

    def score_pairs(
        self,
        texts: Sequence[str],
        images: Sequence[np.ndarray],
        pairs: Sequence[tuple[int, int]],
        on_progress: ProgressFn | None = None,
    ) -> np.ndarray:
        used = {i for _, i in pairs}
        decoded = [
            self.codec.decode(self._bytes(t), *t.shape) if i in used else t for i, t in enumerate(images)
        ]
        return self.inner.score_pairs(texts, decoded, pairs, on_progress)


def logit_error(reference: np.ndarray, got: np.ndarray) -> LogitError:
    """How far ``got`` is from ``reference`` (same pairs), absolute and relative to the reference's spread."""
    diff = np.abs(got.astype(np.float64) - reference.astype(np.float64))
    spread = float(np.std(reference)) or 1.0
    return LogitError(
        pairs=int(diff.size),
        max_abs=sig(float(diff.max())),
        mean_abs=sig(float(diff.mean())),
        max_rel=sig(float(diff.max()) / spread),
        mean_rel=sig(float(diff.mean()) / spread),
    )


def _scored(result: EvalResult) -> np.ndarray:
    """Every rerank logit of an evaluation, both directions (the candidate sets are the same per codec)."""
    assert result.rerank_t2i is not None and result.rerank_i2t is not None
    t2i, i2t = result.rerank_t2i, result.rerank_i2t
    return np.concatenate([t2i[np.isfinite(t2i)], i2t[np.isfinite(i2t)]])


def _r1_hits(result: EvalResult) -> tuple[np.ndarray, np.ndarray]:
    """Which images (text retrieval) and captions (image retrieval) rank their answer first, ranked as
    ``evaluate`` ranks them (ITM + prefilter logit)."""
    assert result.rerank_t2i is not None and result.rerank_i2t is not None
    scale = result.prefilter_logit_scale
    t2i = fused_score(result.rerank_t2i, result.prefilter_scores, scale)
    i2t = fused_score(result.rerank_i2t, result.prefilter_scores.T, scale)
    return text_ranks(i2t, result.text_image) == 0, image_ranks(t2i, result.text_image) == 0


@dataclass
class _RandomModelFigures:
    sizes: tuple[ImageSize, ...]
    timing_tokens: int
    logit_std: float
    by_codec: dict[str, tuple[float, float, float, LogitError]]


def _random_model_figures(
    codecs: Sequence[Codec],
    cfg: BenchConfig,
    engine_choice: PrecisionChoice,
    root: Path,
    *,
    images: int,
    reps: int,
    rerank_reps: int,
    step: StepFn,
) -> _RandomModelFigures:
    """Sizes, times and logit errors on the random ViLT-B/32: (encode ms, decode ms, rerank ms, error)."""
    step("codecs: random-weight ViLT-B/32")
    models = build_models(cfg, root)
    fp32 = make_reranker(
        models, PrecisionChoice("fp32", "the codec's error alone"), batch_size=cfg.batch_size
    )
    shapes = (*cfg.image_sizes, PHOTO_4_3)
    tokens_by_size = [fp32.embed_image(synthetic_image(w, h, seed=7)) for w, h in shapes]
    sizes = tuple(ImageSize(w, h, t.shape[0]) for (w, h), t in zip(shapes, tokens_by_size, strict=True))
    timed = max(tokens_by_size, key=lambda t: t.shape[0])

    step("codecs: logits against fp16 tokens (random ViLT-B/32, fp32)")
    source = [
        fp32.embed_image(synthetic_image(*cfg.image_sizes[i % len(cfg.image_sizes)], seed=50 + i))
        for i in range(images)
    ]
    texts = [bench_text(models, cfg.text_tokens[0]), bench_text(models, cfg.text_tokens[0], shift=3)]
    pairs = [(t, i) for t in range(len(texts)) for i in range(len(source))]
    reference = fp32.score_pairs(texts, [t.astype(np.float16) for t in source], pairs)
    errors: dict[str, LogitError] = {}
    for codec in codecs:
        decoded = [codec.decode(codec.encode(t), *t.shape) for t in source]
        errors[codec.name] = logit_error(reference, fp32.score_pairs(texts, decoded, pairs))
    del fp32

    step("codecs: encode and decode times")
    times: dict[str, tuple[float, float]] = {}
    for codec in codecs:
        buf = codec.encode(timed)
        encode = best_time(partial(codec.encode, timed), reps)
        decode = best_time(partial(codec.decode, buf, *timed.shape), reps)
        times[codec.name] = (encode * 1e3, decode * 1e3)

    step(f"codecs: decode and rerank {TIMED_CANDIDATES} candidates ({engine_choice.precision})")
    engine = make_reranker(models, engine_choice, batch_size=cfg.batch_size)
    candidates = [
        engine.embed_image(synthetic_image(*PHOTO_4_3, seed=200 + i)) for i in range(TIMED_CANDIDATES)
    ]
    query = [bench_text(models, cfg.text_tokens[0])]
    query_pairs = [(0, i) for i in range(TIMED_CANDIDATES)]
    stored = {c.name: [c.encode(t) for t in candidates] for c in codecs}
    rerank = dict.fromkeys(stored, float("inf"))
    # Interleaved, so that a slow spell of a shared machine does not land on one codec only.
    for rep in range(max(1, rerank_reps) + 1):
        for codec in codecs:
            start = time.perf_counter()
            decoded = [codec.decode(b, *t.shape) for b, t in zip(stored[codec.name], candidates, strict=True)]
            engine.score_pairs(query, decoded, query_pairs)
            if rep:  # the first round warms up
                rerank[codec.name] = min(rerank[codec.name], time.perf_counter() - start)
    figures = {c.name: (*times[c.name], rerank[c.name] * 1e3, errors[c.name]) for c in codecs}
    return _RandomModelFigures(sizes, timed.shape[0], float(np.std(reference)), figures)


def bench_codecs(
    codecs: Sequence[str] = tuple(CODECS),
    *,
    images: int = 1000,
    seed: int = FRESH_SEED,
    candidates: int = 16,
    cfg: BenchConfig | None = None,
    engine_choice: PrecisionChoice | None = None,
    random_images: int = 12,
    reps: int = 20,
    rerank_reps: int = 3,
    workdir: Path | None = None,
    step: StepFn = no_steps,
) -> CodecBenchResult:
    """Each codec's bytes, times, logit errors and shapes-model recalls against fp16 (always measured).

    ``images`` is the size of the generated shapes test set (``seed``: one training never used);
    ``random_images`` the images the random ViLT-B/32's logits are compared on (two texts each);
    ``engine_choice`` the precision the rerank timing runs in (default: this machine's choice).
    """
    started = time.perf_counter()
    cfg = cfg or BenchConfig.full()
    chosen = [codec_by_name(name) for name in dict.fromkeys(["fp16", *codecs])]
    hidden = int(cfg.vilt.get("hidden_size", 768))
    if engine_choice is None:
        engine_choice = plan_hardware(CPU, cfg.precision, hidden=hidden).precision_choice
    with tempfile.TemporaryDirectory(prefix="retriever-codecs-", dir=workdir) as tmp:
        root = Path(tmp)
        rand = _random_model_figures(
            chosen,
            cfg,
            engine_choice,
            root,
            images=random_images,
            reps=reps,
            rerank_reps=rerank_reps,
            step=step,
        )

        step(f"codecs: shapes test set, {images} images, seed {seed}")
        split = load_karpathy(generate(root / "shapes", images, seed=seed, split="test"), split="test")
        pre_dir, re_dir = preset("shapes")
        prefilter = load_prefilter(pre_dir, CPU)
        reranker = load_reranker(re_dir, CPU)
        results: dict[str, EvalResult] = {}
        for codec in chosen:
            step(f"codecs: shapes model recall through {codec.name}")
            results[codec.name] = evaluate(
                split, prefilter, CodedReranker(reranker, codec), candidates=candidates
            )
    reference = _scored(results["fp16"])
    tr_base, ir_base = _r1_hits(results["fp16"])
    rows = []
    for codec in chosen:
        encode_ms, decode_ms, rerank_ms, random_error = rand.by_codec[codec.name]
        result = results[codec.name]
        assert result.rerank is not None
        tr_hits, ir_hits = _r1_hits(result)
        rows.append(
            CodecRow(
                codec=codec.name,
                codec_id=codec.id,
                bytes_per_token=codec.encoded_size(1000, hidden) / 1000,
                bytes_per_image=tuple(codec.encoded_size(s.tokens, hidden) for s in rand.sizes),
                encode_ms=sig(encode_ms, 3),
                decode_ms=sig(decode_ms, 3),
                rerank_ms=sig(rerank_ms, 4),
                random_error=random_error,
                shapes_error=logit_error(reference, _scored(result)),
                recall=result.rerank,
                recall_itm=result.rerank_itm_only,
                tr_lost=int((tr_base & ~tr_hits).sum()),
                tr_gained=int((tr_hits & ~tr_base).sum()),
                ir_lost=int((ir_base & ~ir_hits).sum()),
                ir_gained=int((ir_hits & ~ir_base).sum()),
            )
        )
    fp16 = results["fp16"]
    return CodecBenchResult(
        hidden=hidden,
        sizes=rand.sizes,
        timing_tokens=rand.timing_tokens,
        engine_precision=engine_choice.precision,
        random_logit_std=sig(rand.logit_std),
        shapes_images=fp16.images,
        shapes_texts=fp16.texts,
        shapes_seed=seed,
        candidates=candidates,
        shapes_precision=reranker.precision,
        shapes_logit_std=sig(float(np.std(reference))),
        prefilter=fp16.prefilter,
        rows=tuple(rows),
        seconds=round(time.perf_counter() - started, 1),
    )


def format_codecs(result: CodecBenchResult) -> str:
    """The figures as text tables, fp16 first: each codec's differences are against it."""
    size_names = [f"{s.width}x{s.height} ({s.tokens} tok)" for s in result.sizes]
    lines = [f"Token codecs: bytes per image at hidden {result.hidden} (ViLT-B/32), KB = 1024 bytes", ""]
    lines.append("| codec | id | bytes/token | " + " | ".join(size_names) + " |")
    lines.append("|---|---|---|" + "---|" * len(size_names))
    for r in result.rows:
        sizes = " | ".join(f"{b:,} ({b / 1024:.1f} KB)" for b in r.bytes_per_image)
        lines.append(f"| {r.codec} | {r.codec_id} | {r.bytes_per_token:g} | {sizes} |")
    base = next(r for r in result.rows if r.codec == "fp16")
    lines += [
        "",
        f"Time per image of {result.timing_tokens} tokens x {result.hidden}, fastest call; rerank: decode "
        f"{TIMED_CANDIDATES} candidates of {result.sizes[-1].tokens} tokens and score them with one query "
        f"({result.engine_precision}, random ViLT-B/32).",
        "",
        "| codec | encode ms | decode ms | decode + rerank ms | vs fp16 |",
        "|---|---|---|---|---|",
    ]
    for r in result.rows:
        lines.append(
            f"| {r.codec} | {r.encode_ms:g} | {r.decode_ms:g} | {r.rerank_ms:g} | "
            f"{(r.rerank_ms / base.rerank_ms - 1) * 100:+.1f}% |"
        )
    lines += [
        "",
        "Logit error against fp16 tokens, |diff| / std of the fp16 logits (max, mean): random ViLT-B/32 "
        f"(fp32, std {result.random_logit_std:g}, artificial spread) and the shapes model "
        f"({result.shapes_precision}, std {result.shapes_logit_std:g}, every pair its rerank scored).",
        "",
        "| codec | random max | random mean | shapes max | shapes mean | shapes max abs |",
        "|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        a, s = r.random_error, r.shapes_error
        lines.append(
            f"| {r.codec} | {a.max_rel:.3g} | {a.mean_rel:.3g} | {s.max_rel:.3g} | {s.mean_rel:.3g} | "
            f"{s.max_abs:.3g} |"
        )
    pre = result.prefilter
    lines += [
        "",
        f"Shapes model Recall@1, {result.shapes_images} images / {result.shapes_texts} captions (seed "
        f"{result.shapes_seed}), rerank of {result.candidates}; prefilter alone TR {pre.tr_r1:.2f} / "
        f"IR {pre.ir_r1:.2f}.",
        "",
        "| codec | TR R@1 | IR R@1 | TR diff | IR diff | TR hits lost/gained | IR hits lost/gained "
        "| ITM only TR | ITM only IR |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result.rows:
        itm = r.recall_itm
        itm_text = f"{itm.tr_r1:.2f} | {itm.ir_r1:.2f}" if itm is not None else "- | -"
        lines.append(
            f"| {r.codec} | {r.recall.tr_r1:.2f} | {r.recall.ir_r1:.2f} | "
            f"{r.recall.tr_r1 - base.recall.tr_r1:+.2f} | {r.recall.ir_r1 - base.recall.ir_r1:+.2f} | "
            f"{r.tr_lost}/{r.tr_gained} | {r.ir_lost}/{r.ir_gained} | {itm_text} |"
        )
    lines += ["", f"{result.seconds:g} s in all."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m retriever.bench.codecs``: measure every codec and print the tables."""
    parser = argparse.ArgumentParser(prog="python -m retriever.bench.codecs", description=__doc__)
    parser.add_argument("--images", type=int, default=1000, help="shapes test-set images (default 1000)")
    parser.add_argument("--seed", type=int, default=FRESH_SEED, help="shapes test-set seed")
    parser.add_argument("--candidates", type=int, default=16, help="rerank candidates (default 16)")
    parser.add_argument("--codecs", default=",".join(CODECS), help="comma-separated codec names")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all usable)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args(argv)
    cpu = read_cpu_info()
    plan = plan_hardware(
        CPU, "auto", threads=args.threads or usable_threads(cpu), keep_freed=KEEP_FREED_BYTES, cpu=cpu
    )
    configure_plan(plan)  # the one process set-up of this program

    def step(message: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)

    result = bench_codecs(
        [c.strip() for c in args.codecs.split(",") if c.strip()],
        images=args.images,
        seed=args.seed,
        candidates=args.candidates,
        engine_choice=plan.precision_choice,
        step=step,
    )
    print(format_codecs(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result.as_dict(), indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
