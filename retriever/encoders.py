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
        """Embed RGB images; returns (n, dim) L2-normalized float32."""
        out = [np.zeros((0, self.dim), dtype=np.float32)]
        for start in range(0, len(images), self.batch_size):
            chunk = list(images[start : start + self.batch_size])
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
