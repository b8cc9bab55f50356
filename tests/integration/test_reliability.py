"""kill -9 at random moments of index, caption and rebuild runs: the index stays consistent every time.

Each round starts the real CLI, kills it with SIGKILL after a random delay (seeded, so a failing round can
be replayed), then checks the index from a fresh process view: every row has its cached tokens and its
FAISS entry, FAISS holds nothing else, captions likewise, and the next run finishes the work. The count of
rounds and of inconsistencies is printed. CI runs ``ROUNDS`` rounds; the ``slow`` variant runs more.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from retriever.search_index import SearchIndex
from tests.conftest import write_images
from tests.integration.test_cli import run

ROUNDS = 10
SLOW_ROUNDS = 20
IMAGES = 120


def inconsistencies(home: Path) -> list[str]:
    """What is wrong with the index at ``home``, as a list of reasons (empty when consistent)."""
    problems: list[str] = []
    search_index = SearchIndex(home, read_only=True)
    try:
        problems += search_index.check()
        if search_index.models() is None:
            return problems
        for kind in ("images", "texts"):
            ids = (
                search_index.store.image_vectors(1)[0]
                if kind == "images"
                else search_index.store.text_vectors(1)[0]
            )
            index = search_index.vectors(kind)
            if len(index) != len(ids):
                problems.append(f"{kind}: FAISS holds {len(index)} vectors, the database {len(ids)} rows")
                continue
            if len(ids):
                _, found = index.search(np.ones((1, index.dim), dtype=np.float32), len(ids) + 5)
                if set(found[0][found[0] >= 0].tolist()) != set(ids.tolist()):
                    problems.append(f"{kind}: FAISS ids differ from the database's")
        records = list(search_index.store.images(search_index.store.image_vectors(1)[0].tolist()).values())
        tokens = search_index.load_tokens(records)
        if any(
            t.shape[0] != r.patch_tokens or not np.isfinite(t).all()
            for t, r in zip(tokens, records, strict=True)
        ):
            problems.append("cached tokens of some rows are missing or not finite")
        paths = [r.path for r in records]
        if len(paths) != len(set(paths)):
            problems.append("duplicate paths")
    finally:
        search_index.close()
    return problems


def _start(args: list[str], home: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "retriever", *args],
        env={**os.environ, "HF_HUB_OFFLINE": "1", "RETRIEVER_HOME": str(home), **env},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _rounds(tmp_path: Path, env: dict[str, str], rounds: int, seed: int) -> None:
    rng = random.Random(seed)
    home, photos = tmp_path / "home", tmp_path / "photos"
    files = write_images(photos, IMAGES)
    captions = tmp_path / "captions.txt"
    killed_mid_run = 0
    found: list[tuple[int, str, list[str]]] = []
    # The first round of each operation runs to the end and times it; later rounds kill it somewhere
    # between a fifth of that time (Python and torch still starting) and its end, so most kills land
    # while it writes, on a fast machine or a loaded one.
    took: dict[str, float] = {}
    for n in range(rounds):
        op = ["index", "captions", "rebuild"][n % 3]
        args = {
            "index": ["index", str(photos), "--batch-size", "2"],
            "captions": ["texts", "add", str(captions)],
            "rebuild": ["index", str(photos), "--batch-size", "2", "--rebuild"],
        }[op]
        # Every round has work to do: a third of the files changed, or captions never added before.
        for path in rng.sample(files, IMAGES // 3):
            os.utime(path, (time.time(), time.time() + n + 1))
        captions.write_text("".join(f"caption {i} of round {n}, a red circle\n" for i in range(400)))
        started = time.monotonic()
        proc = _start(args, home, env)
        if op not in took:
            proc.communicate(timeout=300)
            took[op] = time.monotonic() - started
        else:
            time.sleep(rng.uniform(0.2, 0.95) * took[op])
            if proc.poll() is None:
                killed_mid_run += 1
                proc.send_signal(signal.SIGKILL)
            proc.communicate(timeout=120)
        problems = inconsistencies(home) if home.exists() else []
        if problems:
            found.append((n, op, problems))
    # The work finishes after all of that.
    report = json.loads(run("index", photos, "--json", home=home, **env).stdout)
    final = inconsistencies(home)
    status = json.loads(run("status", "--json", home=home).stdout)
    print(
        f"\nkill -9: {rounds} rounds (seed {seed}), {killed_mid_run} killed mid-run, "
        f"{len(found)} inconsistent; final run added {report['added']}, updated {report['updated']}, "
        f"unchanged {report['unchanged']}"
    )
    assert not found, found
    assert final == [] and status["images"] == IMAGES
    assert killed_mid_run >= (rounds - len(took)) // 2, "too few rounds were killed mid-run to test anything"


@pytest.fixture
def env(tiny_clip_dir: Path, tiny_vilt_dir: Path) -> dict[str, str]:
    return {"RETRIEVER_PREFILTER": str(tiny_clip_dir), "RETRIEVER_RERANKER": str(tiny_vilt_dir)}


def test_kill_9_rounds_leave_a_consistent_index(tmp_path: Path, env: dict[str, str]) -> None:
    _rounds(tmp_path, env, ROUNDS, seed=13)


@pytest.mark.slow
def test_kill_9_many_rounds(tmp_path: Path, env: dict[str, str]) -> None:
    _rounds(tmp_path, env, SLOW_ROUNDS, seed=int(os.environ.get("RETRIEVER_KILL_SEED", "29")))
