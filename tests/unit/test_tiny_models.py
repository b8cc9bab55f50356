"""Smoke tests for tests/tiny_models.py: the tiny checkpoints load offline and run."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

from tests.tiny_models import make_tiny_clip, make_tiny_vilt

if TYPE_CHECKING:
    from transformers import PreTrainedModel

QUERY = "a red circle left of a blue square"


def _image(w: int = 96, h: int = 64, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8), "RGB")


def _state(path: Path, cls: type[PreTrainedModel]) -> dict[str, torch.Tensor]:
    return cls.from_pretrained(path).state_dict()


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    t0 = time.perf_counter()
    out = {"clip": make_tiny_clip(root / "clip"), "vilt": make_tiny_vilt(root / "vilt")}
    assert time.perf_counter() - t0 < 5.0
    return out


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def test_folders_are_small(built: dict[str, Path]) -> None:
    for path in built.values():
        assert (path / "config.json").is_file()
        assert (path / "model.safetensors").is_file()
        assert _size(path) < 2_000_000


def test_clip_loads_and_runs(built: dict[str, Path]) -> None:
    from transformers import CLIPModel, CLIPProcessor

    path = built["clip"]
    processor = CLIPProcessor.from_pretrained(path)
    model = CLIPModel.from_pretrained(path).eval()  # type: ignore[no-untyped-call]
    tok = processor.tokenizer
    cfg = model.config.text_config

    ids = tok(QUERY)["input_ids"]
    assert max(ids) < cfg.vocab_size == len(tok)
    assert tok.unk_token_id not in ids[1:-1]  # every word is in the vocab, nothing maps to unk/eos
    assert ids[0] == tok.bos_token_id == cfg.bos_token_id
    assert ids[-1] == tok.eos_token_id == cfg.eos_token_id == cfg.pad_token_id
    assert cfg.eos_token_id != 2  # not the legacy argmax-pooling id

    text = processor(text=[QUERY, "a cat"], padding=True, return_tensors="pt")
    pixels = processor(images=_image(), return_tensors="pt")
    assert pixels["pixel_values"].shape == (1, 3, 32, 32)
    with torch.no_grad():
        t_out = model.get_text_features(**text)
        i_out = model.get_image_features(**pixels)
    # transformers 5: get_*_features return BaseModelOutputWithPooling; pooler_output is projected.
    t_emb = t_out.pooler_output if hasattr(t_out, "pooler_output") else t_out
    i_emb = i_out.pooler_output if hasattr(i_out, "pooler_output") else i_out
    assert t_emb.shape == (2, 32) and i_emb.shape == (1, 32)
    assert torch.isfinite(t_emb).all() and torch.isfinite(i_emb).all()

    # Pooling is at the first EOS: padding the short query further must not change its embedding.
    with torch.no_grad():
        alone = model.get_text_features(**processor(text=["a cat"], return_tensors="pt"))
    alone = alone.pooler_output if hasattr(alone, "pooler_output") else alone
    torch.testing.assert_close(alone[0], t_emb[1], rtol=1e-4, atol=1e-5)


def test_vilt_loads_and_runs(built: dict[str, Path]) -> None:
    from transformers import ViltForImageAndTextRetrieval, ViltProcessor

    path = built["vilt"]
    processor = ViltProcessor.from_pretrained(path)
    model = ViltForImageAndTextRetrieval.from_pretrained(path).eval()  # type: ignore[no-untyped-call]
    assert model.config.vocab_size == len(processor.tokenizer)
    assert processor.tokenizer.pad_token_id == model.config.pad_token_id == 0

    inputs = processor(images=_image(), text=QUERY, return_tensors="pt")
    assert inputs["input_ids"].max() < model.config.vocab_size
    assert processor.tokenizer.unk_token_id not in inputs["input_ids"][0].tolist()
    # shortest edge 128, size_divisor 32: a 96x64 image becomes 192x128.
    assert inputs["pixel_values"].shape == (1, 3, 128, 192)
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape == (1, 1)
    assert torch.isfinite(logits).all()

    emb = model.vilt.embeddings
    assert emb.position_embeddings.abs().sum() > 0 and emb.cls_token.abs().sum() > 0
    assert emb.position_embeddings.shape == (1, 12 * 12 + 1, 32)


def test_seed_determinism(built: dict[str, Path], tmp_path: Path) -> None:
    from transformers import CLIPModel, ViltForImageAndTextRetrieval

    clip_same = _state(make_tiny_clip(tmp_path / "c0"), CLIPModel)
    clip_other = _state(make_tiny_clip(tmp_path / "c1", seed=1), CLIPModel)
    clip_ref = _state(built["clip"], CLIPModel)
    assert _same(clip_ref, clip_same)
    assert not _same(clip_ref, clip_other)
    assert (tmp_path / "c0" / "tokenizer.json").read_bytes() == (
        built["clip"] / "tokenizer.json"
    ).read_bytes()

    vilt_same = _state(make_tiny_vilt(tmp_path / "v0"), ViltForImageAndTextRetrieval)
    vilt_other = _state(make_tiny_vilt(tmp_path / "v1", seed=1), ViltForImageAndTextRetrieval)
    vilt_ref = _state(built["vilt"], ViltForImageAndTextRetrieval)
    assert _same(vilt_ref, vilt_same)
    assert not _same(vilt_ref, vilt_other)
    key = "vilt.embeddings.position_embeddings"
    assert not torch.equal(vilt_ref[key], vilt_other[key])
