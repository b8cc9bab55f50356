"""Training data: a Karpathy-format split preprocessed once into tensors for both models."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..datasets.karpathy import KarpathySplit

ProgressFn = Callable[[int, int], None]


@dataclass
class Grounding:
    """Where each caption's named objects are: the token index of each object's last word, and its box.

    Only the shapes benchmark carries object boxes; other datasets train without this loss.
    """

    token_index: np.ndarray  # (T, 2) int64: token position of the 1st and 2nd named object's noun, -1 if none
    target: np.ndarray  # (T, 2, 4) float32: cx, cy, w, h of those objects, as fractions of the image size


@dataclass
class TrainData:
    """Pixels for both processors, tokenized captions, twin groups and (optional) grounding targets."""

    vilt_pixels: list[torch.Tensor]  # per image (3, h, w), float16
    clip_pixels: torch.Tensor  # (I, 3, s, s), float16
    texts: list[str]
    text_image: np.ndarray  # (T,) image index of each caption
    image_texts: list[list[int]]
    groups: list[list[int]]  # twin groups: images that share their captions' words
    vilt_ids: list[list[int]]
    grounding: Grounding | None

    @property
    def n_images(self) -> int:
        """Number of images."""
        return len(self.vilt_pixels)


def _caption_objects(caption: str, objects: Sequence[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
    """(word index of the noun, object) for each object a shapes caption names, in order."""
    words = caption.split()
    found: list[tuple[int, dict[str, Any]]] = []
    for i in range(2, len(words)):
        for obj in objects:
            if words[i - 2 : i + 1] == [obj["size"], obj["color"], obj["shape"]]:
                found.append((i, obj))
    return found


def _grounding(split: KarpathySplit, raw: list[dict[str, Any]], vilt_tokenizer: Any) -> Grounding | None:
    if not all("objects" in r and "width" in r and "height" in r for r in raw):
        return None
    texts = split.texts
    token_index = np.full((len(texts), 2), -1, dtype=np.int64)
    target = np.zeros((len(texts), 2, 4), dtype=np.float32)
    t = 0
    for img, r in zip(split.images, raw, strict=True):
        w, h = float(r["width"]), float(r["height"])
        for caption in img.captions:
            enc = vilt_tokenizer(caption, return_offsets_mapping=True)
            word_starts = [
                len(" ".join(caption.split()[:k])) + (1 if k else 0) for k in range(len(caption.split()))
            ]
            for slot, (word_i, obj) in enumerate(_caption_objects(caption, r["objects"])[:2]):
                start = word_starts[word_i]
                tok = next((j for j, (a, b) in enumerate(enc["offset_mapping"]) if a == start and b > a), -1)
                x0, y0, x1, y1 = obj["box"]
                token_index[t, slot] = tok
                target[t, slot] = [(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h]
            t += 1
    return Grounding(token_index, target)


def load_train_data(
    split: KarpathySplit,
    raw_images: list[dict[str, Any]],
    vilt_processor: Any,
    clip_processor: Any,
    cache_dir: Path | None = None,
    on_progress: ProgressFn | None = None,
) -> TrainData:
    """Decode every image once and run both image processors; cached under ``cache_dir`` when given."""
    key = hashlib.sha256(
        repr(
            (
                [i.path.name for i in split.images],
                vilt_processor.image_processor.to_dict(),
                clip_processor.image_processor.to_dict(),
            )
        ).encode()
    ).hexdigest()[:16]
    cache = cache_dir / f"pixels-{key}.pt" if cache_dir is not None else None
    if cache is not None and cache.exists():
        blob = torch.load(cache, weights_only=True)
        vilt_pixels, clip_pixels = list(blob["vilt"]), blob["clip"]
    else:
        vilt_pixels = []
        clip_list = []
        for n, img in enumerate(split.images):
            with Image.open(img.path) as im:
                rgb = im.convert("RGB")
            vilt_pixels.append(
                vilt_processor.image_processor(images=[rgb], return_tensors="pt")["pixel_values"][0].half()
            )
            clip_list.append(
                clip_processor.image_processor(images=[rgb], return_tensors="pt")["pixel_values"][0].half()
            )
            if on_progress is not None:
                on_progress(n + 1, len(split.images))
        clip_pixels = torch.stack(clip_list)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"vilt": vilt_pixels, "clip": clip_pixels}, cache)
    groups_by_id: dict[int, list[int]] = {}
    for i, r in enumerate(raw_images):
        if r.get("twin_group") is not None and r.get("twin_role") != "single":
            groups_by_id.setdefault(int(r["twin_group"]), []).append(i)
    tokenizer = vilt_processor.tokenizer
    texts = split.texts
    vilt_ids = [list(ids) for ids in tokenizer(texts, truncation=True, max_length=40)["input_ids"]]
    return TrainData(
        vilt_pixels=vilt_pixels,
        clip_pixels=clip_pixels,
        texts=texts,
        text_image=split.text_image,
        image_texts=split.image_texts,
        groups=[g for g in groups_by_id.values() if len(g) > 1],
        vilt_ids=vilt_ids,
        grounding=_grounding(split, raw_images, tokenizer),
    )
