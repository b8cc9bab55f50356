"""The prefilter: a dual encoder whose image and text towers share one embedding space (CLIP)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image


class DualEncoder(Protocol):
    """Encodes images and texts into one space; outputs are L2-normalized float32 arrays of shape (n, dim)."""

    name: str
    fingerprint: str
    dim: int
    #: The encoder's own cosine-to-logit scale (CLIP's learned temperature); the rerank adds
    #: ``logit_scale * cosine`` to the ITM logit.
    logit_scale: float

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed images."""
        ...

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts."""
        ...


def size_field(size: Any, key: str) -> int | None:
    """One entry of an image processor's ``size`` or ``crop_size`` (a ``SizeDict``, or a dict)."""
    value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
    return int(value) if value else None


#: ``central_window`` leaves images up to this aspect ratio as they are: their resize costs at most this many
#: crop-sized squares, and their vectors stay exactly what they were before the window existed.
WINDOW_ASPECT = 16


def central_window(image: Image.Image, image_processor: Any) -> Image.Image:
    """The part of ``image`` that a shortest-edge-then-centre-crop processor (CLIP's) can see.

    CLIP takes any aspect ratio: its processor either resizes straight to a fixed height x width (the
    shipped shapes model: the picture is squashed) or resizes the short side to ``shortest_edge`` S and
    centre-crops (OpenAI's CLIP, the tiny test model): a panorama is seen by its centre only. In the second
    case the resize comes first, at the full aspect ratio, so a 20000 x 2 image becomes 4.5 million x 224
    pixels (gigabytes, seconds) before the crop throws nearly all of it away. The rule here: when the
    processor crops, keep only a central window of the long side, ``WINDOW_ASPECT`` short sides long, or
    longer where the crop reaches further (the crop's longer side scaled back to the original, C x short /
    S, plus one short side of margin at each end for the resampling filter). The processor then crops the
    same centre, shifted by at most about a pixel (its sizes are rounded differently), and the resize is
    bounded. Other processors, and images no longer than the window, come back unchanged, as the same
    object.
    """
    crops = getattr(image_processor, "do_center_crop", False)
    if not crops or not getattr(image_processor, "do_resize", True):
        return image
    shorter = size_field(getattr(image_processor, "size", None) or {}, "shortest_edge")
    crop = getattr(image_processor, "crop_size", None) or {}
    crop_h, crop_w = size_field(crop, "height"), size_field(crop, "width")
    if shorter is None or crop_h is None or crop_w is None:
        return image
    width, height = image.size
    long, short = max(width, height), min(width, height)
    window = max(WINDOW_ASPECT * short, -(-max(crop_h, crop_w) * short // shorter) + 2 * short)
    # Same parity as the long side, so the window's centre is the image's centre to the pixel.
    window += (long - window) % 2
    if window >= long:
        return image
    start = (long - window) // 2
    if width >= height:
        return image.crop((start, 0, start + window, height))
    return image.crop((0, start, width, start + window))


def _normalized(x: torch.Tensor) -> np.ndarray:
    x = torch.nn.functional.normalize(x.float(), dim=-1)
    return np.ascontiguousarray(x.cpu().numpy(), dtype=np.float32)


class ClipEncoder:
    """A transformers ``CLIPModel`` with its processor, as a ``DualEncoder``."""

    def __init__(
        self,
        model: Any,
        processor: Any,
        *,
        name: str,
        fingerprint: str,
        device: torch.device,
        batch_size: int = 32,
    ) -> None:
        self.model = model.eval().to(device)
        self.processor = processor
        self.name = name
        self.fingerprint = fingerprint
        self.device = device
        self.batch_size = batch_size
        self.dim = int(model.config.projection_dim)
        # CLIP clamps its scale at 100 in training; the same clamp here.
        self.logit_scale = float(min(100.0, float(model.logit_scale.detach().exp())))
        tokenizer = processor.tokenizer
        self.max_length = int(
            min(getattr(tokenizer, "model_max_length", 77), model.config.text_config.max_position_embeddings)
        )

    @torch.inference_mode()
    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed RGB images; returns (n, dim) L2-normalized float32.

        An image much wider (or taller) than the processor's crop is cut to the part the crop can see
        first (see ``central_window``).
        """
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        image_processor = self.processor.image_processor
        for start in range(0, len(images), self.batch_size):
            chunk = [central_window(img, image_processor) for img in images[start : start + self.batch_size]]
            pixels = self.processor.image_processor(images=chunk, return_tensors="pt")["pixel_values"]
            feats = self.model.get_image_features(pixel_values=pixels.to(self.device)).pooler_output
            out.append(_normalized(feats))
        return np.concatenate(out)

    @torch.inference_mode()
    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts (truncated to the model's context); returns (n, dim) L2-normalized float32."""
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(texts), self.batch_size):
            chunk = list(texts[start : start + self.batch_size])
            enc = self.processor.tokenizer(
                chunk, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
            )
            feats = self.model.get_text_features(
                input_ids=enc["input_ids"].to(self.device),
                attention_mask=enc["attention_mask"].to(self.device),
            ).pooler_output
            out.append(_normalized(feats))
        return np.concatenate(out)
