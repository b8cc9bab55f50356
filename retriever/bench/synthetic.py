"""Synthetic data for the bench and for tests: unit vectors with or without topics, photo-like images.

Only numpy and Pillow: tests import these without the bench's models, torch or the engine.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from PIL import Image


def synthetic_vectors(n: int, dim: int, *, clustered: bool, seed: int) -> np.ndarray:
    """Unit vectors: clustered (topics of about 500 vectors, cosine about 0.6 to their centre) or uniform."""
    rng = np.random.default_rng(seed)
    if clustered:
        centres = rng.standard_normal((max(1, n // 500), dim)).astype(np.float32)
        centres /= np.linalg.norm(centres, axis=1, keepdims=True)
        x = centres[rng.integers(0, len(centres), n)]
        x = x + rng.standard_normal((n, dim)).astype(np.float32) * (1.35 / math.sqrt(dim))
    else:
        x = rng.standard_normal((n, dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return np.ascontiguousarray(x, dtype=np.float32)


def synthetic_image(width: int, height: int, seed: int) -> Image.Image:
    """A smooth, photo-like RGB image (coloured blobs over a gradient, a little grain)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, size=(max(2, height // 64), max(2, width // 64), 3), dtype=np.uint8)
    base = Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)
    grain = rng.integers(-6, 7, size=(height, width, 1), dtype=np.int16)
    arr = np.clip(np.asarray(base, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
    return Image.fromarray(arr)


def write_jpegs(folder: Path, count: int, size: tuple[int, int]) -> list[Path]:
    """``count`` photo-like JPEGs of ``size`` (width, height), quality 90."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"photo-{i:03d}.jpg"
        synthetic_image(size[0], size[1], seed=100 + i).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths
