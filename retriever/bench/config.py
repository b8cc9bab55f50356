"""What ``retriever bench`` measures and how much: model sizes, workloads and repetitions.

Plain data, no torch: the CLI builds a ``BenchConfig`` before anything heavy is imported.
"""

from __future__ import annotations

from dataclasses import dataclass, field

#: Keyword overrides for a transformers model configuration (``ViltConfig``, ``CLIPConfig`` parts).
ConfigOverrides = dict[str, int | float | str | bool]


def _vilt_b32() -> ConfigOverrides:
    return {}  # ViltConfig() defaults are ViLT-B/32: hidden 768, 12 layers, 12 heads, MLP 3072


def _clip_b32_text() -> ConfigOverrides:
    return {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8}


def _clip_b32_vision() -> ConfigOverrides:
    return {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "image_size": 224,
        "patch_size": 32,
    }


@dataclass(frozen=True)
class BenchConfig:
    """What to measure and how much. ``full()`` and ``quick()`` are the CLI's; tests pass tiny models."""

    #: ``ViltConfig`` overrides (none: ViLT-B/32) and the ViLT image processor's shorter edge.
    vilt: ConfigOverrides = field(default_factory=_vilt_b32)
    vilt_shortest_edge: int = 384
    #: CLIP text and vision ``CLIPConfig`` overrides (defaults: clip-vit-base-patch32 sizes).
    clip_text: ConfigOverrides = field(default_factory=_clip_b32_text)
    clip_vision: ConfigOverrides = field(default_factory=_clip_b32_vision)
    projection_dim: int = 512
    #: Text lengths in tokens ([CLS] and [SEP] included) and image sizes (width, height).
    text_tokens: tuple[int, ...] = (16, 40)
    image_sizes: tuple[tuple[int, int], ...] = ((384, 384), (576, 384))
    engine_pairs: int = 32
    naive_pairs: int = 4
    reps: int = 2
    batch_size: int = 16
    #: Index sizes, rerank candidates and queries per (size, candidates) for the latency table.
    index_sizes: tuple[int, ...] = (1_000, 10_000, 100_000)
    candidates: tuple[int, ...] = (16, 64)
    query_reps: int = 3
    image_tokens_per_entry: int = 145
    recall_queries: int = 100
    #: Generated JPEGs for the indexing measurement.
    jpeg_count: int = 6
    jpeg_size: tuple[int, int] = (4000, 3000)
    #: Rows written to a real SQLite store to measure its bytes per image.
    db_rows: int = 1000
    #: Matmul shapes (m, k, n) for the peak, and timed repetitions of each.
    peak_shapes: tuple[tuple[int, int, int], ...] = (
        (2048, 2048, 2048),
        (4096, 768, 3072),
        (2576, 768, 3072),
    )
    peak_reps: int = 5
    #: Distinct images scored with two texts, engine against fp32, for the logit difference.
    accuracy_images: int = 8
    precision: str = "auto"
    threads: int | None = None
    #: Freed memory malloc may keep (bytes; 0: off). None: the engine's default. The program reads it.
    keep_freed: int | None = None
    #: Where the models run: auto (CUDA when torch sees a GPU), cpu or cuda. Decoding, FAISS and
    #: the patch cache stay on the CPU either way.
    device: str = "auto"
    #: Matmul shapes for the peak on a GPU, where the CPU's are too small to fill the card.
    gpu_peak_shapes: tuple[tuple[int, int, int], ...] = (
        (8192, 8192, 8192),
        (16384, 768, 3072),
        (10304, 768, 3072),
    )
    #: Batch size of the fp32 rows of the steps table (None: ``batch_size``).
    fp32_step_batch: int | None = None
    #: Extra rows of the steps table: cached tokens at batch 1, bf16 with an fp32 residual stream, int8
    #: for comparison, and the engine at 1 thread.
    extra_steps: bool = True

    @classmethod
    def full(cls) -> BenchConfig:
        """The full run: real model sizes, N up to 100k, a few repetitions."""
        return cls()

    @classmethod
    def quick(cls) -> BenchConfig:
        """All four parts, small enough for a CI job on a small machine; same model sizes."""
        return cls(
            text_tokens=(16,),
            engine_pairs=16,
            naive_pairs=1,
            reps=1,
            batch_size=16,
            fp32_step_batch=8,
            index_sizes=(1_000,),
            candidates=(16,),
            query_reps=1,
            recall_queries=20,
            jpeg_count=1,
            db_rows=100,
            peak_shapes=((1024, 768, 3072), (2576, 768, 3072)),
            peak_reps=3,
            accuracy_images=4,
            extra_steps=False,
        )
