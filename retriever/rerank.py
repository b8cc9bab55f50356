"""The reranker: ViLT's image-text-matching head, scoring pairs from cached visual tokens.

At index time ``embed_image`` runs ViLT's visual embedding once per image: patch projection plus
interpolated position embeddings, with the image CLS token in front. That is exactly what
``ViltModel`` accepts as ``image_embeds`` (with the token mask as ``pixel_mask``). transformers'
own ``visual_embed`` returns the same tokens in a random order (``torch.multinomial``); the
transformer and the CLS pooling do not depend on the order of the image tokens, so the logits
are the same. At search time only the transformer runs.

How it runs: the precision is ``retriever.hardware``'s choice (bf16 on CPUs with native bf16, int8
elsewhere, fp16 on CUDA, fp32 for small models); ``retriever.vilt_fast`` prepares the model for it
(attention through SDPA, fused or quantized layers); batches are cut here, where token counts jump,
so that little of each batch is padding.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import numpy as np
import torch
import torch.utils.dlpack
from PIL import Image, ImageStat

from .encoders import size_field
from .hardware import DTYPES, Precision
from .vilt_fast import PreparedModel, prepare_vilt

ProgressFn = Callable[[int, int], None]


class Reranker(Protocol):
    """Scores (text, image) pairs, the image given as its cached visual tokens."""

    name: str
    fingerprint: str
    hidden: int

    def embed_image(self, image: Image.Image) -> np.ndarray:
        """Visual tokens (tokens, hidden) of one RGB image."""
        ...

    def score_pairs(
        self,
        texts: Sequence[str],
        images: Sequence[np.ndarray],
        pairs: Sequence[tuple[int, int]],
        on_progress: ProgressFn | None = None,
    ) -> np.ndarray:
        """ITM logit of each (text index, image index) pair."""
        ...


def visual_tokens(model: Any, pixel_values: torch.Tensor) -> torch.Tensor:
    """ViLT's visual embedding of same-size images: (n, 1 + patches, hidden), the image CLS token first.

    Patch projection plus the position grid interpolated to the image's patch grid, as
    ``ViltModel`` takes them as ``image_embeds``. Shared by indexing and training.
    """
    emb = model.vilt.embeddings
    base = int(model.config.image_size) // int(model.config.patch_size)
    x = emb.patch_embeddings(pixel_values)  # (n, hidden, h, w)
    n, hidden, h, w = x.shape
    grid = emb.position_embeddings[:, 1:, :].transpose(1, 2).reshape(1, hidden, base, base)
    pos = torch.nn.functional.interpolate(grid, size=(h, w), mode="bilinear", align_corners=True)
    cls = (emb.cls_token + emb.position_embeddings[:, :1, :]).expand(n, -1, -1)
    return torch.cat([cls, (x + pos).flatten(2).transpose(1, 2)], dim=1)


#: transformers' ViLT image processors cap the resized long side at 1333/800 of ``shortest_edge`` (the
#: DETR/COCO limits), as module constants; read from the processor's module when it has them.
_MAX_LONGER_EDGE = 1333
_MAX_SHORTER_EDGE = 800


def aspect_limits(image_processor: Any, patch_size: int) -> tuple[int, int] | None:
    """(long, short): the widest image ViLT's processor still turns into a patch grid is long x short.

    The processor resizes the short side to ``shortest_edge`` S, then caps the long side at
    L = int(1333 / 800 * S), shrinking both sides by the same factor, rounds each to the nearest pixel and
    floors it to a multiple of ``size_divisor`` d. At an aspect ratio r past L / S the short side becomes
    L / r before the floor, so it keeps at least one patch row while L / r >= m, where m is the smallest
    multiple of d that is at least ``patch_size``. The limit is the ratio L / m: (long, short) = (L, m).
    For ViLT-B/32 (S 384, d 32, patch 32) that is 639 / 32, about 20:1; for the shipped shapes model
    (S 64, d 8, patch 8) 106 / 8; for the tiny test model (S 128, d 32, patch 32) 213 / 32.

    None when no ratio helps: the processor does not resize by the shortest edge, or S itself floors
    below a patch (every image would fail alike).
    """
    if not getattr(image_processor, "do_resize", True):
        return None
    shorter = size_field(getattr(image_processor, "size", None) or {}, "shortest_edge")
    if shorter is None:
        return None
    module = sys.modules.get(type(image_processor).__module__)
    cap = getattr(module, "MAX_LONGER_EDGE", _MAX_LONGER_EDGE) / getattr(
        module, "MAX_SHORTER_EDGE", _MAX_SHORTER_EDGE
    )
    longest = int(cap * shorter)
    divisor = int(getattr(image_processor, "size_divisor", None) or 1)
    shortest = -(-patch_size // divisor) * divisor
    if shorter // divisor * divisor < shortest or longest < shortest:
        return None
    return longest, shortest


def fit_aspect(image: Image.Image, image_processor: Any, patch_size: int) -> Image.Image:
    """``image``, letterboxed when it is wider (or taller) than ViLT's processor can take.

    The rule: an image whose long side / short side exceeds the limit L / m of ``aspect_limits`` gets its
    short side padded, the picture centred, until the ratio is L / m, the widest the processor turns into
    a non-empty patch grid. An image longer than L is first shrunk (bicubic) to a long side of L, which the
    processor would do anyway, so that a 100-megapixel panorama is not padded at full size. The padding
    is the picture's mean colour: black or white bars would add a colour the picture does not have, which
    a caption such as "a black line" could match. ViLT then sees the whole picture at the largest size it
    can, over about one patch row (or column); only the padding is invented.

    Images within the limit, and processors the limit does not apply to (see ``aspect_limits``), come
    back unchanged, as the very same object.
    """
    limits = aspect_limits(image_processor, patch_size)
    if limits is None:
        return image
    longest, shortest = limits
    width, height = image.size
    long, short = max(width, height), min(width, height)
    if long * shortest <= short * longest:
        return image
    wide = width >= height
    if long > longest:
        short = max(1, round(short * longest / long))
        long = longest
        image = image.resize((long, short) if wide else (short, long), Image.Resampling.BICUBIC)
    padded = -(-long * shortest // longest)
    fill = tuple(round(v) for v in ImageStat.Stat(image).mean)
    canvas = Image.new(image.mode, (long, padded) if wide else (padded, long), fill)
    offset = (padded - short) // 2
    canvas.paste(image, (0, offset) if wide else (offset, 0))
    return canvas


class ViltReranker:
    """``ViltForImageAndTextRetrieval`` and its ``ViltProcessor``, as a ``Reranker``."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        name: str,
        fingerprint: str,
        device: torch.device,
        batch_size: int = 16,
        dtype: torch.dtype = torch.float32,
        precision: Precision | None = None,
        precision_reason: str = "",
        sdpa: bool = True,
        max_padding: float = 0.1,
        fp32_residual: bool = False,
    ) -> None:
        """Wrap ``model``, prepared in place (``retriever.vilt_fast.prepare_vilt``) for ``precision``.

        Without ``precision``, ``dtype`` names it (float32, bfloat16, float16), as before precisions
        existed. ``sdpa`` swaps the attention for ``scaled_dot_product_attention``. ``batch_size``
        caps the pairs per forward pass; a batch also ends where adding the next pair would make
        more than ``max_padding`` of its tokens padding. ``fp32_residual`` keeps the residual stream
        of a bf16 CPU model in fp32 (more accurate, slower; see ``retriever.vilt_fast.FusedViltLayer``).
        """
        self.model = model.eval().to(device)
        self.processor = processor
        self.name = name
        self.fingerprint = fingerprint
        self.device = device
        self.batch_size = batch_size
        self.max_padding = max_padding
        if precision is None:
            by_dtype: dict[torch.dtype, Precision] = {
                torch.float32: "fp32",
                torch.bfloat16: "bf16",
                torch.float16: "fp16",
            }
            precision = by_dtype.get(dtype, "fp32")
        self.precision: Precision = precision
        self.precision_reason = precision_reason or "asked for"
        self.dtype = DTYPES[precision]
        config = model.config
        self.hidden = int(config.hidden_size)
        self.max_text_tokens = int(config.max_position_embeddings)
        self.patch_size = int(config.patch_size)
        self.prepared: PreparedModel = prepare_vilt(
            self.model, precision, device, sdpa=sdpa, fp32_residual=fp32_residual
        )
        self.attention = self.prepared.attention

    # -- index time -------------------------------------------------------------------------------

    @torch.inference_mode()
    def embed_image(self, image: Image.Image) -> np.ndarray:
        """Visual tokens of one RGB image at the processor's resolution: (1 + patches, hidden) float32.

        An image too wide or too tall for the processor is letterboxed first (see ``fit_aspect``).
        """
        image = fit_aspect(image, self.processor.image_processor, self.patch_size)
        pixels = self.processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        dtype = self.model.vilt.embeddings.position_embeddings.dtype
        tokens = visual_tokens(self.model, pixels.to(self.device, dtype))[0]
        return np.ascontiguousarray(tokens.float().cpu().numpy())

    # -- search time ------------------------------------------------------------------------------

    def _tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        enc = self.processor.tokenizer(
            list(texts), truncation=True, max_length=self.max_text_tokens, padding=False
        )
        return [list(ids) for ids in enc["input_ids"]]

    @torch.inference_mode()
    def score_pairs(
        self,
        texts: Sequence[str],
        images: Sequence[np.ndarray],
        pairs: Sequence[tuple[int, int]],
        on_progress: ProgressFn | None = None,
    ) -> np.ndarray:
        """ITM logit of each (text index, image index) pair, in the order given.

        Pairs are batched by image token count, so a batch pads few tokens; texts are tokenized once.
        """
        scores = np.empty(len(pairs), dtype=np.float32)
        if not pairs:
            return scores
        token_ids = self._tokenize(texts)
        lengths = [len(token_ids[t]) + images[i].shape[0] for t, i in pairs]
        order = sorted(
            range(len(pairs)), key=lambda p: (images[pairs[p][1]].shape[0], len(token_ids[pairs[p][0]]))
        )
        done = 0
        for chunk in self._batches(order, lengths):
            logits = self._forward(
                [token_ids[pairs[p][0]] for p in chunk], [images[pairs[p][1]] for p in chunk]
            )
            scores[chunk] = logits
            done += len(chunk)
            if on_progress is not None:
                on_progress(done, len(pairs))
        return scores

    def _batches(self, order: Sequence[int], lengths: Sequence[int]) -> list[list[int]]:
        """Cut pairs sorted by length into batches of at most ``batch_size`` with little padding.

        A batch is padded to its longest pair; it ends before a pair that would make more than
        ``max_padding`` of its tokens padding, so a jump in token count (another aspect ratio)
        starts a new batch instead of padding the whole batch up to it.
        """
        batches: list[list[int]] = []
        batch: list[int] = []
        useful = longest = 0
        for p in order:
            grown = max(longest, lengths[p])
            full = len(batch) >= self.batch_size
            wasteful = (len(batch) + 1) * grown > (useful + lengths[p]) * (1 + self.max_padding)
            if batch and (full or wasteful):
                batches.append(batch)
                batch, useful, grown = [], 0, lengths[p]
            batch.append(p)
            useful += lengths[p]
            longest = grown
        if batch:
            batches.append(batch)
        return batches

    def _forward(self, text_ids: Sequence[list[int]], image_tokens: Sequence[np.ndarray]) -> np.ndarray:
        n = len(text_ids)
        t_len = max(len(t) for t in text_ids)
        i_len = max(t.shape[0] for t in image_tokens)
        pad_id = int(self.processor.tokenizer.pad_token_id or 0)
        input_ids = torch.full((n, t_len), pad_id, dtype=torch.long)
        text_mask = torch.zeros((n, t_len), dtype=torch.long)
        # fp32 in every precision: the embeddings stay fp32 (see vilt_fast.prepare_vilt).
        embeds = torch.empty((n, i_len, self.hidden), dtype=torch.float32)
        image_mask = torch.zeros((n, i_len), dtype=torch.long)
        for row, (ids, tokens) in enumerate(zip(text_ids, image_tokens, strict=True)):
            k = tokens.shape[0]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            text_mask[row, : len(ids)] = 1
            # The one copy of the cached tokens: from the memory map into the batch, cast on the way.
            embeds[row, :k].copy_(_as_tensor(tokens))
            embeds[row, k:].zero_()
            image_mask[row, :k] = 1
        dev = self.device
        with torch.autocast(device_type=dev.type, dtype=self.dtype, enabled=self.prepared.autocast):
            out = self.model(
                input_ids=input_ids.to(dev),
                attention_mask=text_mask.to(dev),
                token_type_ids=torch.zeros_like(input_ids).to(dev),
                image_embeds=embeds.to(dev),
                pixel_mask=image_mask.to(dev),
            )
        return np.asarray(out.logits[:, 0].float().cpu().numpy(), dtype=np.float32)


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor viewing ``array`` without a copy, read-only memory maps included.

    ``torch.from_numpy`` warns on read-only arrays (the patch cache is mapped read-only); DLPack
    shares the memory and carries the read-only flag instead.
    """
    try:
        return torch.utils.dlpack.from_dlpack(array)
    except (BufferError, TypeError, RuntimeError):
        return torch.from_numpy(np.array(array))
