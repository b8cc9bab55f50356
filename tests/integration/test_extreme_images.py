"""Very wide and very tall images: indexed, searched with, and never able to sink a batch.

ViLT's image processor resizes the short side to ``shortest_edge``, caps the long side at 1333/800 of
that, and floors both to ``size_divisor``; past some aspect ratio the short side floors to 0 and the
processor raises. These tests index and query with such images through the tiny models, the shipped
shapes model, the real CLI and the API, and check that a file whose encoding fails is skipped alone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from retriever.api.app import create_app
from retriever.api.settings import Settings
from retriever.encoders import WINDOW_ASPECT, DualEncoder, central_window
from retriever.factory import load_prefilter, load_reranker, preset
from retriever.indexing import index_folder
from retriever.rerank import ProgressFn, Reranker, fit_aspect
from retriever.search_index import SearchIndex
from tests.api.conftest import CountingReranker, GatedLoader, wait_ready
from tests.conftest import write_images

#: The sizes the tester found crashing (width, height): ratios 150, 22, 19 and 1/22.
EXTREME_SIZES: tuple[tuple[int, int], ...] = ((30000, 200), (2200, 100), (1900, 100), (100, 2200))
#: (shortest_edge, size_divisor, patch size) of ViLT-B/32, the shipped shapes reranker and the tiny one.
VILT_CONFIGS: tuple[tuple[int, int, int], ...] = ((384, 32, 32), (64, 8, 8), (128, 32, 32))


def extreme_image(seed: int, size: tuple[int, int]) -> Image.Image:
    """A distinct image of any size, cheap to make and to compress: a gradient with a coloured band."""
    rng = np.random.default_rng(seed)
    w, h = size
    ramp = np.linspace(0, 255, max(w, h), dtype=np.float32)
    along = ramp[:w][None, :] if w >= h else ramp[:h][:, None]
    arr = np.empty((h, w, 3), dtype=np.uint8)
    for c in range(3):
        arr[..., c] = np.broadcast_to(along * rng.uniform(0.3, 1.0), (h, w)).astype(np.uint8)
    arr[h // 3 : max(h // 3 + 1, 2 * h // 3), w // 3 : max(w // 3 + 1, 2 * w // 3)] = rng.integers(0, 255, 3)
    return Image.fromarray(arr)


def write_extreme(folder: Path, sizes: Sequence[tuple[int, int]] = EXTREME_SIZES) -> list[Path]:
    """One PNG per size in ``folder``, named after its size."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, size in enumerate(sizes):
        path = folder / f"extreme_{size[0]}x{size[1]}.png"
        extreme_image(100 + i, size).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path], list[Path]]:
    """A folder of three ordinary images (in ``normal/``) and the four extreme ones (in ``extreme/``).

    Returns (folder, normal, extreme).
    """
    folder = tmp_path_factory.mktemp("mixed")
    return folder, write_images(folder / "normal", 3), write_extreme(folder / "extreme")


@pytest.fixture(scope="module")
def shapes_models() -> tuple[DualEncoder, Reranker]:
    """The model shipped in the package, as ``--model shapes`` loads it."""
    pre_dir, re_dir = preset("shapes")
    cpu = torch.device("cpu")
    return load_prefilter(pre_dir, cpu), load_reranker(re_dir, cpu)


def sqlite_library(home: Path) -> SearchIndex:
    return SearchIndex(home, f"sqlite:///{home / 'store.db'}")


def resolved(paths: Sequence[Path]) -> set[str]:
    return {str(p.resolve()) for p in paths}


# -- the rule -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("shortest", "divisor", "patch"), VILT_CONFIGS)
def test_fit_aspect_gives_every_image_a_patch_grid(shortest: int, divisor: int, patch: int) -> None:
    from transformers import ViltImageProcessor

    processor = ViltImageProcessor(size={"shortest_edge": shortest}, size_divisor=divisor)  # type: ignore[call-arg]
    sizes = [*EXTREME_SIZES, (20000, 1), (1, 5000), (1, 1), (3, 2), (640, 480), (1200, 100), (700, 20)]
    for size in sizes:
        image = Image.new("RGB", size, (200, 10, 10))
        fitted = fit_aspect(image, processor, patch)
        pixels = processor(images=[fitted], return_tensors="pt")["pixel_values"]
        assert pixels.shape[-2] >= patch and pixels.shape[-1] >= patch, (size, fitted.size, pixels.shape)
        # The long side keeps its orientation: a panorama stays wider than tall.
        assert (fitted.width >= fitted.height) == (size[0] >= size[1]), (size, fitted.size)
    # Images the processor takes as they are pass through untouched (the very same object).
    ordinary = Image.new("RGB", (640, 480))
    assert fit_aspect(ordinary, processor, patch) is ordinary


def test_fit_aspect_pads_no_more_than_needed() -> None:
    from transformers import ViltImageProcessor

    processor = ViltImageProcessor(size={"shortest_edge": 384}, size_divisor=32)  # type: ignore[call-arg]
    # ViLT-B/32: long side capped at int(1333 / 800 * 384) = 639, so the widest it takes is 639 / 32.
    assert fit_aspect(Image.new("RGB", (1900, 100)), processor, 32).size == (1900, 100)
    wide = fit_aspect(Image.new("RGB", (2200, 100)), processor, 32)
    assert wide.width / wide.height <= 639 / 32 < wide.width / (wide.height - 1)


def test_central_window_keeps_what_clip_crops_and_bounds_the_work() -> None:
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    image = extreme_image(7, (3000, 20))
    window = central_window(image, processor)
    assert window.size == (WINDOW_ASPECT * 20, 20)
    # Up to WINDOW_ASPECT:1 nothing changes.
    ordinary = extreme_image(8, (WINDOW_ASPECT * 20, 20))
    assert central_window(ordinary, processor) is ordinary
    full = processor(images=[image], return_tensors="pt")["pixel_values"]
    kept = processor(images=[window], return_tensors="pt")["pixel_values"]
    assert full.shape == kept.shape
    # The same centre, up to where a pixel boundary falls after the two resizes.
    assert float((full - kept).abs().mean()) < 0.1
    # A real CLIP config (shortest edge 224) would resize 20000x2 to 2.2 gigapixels without the window.
    real = CLIPImageProcessor(size={"shortest_edge": 224}, crop_size={"height": 224, "width": 224})
    started = time.perf_counter()
    out = real(images=[central_window(Image.new("RGB", (20000, 2)), real)], return_tensors="pt")
    assert out["pixel_values"].shape == (1, 3, 224, 224)
    assert time.perf_counter() - started < 5.0


# -- indexing -----------------------------------------------------------------------------------------


def _index_mixed(
    tmp_path: Path, mixed: tuple[Path, list[Path], list[Path]], prefilter: DualEncoder, reranker: Reranker
) -> None:
    folder, normal, extreme = mixed
    search_index = sqlite_library(tmp_path / "index")
    try:
        report = index_folder(search_index, prefilter, reranker, folder, batch_size=4)
        assert report.skipped == [], report.skipped
        assert report.added == len(normal) + len(extreme)
        states = search_index.store.file_states()
        assert set(states) == resolved(normal + extreme)
        records = search_index.store.images(sorted(s.id for s in states.values()))
        tokens = search_index.patches().load([(r.patch_offset, r.patch_tokens) for r in records.values()])
        assert all(t.shape[0] > 1 and np.isfinite(t).all() for t in tokens)
        # The folder is finished: a second run has nothing left to do.
        again = index_folder(search_index, prefilter, reranker, folder, batch_size=4)
        assert (again.added, again.unchanged, again.skipped) == (0, len(normal) + len(extreme), [])
    finally:
        search_index.close()


def test_extreme_images_are_indexed_with_the_tiny_models(
    tmp_path: Path, mixed: tuple[Path, list[Path], list[Path]], tiny_models: tuple[Any, Any]
) -> None:
    _index_mixed(tmp_path, mixed, *tiny_models)


def test_extreme_images_are_indexed_with_the_shapes_model(
    tmp_path: Path, mixed: tuple[Path, list[Path], list[Path]], shapes_models: tuple[DualEncoder, Reranker]
) -> None:
    _index_mixed(tmp_path, mixed, *shapes_models)


class PoisonedReranker:
    """A reranker whose ``embed_image`` raises for images of one size."""

    def __init__(self, inner: Reranker, poison: tuple[int, int]) -> None:
        self.inner, self.poison = inner, poison
        self.name, self.fingerprint, self.hidden = inner.name, inner.fingerprint, inner.hidden

    def embed_image(self, image: Image.Image) -> np.ndarray:
        if image.size == self.poison:
            raise RuntimeError("poisoned image\nsecond line")
        return self.inner.embed_image(image)

    def score_pairs(
        self,
        texts: Sequence[str],
        images: Sequence[np.ndarray],
        pairs: Sequence[tuple[int, int]],
        on_progress: ProgressFn | None = None,
    ) -> np.ndarray:
        return self.inner.score_pairs(texts, images, pairs, on_progress)


class PoisonedPrefilter:
    """A prefilter whose ``encode_images`` raises for any batch holding an image of one size."""

    def __init__(self, inner: DualEncoder, poison: tuple[int, int]) -> None:
        self.inner, self.poison = inner, poison
        self.name, self.fingerprint, self.dim = inner.name, inner.fingerprint, inner.dim
        self.logit_scale = inner.logit_scale

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        if any(img.size == self.poison for img in images):
            raise ValueError("poisoned batch")
        return self.inner.encode_images(images)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.inner.encode_texts(texts)


@pytest.mark.parametrize("where", ["reranker", "prefilter"])
def test_a_failing_image_is_skipped_alone(tmp_path: Path, tiny_models: tuple[Any, Any], where: str) -> None:
    pre, rer = tiny_models
    poison_size = (77, 55)
    folder = tmp_path / "photos"
    normal = write_images(folder, 5)
    poison = folder / "img_0002_poison.png"
    extreme_image(3, poison_size).save(poison)
    if where == "reranker":
        rer = PoisonedReranker(rer, poison_size)
    else:
        pre = PoisonedPrefilter(pre, poison_size)
    search_index = sqlite_library(tmp_path / "index")
    try:
        # One batch holds all six files.
        report = index_folder(search_index, pre, rer, folder, batch_size=16)
        assert report.added == len(normal)
        assert [p for p, _ in report.skipped] == [str(poison.resolve())]
        reason = report.skipped[0][1]
        assert "poisoned" in reason and "\n" not in reason
        assert set(search_index.store.file_states()) == resolved(normal)
        # The bad file is tried again next time (it may be fixed), and again loses nothing.
        again = index_folder(search_index, pre, rer, folder, batch_size=16)
        assert (again.added, again.unchanged) == (0, len(normal))
        assert [p for p, _ in again.skipped] == [str(poison.resolve())]
    finally:
        search_index.close()


# -- queries ------------------------------------------------------------------------------------------


def run_cli(*args: str | Path, home: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "RETRIEVER_HOME": str(home), **env}
    return subprocess.run(
        [sys.executable, "-m", "retriever", *map(str, args)], capture_output=True, text=True, env=full_env
    )


def test_cli_searches_captions_with_extreme_images(
    tmp_path: Path, mixed: tuple[Path, list[Path], list[Path]], tiny_clip_dir: Path, tiny_vilt_dir: Path
) -> None:
    folder, normal, extreme = mixed
    home = tmp_path / "home"
    env = {"RETRIEVER_PREFILTER": str(tiny_clip_dir), "RETRIEVER_RERANKER": str(tiny_vilt_dir)}
    # Only the ordinary images are indexed: the queries alone must cope with the extreme ones.
    indexed = run_cli("index", folder / "normal", "--json", home=home, env=env)
    assert indexed.returncode == 0, indexed.stderr
    assert json.loads(indexed.stdout)["added"] == len(normal)
    captions = tmp_path / "caps.jsonl"
    captions.write_text('{"id": "c1", "text": "a red line"}\n{"id": "c2", "text": "a blue tower"}\n')
    assert run_cli("texts", "add", captions, home=home, env=env).returncode == 0
    for query in (extreme[0], extreme[-1]):  # 30000x200 and 100x2200
        proc = run_cli("search", "--image", query, "--texts", "--json", home=home, env=env)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
        answer = json.loads(proc.stdout)
        assert {r["id"] for r in answer["results"]} == {"c1", "c2"}
        # ViLT ran on the query image: the rerank embedded it and the scores are fused ones.
        assert "embed" in answer["seconds"] and "rerank" in answer["seconds"]
        assert all(r["score"] != r["prefilter_score"] for r in answer["results"])


@pytest.fixture
def client(
    tmp_path: Path,
    mixed: tuple[Path, list[Path], list[Path]],
    tiny_models: tuple[Any, Any],
    tiny_clip_dir: Path,
    tiny_vilt_dir: Path,
) -> Iterator[TestClient]:
    """The API over an index of the ordinary images and two captions (SQLite); errors come back as answers."""
    pre, rer = tiny_models
    home = tmp_path / "index"
    search_index = sqlite_library(home)
    try:
        index_folder(search_index, pre, rer, mixed[0] / "normal")
        vectors = pre.encode_texts(["a red line", "a blue tower"])
        search_index.commit_texts([("c1", "a red line", vectors[0]), ("c2", "a blue tower", vectors[1])])
    finally:
        search_index.close()
    settings = Settings(
        index_dir=home,
        db_url=f"sqlite:///{home / 'store.db'}",
        prefilter=str(tiny_clip_dir),
        reranker=str(tiny_vilt_dir),
        device="cpu",
    )
    app = create_app(settings, loader=GatedLoader(pre, CountingReranker(rer)))
    # A server error comes back as the 500 a user would see, not as the exception; the Host is one any
    # server answers to.
    with TestClient(app, base_url="http://localhost", raise_server_exceptions=False) as test_client:
        wait_ready(test_client)
        yield test_client


def test_api_image_search_with_extreme_images(
    client: TestClient, mixed: tuple[Path, list[Path], list[Path]]
) -> None:
    for query in mixed[2]:
        files = {"file": (query.name, query.read_bytes(), "image/png")}
        texts = client.post("/v1/search/image", files=files, data={"target": "texts"})
        assert texts.status_code == 200, texts.text
        assert {h["id"] for h in texts.json()["data"]} == {"c1", "c2"}
        assert all(h["rerank_score"] is not None for h in texts.json()["data"])
        images = client.post("/v1/search/image", files=files, data={"target": "images", "k": "3"})
        assert images.status_code == 200, images.text
        assert images.json()["count"] == 3
