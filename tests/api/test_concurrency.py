"""Searches during an index job, and concurrent searches sharing rerank batches, through the real app."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from retriever.search import search_text
from retriever.search_index import SearchIndex
from tests.api.conftest import AppFactory, GatedLoader, wait_job
from tests.conftest import write_images


def _consistent(body: dict[str, Any], k: int, known: set[str]) -> None:
    hits = body["data"]
    assert body["count"] == len(hits) <= k
    assert [h["rank"] for h in hits] == list(range(1, len(hits) + 1))
    assert len({h["id"] for h in hits}) == len(hits)
    scores = [(h["score"], h["prefilter_score"]) for h in hits]
    assert scores == sorted(scores, reverse=True)
    assert all(h["path"] in known and h["rerank_score"] is not None for h in hits)


def test_queries_are_answered_while_an_index_job_runs(
    indexed: Path, make_client: AppFactory, tmp_path: Path, photos: Path
) -> None:
    client = make_client()
    more = write_images(tmp_path / "root" / "more", 100, start_seed=1000)
    known = {str(p.resolve()) for p in [*photos.iterdir(), *more]}
    job = client.post("/v1/index", json={"path": "more"}).json()
    seen_counts: set[int] = set()
    bodies: list[dict[str, Any]] = []
    errors: list[str] = []
    stop = threading.Event()

    def query(i: int) -> None:
        while not stop.is_set():
            response = client.get("/v1/search", params={"q": f"picture {i}", "k": 5, "candidates": 8})
            if response.status_code != 200:
                errors.append(response.text)
                return
            bodies.append(response.json())
            seen_counts.add(client.get("/health").json()["images"])

    with ThreadPoolExecutor(4) as pool:
        for i in range(4):
            pool.submit(query, i)
        try:
            done = wait_job(client, job["id"], timeout=120)
        finally:
            stop.set()
    assert not errors, errors[:3]
    assert done["state"] == "done" and done["report"]["added"] == 100, done
    assert len(bodies) >= 8
    for body in bodies:
        _consistent(body, 5, known)
    # Queries ran while the index grew, not only before or after it.
    assert any(8 < n < 108 for n in seen_counts), seen_counts
    after = client.get("/v1/search", params={"q": "picture", "k": 100, "rerank": "false"}).json()
    assert after["count"] == 100
    assert client.get("/health").json()["images"] == 108


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_concurrent_searches_share_rerank_batches(
    indexed: Path, make_client: AppFactory, loader: GatedLoader, db_url: str, tiny_models: tuple[Any, Any]
) -> None:
    client = make_client(rerank_batch_wait_s=0.2)
    queries = [f"a photo of thing {i}" for i in range(8)]
    before = loader.reranker.calls
    start = threading.Barrier(len(queries))

    def search(q: str) -> dict[str, Any]:
        start.wait()
        response = client.get("/v1/search", params={"q": q, "k": 4, "candidates": 6})
        assert response.status_code == 200, response.text
        return dict(response.json())

    t0 = time.monotonic()
    with ThreadPoolExecutor(len(queries)) as pool:
        bodies = list(pool.map(search, queries))
    assert time.monotonic() - t0 < 30
    assert loader.reranker.calls - before < len(queries)

    pre, rer = tiny_models
    search_index = SearchIndex(indexed, db_url)
    try:
        for q, body in zip(queries, bodies, strict=True):
            alone = search_text(search_index, pre, rer, q, k=4, candidates=6)
            assert [h["id"] for h in body["data"]] == [h.id for h in alone.hits]
            for got, want in zip(body["data"], alone.hits, strict=True):
                assert got["score"] == pytest.approx(want.score, abs=1e-4)
    finally:
        search_index.close()


@pytest.mark.parametrize("db_url", ["sqlite"], indirect=True)
def test_a_second_index_job_waits_for_the_first(make_client: AppFactory, tmp_path: Path, db_url: str) -> None:
    client = make_client()
    write_images(tmp_path / "root" / "a", 40)
    write_images(tmp_path / "root" / "b", 4, start_seed=500)
    first = client.post("/v1/index", json={"path": "a"}).json()
    second = client.post("/v1/index", json={"path": "b"}).json()
    states: set[tuple[str, str]] = set()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        # Read the second job before the first: if the second is running, the first must have been
        # done already when it is read next. The other order would race with the hand-over.
        later = client.get(f"/v1/jobs/{second['id']}").json()["state"]
        earlier = client.get(f"/v1/jobs/{first['id']}").json()["state"]
        pair = (earlier, later)
        states.add(pair)
        if pair == ("done", "done"):
            break
        assert "failed" not in pair
    assert ("done", "done") in states
    assert ("running", "running") not in states
    assert all(a == "done" for a, b in states if b == "running"), states
    assert wait_job(client, second["id"])["report"]["added"] == 4
    assert client.get("/health").json()["images"] == 44
