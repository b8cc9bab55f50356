"""``retriever train`` end to end: data, the prefilter stage, negative mining, the reranker stage, export.

An output folder holds ``prefilter/`` and ``reranker/`` (``save_pretrained`` folders with tokenizer
and processor files), ``TRAINING.json`` (how they were made) and ``state/`` (resumable training
state and the preprocessed pixels). Running the same command again resumes where it stopped.
"""

from __future__ import annotations

import json
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..datasets.karpathy import load_karpathy
from ..datasets.shapes import EVAL_TEST_SEEDS, eval_seed_of, render_settings, scene_of_entry
from ..errors import RetrieverError
from ..hardware import training_autocast
from .build import SmallConfig, new_prefilter, new_reranker
from .data import load_train_data
from .loop import LoopConfig, RerankSampling, StepFn, prefilter_embeddings, train_prefilter, train_reranker

StatusFn = Callable[[str], None]


@dataclass(frozen=True)
class TrainRequest:
    """Everything a training run depends on."""

    dataset: Path
    out: Path
    images_dir: Path | None = None
    split: str = "train"
    prefilter_init: str | None = None  # fine-tune this CLIPModel instead of training a small one from scratch
    reranker_init: str | None = None  # likewise for ViltForImageAndTextRetrieval
    prefilter_steps: int = 600
    reranker_steps: int = 6000
    prefilter_batch: int = 256
    prefilter_lr: float | None = None  # default: 1e-3 from scratch, 1e-5 when fine-tuning
    reranker_lr: float | None = None  # default: 5e-4 from scratch, 1e-4 when fine-tuning (ViLT's value)
    sampling: RerankSampling = field(default_factory=RerankSampling)
    small: SmallConfig = field(default_factory=SmallConfig)
    seed: int = 0
    device: str = "cpu"
    precision: str = "auto"  # auto | fp32 | bf16
    # A shapes renderer (`retriever.datasets.shapes.RENDERERS`, e.g. "envelope"): draw the training
    # images again from the dataset's scenes with it, seeded by `seed`, instead of reading the files.
    render: str | None = None


def _raw_entries(dataset: Path, split: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The split's entries, and the document's other top-level fields (`dataset`, a shapes `render`)."""
    wanted = {"train": {"train", "restval"}}.get(split, {split})
    data = json.loads(dataset.read_text())
    entries = [e for e in data["images"] if isinstance(e, dict) and e.get("split") in wanted]
    return entries, {k: v for k, v in data.items() if k != "images"}


def _check_data(req: TrainRequest, raw: list[dict[str, Any]]) -> None:
    """Refuse, before any model is built, data training must not use.

    Training never sees the images the project evaluates on, so its test sets stay fresh for every
    model; and `--render` needs shapes scenes to draw.
    """
    seed = eval_seed_of(raw)
    if seed is not None:
        raise RetrieverError(
            f"{req.dataset} was generated with seed {seed}, one of the shapes test seeds the project "
            f"evaluates on ({', '.join(map(str, sorted(EVAL_TEST_SEEDS)))}); train on a set drawn with "
            "another seed"
        )
    if req.render is not None and req.seed in EVAL_TEST_SEEDS:
        raise RetrieverError(
            f"--seed {req.seed} would draw the training images (--render) from a seed the project "
            "evaluates on; choose another seed"
        )
    if req.render is not None:
        for entry in raw:
            scene_of_entry(entry)


def _render_record(req: TrainRequest, document: dict[str, Any]) -> dict[str, Any] | None:
    """How the training images were drawn: by this run (`--render`), or as the dataset's files say."""
    if req.render is not None:
        settings = render_settings(req.render).as_json()
        return {"name": req.render, "drawn_by_training": True, "seed": req.seed, "settings": settings}
    if document.get("dataset") != "shapes":
        return None
    # Shapes sets record a renderer other than the default; sets without one used the default.
    recorded = document.get("render") or {"name": "default"}
    return {"name": recorded.get("name"), "drawn_by_training": False, "settings": recorded}


def _load_or_build(req: TrainRequest, texts: list[str], work: Path) -> tuple[Any, Any, Any, Any]:
    from transformers import CLIPModel, CLIPProcessor, ViltForImageAndTextRetrieval, ViltProcessor

    if req.prefilter_init:
        clip = CLIPModel.from_pretrained(req.prefilter_init)
        clip_proc = CLIPProcessor.from_pretrained(req.prefilter_init)
    else:
        clip, clip_proc = new_prefilter(sorted(set(texts)), req.small, req.seed)
    if req.reranker_init:
        vilt = ViltForImageAndTextRetrieval.from_pretrained(req.reranker_init)
        vilt_proc = ViltProcessor.from_pretrained(req.reranker_init)
    else:
        words = sorted({w for t in texts for w in t.lower().split()})
        letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
        # Single letters and word pieces let the tokenizer spell any word it was not trained on.
        vocab = words + [c for c in letters if c not in words] + ["##" + c for c in letters]
        vilt, vilt_proc = new_reranker(vocab, req.small, work / "tokenizer", req.seed)
    return clip, clip_proc, vilt, vilt_proc


def train(
    req: TrainRequest,
    *,
    command: str = "",
    on_step: StepFn | None = None,
    on_status: StatusFn | None = None,
) -> Path:
    """Train (or resume) both models; returns the output folder."""
    started = time.perf_counter()
    say = on_status or (lambda _m: None)
    device = torch.device(req.device)
    # bf16 autocast where the hardware multiplies bf16 natively (the rerank's rule), else fp32.
    dtype = training_autocast(device, req.precision)
    work = req.out / "state"
    work.mkdir(parents=True, exist_ok=True)
    if not req.dataset.exists():
        raise RetrieverError(f"no dataset at {req.dataset}")
    split = load_karpathy(req.dataset, req.images_dir, req.split)
    raw, document = _raw_entries(req.dataset, req.split)
    if len(raw) != len(split.images):
        raise RetrieverError("the dataset's entries and the loaded split disagree; is the JSON well formed?")
    _check_data(req, raw)
    render = render_settings(req.render) if req.render is not None else None
    torch.manual_seed(req.seed)
    clip, clip_proc, vilt, vilt_proc = _load_or_build(req, split.texts, work)
    drawn = f", drawn with the {req.render} renderer" if req.render is not None else ""
    say(f"preprocessing {len(split.images)} images ({len(split.texts)} captions){drawn}")
    data = load_train_data(
        split, raw, vilt_proc, clip_proc, cache_dir=work, render=render, render_seed=req.seed
    )

    prefilter_lr = req.prefilter_lr or (1e-5 if req.prefilter_init else 1e-3)
    reranker_lr = req.reranker_lr or (1e-4 if req.reranker_init else 5e-4)
    say(f"training the prefilter for {req.prefilter_steps} steps (precision {dtype or torch.float32})")
    pre_cfg = LoopConfig(
        steps=req.prefilter_steps,
        lr=prefilter_lr,
        batch=req.prefilter_batch,
        seed=req.seed,
        device=device,
        autocast=dtype,
        warmup=min(100, req.prefilter_steps // 10),
    )
    clip = train_prefilter(clip, clip_proc.tokenizer, data, pre_cfg, work / "prefilter.pt", on_step)
    _export(clip, clip_proc, req.out / "prefilter")

    say("mining negatives with the prefilter")
    sims = prefilter_embeddings(clip, clip_proc.tokenizer, data, device)
    say(f"training the reranker for {req.reranker_steps} steps")
    re_cfg = LoopConfig(
        steps=req.reranker_steps,
        lr=reranker_lr,
        batch=req.sampling.captions,
        seed=req.seed,
        device=device,
        autocast=dtype,
        warmup=min(200, req.reranker_steps // 10),
    )
    vilt = train_reranker(vilt, data, sims, re_cfg, work / "reranker.pt", req.sampling, on_step)
    _export(vilt, vilt_proc, req.out / "reranker")

    record = {
        "command": command,
        "dataset": str(req.dataset),
        "split": req.split,
        "images": len(split.images),
        "captions": len(split.texts),
        "twin_groups": len(data.groups),
        "seed": req.seed,
        "render": _render_record(req, document),
        "prefilter_steps": req.prefilter_steps,
        "reranker_steps": req.reranker_steps,
        "prefilter_pairs": req.prefilter_steps * req.prefilter_batch,
        "reranker_pairs": req.reranker_steps
        * req.sampling.captions
        * (1 + req.sampling.hard + req.sampling.random),
        "sampling": asdict(req.sampling),
        "small_config": asdict(req.small) if not (req.prefilter_init or req.reranker_init) else None,
        "prefilter_init": req.prefilter_init,
        "reranker_init": req.reranker_init,
        "prefilter_lr": prefilter_lr,
        "reranker_lr": reranker_lr,
        # How the starting checkpoints were made, when they were made by this command.
        "init_training": _init_training(req),
        "precision": str(dtype or torch.float32),
        "device": req.device,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "wall_seconds_this_run": round(time.perf_counter() - started, 1),
    }
    previous = req.out / "TRAINING.json"
    if previous.exists():
        old = json.loads(previous.read_text())
        record["wall_seconds_total"] = round(
            old.get("wall_seconds_total", 0) + record["wall_seconds_this_run"], 1
        )
    else:
        record["wall_seconds_total"] = record["wall_seconds_this_run"]
    previous.write_text(json.dumps(record, indent=2) + "\n")
    return req.out


def _init_training(req: TrainRequest) -> dict[str, Any] | None:
    records = {}
    for name, init in (("prefilter", req.prefilter_init), ("reranker", req.reranker_init)):
        record = Path(init).parent / "TRAINING.json" if init else None
        if record is not None and record.is_file():
            records[name] = json.loads(record.read_text())
    return records or None


def _export(model: Any, processor: Any, folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    model.eval().to("cpu").float()
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
