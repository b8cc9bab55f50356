"""Training loops: CLIP-style contrastive prefilter, then ViLT ITM with negatives mined by the prefilter.

Both loops save a resumable state (weights, optimizer, step, random generators) every few hundred
steps, so an interrupted run goes on from its last save with the same seed stream.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..rerank import visual_tokens
from .data import TrainData


@dataclass(frozen=True)
class StepInfo:
    """One training step, for progress display."""

    stage: str
    step: int
    steps: int
    loss: float
    pairs_per_s: float
    extra: dict[str, float]


StepFn = Callable[[StepInfo], None]


@dataclass(frozen=True)
class LoopConfig:
    """Optimisation settings shared by both stages."""

    steps: int
    lr: float
    batch: int
    seed: int
    device: torch.device
    autocast: torch.dtype | None = None  # bf16 where the hardware runs it natively
    save_every: int = 200
    warmup: int = 100


def _lr(step: int, cfg: LoopConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress))))


def _save_state(path: Path, step: int, modules: dict[str, Any], rng: np.random.Generator) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(
        {
            "step": step,
            **{k: m.state_dict() for k, m in modules.items()},
            "torch_rng": torch.get_rng_state(),
            "np_rng": rng.bit_generator.state,
        },
        tmp,
    )
    tmp.replace(path)


def _load_state(path: Path, modules: dict[str, Any], rng: np.random.Generator) -> int:
    if not path.exists():
        return 0
    state = torch.load(path, weights_only=False)
    for k, m in modules.items():
        m.load_state_dict(state[k])
    torch.set_rng_state(state["torch_rng"])
    rng.bit_generator.state = state["np_rng"]
    return int(state["step"])


def _autocast(cfg: LoopConfig) -> Any:
    return torch.autocast(
        device_type=cfg.device.type, dtype=cfg.autocast or torch.float32, enabled=cfg.autocast is not None
    )


# -- prefilter ----------------------------------------------------------------------------------------


def clip_text_batch(tokenizer: Any, texts: list[str]) -> dict[str, torch.Tensor]:
    """Tokenized, padded captions for CLIP."""
    enc = tokenizer(texts, padding=True, truncation=True, max_length=40, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def train_prefilter(
    model: Any,
    tokenizer: Any,
    data: TrainData,
    cfg: LoopConfig,
    state_path: Path,
    on_step: StepFn | None = None,
) -> Any:
    """Symmetric InfoNCE on (image, one of its captions) batches of distinct images."""
    model.to(cfg.device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.05)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    step = _load_state(state_path, {"model": model, "opt": opt}, rng)
    n = data.n_images
    while step < cfg.steps:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        images = rng.choice(n, size=min(cfg.batch, n), replace=False)
        captions = [data.texts[int(rng.choice(data.image_texts[i]))] for i in images]
        text = {k: v.to(cfg.device) for k, v in clip_text_batch(tokenizer, captions).items()}
        pixels = data.clip_pixels[images].float().to(cfg.device)
        with _autocast(cfg):
            img = model.get_image_features(pixel_values=pixels).pooler_output
            txt = model.get_text_features(**text).pooler_output
        img = F.normalize(img.float(), dim=-1)
        txt = F.normalize(txt.float(), dim=-1)
        logits = model.logit_scale.exp().clamp(max=100) * img @ txt.T
        target = torch.arange(len(images), device=cfg.device)
        loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        acc = float((logits.argmax(1) == target).float().mean())
        if on_step is not None:
            dt = time.perf_counter() - t0
            on_step(StepInfo("prefilter", step, cfg.steps, loss.item(), len(images) / dt, {"acc": acc}))
        if step % cfg.save_every == 0 or step == cfg.steps:
            _save_state(state_path, step, {"model": model, "opt": opt}, rng)
    return model.eval()


@torch.inference_mode()
def prefilter_embeddings(
    model: Any, tokenizer: Any, data: TrainData, device: torch.device
) -> tuple[np.ndarray, np.ndarray]:
    """Normalized image (I, d) and caption (T, d) embeddings of the whole training set."""
    model.eval().to(device)
    imgs, txts = [], []
    for s in range(0, data.n_images, 256):
        feats = model.get_image_features(
            pixel_values=data.clip_pixels[s : s + 256].float().to(device)
        ).pooler_output
        imgs.append(F.normalize(feats.float(), dim=-1).cpu())
    for s in range(0, len(data.texts), 512):
        text = {k: v.to(device) for k, v in clip_text_batch(tokenizer, data.texts[s : s + 512]).items()}
        txts.append(F.normalize(model.get_text_features(**text).pooler_output.float(), dim=-1).cpu())
    return torch.cat(imgs).numpy(), torch.cat(txts).numpy()


# -- reranker -----------------------------------------------------------------------------------------


def vilt_embed(
    model: Any, pixels: list[torch.Tensor], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """ViLT visual tokens for images of varying size, padded: (n, L, H) and the mask (n, L).

    ``retriever.rerank.visual_tokens``, batched by patch-grid shape.
    """
    hidden = model.config.hidden_size
    by_shape: dict[tuple[int, int], list[int]] = {}
    for i, p in enumerate(pixels):
        by_shape.setdefault((p.shape[1], p.shape[2]), []).append(i)
    outs: list[torch.Tensor | None] = [None] * len(pixels)
    for idx in by_shape.values():
        tokens = visual_tokens(model, torch.stack([pixels[i].float() for i in idx]).to(device))
        for j, i in enumerate(idx):
            outs[i] = tokens[j]
    length = max(int(o.shape[0]) for o in outs if o is not None)
    padded = torch.zeros(len(pixels), length, hidden, device=device)
    mask = torch.zeros(len(pixels), length, dtype=torch.long, device=device)
    for i, o in enumerate(outs):
        if o is not None:
            padded[i, : o.shape[0]] = o
            mask[i, : o.shape[0]] = 1
    return padded, mask


def _pad_ids(rows: list[list[int]], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    length = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
    return ids.to(device), mask.to(device)


@dataclass(frozen=True)
class RerankSampling:
    """How each caption's candidate list is drawn."""

    captions: int = 16  # captions per step
    hard: int = 5  # negatives with the highest prefilter similarity in the pool (twins first)
    random: int = 2  # uniformly random negatives
    pool: int = 48  # random images the hard negatives are mined from, plus the caption's twin group
    grounding_weight: float = 1.0
    # Curriculum: mined negatives carry no signal until the model knows which objects an image
    # holds, so they come in only once the positive beats random negatives this often.
    curriculum_accuracy: float = 0.9


def _mine(
    data: TrainData,
    t: int,
    rng: np.random.Generator,
    sampling: RerankSampling,
    sims: tuple[np.ndarray, np.ndarray],
    group_of: dict[int, list[int]],
    hard_on: bool,
) -> list[int]:
    pos = int(data.text_image[t])
    if not hard_on:
        width = sampling.hard + sampling.random
        rand = [int(i) for i in rng.choice(data.n_images, size=width + 2, replace=False) if int(i) != pos]
        return [pos, *rand[:width]]
    img_emb, txt_emb = sims
    pool = set(rng.choice(data.n_images, size=min(sampling.pool, data.n_images), replace=False).tolist())
    pool.update(group_of.get(pos, []))
    pool.discard(pos)
    cands = np.array(sorted(pool))
    scores = img_emb[cands] @ txt_emb[t]
    hard = cands[np.argsort(-scores)[: sampling.hard]].tolist()
    rand = [
        int(i)
        for i in rng.choice(data.n_images, size=sampling.random)
        if int(i) != pos and int(i) not in hard
    ]
    return [pos, *hard, *rand]


def train_reranker(
    model: Any,
    data: TrainData,
    sims: tuple[np.ndarray, np.ndarray],
    cfg: LoopConfig,
    state_path: Path,
    sampling: RerankSampling = RerankSampling(),
    on_step: StepFn | None = None,
) -> Any:
    """Listwise ITM: each caption against its image and negatives mined by the prefilter.

    With object boxes in the data, a grounding head also predicts each named object's box from the
    output at its noun: a dense signal that teaches which patches a phrase refers to.
    """
    model.to(cfg.device).train()
    hidden = model.config.hidden_size
    ground_head = torch.nn.Linear(hidden, 4).to(cfg.device)
    params = list(model.parameters()) + list(ground_head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.01)
    rng = np.random.default_rng(cfg.seed)
    torch.manual_seed(cfg.seed)
    modules = {"model": model, "ground": ground_head, "opt": opt}
    step = _load_state(state_path, modules, rng)
    group_of = {i: g for g in data.groups for i in g}
    n_texts = len(data.texts)
    # A marker file records that the curriculum switched, so a resumed run keeps mined negatives on.
    hard_marker = state_path.with_suffix(".hard")
    accuracy_ema, hard_on = 0.0, sampling.curriculum_accuracy <= 0 or hard_marker.exists()
    while step < cfg.steps:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        texts = rng.choice(n_texts, size=sampling.captions, replace=False)
        lists = [_mine(data, int(t), rng, sampling, sims, group_of, hard_on) for t in texts]
        width = min(len(c) for c in lists)
        lists = [c[:width] for c in lists]
        unique = sorted({i for c in lists for i in c})
        where = {img: k for k, img in enumerate(unique)}
        with _autocast(cfg):
            tokens, tmask = vilt_embed(model, [data.vilt_pixels[i] for i in unique], cfg.device)
            pair_img = torch.tensor([where[i] for c in lists for i in c], device=cfg.device)
            pair_txt = [data.vilt_ids[int(t)] for t, c in zip(texts, lists, strict=True) for _ in c]
            ids, amask = _pad_ids(pair_txt, cfg.device)
            out = model.vilt(
                input_ids=ids,
                attention_mask=amask,
                token_type_ids=torch.zeros_like(ids),
                image_embeds=tokens[pair_img],
                pixel_mask=tmask[pair_img],
            )
            logits = model.rank_output(out.pooler_output).float().view(len(texts), width)
        itm = F.cross_entropy(logits, torch.zeros(len(texts), dtype=torch.long, device=cfg.device))
        loss = itm
        # Strictly above every negative: tied logits (an untrained head) do not count as right.
        accuracy = float((logits[:, 0] > logits[:, 1:].max(dim=1).values).float().mean())
        accuracy_ema = 0.95 * accuracy_ema + 0.05 * accuracy
        if not hard_on and accuracy_ema >= sampling.curriculum_accuracy:
            hard_on = True
            hard_marker.touch()
        extra = {"acc": accuracy, "hard": float(hard_on)}
        if data.grounding is not None and sampling.grounding_weight > 0:
            pos_rows = torch.arange(len(texts), device=cfg.device) * width
            tok = torch.from_numpy(data.grounding.token_index[texts]).to(cfg.device)
            target = torch.from_numpy(data.grounding.target[texts]).to(cfg.device)
            valid = tok >= 0
            hs = out.last_hidden_state[pos_rows].float()  # (n, L, H) of the positive pairs
            picked = hs[torch.arange(len(texts), device=cfg.device)[:, None], tok.clamp(min=0)]
            pred = torch.sigmoid(ground_head(picked))
            ground = (F.l1_loss(pred, target, reduction="none").sum(-1) * valid).sum() / valid.sum().clamp(
                min=1
            )
            loss = loss + sampling.grounding_weight * ground
            extra["ground"] = ground.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        if on_step is not None:
            dt = time.perf_counter() - t0
            on_step(StepInfo("reranker", step, cfg.steps, itm.item(), len(texts) * width / dt, extra))
        if step % cfg.save_every == 0 or step == cfg.steps:
            _save_state(state_path, step, modules, rng)
    return model.eval()
