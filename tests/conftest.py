"""Shared fixtures: tiny random models saved like real checkpoints, and generated images.

Nothing here reaches the network: the hub is switched to offline mode before transformers loads.
"""

from __future__ import annotations

import os
import subprocess

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sqlalchemy import Engine, create_engine, text
from sqlalchemy.engine import make_url

from tests.tiny_models import make_tiny_clip, make_tiny_vilt

#: The PostgreSQL server every development and CI machine runs (trust auth).
PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def pg_admin_engine() -> Engine:
    """An AUTOCOMMIT engine on the server's maintenance database, to create and drop test databases."""
    return create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": 5})


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh, empty database of each backend."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'store.db'}"
        return
    if os.environ.get("RETRIEVER_SKIP_POSTGRES") == "1":
        pytest.skip("RETRIEVER_SKIP_POSTGRES=1")
    name = f"retriever_test_{uuid.uuid4().hex}"
    admin = pg_admin_engine()
    problem = ""
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    except Exception as exc:
        cause = getattr(exc, "orig", None) or exc
        problem = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    if problem:  # failed outside the except block, so the report is one readable line
        admin.dispose()
        pytest.fail(
            f"PostgreSQL at {PG_ADMIN_URL} is not reachable ({problem}); start it, or set "
            "RETRIEVER_SKIP_POSTGRES=1 to skip the PostgreSQL cases",
            pytrace=False,
        )
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.execute(
                text("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = :n"), {"n": name}
            )
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


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


@contextmanager
def mounted_tmpfs(where: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` (``1m``, ``4m``) mounted at a new folder ``where`` for one test, to fill a disk
    for real; the test is skipped where this machine does not allow mounting."""
    where.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip() or proc.returncode})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)
