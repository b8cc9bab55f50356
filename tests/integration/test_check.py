"""``retriever check`` finds each kind of damage, names it with the repair, and ``--repair`` fixes it:
the real CLI over an index of the tiny models."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import write_images
from tests.integration.test_cli import run

N = 6


@pytest.fixture
def env(tiny_clip_dir: Path, tiny_vilt_dir: Path) -> dict[str, str]:
    return {"RETRIEVER_PREFILTER": str(tiny_clip_dir), "RETRIEVER_RERANKER": str(tiny_vilt_dir)}


@pytest.fixture
def indexed(tmp_path: Path, env: dict[str, str]) -> tuple[Path, Path]:
    home, photos = tmp_path / "home", tmp_path / "photos"
    write_images(photos, N)
    run("index", photos, home=home, **env)
    run("search", "a red circle", home=home, **env)  # saves nothing, but proves the index answers
    return home, photos


def check(home: Path, *args: str, **env: str) -> tuple[subprocess.CompletedProcess[str], dict[str, object]]:
    proc = run("check", "--json", *args, home=home, check=False, **env)
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc, json.loads(proc.stdout)


def findings(facts: dict[str, object], severity: str) -> list[str]:
    found = facts["findings"]
    assert isinstance(found, list)
    return [f"{f['part']}: {f['message']}" for f in found if f["severity"] == severity]


def searchable(home: Path, env: dict[str, str]) -> int:
    hits = json.loads(run("search", "a red circle", "--json", "--k", str(N), home=home, **env).stdout)
    return len(hits["results"])


def test_a_sound_index_passes(indexed: tuple[Path, Path]) -> None:
    home, _ = indexed
    proc, facts = check(home)
    assert proc.returncode == 0 and facts["images"] == N and not facts["damaged"]
    assert findings(facts, "damage") == []
    plain = run("check", home=home)
    assert "checked 6 images" in plain.stdout


def test_non_finite_tokens_are_found_and_reencoded(indexed: tuple[Path, Path], env: dict[str, str]) -> None:
    home, _ = indexed
    (cache,) = home.glob("patches-*")
    data = np.memmap(cache, dtype=np.float16, mode="r+")
    data[:10] = np.nan  # the first image's first rows
    data.flush()
    del data
    proc, facts = check(home)
    assert proc.returncode == 1
    damage = findings(facts, "damage")
    assert any("non-finite cached tokens" in d for d in damage), damage
    damaged = facts["damaged_images"]
    assert isinstance(damaged, list) and [d["id"] for d in damaged] == [1]
    plain = run("check", home=home, check=False)
    assert plain.returncode == 1 and "retriever check --repair" in plain.stderr

    proc, facts = check(home, "--repair", **env)
    assert proc.returncode == 0, findings(facts, "damage")
    assert facts["repaired"] == {"dropped": 1, "reindexed": 1, "rebuilt": []}
    assert facts["images"] == N and searchable(home, env) == N


def test_a_cut_cache_is_found_and_repaired(indexed: tuple[Path, Path], env: dict[str, str]) -> None:
    home, _ = indexed
    (cache,) = home.glob("patches-*")
    with open(cache, "r+b") as f:
        f.truncate(cache.stat().st_size // 2)
    proc, facts = check(home)
    assert proc.returncode == 1 and any("lacks the tokens" in d for d in findings(facts, "damage"))
    proc, facts = check(home, "--repair", **env)
    assert proc.returncode == 0, findings(facts, "damage")
    assert searchable(home, env) == N


def test_a_faiss_file_that_disagrees_or_is_truncated_is_rebuilt(
    indexed: tuple[Path, Path], env: dict[str, str]
) -> None:
    home, _ = indexed
    (faiss_file,) = home.glob("images-*.faiss")
    original = faiss_file.read_bytes()
    faiss_file.write_bytes(original[: len(original) // 2])
    proc, facts = check(home)
    assert proc.returncode == 1 and any("cannot be read" in d for d in findings(facts, "damage"))

    proc, facts = check(home, "--repair", **env)
    assert proc.returncode == 0 and facts["repaired"]["rebuilt"] == ["images"]  # type: ignore[index]
    assert faiss_file.exists() and searchable(home, env) == N


def test_gone_files_are_a_note_and_repair_drops_their_rows(
    indexed: tuple[Path, Path], env: dict[str, str]
) -> None:
    home, photos = indexed
    gone = sorted(photos.iterdir())[0]
    gone.unlink()
    proc, facts = check(home)
    assert proc.returncode == 0  # the index still answers: a note, not damage
    assert any("gone from disk" in n and gone.name in n for n in findings(facts, "note"))
    proc, facts = check(home, "--skip-files")
    assert not findings(facts, "note") or all("gone" not in n for n in findings(facts, "note"))

    proc, facts = check(home, "--repair", **env)
    assert proc.returncode == 0 and facts["repaired"]["dropped"] == 1  # type: ignore[index]
    assert facts["images"] == N - 1 and facts["gone_images"] == []


def test_check_on_a_missing_index_is_one_line(tmp_path: Path) -> None:
    proc = run("check", home=tmp_path / "nowhere", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")], proc.stderr
    assert not (tmp_path / "nowhere").exists()
