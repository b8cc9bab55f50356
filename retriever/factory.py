"""The one place that wires concrete classes together: models from hub ids or folders.

How they run (device, precision, batch size) is ``retriever.hardware``'s decision.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .encoders import ClipEncoder
from .errors import ModelNotFoundError
from .hardware import plan_hardware
from .presets import DEFAULT_PREFILTER, DEFAULT_RERANKER, PRESETS, SHAPES_DIR, model_name, preset
from .rerank import ViltReranker

__all__ = [
    "DEFAULT_PREFILTER",
    "DEFAULT_RERANKER",
    "PRESETS",
    "SHAPES_DIR",
    "fingerprint",
    "load_prefilter",
    "load_reranker",
    "model_name",
    "preset",
]


def fingerprint(model: Any) -> str:
    """A short hash of a model's config and a few of its weights, to tell checkpoints apart cheaply."""
    h = hashlib.sha256()
    config = model.config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "torch_dtype", "dtype"):
        config.pop(volatile, None)
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    params = list(model.state_dict().items())
    for _, tensor in params[:2] + params[-2:]:
        h.update(tensor.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _load(kind: str, id_or_path: str, loaders: tuple[Any, Any], option: str) -> tuple[Any, Any]:
    model_cls, processor_cls = loaders
    path = Path(id_or_path).expanduser()
    looks_local = path.exists() or id_or_path.startswith((".", "/", "~")) or id_or_path.count("/") > 1
    if looks_local and not path.is_dir():
        raise ModelNotFoundError(
            f"{kind} model not found: no folder at {path}. Pass {option} a folder written by "
            "save_pretrained (weights, tokenizer and processor files), or a hub id."
        )
    try:
        model = model_cls.from_pretrained(str(path) if path.is_dir() else id_or_path)
        processor = processor_cls.from_pretrained(str(path) if path.is_dir() else id_or_path)
    except Exception as exc:  # transformers raises OSError, ValueError or hub errors here
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if path.is_dir():
            raise ModelNotFoundError(
                f"{kind} model at {path} could not be loaded: {reason}. The folder must hold what "
                "save_pretrained writes for the model, its tokenizer and its processor."
            ) from exc
        raise ModelNotFoundError(
            f"{kind} model {id_or_path!r} is not available: it is not a local folder, it is not in the "
            f"Hugging Face cache, and it could not be downloaded ({reason}). Run once on a machine with "
            f"network access to fill the cache, or pass {option} a local folder written by save_pretrained. "
            "The model shipped with retriever works offline: --model shapes."
        ) from exc
    return model, processor


def load_prefilter(id_or_path: str, device: torch.device) -> ClipEncoder:
    """A ``CLIPModel`` checkpoint as the prefilter."""
    from transformers import CLIPModel, CLIPProcessor

    model, processor = _load("prefilter", id_or_path, (CLIPModel, CLIPProcessor), "--prefilter")
    return ClipEncoder(
        model, processor, name=model_name(id_or_path), fingerprint=fingerprint(model), device=device
    )


def load_reranker(id_or_path: str, device: torch.device, precision: str = "auto") -> ViltReranker:
    """A ``ViltForImageAndTextRetrieval`` checkpoint as the reranker.

    ``precision`` is ``auto`` (chosen from the device and, on a CPU, its features: see
    ``retriever.hardware.choose_precision``) or one of fp32, bf16, fp16, int8; the batch size is the
    device's (``retriever.hardware.plan_hardware``). Loading changes no process-wide state: threads and
    malloc are the program's (``retriever.hardware.configure_process``).
    """
    from transformers import ViltForImageAndTextRetrieval, ViltProcessor

    model, processor = _load(
        "reranker", id_or_path, (ViltForImageAndTextRetrieval, ViltProcessor), "--reranker"
    )
    plan = plan_hardware(device, precision, hidden=int(model.config.hidden_size))
    return ViltReranker(
        model,
        processor,
        name=model_name(id_or_path),
        # Before the precision changes any weight: the fingerprint names the checkpoint, not how it runs.
        fingerprint=fingerprint(model),
        device=device,
        batch_size=plan.batch_size,
        precision=plan.precision,
        precision_reason=plan.precision_reason,
    )
