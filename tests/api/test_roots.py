"""Roots mean roots: nothing the API indexes or serves lies outside the server's folders, links included."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient

from tests.api.conftest import API_KEY, AppFactory, wait_job
from tests.conftest import write_images

KEY = {"X-API-Key": API_KEY}


def _escape_tree(tmp_path: Path) -> tuple[Path, Path]:
    """root/sub with one real image, a link to an outside folder and a link to an outside image."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    write_images(outside, 3, start_seed=60)
    sub = root / "sub"
    write_images(sub, 1)
    os.symlink(outside, sub / "esc_dir")
    os.symlink(outside / "img_0060.png", sub / "esc.png")
    return root, outside


def _index(client: TestClient, path: str) -> dict[str, Any]:
    answer = client.post("/v1/index", json={"path": path}, headers=KEY)
    assert answer.status_code == 202, answer.text
    job = wait_job(client, answer.json()["id"])
    assert job["state"] == "done", job
    return job


def test_links_inside_a_root_do_not_index_what_lies_outside(tmp_path: Path, make_client: AppFactory) -> None:
    root, _outside = _escape_tree(tmp_path)
    client = make_client(roots=(root.resolve(),), api_key=API_KEY)

    job = _index(client, "sub")

    report = job["report"]
    assert report["added"] == 1
    skipped = {Path(s["path"]).name: s["reason"] for s in report["skipped"]}
    assert set(skipped) == {"esc_dir", "esc.png"}
    assert all("outside" in reason for reason in skipped.values())
    listed = client.get("/v1/images").json()["data"]
    assert [Path(i["path"]).name for i in listed] == ["img_0000.png"]
    for image in listed:
        assert os.path.realpath(image["path"]).startswith(str(root.resolve()))


def test_a_link_swapped_in_after_indexing_is_not_served(tmp_path: Path, make_client: AppFactory) -> None:
    root = tmp_path / "root"
    (real,) = write_images(root / "sub", 1)
    secret = tmp_path / "secret.txt"
    secret.write_text("the contents of a file outside every root")
    client = make_client(roots=(root.resolve(),), api_key=API_KEY)
    _index(client, "sub")
    (image,) = client.get("/v1/images").json()["data"]
    served = client.get(f"/v1/images/{image['id']}/file")
    assert served.status_code == 200 and served.content == real.read_bytes()

    real.unlink()
    os.symlink(secret, real)

    for route in ("file", "thumbnail"):
        answer = client.get(f"/v1/images/{image['id']}/{route}")
        assert answer.status_code in (403, 404), (route, answer.status_code)
        assert b"outside every root" not in answer.content
        assert "detail" in answer.json()


def test_a_file_replaced_after_indexing_is_not_served_as_the_indexed_image(
    tmp_path: Path, make_client: AppFactory
) -> None:
    root = tmp_path / "root"
    (real,) = write_images(root / "sub", 1)
    client = make_client(roots=(root.resolve(),), api_key=API_KEY)
    _index(client, "sub")
    (image,) = client.get("/v1/images").json()["data"]

    real.write_bytes(b"other bytes written after indexing")

    answer = client.get(f"/v1/images/{image['id']}/file")
    assert answer.status_code == 404
    assert "re-index" in answer.json()["detail"] or "changed" in answer.json()["detail"]


def test_without_server_roots_only_indexed_folders_are_served(
    tmp_path: Path, indexed: Path, photos: Path, make_client: AppFactory
) -> None:
    """A server started without --root serves files inside the folders `retriever index` was given."""
    client = make_client(roots=())
    (first, second) = client.get("/v1/images?limit=2").json()["data"]
    assert client.get(f"/v1/images/{first['id']}/file").status_code == 200

    target = Path(second["path"])
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(target.read_bytes())
    os.utime(outside, (target.stat().st_atime, target.stat().st_mtime))
    target.unlink()
    os.symlink(outside, target)

    assert client.get(f"/v1/images/{second['id']}/file").status_code in (403, 404)
