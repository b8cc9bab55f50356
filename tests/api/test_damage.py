"""A damaged index answers 503 with the reason, and a server follows an index rebuilt by another process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retriever.indexing import index_folder
from retriever.search import search_text
from retriever.search_index import SearchIndex
from tests.api.conftest import AppFactory
from tests.conftest import write_images


def _cache(home: Path) -> Path:
    (path,) = home.glob("patches-*")
    return path


def test_non_finite_tokens_answer_503_with_the_reason(indexed: Path, make_client: AppFactory) -> None:
    client = make_client()
    assert client.get("/v1/search", params={"q": "a red square"}).status_code == 200
    data = np.memmap(_cache(indexed), dtype=np.float16, mode="r+")
    data[:] = np.nan
    data.flush()
    del data

    answer = client.get("/v1/search", params={"q": "a red square", "candidates": 8})

    assert answer.status_code == 503
    assert "not finite" in answer.json()["detail"]


def test_a_cut_patch_cache_answers_503_with_the_repair(indexed: Path, make_client: AppFactory) -> None:
    client = make_client()
    with open(_cache(indexed), "r+b") as f:
        f.truncate(8)

    answer = client.get("/v1/search", params={"q": "a red square", "candidates": 8})

    assert answer.status_code == 503
    assert "patch cache" in answer.json()["detail"] and "retriever index" in answer.json()["detail"]


def test_a_running_server_follows_a_rebuild_by_another_process(
    tmp_path: Path, db_url: str, indexed: Path, make_client: AppFactory, tiny_models: tuple[Any, Any]
) -> None:
    pre, rer = tiny_models
    client = make_client()
    params: dict[str, str | int] = {"q": "a red square", "k": 5, "candidates": 5}
    assert client.get("/v1/search", params=params).status_code == 200
    other = tmp_path / "other"
    write_images(other, 5, start_seed=300)

    cli = SearchIndex(indexed, db_url)  # `retriever index other --rebuild` in another process
    index_folder(cli, pre, rer, other, rebuild=True)
    expected = search_text(cli, pre, rer, "a red square", k=5, candidates=5).hits
    cli.close()

    served = client.get("/v1/search", params=params).json()["data"]
    assert [h["id"] for h in served] == [h.id for h in expected]
    assert [h["rerank_score"] for h in served] == pytest.approx([h.rerank_score for h in expected], abs=1e-4)


def test_a_database_failing_mid_request_answers_503_with_retry_after(
    db_url: str, indexed: Path, make_client: AppFactory
) -> None:
    from sqlalchemy import create_engine, text

    from retriever.index.database import normalize_url

    client = make_client()
    engine = create_engine(normalize_url(db_url))
    with engine.begin() as conn:
        conn.execute(text("DROP TABLE texts"))
    engine.dispose()

    answer = client.get("/health")

    assert answer.status_code == 503 and answer.headers["retry-after"] == "10"
    assert answer.json()["detail"].startswith("the database is unavailable (")


def test_a_refused_write_is_503_not_a_bad_request() -> None:
    # A full disk under the segment store is the machine's refusal, not the client's mistake.
    from retriever.api.errors import status_of
    from retriever.errors import ResourceError
    from retriever.index.blobs import BlobStoreFullError

    assert status_of(ResourceError("disk full")) == 503
    assert issubclass(BlobStoreFullError, ResourceError)
