"""The real CLI facing damage, a full disk and a second writer: one line, a non-zero exit, nothing lost."""

from __future__ import annotations

import fcntl
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import mounted_tmpfs, write_images
from tests.integration.test_cli import run


@pytest.fixture
def env(tiny_clip_dir: Path, tiny_vilt_dir: Path) -> dict[str, str]:
    return {"RETRIEVER_PREFILTER": str(tiny_clip_dir), "RETRIEVER_RERANKER": str(tiny_vilt_dir)}


def one_line_error(proc: subprocess.CompletedProcess[str], *words: str) -> str:
    """The command failed with one ``error:`` line containing ``words`` and no traceback."""
    assert proc.returncode != 0, proc.stdout
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def indexed(tmp_path: Path, env: dict[str, str]) -> tuple[Path, Path]:
    home, photos = tmp_path / "home", tmp_path / "photos"
    write_images(photos, 6)
    run("index", photos, home=home, **env)
    return home, photos


def test_a_second_writer_is_told_before_any_model_loads(tmp_path: Path, env: dict[str, str]) -> None:
    home, photos = tmp_path / "home", tmp_path / "photos"
    write_images(photos, 2)
    home.mkdir()
    with open(home / "write.lock", "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        # A reranker that does not exist: had the models loaded first, the error would be about it.
        proc = run("index", photos, "--reranker", str(tmp_path / "missing"), home=home, check=False, **env)
    one_line_error(proc, "another process is writing")


def test_read_only_commands_on_a_missing_index_create_nothing(tmp_path: Path, env: dict[str, str]) -> None:
    home = tmp_path / "nowhere"
    for args in (("search", "a red circle"), ("status",)):
        one_line_error(run(*args, home=home, check=False, **env), "no index", "retriever index")
    assert not home.exists()


def test_a_cut_patch_cache_is_named_by_status_and_search_and_repaired_by_index(
    indexed: tuple[Path, Path], env: dict[str, str]
) -> None:
    home, photos = indexed
    (cache,) = home.glob("patches-*")
    with open(cache, "r+b") as f:
        f.truncate(cache.stat().st_size // 3)

    status = run("status", home=home, check=False)
    assert status.returncode == 1 and "Traceback" not in status.stderr
    assert "damaged:" in status.stderr and "patch cache" in status.stderr
    one_line_error(
        run("search", "a red circle", home=home, check=False, **env), "patch cache", "retriever index"
    )

    repaired = json.loads(run("index", photos, "--json", home=home, **env).stdout)
    assert repaired["repaired"] >= 1
    assert run("status", home=home).returncode == 0
    hits = json.loads(run("search", "a red circle", "--json", "--k", "6", home=home, **env).stdout)
    assert len(hits["results"]) == 6


def test_non_finite_tokens_give_a_message_not_nan(indexed: tuple[Path, Path], env: dict[str, str]) -> None:
    home, _ = indexed
    (cache,) = home.glob("patches-*")
    data = np.memmap(cache, dtype=np.float16, mode="r+")
    data[:] = np.inf
    data.flush()
    del data
    proc = run("search", "a red circle", "--json", home=home, check=False, **env)
    one_line_error(proc, "not finite", "--rebuild")
    assert "NaN" not in proc.stdout and "Infinity" not in proc.stdout


@pytest.mark.parametrize("damage", ["header", "page"])
def test_a_damaged_sqlite_database_is_one_line(
    indexed: tuple[Path, Path], env: dict[str, str], damage: str
) -> None:
    home, _ = indexed
    db = home / "retriever.db"
    data = bytearray(db.read_bytes())
    if damage == "header":
        data[:100] = b"\x00" * 100
    else:  # every page after the first overwritten: the schema is found, the tables are garbage
        data[4096:] = b"\xa5" * (len(data) - 4096)
    db.write_bytes(bytes(data))
    for args in (("status",), ("search", "a red circle")):
        line = one_line_error(run(*args, home=home, check=False, **env))
        assert "database" in line


# -- a full disk ------------------------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MB tmpfs mounted for this test (skipped where this machine does not allow mounting)."""
    with mounted_tmpfs(tmp_path / "disk", "4m") as mount:
        yield mount


def _fill(disk: Path) -> Path:
    """Take every free byte of the disk with one file; returns it."""
    filler = disk / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    return filler


def test_a_full_disk_is_one_line_keeps_the_index_and_search_still_works(
    small_disk: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    home, photos = small_disk / "index", tmp_path / "photos"
    write_images(photos, 4)
    run("index", photos, home=home, **env)
    before = json.loads(run("search", "a red circle", "--json", "--k", "4", home=home, **env).stdout)
    write_images(photos, 40, start_seed=100)
    filler = _fill(small_disk)

    proc = run("index", photos, home=home, check=False, **env)
    one_line_error(proc, "no space left", "run the command again")
    assert not list(home.glob("*.tmp")), list(home.iterdir())

    # Reading needs no space, writes nothing and still finds what was indexed before.
    listing = sorted(p.name for p in home.iterdir())
    after = json.loads(run("search", "a red circle", "--json", "--k", "4", home=home, **env).stdout)
    assert [r["path"] for r in after["results"]] == [r["path"] for r in before["results"]]
    status = json.loads(run("status", "--json", home=home, **env).stdout)
    assert status["images"] >= 4 and status["problems"] == []
    assert sorted(p.name for p in home.iterdir()) == listing

    filler.unlink()
    report = json.loads(run("index", photos, "--json", home=home, **env).stdout)
    assert report["added"] + report["unchanged"] == 44
    assert json.loads(run("status", "--json", home=home).stdout)["images"] == 44


def test_a_reindex_with_nothing_to_do_loads_no_model(
    tmp_path: Path, tiny_clip_dir: Path, tiny_vilt_dir: Path
) -> None:
    import shutil

    clip, vilt = tmp_path / "clip", tmp_path / "vilt"
    shutil.copytree(tiny_clip_dir, clip)
    shutil.copytree(tiny_vilt_dir, vilt)
    models = {"RETRIEVER_PREFILTER": str(clip), "RETRIEVER_RERANKER": str(vilt)}
    home, photos = tmp_path / "home", tmp_path / "photos"
    write_images(photos, 3)
    run("index", photos, home=home, **models)
    shutil.rmtree(vilt)  # a run that loaded the reranker would now fail

    again = json.loads(run("index", photos, "--json", home=home, **models).stdout)

    assert (again["added"], again["unchanged"], again["removed"]) == (0, 3, 0)
    write_images(photos, 1, start_seed=50)
    one_line_error(run("index", photos, home=home, check=False, **models), "reranker", "not found")


def test_a_read_only_file_system_is_one_line_and_search_still_works(
    small_disk: Path, tmp_path: Path, env: dict[str, str]
) -> None:
    home, photos = small_disk / "index", tmp_path / "photos"
    write_images(photos, 3)
    run("index", photos, home=home, **env)
    write_images(photos, 2, start_seed=100)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)

    line = one_line_error(run("index", photos, home=home, check=False, **env))
    assert "read-only" in line

    hits = json.loads(run("search", "a red circle", "--json", home=home, **env).stdout)
    assert len(hits["results"]) == 3
