"""Random-weight ViLT and CLIP of the configured sizes: the bench needs no download and no trained model.

Throughput depends on the models' shapes, not their weights; the one place weights matter, the
logit spread the precision error is measured against, is set up in ``build_models``.
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..encoders import ClipEncoder
from ..hardware import PrecisionChoice
from ..rerank import ViltReranker
from ..tokenizers import clip_tokenizer, wordpiece_tokenizer
from .config import BenchConfig

CPU = torch.device("cpu")


@dataclass
class BenchModels:
    """Random-weight ViLT and CLIP of the configured sizes, with their processors."""

    # transformers' model and processor classes carry no usable annotations.
    vilt: Any
    vilt_processor: Any
    clip: ClipEncoder
    words: list[str]


def build_models(
    cfg: BenchConfig, workdir: Path, *, seed: int = 0, device: torch.device = CPU
) -> BenchModels:
    """A random ``ViltForImageAndTextRetrieval`` (fp32, CPU) and a random CLIP encoder on ``device``."""
    # transformers' constructors carry no usable annotations; go through the module as Any.
    hf: Any = importlib.import_module("transformers")

    # Every word is one WordPiece token, so a text of n-2 words is exactly n tokens with [CLS] and [SEP].
    words = [f"tok{i}" for i in range(200)]
    tokenizer = wordpiece_tokenizer(words, workdir / "vilt-vocab.txt", max_length=64)
    torch.manual_seed(seed)
    vilt_config = hf.ViltConfig(**{"vocab_size": len(tokenizer), "pad_token_id": 0, **cfg.vilt})
    vilt = hf.ViltForImageAndTextRetrieval(vilt_config).eval()
    emb = vilt.vilt.embeddings
    with torch.no_grad():
        emb.cls_token.normal_(std=0.02)
        emb.position_embeddings.normal_(std=0.02)
        # A fresh head gives every pair nearly the same logit; widen it (logit std of a few units across
        # pairs, like a trained ITM head) so that precision errors are measured against a real spread.
        for module in (vilt.vilt.pooler.dense, vilt.rank_output):
            module.weight.normal_(std=0.2)
    vilt_processor = hf.ViltProcessor(
        image_processor=hf.ViltImageProcessor(
            size={"shortest_edge": cfg.vilt_shortest_edge}, size_divisor=32
        ),
        tokenizer=tokenizer,
    )

    clip_tok = clip_tokenizer([" ".join(words[:50]), "a photo of a dog on a red car next to a tree"], 120)
    text_config = {
        "vocab_size": len(clip_tok),
        "max_position_embeddings": 77,
        "bos_token_id": clip_tok.bos_token_id,
        "eos_token_id": clip_tok.eos_token_id,
        "pad_token_id": clip_tok.pad_token_id,
        "projection_dim": cfg.projection_dim,
        **cfg.clip_text,
    }
    vision = {"projection_dim": cfg.projection_dim, **cfg.clip_vision}
    clip_config = hf.CLIPConfig(
        text_config=text_config, vision_config=vision, projection_dim=cfg.projection_dim
    )
    clip_model = hf.CLIPModel(clip_config).eval()
    size = int(vision.get("image_size", 224))
    clip_processor = hf.CLIPProcessor(
        image_processor=hf.CLIPImageProcessor(
            size={"shortest_edge": size}, crop_size={"height": size, "width": size}
        ),
        tokenizer=clip_tok,
    )
    clip = ClipEncoder(clip_model, clip_processor, name="bench-clip", fingerprint="bench", device=device)
    return BenchModels(vilt, vilt_processor, clip, words)


def make_reranker(
    models: BenchModels,
    choice: PrecisionChoice,
    *,
    batch_size: int,
    sdpa: bool = True,
    fp32_residual: bool = False,
    device: torch.device = CPU,
) -> ViltReranker:
    """A ``ViltReranker`` on a copy of the bench ViLT, prepared as the engine prepares it."""
    return ViltReranker(
        copy.deepcopy(models.vilt),
        models.vilt_processor,
        name="bench-vilt",
        fingerprint="bench",
        device=device,
        batch_size=batch_size,
        precision=choice.precision,
        precision_reason=choice.reason,
        sdpa=sdpa,
        fp32_residual=fp32_residual,
    )


def bench_text(models: BenchModels, tokens: int, shift: int = 0) -> str:
    """A text of exactly ``tokens`` ViLT tokens ([CLS] and [SEP] included); ``shift`` varies the words."""
    return " ".join(models.words[(7 * j + shift) % len(models.words)] for j in range(tokens - 2))
