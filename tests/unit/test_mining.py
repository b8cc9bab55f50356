"""Hard-negative mining for the reranker: hard, never a false negative, both directions."""

from __future__ import annotations

import numpy as np
import torch

from retriever.training.data import TrainData
from retriever.training.loop import RerankSampling, _Miner, _prefilter_batch


def _data() -> tuple[TrainData, np.ndarray, np.ndarray]:
    # Images 0-3 are a twin group; image 4 shows the same scene as image 0 (same captions);
    # images 5-11 are unrelated. Two captions per image.
    scenes = [0, 1, 2, 3, 0, 5, 6, 7, 8, 9, 10, 11]
    texts: list[str] = []
    text_image: list[int] = []
    image_texts: list[list[int]] = []
    for i, scene in enumerate(scenes):
        image_texts.append([])
        for form in range(2):
            image_texts[-1].append(len(texts))
            texts.append(f"scene {scene} form {form}")
            text_image.append(i)
    rng = np.random.default_rng(0)
    base = rng.normal(size=(12, 8))
    base[1:4] = base[0] + 0.01 * rng.normal(size=(3, 8))  # twins look alike to the prefilter
    base[4] = base[0]
    img = base / np.linalg.norm(base, axis=1, keepdims=True)
    txt = np.repeat(img, 2, axis=0)
    data = TrainData(
        vilt_pixels=[torch.zeros(3, 8, 8) for _ in scenes],
        clip_pixels=torch.zeros(12, 3, 8, 8),
        texts=texts,
        text_image=np.array(text_image),
        image_texts=image_texts,
        groups=[[0, 1, 2, 3]],
        vilt_ids=[[1, 2] for _ in texts],
        grounding=None,
    )
    return data, img.astype(np.float32), txt.astype(np.float32)


def test_mined_images_are_twins_first_and_never_the_same_scene() -> None:
    data, img, txt = _data()
    miner = _Miner(data, RerankSampling(hard=3, random=2, pool=4), img, txt)
    rng = np.random.default_rng(1)
    for _ in range(50):
        images = miner.images(0, rng, hard_on=True)
        assert images[0] == 0
        assert 4 not in images  # shows caption 0's scene: not a negative
        assert set(images[1:4]) == {1, 2, 3}  # the twins are the hardest
        cold = miner.images(0, rng, hard_on=False)
        assert cold[0] == 0 and 4 not in cold[1:] and len(cold) == 6


def test_mined_captions_are_hard_and_never_the_image_s_own() -> None:
    data, img, txt = _data()
    miner = _Miner(data, RerankSampling(text_hard=4, text_random=2, text_pool=4), img, txt)
    rng = np.random.default_rng(2)
    own = {"scene 0 form 0", "scene 0 form 1"}
    for _ in range(50):
        negatives = miner.texts(0, rng, 6)
        words = [data.texts[j] for j in negatives]
        assert len(negatives) == 6 and not own & set(words)
        # The twin group's captions are the prefilter's nearest.
        assert {int(data.text_image[j]) for j in negatives[:4]} <= {1, 2, 3}


def test_prefilter_batches_hold_whole_twin_groups() -> None:
    data, _, _ = _data()
    rng = np.random.default_rng(3)
    batch = _prefilter_batch(data, 8, 0.5, rng)
    assert len(batch) == len(set(batch.tolist())) == 8
    assert {0, 1, 2, 3} <= set(batch.tolist())
    plain = _prefilter_batch(data, 8, 0.0, rng)
    assert len(set(plain.tolist())) == 8
