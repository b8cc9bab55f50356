"""A new user's first hour: the README's quickstart as written, then the bad inputs a user tries.

Everything runs the real CLI as a subprocess with the model shipped inside the package, offline. Every
failure must be one ``error:`` line with a non-zero exit and no traceback, and must leave nothing behind.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

QUERY = "a large yellow circle left of a large purple square"  # the Makefile's demo query


def cli(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETRIEVER_")}
    env["HF_HUB_OFFLINE"] = "1"
    env["HOME"] = str(cwd / "home")  # nothing of the real user's
    return subprocess.run(
        [sys.executable, "-m", "retriever", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True
    )


def ok(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stdout


def refused(proc: subprocess.CompletedProcess[str], code: int, *words: str) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo's commands, as the Makefile runs them, on 32 images."""
    work = tmp_path_factory.mktemp("newuser")
    ok(
        cli(
            "datasets",
            "shapes",
            "--out",
            "demo/shapes",
            "--images",
            "32",
            "--seed",
            "7",
            "--split",
            "test",
            cwd=work,
        )
    )
    (work / "demo/shapes/broken.png").write_text("not an image")
    indexed = cli("index", "demo/shapes", "--model", "shapes", "--index-dir", "demo/index", cwd=work)
    ok(indexed)
    assert "skipped" in indexed.stderr and "broken.png" in indexed.stderr
    assert "added 32" in indexed.stdout
    # Not a terminal (a log, CI, nohup): plain progress lines instead of a bar.
    assert "indexing: 33/33 img" in indexed.stderr  # 32 images and the broken file
    return work


def test_the_quickstart_search_explains_its_output(quickstart: Path) -> None:
    out = ok(cli("search", QUERY, "--k", "5", "--index-dir", "demo/index", cwd=quickstart))
    lines = out.splitlines()
    assert lines[0].split()[:4] == ["rank", "score", "ITM", "cosine"]
    assert len([line for line in lines if line.strip()[:1].isdigit()]) == 5
    assert "ranked by" in lines[-1]


def test_more_results_than_candidates_are_all_given(quickstart: Path) -> None:
    out = json.loads(
        ok(
            cli(
                "search",
                QUERY,
                "--k",
                "25",
                "--candidates",
                "5",
                "--json",
                "--index-dir",
                "demo/index",
                cwd=quickstart,
            )
        )
    )
    assert len(out["results"]) == 25
    assert all(r["rerank_score"] is not None for r in out["results"])


def test_status_names_the_indexed_folder(quickstart: Path) -> None:
    out = ok(cli("status", "--index-dir", "demo/index", cwd=quickstart))
    assert "indexed" in out and str((quickstart / "demo/shapes").resolve()) in out


def test_a_second_index_run_with_nothing_to_do_is_quick_to_say_so(quickstart: Path) -> None:
    out = ok(cli("index", "demo/shapes", "--model", "shapes", "--index-dir", "demo/index", cwd=quickstart))
    assert "added 0" in out and "unchanged 32" in out


def test_help_and_version(quickstart: Path) -> None:
    assert "Usage" in ok(cli("-h", cwd=quickstart))
    assert ok(cli("--version", cwd=quickstart)).startswith("retriever ")
    assert "FOLDER" in ok(cli("index", "--help", cwd=quickstart))


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (("search", "   "), 2, ("query is empty",)),
        (
            ("search", "--image", "demo/shapes/broken.png", "--texts"),
            2,
            ("broken.png", "not an image"),
        ),
        (("index", "demo/shapes", "--model", "doesnotexist", "--index-dir", "fresh"), 1, ("doesnotexist",)),
        (
            ("index", "demo/shapes", "--db-url", "mysql://root@localhost/test", "--index-dir", "fresh"),
            1,
            ("PostgreSQL",),
        ),
        (("search", QUERY, "--index-dir", "fresh"), 1, ("no index", "retriever index")),
        (("status", "--index-dir", "fresh"), 1, ("no index",)),
        (("index", "no/such/folder", "--index-dir", "fresh"), 2, ("no such folder",)),
    ],
    ids=[
        "empty-query",
        "bad-query-image",
        "unknown-preset",
        "mysql",
        "search-no-index",
        "status-no-index",
        "no-folder",
    ],
)
def test_bad_input_is_one_line_and_leaves_nothing(
    quickstart: Path, args: tuple[str, ...], code: int, words: tuple[str, ...]
) -> None:
    if "--index-dir" not in args:
        args = (*args, "--index-dir", "demo/index")
    refused(cli(*args, cwd=quickstart), code, *words)
    assert not (quickstart / "fresh").exists()


@pytest.mark.parametrize("delay", [0.2, 0.6, 1.5])
def test_ctrl_c_at_any_moment_of_start_up_is_one_line(quickstart: Path, delay: float) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RETRIEVER_")}
    env.update(HF_HUB_OFFLINE="1", HOME=str(quickstart / "home"))
    args = ["index", "demo/shapes", "--model", "shapes", "--index-dir", f"ctrl-c-{delay}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "retriever", *args],
        cwd=quickstart,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(delay)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert "Traceback" not in err, err
    if "added" not in out:  # not finished before the signal came
        # 130, or ended by SIGINT itself (how Python reports some interrupted imports); one line either way.
        assert proc.returncode in (130, -signal.SIGINT), (proc.returncode, err)
        assert [line for line in err.splitlines() if line.strip()][-1:] == ["interrupted"] or (
            "error: interrupted" in err
        ), err
