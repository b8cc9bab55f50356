"""The real CLI as a subprocess, end to end, with tiny models and generated images."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import overload

import numpy as np
import pytest

from retriever.search_index import SearchIndex
from tests.conftest import write_images
from tests.tiny_models import make_tiny_vilt


# mypy lets a ``**dict[str, str]`` argument fill any keyword parameter, so with one signature every
# ``run(..., **env)`` reads as passing a string for ``check``. Two signatures: ``check`` absent, or named.
# (The implementation is flagged for not taking a string ``check`` that the first would route to it.)
@overload
def run(*args: str | Path, home: Path, **env: str) -> subprocess.CompletedProcess[str]: ...
@overload
def run(*args: str | Path, home: Path, check: bool, **env: str) -> subprocess.CompletedProcess[str]: ...
def run(  # type: ignore[misc]
    *args: str | Path, home: Path, check: bool = True, **env: str
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "RETRIEVER_HOME": str(home), **env}
    proc = subprocess.run(
        [sys.executable, "-m", "retriever", *map(str, args)], capture_output=True, text=True, env=full_env
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


@pytest.fixture
def env(tiny_clip_dir: Path, tiny_vilt_dir: Path) -> dict[str, str]:
    return {"RETRIEVER_PREFILTER": str(tiny_clip_dir), "RETRIEVER_RERANKER": str(tiny_vilt_dir)}


def test_index_search_status_end_to_end(tmp_path: Path, env: dict[str, str]) -> None:
    home, photos = tmp_path / "home", tmp_path / "photos"
    paths = write_images(photos, 8)
    (photos / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")

    out = run("index", photos, "--json", home=home, **env)
    report = json.loads(out.stdout)
    assert report["added"] == 8
    assert [s["path"] for s in report["skipped"]] == [str((photos / "broken.jpg").resolve())]
    assert "skipped" in out.stderr and "broken.jpg" in out.stderr

    res = json.loads(
        run("search", "a red circle", "--k", "3", "--candidates", "6", "--json", home=home, **env).stdout
    )
    assert res["query"] == "a red circle"
    assert [r["rank"] for r in res["results"]] == [1, 2, 3]
    scores = [r["score"] for r in res["results"]]
    assert scores == sorted(scores, reverse=True)
    assert all(Path(r["path"]).exists() and -1.0 <= r["prefilter_score"] <= 1.0 for r in res["results"])

    plain = json.loads(
        run("search", "a red circle", "--k", "3", "--no-rerank", "--json", home=home, **env).stdout
    )
    assert all(r["score"] == r["prefilter_score"] for r in plain["results"])

    same = json.loads(run("search", "--image", paths[2], "--k", "1", "--json", home=home, **env).stdout)
    assert same["results"][0]["path"] == str(paths[2].resolve())
    assert same["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)

    captions = tmp_path / "caps.jsonl"
    captions.write_text('{"id": "c1", "text": "a red dog"}\n{"id": "c2", "text": "a blue cat"}\n')
    run("texts", "add", captions, home=home, **env)
    i2t = json.loads(run("search", "--image", paths[0], "--texts", "--json", home=home, **env).stdout)
    assert {r["id"] for r in i2t["results"]} == {"c1", "c2"}
    assert all("text" in r and "path" not in r for r in i2t["results"])

    status = json.loads(run("status", "--json", home=home).stdout)
    assert status["images"] == 8 and status["texts"] == 2
    assert status["cache_bytes_per_image"] > 0 and status["disk_bytes"] > status["patch_cache_bytes"]

    table = run("search", "a red circle", "--k", "2", home=home, **env).stdout
    assert "rank" in table and str(photos.resolve()) in table


def test_bad_queries_give_short_errors(tmp_path: Path, env: dict[str, str]) -> None:
    home, photos = tmp_path / "home", tmp_path / "photos"
    write_images(photos, 2)
    run("index", photos, home=home, **env)
    for args in (["search", "   "], ["search", "--image", tmp_path / "missing.png"], ["search"]):
        proc = run(*args, home=home, check=False, **env)
        assert proc.returncode == 2, proc
        assert "Traceback" not in proc.stderr and proc.stderr.strip()


def test_missing_model_says_what_and_how(tmp_path: Path, env: dict[str, str]) -> None:
    photos = tmp_path / "photos"
    write_images(photos, 1)
    cases = {
        "RETRIEVER_RERANKER": "dandelin/vilt-b32-finetuned-coco",  # a hub id, with the hub offline
        "RETRIEVER_PREFILTER": str(tmp_path / "nope"),  # a local path that does not exist
    }
    for var, value in cases.items():
        proc = run("index", photos, home=tmp_path / "home", check=False, **{**env, var: value})
        assert proc.returncode == 1, proc
        assert "Traceback" not in proc.stderr
        assert value in proc.stderr
        assert "save_pretrained" in proc.stderr
    # Nothing is left behind by a first run whose models never loaded (it used to leave an empty index).
    assert not (tmp_path / "home").exists()


def test_model_mismatch_is_refused(tmp_path: Path, env: dict[str, str]) -> None:
    home, photos = tmp_path / "home", tmp_path / "photos"
    write_images(photos, 2)
    run("index", photos, home=home, **env)
    other = make_tiny_vilt(tmp_path / "other_vilt", seed=1)
    for args in (["search", "a cat"], ["index", photos]):
        proc = run(*args, "--reranker", other, home=home, check=False, **env)
        assert proc.returncode == 1 and "built with" in proc.stderr and "--rebuild" in proc.stderr
    rebuilt = json.loads(
        run("index", photos, "--reranker", other, "--rebuild", "--json", home=home, **env).stdout
    )
    assert rebuilt["added"] == 2
    # Without an explicit reranker, search uses the one the index now records.
    run("search", "a cat", home=home, RETRIEVER_PREFILTER=env["RETRIEVER_PREFILTER"])


def _rows(home: Path) -> int:
    try:
        with sqlite3.connect(home / "retriever.db", timeout=1) as conn:
            return int(conn.execute("select count(*) from images").fetchone()[0])
    except sqlite3.Error:
        return 0


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT])
def test_interrupted_index_is_consistent_and_resumes(tmp_path: Path, env: dict[str, str], sig: int) -> None:
    home, photos = tmp_path / "home", tmp_path / "photos"
    write_images(photos, 300)
    cmd = [sys.executable, "-m", "retriever", "index", str(photos), "--batch-size", "2"]
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "RETRIEVER_HOME": str(home), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 60
    while _rows(home) < 20 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.02)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    done = _rows(home)
    assert 0 < done < 300, "the run should have been stopped midway"
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err

    lib = SearchIndex(home)
    ids = set(s.id for s in lib.store.file_states().values())
    index = lib.vectors("images")
    _, found = index.search(np.ones((1, index.dim), dtype=np.float32), len(ids) + 5)
    assert set(found[0][found[0] >= 0].tolist()) == ids
    records = lib.store.images(sorted(ids))
    assert all(
        t.shape[0] == r.patch_tokens
        for t, r in zip(
            lib.patches().load([(r.patch_offset, r.patch_tokens) for r in records.values()]),
            records.values(),
            strict=True,
        )
    )
    lib.close()

    resumed = json.loads(run("index", photos, "--json", home=home, **env).stdout)
    assert resumed["unchanged"] >= done - 2 and resumed["added"] + resumed["unchanged"] == 300
    assert json.loads(run("status", "--json", home=home).stdout)["images"] == 300
