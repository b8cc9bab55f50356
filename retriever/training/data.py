"""Training data: a Karpathy-format split preprocessed once into tensors for both models."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..datasets.karpathy import KarpathySplit
from ..datasets.shapes import RenderSettings, render_entries

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


def _images(
    split: KarpathySplit,
    raw_images: list[dict[str, Any]],
    render: RenderSettings | None,
    render_seed: int,
    metas: list[dict[str, Any]],
) -> Iterator[Image.Image]:
    """The split's images in order: read from their files, or drawn with ``render`` (their metadata
    appended to ``metas``)."""
    if render is None:
        for img in split.images:
            with Image.open(img.path) as im:
                yield im.convert("RGB")
        return
    for image, meta in render_entries(raw_images, render, render_seed):
        metas.append(meta)
        yield image


def load_train_data(
    split: KarpathySplit,
    raw_images: list[dict[str, Any]],
    vilt_processor: Any,
    clip_processor: Any,
    cache_dir: Path | None = None,
    on_progress: ProgressFn | None = None,
    render: RenderSettings | None = None,
    render_seed: int = 0,
) -> TrainData:
    """Decode every image once and run both image processors; cached under ``cache_dir`` when given.

    With ``render``, the images are not read from their files: each shapes entry's scene is drawn
    again with those settings (from ``render_seed``'s own stream), so one set's scenes and captions
    can be trained on under a renderer that covers the spec's whole envelope without writing it to
    disk. The entries' boxes and sizes then come from the new drawings, for the grounding targets.
    """
    identity: tuple[Any, ...] = (
        [i.path.name for i in split.images],
        vilt_processor.image_processor.to_dict(),
        clip_processor.image_processor.to_dict(),
    )
    if render is not None:
        identity += (render.as_json(), render_seed)
    key = hashlib.sha256(repr(identity).encode()).hexdigest()[:16]
    cache = cache_dir / f"pixels-{key}.pt" if cache_dir is not None else None
    metas: list[dict[str, Any]] = []
    if cache is not None and cache.exists():
        blob = torch.load(cache, weights_only=True)
        vilt_pixels, clip_pixels = list(blob["vilt"]), blob["clip"]
        metas = json.loads(blob.get("meta", "[]"))
    else:
        vilt_pixels = []
        clip_list = []
        for n, rgb in enumerate(_images(split, raw_images, render, render_seed, metas)):
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
            blob = {"vilt": vilt_pixels, "clip": clip_pixels}
            if render is not None:
                blob["meta"] = json.dumps(metas)
            torch.save(blob, cache)
    if render is not None:
        # The drawings' own sizes and boxes replace the files' (twin groups and captions stay).
        raw_images = [{**r, **meta} for r, meta in zip(raw_images, metas, strict=True)]
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
