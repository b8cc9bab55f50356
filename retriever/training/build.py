"""Fresh small models to train from scratch: a CLIP dual encoder and a ViLT ITM model, with processors."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .tokenizers import clip_tokenizer, wordpiece_tokenizer


@dataclass(frozen=True)
class SmallConfig:
    """Sizes of the models trained from scratch (defaults: the shipped shapes model)."""

    image_size: int = 64  # shorter edge after resizing
    vilt_patch: int = 8
    vilt_hidden: int = 128
    vilt_layers: int = 4
    vilt_heads: int = 4
    clip_patch: int = 8
    clip_hidden: int = 96
    clip_layers: int = 3
    clip_heads: int = 4
    projection_dim: int = 64


def sincos_2d(grid: int, dim: int) -> torch.Tensor:
    """Fixed 2D sine-cosine position embeddings (grid*grid, dim), so position is readable from step one."""
    quarter = dim // 4
    omega = 1.0 / (10000 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(
        torch.arange(grid, dtype=torch.float32), torch.arange(grid, dtype=torch.float32), indexing="ij"
    )
    out = [torch.sin(xs.flatten()[:, None] * omega), torch.cos(xs.flatten()[:, None] * omega)]
    out += [torch.sin(ys.flatten()[:, None] * omega), torch.cos(ys.flatten()[:, None] * omega)]
    emb = torch.cat(out, dim=1)
    if emb.shape[1] < dim:
        emb = torch.nn.functional.pad(emb, (0, dim - emb.shape[1]))
    return emb


def new_reranker(words: list[str], cfg: SmallConfig, folder: Path, seed: int) -> tuple[Any, Any]:
    """A randomly initialised ``ViltForImageAndTextRetrieval`` and its ``ViltProcessor`` over ``words``."""
    from transformers import ViltConfig, ViltForImageAndTextRetrieval, ViltImageProcessor, ViltProcessor

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = wordpiece_tokenizer(words, folder / "vocab.txt", max_length=40)
    # Position grid for the longest edge the processor produces (1333/800 of the shorter one).
    longest = int(cfg.image_size * 1333 / 800) // cfg.vilt_patch * cfg.vilt_patch
    config = ViltConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=40,
        hidden_size=cfg.vilt_hidden,
        num_hidden_layers=cfg.vilt_layers,
        num_attention_heads=cfg.vilt_heads,
        intermediate_size=cfg.vilt_hidden * 4,
        image_size=longest,
        patch_size=cfg.vilt_patch,
        max_image_length=-1,
        pad_token_id=0,
    )
    torch.manual_seed(seed)
    model = ViltForImageAndTextRetrieval(config)
    emb = model.vilt.embeddings
    grid = longest // cfg.vilt_patch
    with torch.no_grad():
        # transformers initialises the image CLS token and positions to zero; ViLT used N(0, 0.02).
        emb.cls_token.normal_(std=0.02)
        emb.position_embeddings[0, 0].normal_(std=0.02)
        emb.position_embeddings[0, 1:] = sincos_2d(grid, cfg.vilt_hidden) * 0.5
    processor = ViltProcessor(
        image_processor=ViltImageProcessor(
            size={"shortest_edge": cfg.image_size},
            size_divisor=cfg.vilt_patch,  # type: ignore[call-arg]
        ),
        tokenizer=tokenizer,
    )
    return model, processor


def new_prefilter(corpus: list[str], cfg: SmallConfig, seed: int) -> tuple[Any, Any]:
    """A randomly initialised ``CLIPModel`` and its ``CLIPProcessor`` (BPE learned on ``corpus``)."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    tokenizer = clip_tokenizer(corpus, n_merges=300)
    text_config = {
        "vocab_size": len(tokenizer),
        "hidden_size": cfg.clip_hidden,
        "intermediate_size": cfg.clip_hidden * 4,
        "num_hidden_layers": cfg.clip_layers,
        "num_attention_heads": cfg.clip_heads,
        "max_position_embeddings": 40,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }
    vision_config = {
        "hidden_size": cfg.clip_hidden,
        "intermediate_size": cfg.clip_hidden * 4,
        "num_hidden_layers": cfg.clip_layers,
        "num_attention_heads": cfg.clip_heads,
        "image_size": cfg.image_size,
        "patch_size": cfg.clip_patch,
    }
    config = CLIPConfig(
        text_config=text_config, vision_config=vision_config, projection_dim=cfg.projection_dim
    )
    config.logit_scale_init_value = math.log(1 / 0.07)
    torch.manual_seed(seed)
    model = CLIPModel(config)
    # A square resize without cropping: a centre crop would cut off objects near the long edges.
    image_processor = CLIPImageProcessor(
        size={"height": cfg.image_size, "width": cfg.image_size}, do_center_crop=False
    )
    return model, CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer)
