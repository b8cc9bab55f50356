"""Every endpoint of the real app, its happy paths and its errors, on SQLite and on PostgreSQL."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from retriever.captions import caption_id
from retriever.errors import ModelNotFoundError
from retriever.search import search_text
from retriever.search_index import SearchIndex
from tests.api.conftest import API_KEY, AppFactory, GatedLoader, png_bytes, wait_job, wait_loaded, wait_ready
from tests.conftest import write_images


def _is_error(response: Any, status: int) -> None:
    request = response.request
    assert response.status_code == status, f"{request.method} {request.url}: {response.text}"
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert isinstance(body["detail"], str) and body["detail"]


# -- health, status, page -----------------------------------------------------------------------------


def test_health_status_page_and_openapi(indexed: Path, make_client: AppFactory, db_url: str) -> None:
    client = make_client()
    assert client.get("/health").json() == {
        "status": "ok",
        "loading": [],
        "images": 8,
        "texts": 2,
        "error": None,
    }
    status = client.get("/v1/status").json()
    search_index = SearchIndex(indexed, db_url)
    try:
        expected = search_index.status()
    finally:
        search_index.close()
    # Without the API key the paths are hidden (tests/api/test_security.py); the rest is the engine's.
    assert set(status) <= set(expected)
    assert status == {k: expected[k] for k in status} | {"index_dir": None, "database": None}
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert client.get("/static/app.js").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/health", "/v1/search", "/v1/search/image", "/v1/images/{image_id}", "/v1/index"} <= set(paths)


# -- text search --------------------------------------------------------------------------------------


def test_text_search_matches_the_library_search(
    indexed: Path, make_client: AppFactory, db_url: str, tiny_models: tuple[Any, Any], photos: Path
) -> None:
    client = make_client()
    body = client.get("/v1/search", params={"q": "  a red   square ", "k": 3, "candidates": 5}).json()
    assert body["query"] == "a red square"
    assert body["count"] == 3 == len(body["data"])
    assert [h["rank"] for h in body["data"]] == [1, 2, 3]
    assert {"encode", "prefilter", "rerank", "total"} <= set(body["seconds"])
    pre, rer = tiny_models
    search_index = SearchIndex(indexed, db_url)
    try:
        reference = search_text(search_index, pre, rer, "a red square", k=3, candidates=5)
    finally:
        search_index.close()
    assert [h["id"] for h in body["data"]] == [h.id for h in reference.hits]
    for got, want in zip(body["data"], reference.hits, strict=True):
        assert got["score"] == pytest.approx(want.score, abs=1e-4)
        # The ranking score is the ITM logit plus the prefilter's logit (search.fused_score).
        fused = got["rerank_score"] + pre.logit_scale * got["prefilter_score"]
        assert got["score"] == pytest.approx(fused, abs=1e-3)
        assert got["prefilter_score"] == pytest.approx(want.prefilter_score, abs=1e-5)
        assert got["path"] == want.path and got["filename"] == os.path.basename(want.path or "")
        assert Path(got["path"]).parent == photos.resolve()

    plain = client.get("/v1/search", params={"q": "a red square", "k": 8, "rerank": "false"}).json()
    assert plain["count"] == 8
    assert all(h["rerank_score"] is None and h["score"] == h["prefilter_score"] for h in plain["data"])
    scores = [h["score"] for h in plain["data"]]
    assert scores == sorted(scores, reverse=True)


def test_search_on_an_empty_index_finds_nothing(make_client: AppFactory) -> None:
    client = make_client()
    assert client.get("/v1/search", params={"q": "anything"}).json()["data"] == []
    upload = {"file": ("q.png", png_bytes(), "image/png")}
    assert client.post("/v1/search/image", files=upload).json()["count"] == 0
    texts = client.post("/v1/search/image", files=upload, data={"target": "texts"}).json()
    assert texts["target"] == "texts" and texts["data"] == []


BAD_SEARCHES: list[dict[str, Any]] = [
    {},
    {"q": ""},
    {"q": "   \t "},
    {"q": "x" * 1001},
    {"q": "dog", "k": 0},
    {"q": "dog", "k": 101},
    {"q": "dog", "k": "ten"},
    {"q": "dog", "candidates": 0},
    {"q": "dog", "candidates": 1001},
    {"q": "dog", "rerank": "perhaps"},
]


def test_bad_search_parameters_are_422(make_client: AppFactory) -> None:
    client = make_client()
    for params in BAD_SEARCHES:
        _is_error(client.get("/v1/search", params=params), 422)


# -- image search -------------------------------------------------------------------------------------


def test_image_search_finds_the_same_image_and_captions(
    indexed: Path, make_client: AppFactory, photos: Path
) -> None:
    client = make_client()
    query = sorted(photos.iterdir())[2]
    files = {"file": (query.name, query.read_bytes(), "image/png")}
    same = client.post("/v1/search/image", files=files, data={"k": "3"}).json()
    assert same["target"] == "images" and same["query"] == query.name
    assert same["data"][0]["path"] == str(query.resolve())
    assert same["data"][0]["score"] == pytest.approx(1.0, abs=1e-4)
    assert same["data"][0]["rerank_score"] is None

    texts = client.post("/v1/search/image", files=files, data={"target": "texts", "k": "5"}).json()
    assert texts["target"] == "texts" and texts["count"] == 2
    assert {h["id"] for h in texts["data"]} == {"c1", "c2"}
    assert {h["text"] for h in texts["data"]} == {"a red square", "a blue circle"}
    assert all(h["rerank_score"] is not None and h["score"] != h["rerank_score"] for h in texts["data"])
    assert [h["score"] for h in texts["data"]] == sorted((h["score"] for h in texts["data"]), reverse=True)
    plain = client.post("/v1/search/image", files=files, data={"target": "texts", "rerank": "false"}).json()
    assert all(h["rerank_score"] is None for h in plain["data"])


def test_bad_uploads(make_client: AppFactory) -> None:
    client = make_client(max_upload_bytes=50_000, max_upload_pixels=100 * 100)
    good = png_bytes(0, (64, 48))

    def post(data: bytes, **form: str) -> Any:
        return client.post("/v1/search/image", files={"file": ("q.png", data, "image/png")}, data=form)

    assert post(good).status_code == 200
    _is_error(post(b"this is not an image"), 422)
    _is_error(post(good[: len(good) // 2]), 422)
    _is_error(post(b""), 422)
    _is_error(post(good, target="everything"), 422)
    _is_error(post(good, k="0"), 422)
    _is_error(client.post("/v1/search/image", data={"k": "3"}), 422)
    # Over the byte limit: random bytes do not compress, so this PNG is far over 50 kB.
    big = png_bytes(1, (200, 200))
    assert len(big) > 50_000
    _is_error(post(big), 413)
    # Over the pixel limit but small in bytes: a flat 1000×1000 PNG.
    buf = io.BytesIO()
    Image.new("RGB", (1000, 1000), (10, 20, 30)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 50_000
    response = post(buf.getvalue())
    _is_error(response, 413)
    assert "pixels" in response.json()["detail"]
    # A body over the limit is refused from its Content-Length, before it is read.
    _is_error(
        client.post("/v1/search/image", content=b"x" * 200_000, headers={"content-type": "image/png"}), 413
    )


# -- images -------------------------------------------------------------------------------------------


def test_image_metadata_thumbnail_and_file(indexed: Path, make_client: AppFactory, photos: Path) -> None:
    client = make_client()
    listing = client.get("/v1/images", params={"limit": 3, "offset": 2}).json()
    assert listing["count"] == 8 and len(listing["data"]) == 3
    image = listing["data"][0]
    meta = client.get(f"/v1/images/{image['id']}").json()
    assert meta == image
    assert set(meta) == {
        "id", "path", "filename", "size", "mtime", "width", "height", "content_hash", "indexed_at",
        "prefilter_model", "reranker_model",
    }  # fmt: skip
    original = Path(meta["path"])
    assert meta["filename"] == original.name and meta["size"] == original.stat().st_size

    thumb = client.get(f"/v1/images/{image['id']}/thumbnail", params={"size": 32})
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(thumb.content)) as img:
        assert img.format == "JPEG" and max(img.size) == 32
    assert list((indexed / "thumbs").glob(f"{image['id']}-32-*.jpg"))
    again = client.get(f"/v1/images/{image['id']}/thumbnail", params={"size": 32})
    assert again.content == thumb.content

    file = client.get(f"/v1/images/{image['id']}/file")
    assert file.status_code == 200 and file.content == original.read_bytes()
    assert file.headers["content-type"] == "image/png"

    for bad_size in (31, 1025):
        _is_error(client.get(f"/v1/images/{image['id']}/thumbnail", params={"size": bad_size}), 422)
    original.unlink()
    _is_error(client.get(f"/v1/images/{image['id']}/file"), 404)
    _is_error(client.get(f"/v1/images/{image['id']}/thumbnail", params={"size": 64}), 404)


WEIRD_URLS: list[tuple[str, int]] = [
    ("/v1/images/999999", 404),
    ("/v1/images/999999/thumbnail", 404),
    ("/v1/images/999999/file", 404),
    ("/v1/images/0", 422),
    ("/v1/images/-3/file", 422),
    ("/v1/images/99999999999999999999/file", 422),
    ("/v1/images/abc", 422),
    ("/v1/images/..%2F..%2Fetc/file", 404),
    ("/v1/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd/file", 404),
    ("/v1/images/1%00/file", 422),
    ("/v1/jobs/no-such-job", 404),
    ("/v1/nothing-here", 404),
]


def test_unknown_and_weird_ids(indexed: Path, make_client: AppFactory) -> None:
    client = make_client()
    for url, status in WEIRD_URLS:
        response = client.get(url)
        _is_error(response, status)
        assert b"root:" not in response.content


def test_delete_needs_the_key_and_removes_the_image(indexed: Path, make_client: AppFactory) -> None:
    client = make_client(api_key=API_KEY)
    ids = [h["id"] for h in client.get("/v1/images").json()["data"]]
    client.get(f"/v1/images/{ids[0]}/thumbnail", params={"size": 32})
    _is_error(client.delete(f"/v1/images/{ids[0]}"), 401)
    _is_error(client.delete(f"/v1/images/{ids[0]}", headers={"X-API-Key": "wrong"}), 401)
    _is_error(client.delete(f"/v1/images/{ids[0]}", headers={"Authorization": "Bearer wrong"}), 401)
    _is_error(client.delete(f"/v1/images/{ids[0]}", headers={b"X-API-Key": "s3cret-kéy".encode()}), 401)
    response = client.delete(f"/v1/images/{ids[0]}", headers={"X-API-Key": API_KEY})
    assert response.status_code == 204 and response.content == b""
    assert not list((indexed / "thumbs").glob(f"{ids[0]}-*.jpg"))
    _is_error(client.get(f"/v1/images/{ids[0]}"), 404)
    _is_error(client.delete(f"/v1/images/{ids[0]}", headers={"X-API-Key": API_KEY}), 404)
    bearer = {"Authorization": f"Bearer {API_KEY}"}
    assert client.delete(f"/v1/images/{ids[1]}", headers=bearer).status_code == 204
    found = client.get("/v1/search", params={"q": "a red square", "k": 100, "rerank": "false"}).json()
    assert found["count"] == 6 and not {ids[0], ids[1]} & {h["id"] for h in found["data"]}
    assert client.get("/health").json()["images"] == 6


# -- indexing jobs ------------------------------------------------------------------------------------


def test_index_job_indexes_a_folder_inside_a_root(make_client: AppFactory, tmp_path: Path) -> None:
    client = make_client(api_key=API_KEY)
    new = tmp_path / "root" / "new"
    write_images(new, 5, start_seed=100)
    (new / "broken.jpg").write_bytes(b"\xff\xd8\xff nonsense")
    _is_error(client.post("/v1/index", json={"path": str(new)}), 401)
    response = client.post("/v1/index", json={"path": "new"}, headers={"X-API-Key": API_KEY})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["state"] in ("queued", "running") and job["path"] == str(new.resolve())
    assert response.headers["location"] == f"/v1/jobs/{job['id']}"
    done = wait_job(client, job["id"])
    assert done["state"] == "done", done
    assert done["error"] is None and done["done"] == done["total"] == 6
    assert done["report"]["added"] == 5
    assert [s["path"] for s in done["report"]["skipped"]] == [str((new / "broken.jpg").resolve())]
    assert client.get("/health").json()["images"] == 5
    hits = client.get("/v1/search", params={"q": "anything", "k": 5}).json()["data"]
    assert {Path(h["path"]).parent for h in hits} == {new.resolve()}


def test_index_paths_outside_the_roots_are_refused(make_client: AppFactory, tmp_path: Path) -> None:
    client = make_client()
    elsewhere = tmp_path / "elsewhere"
    write_images(elsewhere, 1)
    (tmp_path / "root" / "link").symlink_to(elsewhere)
    for path in (
        str(elsewhere),
        "../elsewhere",
        "../../etc/passwd",
        "/etc/passwd",
        "/",
        str(tmp_path / "root" / ".." / "elsewhere"),
        "link",
        str(tmp_path / "rootkit"),
    ):
        response = client.post("/v1/index", json={"path": path})
        _is_error(response, 403)
        assert "outside" in response.json()["detail"]
    _is_error(client.post("/v1/index", json={"path": "not/there"}), 404)
    _is_error(client.post("/v1/index", json={"path": ""}), 422)
    _is_error(client.post("/v1/index", json={"path": "a\x00b"}), 422)
    _is_error(client.post("/v1/index", json={}), 422)
    _is_error(client.post("/v1/index", json={"path": "x", "other": 1}), 422)
    _is_error(
        client.post("/v1/index", content=b"{not json", headers={"content-type": "application/json"}), 422
    )


def test_index_without_roots_is_off(make_client: AppFactory, tmp_path: Path) -> None:
    response = make_client(roots=()).post("/v1/index", json={"path": str(tmp_path)})
    _is_error(response, 403)
    assert "--root" in response.json()["detail"]


def test_writers_from_another_process_are_respected(
    indexed: Path, make_client: AppFactory, db_url: str
) -> None:
    client = make_client()
    other = SearchIndex(indexed, db_url)
    try:
        # flock locks belong to an open file, so this behaves as another process holding the lock.
        with other.writer():
            job = client.post("/v1/index", json={"path": "photos"}).json()
            failed = wait_job(client, job["id"])
            response = client.delete("/v1/images/1")
    finally:
        other.close()
    assert failed["state"] == "failed" and "another process is writing" in failed["error"]
    _is_error(response, 409)


def test_unknown_job_is_404(make_client: AppFactory) -> None:
    _is_error(make_client().get("/v1/jobs/0123456789abcdef"), 404)


# -- captions -----------------------------------------------------------------------------------------


def test_add_texts(indexed: Path, make_client: AppFactory) -> None:
    client = make_client(api_key=API_KEY)
    key = {"X-API-Key": API_KEY}
    body = {"texts": [{"text": "a green triangle", "id": "c3"}, {"text": "an orange"}]}
    _is_error(client.post("/v1/texts", json=body), 401)
    assert client.post("/v1/texts", json=body, headers=key).json() == {"added": 2, "count": 4}
    replaced = client.post("/v1/texts", json={"texts": [{"text": "a red square!", "id": "c1"}]}, headers=key)
    assert replaced.json() == {"added": 1, "count": 4}
    bad_bodies: list[dict[str, Any]] = [
        {"texts": []},
        {"texts": [{"text": ""}]},
        {"texts": [{"text": "  \n"}]},
        {"texts": [{"text": "ok", "id": ""}]},
        {},
        {"texts": "x"},
    ]
    for bad in bad_bodies:
        _is_error(client.post("/v1/texts", json=bad, headers=key), 422)
    upload = {"file": ("q.png", png_bytes(), "image/png")}
    found = client.post("/v1/search/image", files=upload, data={"target": "texts", "k": 10}).json()
    # An id-less caption gets the id `retriever texts add` gives it, and sending it again adds no copy.
    assert {h["id"] for h in found["data"]} == {"c1", "c2", "c3", caption_id("an orange")}
    again = client.post("/v1/texts", json={"texts": [{"text": "an  orange"}]}, headers=key)
    assert again.json() == {"added": 1, "count": 4}
    assert "a red square!" in {h["text"] for h in found["data"]}


# -- model loading ------------------------------------------------------------------------------------


def test_searches_wait_for_the_models_with_503(
    indexed: Path, make_client: AppFactory, loader: GatedLoader
) -> None:
    loader.gate.clear()
    client = make_client(wait=False, retry_after_s=7)
    assert client.get("/health").json() == {
        "status": "loading",
        "loading": ["prefilter", "reranker"],
        "images": 8,
        "texts": 2,
        "error": None,
    }
    response = client.get("/v1/search", params={"q": "a dog"})
    _is_error(response, 503)
    assert response.headers["retry-after"] == "7"
    upload = {"file": ("q.png", png_bytes(), "image/png")}
    _is_error(client.post("/v1/search/image", files=upload), 503)
    _is_error(client.post("/v1/texts", json={"texts": [{"text": "x"}]}), 503)
    # What needs no model keeps working, and an index job waits for the models.
    assert client.get("/v1/images").json()["count"] == 8
    assert client.get("/v1/status").status_code == 200
    job = client.post("/v1/index", json={"path": "photos"}).json()
    assert client.get(f"/v1/jobs/{job['id']}").json()["state"] in ("queued", "running")
    loader.gate.set()
    wait_ready(client)
    assert client.get("/v1/search", params={"q": "a dog"}).status_code == 200
    assert wait_job(client, job["id"])["report"]["unchanged"] == 8


def test_a_model_that_fails_to_load_is_reported(make_client: AppFactory, loader: GatedLoader) -> None:
    loader.fail_with = ModelNotFoundError("reranker model not found: no folder at /nowhere")
    client = make_client(wait=False)
    loader.gate.set()
    health = wait_loaded(client)
    assert health["status"] == "error" and "/nowhere" in health["error"]
    response = client.get("/v1/search", params={"q": "a dog"})
    _is_error(response, 503)
    assert "retry-after" not in response.headers and "/nowhere" in response.json()["detail"]
    job = client.post("/v1/index", json={"path": "."}).json()
    failed = wait_job(client, job["id"])
    assert failed["state"] == "failed" and "/nowhere" in failed["error"]
