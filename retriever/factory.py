"""The one place that wires concrete classes together: models from hub ids or folders, and devices."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from .encoders import ClipEncoder
from .errors import ModelNotFoundError, RetrieverError
from .presets import DEFAULT_PREFILTER, DEFAULT_RERANKER, PRESETS, SHAPES_DIR, model_name, preset
from .rerank import ViltReranker

__all__ = [
    "DEFAULT_CANDIDATES_CPU",
    "DEFAULT_CANDIDATES_GPU",
    "DEFAULT_PREFILTER",
    "DEFAULT_RERANKER",
    "PRESETS",
    "RERANK_BATCH_CPU",
    "RERANK_BATCH_GPU",
    "SHAPES_DIR",
    "default_candidates",
    "fingerprint",
    "load_prefilter",
    "load_reranker",
    "model_name",
    "preset",
    "rerank_batch_size",
    "resolve_device",
]

#: Rerank candidates by default: a ViLT-B/32 pair costs tens of ms on a 2-core CPU, a few ms on a GPU.
DEFAULT_CANDIDATES_CPU = 20
DEFAULT_CANDIDATES_GPU = 100
#: Pairs per rerank forward pass: 16 fills a CPU's matmul units (measured best of 4-32 on 2 Sapphire
#: Rapids cores); a GPU needs more rows than 16 x ~200 tokens to fill its SMs.
RERANK_BATCH_CPU = 16
RERANK_BATCH_GPU = 64


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when a GPU is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RetrieverError("--device cuda was asked for, but torch sees no CUDA GPU")
    if name not in ("cpu", "cuda"):
        raise RetrieverError(f"unknown device {name!r}: use auto, cpu or cuda")
    return torch.device(name)


def default_candidates(device: torch.device) -> int:
    """How many prefilter candidates the rerank scores by default on this device."""
    return DEFAULT_CANDIDATES_GPU if device.type == "cuda" else DEFAULT_CANDIDATES_CPU


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
    ``retriever.perf.choose_precision``) or one of fp32, bf16, fp16, int8. On a CPU, torch gets at
    most one intra-op thread per usable physical core.
    """
    from transformers import ViltForImageAndTextRetrieval, ViltProcessor

    from .perf import choose_precision, configure_threads, read_cpu_info, usable_threads

    model, processor = _load(
        "reranker", id_or_path, (ViltForImageAndTextRetrieval, ViltProcessor), "--reranker"
    )
    cpu = read_cpu_info() if device.type == "cpu" else None
    choice = choose_precision(device, precision, hidden=int(model.config.hidden_size), cpu=cpu)
    if cpu is not None:
        # Never above what torch was started with: a deliberate OMP_NUM_THREADS (or a busy, shared
        # machine's operator) wins; above the physical cores torch's default only oversubscribes.
        configure_threads(min(torch.get_num_threads(), usable_threads(cpu)))
    return ViltReranker(
        model,
        processor,
        name=model_name(id_or_path),
        # Before the precision changes any weight: the fingerprint names the checkpoint, not how it runs.
        fingerprint=fingerprint(model),
        device=device,
        batch_size=rerank_batch_size(device),
        precision=choice.precision,
        precision_reason=choice.reason,
    )


def rerank_batch_size(device: torch.device) -> int:
    """Pairs per ViLT forward pass on this device."""
    return RERANK_BATCH_GPU if device.type == "cuda" else RERANK_BATCH_CPU
