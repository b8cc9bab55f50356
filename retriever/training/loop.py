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
    twin_share: float = 0.5,
) -> Any:
    """Symmetric InfoNCE on (image, one of its captions) batches of distinct images.

    About ``twin_share`` of each batch is whole twin groups, so the encoders see captions that share
    every word and must read word order to tell them apart.
    """
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
        images = _prefilter_batch(data, min(cfg.batch, n), twin_share, rng)
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


def _prefilter_batch(data: TrainData, size: int, twin_share: float, rng: np.random.Generator) -> np.ndarray:
    """Distinct image indices: whole twin groups up to ``twin_share`` of the batch, the rest at random."""
    chosen: list[int] = []
    if data.groups and twin_share > 0:
        for g in rng.permutation(len(data.groups)):
            group = data.groups[int(g)]
            if len(chosen) + len(group) > size * twin_share:
                break
            chosen.extend(group)
    taken = set(chosen)
    for i in rng.permutation(data.n_images):
        if len(chosen) >= size:
            break
        if int(i) not in taken:
            chosen.append(int(i))
    return np.array(chosen)


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
    """How each caption's image list, and each image's caption list, is drawn (ALBEF-style, both ways)."""

    captions: int = 16  # captions per step
    hard: int = 5  # negative images with the highest prefilter similarity in the pool (twins first)
    random: int = 2  # uniformly random negative images
    # Random images the hard negatives are mined from, plus the caption's twin group. A wide pool
    # holds the scenes that differ from the caption in one word, which a test set of 1000 is full of.
    pool: int = 512
    text_hard: int = 4  # negative captions for the caption's image, mined by the prefilter
    text_random: int = 1
    text_pool: int = 1024
    grounding_weight: float = 1.0
    # Curriculum: mined negatives carry no signal until the model knows which objects an image
    # holds, so they come in only once the positive beats random negatives this often.
    curriculum_accuracy: float = 0.9


@dataclass
class _Miner:
    """Hard negatives from the prefilter's embeddings; never a negative that carries the same caption."""

    data: TrainData
    sampling: RerankSampling
    img_emb: np.ndarray
    txt_emb: np.ndarray

    def __post_init__(self) -> None:
        self.group_of = {i: g for g in self.data.groups for i in g}
        by_text: dict[str, set[int]] = {}
        for t, text in enumerate(self.data.texts):
            by_text.setdefault(text, set()).add(int(self.data.text_image[t]))
        # Images that show the caption's scene: duplicates in a training set are not negatives.
        self.same_scene = [by_text[text] for text in self.data.texts]

    def images(self, t: int, rng: np.random.Generator, hard_on: bool) -> list[int]:
        """Caption ``t``'s image first, then negative images."""
        s, data = self.sampling, self.data
        pos = int(data.text_image[t])
        excluded = self.same_scene[t]
        if not hard_on:
            width = s.hard + s.random
            size = min(data.n_images, width + len(excluded) + 1)
            drawn = rng.choice(data.n_images, size=size, replace=False)
            return [pos, *[int(i) for i in drawn.tolist() if int(i) not in excluded][:width]]
        pool = set(rng.choice(data.n_images, size=min(s.pool, data.n_images), replace=False).tolist())
        pool.update(self.group_of.get(pos, []))
        cands = np.array(sorted(pool - excluded))
        scores = self.img_emb[cands] @ self.txt_emb[t]
        hard = cands[np.argsort(-scores)[: s.hard]].tolist()
        taken = excluded | set(hard)
        rand = [int(i) for i in rng.choice(data.n_images, size=s.random) if int(i) not in taken]
        return [pos, *hard, *rand]

    def texts(self, t: int, rng: np.random.Generator, width: int) -> list[int]:
        """``width`` negative captions for caption ``t``'s image: the prefilter's nearest, then random."""
        s, data = self.sampling, self.data
        pos = int(data.text_image[t])
        own = {data.texts[j] for j in data.image_texts[pos]}
        n = len(data.texts)
        pool = set(rng.choice(n, size=min(s.text_pool, n), replace=False).tolist())
        for img in self.group_of.get(pos, []):
            pool.update(data.image_texts[img])
        cands = np.array(sorted(j for j in pool if data.texts[j] not in own))
        scores = self.txt_emb[cands] @ self.img_emb[pos]
        hard: list[int] = [int(j) for j in cands[np.argsort(-scores)[: min(s.text_hard, width)]]]
        others = [int(j) for j in rng.choice(n, size=min(n, 4 * width + 8 * len(own)), replace=False)]
        hard += [j for j in others if data.texts[j] not in own and j not in hard][: width - len(hard)]
        return hard


def train_reranker(
    model: Any,
    data: TrainData,
    sims: tuple[np.ndarray, np.ndarray],
    cfg: LoopConfig,
    state_path: Path,
    sampling: RerankSampling = RerankSampling(),
    on_step: StepFn | None = None,
) -> Any:
    """Listwise ITM in both directions, on negatives mined by the prefilter (as ALBEF does).

    Each caption is ranked against its image and negative images (text→image); once mined
    negatives are on, its image is also ranked against the caption and negative captions
    (image→text). With object boxes in the data, a grounding head also predicts each named object's
    box from the output at its noun: a dense signal that teaches which patches a phrase refers to.
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
    miner = _Miner(data, sampling, *sims)
    n_texts = len(data.texts)
    text_width = sampling.text_hard + sampling.text_random
    # A marker file records that the curriculum switched, so a resumed run keeps mined negatives on.
    hard_marker = state_path.with_suffix(".hard")
    accuracy_ema, hard_on = 0.0, sampling.curriculum_accuracy <= 0 or hard_marker.exists()
    while step < cfg.steps:
        t0 = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = _lr(step, cfg)
        texts = rng.choice(n_texts, size=sampling.captions, replace=False)
        lists = [miner.images(int(t), rng, hard_on) for t in texts]
        width = min(len(c) for c in lists)
        lists = [c[:width] for c in lists]
        text_lists = [miner.texts(int(t), rng, text_width) for t in texts] if hard_on and text_width else []
        text_w = min((len(c) for c in text_lists), default=0)
        text_lists = [c[:text_w] for c in text_lists] if text_w else []
        unique = sorted({i for c in lists for i in c})
        where = {img: k for k, img in enumerate(unique)}
        pair_img = [where[i] for c in lists for i in c]
        pair_txt = [data.vilt_ids[int(t)] for t, c in zip(texts, lists, strict=True) for _ in c]
        for c, negs in zip(lists, text_lists, strict=False):  # no caption lists before the curriculum
            pair_img += [where[c[0]]] * len(negs)
            pair_txt += [data.vilt_ids[j] for j in negs]
        n_t2i = len(texts) * width
        with _autocast(cfg):
            tokens, tmask = vilt_embed(model, [data.vilt_pixels[i] for i in unique], cfg.device)
            rows = torch.tensor(pair_img, device=cfg.device)
            ids, amask = _pad_ids(pair_txt, cfg.device)
            out = model.vilt(
                input_ids=ids,
                attention_mask=amask,
                token_type_ids=torch.zeros_like(ids),
                image_embeds=tokens[rows],
                pixel_mask=tmask[rows],
            )
            scores = model.rank_output(out.pooler_output).float().squeeze(-1)
        logits = scores[:n_t2i].view(len(texts), width)
        zeros = torch.zeros(len(texts), dtype=torch.long, device=cfg.device)
        itm = F.cross_entropy(logits, zeros)
        extra: dict[str, float] = {}
        if text_lists:
            # The caption's own pair (the first of its image list) against the negative captions.
            i2t = torch.cat([logits[:, :1], scores[n_t2i:].view(len(texts), text_w)], dim=1)
            i2t_loss = F.cross_entropy(i2t, zeros)
            itm = (itm + i2t_loss) / 2
            extra["acc_i2t"] = float((i2t[:, 0] > i2t[:, 1:].max(dim=1).values).float().mean())
        loss = itm
        # Strictly above every negative: tied logits (an untrained head) do not count as right.
        accuracy = float((logits[:, 0] > logits[:, 1:].max(dim=1).values).float().mean())
        accuracy_ema = 0.95 * accuracy_ema + 0.05 * accuracy
        if not hard_on and accuracy_ema >= sampling.curriculum_accuracy:
            hard_on = True
            hard_marker.touch()
        extra = {"acc": accuracy, **extra, "hard": float(hard_on)}
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
            on_step(StepInfo("reranker", step, cfg.steps, itm.item(), len(pair_img) / dt, extra))
        if step % cfg.save_every == 0 or step == cfg.steps:
            _save_state(state_path, step, modules, rng)
    return model.eval()
