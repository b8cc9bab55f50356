"""Fixtures for the API tests: the real app over a real index, with the tiny models and generated images.

Model loading goes through ``GatedLoader``: it hands out the session's tiny models once its gate is open,
so a test can hold the server in its loading state, and it wraps the reranker to count forward calls.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from PIL import Image

from retriever.api.app import create_app
from retriever.api.settings import LOOPBACK_HOSTS, Settings
from retriever.encoders import DualEncoder
from retriever.indexing import index_folder
from retriever.rerank import ProgressFn, Reranker
from retriever.search_index import SearchIndex
from tests.conftest import write_images

API_KEY = "s3cret-key"
#: The Host names the test apps answer to: TestClient (and schemathesis) send "testserver", which the
#: product's defaults rightly refuse.
TEST_HOSTS = (*LOOPBACK_HOSTS, "testserver")


class CountingReranker:
    """A reranker that counts its ``score_pairs`` calls and the pairs they scored."""

    def __init__(self, inner: Reranker) -> None:
        self.inner = inner
        self.name, self.fingerprint, self.hidden = inner.name, inner.fingerprint, inner.hidden
        self.calls = 0
        self.pairs = 0
        self._lock = threading.Lock()

    def embed_image(self, image: Image.Image) -> np.ndarray:
        return self.inner.embed_image(image)

    def score_pairs(
        self,
        texts: Sequence[str],
        images: Sequence[np.ndarray],
        pairs: Sequence[tuple[int, int]],
        on_progress: ProgressFn | None = None,
    ) -> np.ndarray:
        with self._lock:
            self.calls += 1
            self.pairs += len(pairs)
        return self.inner.score_pairs(texts, images, pairs, on_progress)


@dataclass
class GatedLoader:
    """A ``ModelLoader`` that returns the tiny models once ``gate`` is set (it is, unless a test clears it).

    ``fail_with``, when set, is raised in place of loading the reranker.
    """

    prefilter: DualEncoder
    reranker: CountingReranker
    gate: threading.Event = field(default_factory=threading.Event)
    fail_with: Exception | None = None

    def __post_init__(self) -> None:
        self.gate.set()

    def load_prefilter(self, model_id: str, device: torch.device) -> DualEncoder:
        self.gate.wait(30)
        return self.prefilter

    def load_reranker(self, model_id: str, device: torch.device) -> Reranker:
        if self.fail_with is not None:
            raise self.fail_with
        return self.reranker


@pytest.fixture
def loader(tiny_models: tuple[Any, Any]) -> GatedLoader:
    pre, rer = tiny_models
    return GatedLoader(pre, CountingReranker(rer))


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """A folder of 8 generated images (inside the server's root)."""
    root = tmp_path / "root" / "photos"
    write_images(root, 8)
    return root


@pytest.fixture
def indexed(tmp_path: Path, db_url: str, photos: Path, tiny_models: tuple[Any, Any]) -> Path:
    """An index dir over ``photos`` and two captions, on the ``db_url`` backend."""
    pre, rer = tiny_models
    home = tmp_path / "index"
    search_index = SearchIndex(home, db_url)
    try:
        index_folder(search_index, pre, rer, photos)
        vectors = pre.encode_texts(["a red square", "a blue circle"])
        search_index.commit_texts([("c1", "a red square", vectors[0]), ("c2", "a blue circle", vectors[1])])
    finally:
        search_index.close()
    return home


AppFactory = Callable[..., TestClient]


@pytest.fixture
def make_settings(
    tmp_path: Path, db_url: str, tiny_clip_dir: Path, tiny_vilt_dir: Path
) -> Callable[..., Settings]:
    """Settings like ``make_client``'s (overridable by keyword), for a test that runs the app itself."""
    (tmp_path / "root").mkdir(exist_ok=True)

    def make(**overrides: Any) -> Settings:
        fields: dict[str, Any] = {
            "index_dir": tmp_path / "index",
            "db_url": db_url,
            "prefilter": str(tiny_clip_dir),
            "reranker": str(tiny_vilt_dir),
            "device": "cpu",
            "roots": ((tmp_path / "root").resolve(),),
            "allowed_hosts": TEST_HOSTS,
            **overrides,
        }
        return Settings(**fields)

    return make


@pytest.fixture
def make_client(make_settings: Callable[..., Settings], loader: GatedLoader) -> Iterator[AppFactory]:
    """Start the app (settings overridable by keyword) and return a TestClient; all are shut down after."""
    clients: list[TestClient] = []

    def make(wait: bool = True, **overrides: Any) -> TestClient:
        client = TestClient(create_app(make_settings(**overrides), loader=loader))
        client.__enter__()
        clients.append(client)
        if wait:
            wait_ready(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def wait_loaded(client: TestClient, timeout: float = 30.0) -> dict[str, Any]:
    """Poll /health until the models are loaded or failed to; returns the last answer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = client.get("/health").json()
        if body["status"] != "loading":
            return body
        time.sleep(0.01)
    raise AssertionError("the models did not load in time")


def wait_ready(client: TestClient, timeout: float = 30.0) -> None:
    """Poll /health until the models are loaded."""
    body = wait_loaded(client, timeout)
    assert body["status"] == "ok", body


def wait_job(client: TestClient, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll a job until it is done or failed; returns its last state."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job: dict[str, Any] = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in ("done", "failed"):
            return job
        time.sleep(0.02)
    raise AssertionError(f"job {job_id} did not finish in time")


def png_bytes(seed: int = 0, size: tuple[int, int] = (64, 48)) -> bytes:
    """A generated PNG image."""
    import io

    from tests.conftest import random_image

    buf = io.BytesIO()
    random_image(seed, size).save(buf, format="PNG")
    return buf.getvalue()
