"""Shared fixtures: tiny random models saved like real checkpoints, and generated images.

Nothing here reaches the network: the hub is switched to offline mode before transformers loads.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from tests.tiny_models import make_tiny_clip, make_tiny_vilt  # noqa: E402


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random CLIPModel folder (weights, tokenizer, processor)."""
    return make_tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(scope="session")
def tiny_vilt_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random ViltForImageAndTextRetrieval folder (weights, tokenizer, processor)."""
    return make_tiny_vilt(tmp_path_factory.mktemp("vilt"))


@pytest.fixture(scope="session")
def tiny_models(tiny_clip_dir: Path, tiny_vilt_dir: Path) -> Iterator[tuple[object, object]]:
    """The tiny prefilter and reranker, loaded once per session through the real factory."""
    import torch

    from retriever.factory import load_prefilter, load_reranker

    cpu = torch.device("cpu")
    yield load_prefilter(str(tiny_clip_dir), cpu), load_reranker(str(tiny_vilt_dir), cpu)


def random_image(seed: int, size: tuple[int, int] = (96, 64)) -> Image.Image:
    """A distinct, seeded RGB image: a few coloured blocks on noise."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = rng.integers(0, 255, size=(h, w, 3), dtype=np.uint8)
    for _ in range(3):
        x0, y0 = int(rng.integers(0, w // 2)), int(rng.integers(0, h // 2))
        arr[y0 : y0 + h // 3, x0 : x0 + w // 3] = rng.integers(0, 255, size=3, dtype=np.uint8)
    return Image.fromarray(arr)


def write_images(folder: Path, n: int, *, start_seed: int = 0, fmt: str = "png") -> list[Path]:
    """Write ``n`` distinct images into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img_{start_seed + i:04d}.{fmt}"
        random_image(start_seed + i, (64 + 16 * (i % 4), 64 + 8 * (i % 3))).save(path)
        paths.append(path)
    return paths
