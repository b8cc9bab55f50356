"""The package installs without links: ``pip install .`` and ``pip install -e .`` both give working
``retriever.index`` and ``retriever.cli`` from the top-level ``index/`` and ``cli/`` folders."""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

import pytest

from tests.lint import ROOT, package_dirs

# Imports that need none of the heavy dependencies, so a bare venv can run them.
PROBE = (
    "import retriever.index, retriever.cli, pathlib;"
    "print(pathlib.Path(retriever.index.__file__).parent);"
    "print(pathlib.Path(retriever.cli.__file__).parent)"
)


def test_the_tree_holds_no_symbolic_links() -> None:
    listed = subprocess.run(["git", "ls-files", "-s"], cwd=ROOT, capture_output=True, text=True, check=True)
    links = [line.split("\t", 1)[1] for line in listed.stdout.splitlines() if line.startswith("120000")]
    assert not links, f"symbolic links in the tree: {links}"


def test_package_dir_maps_the_top_level_folders() -> None:
    assert package_dirs() == {"retriever.index": "index", "retriever.cli": "cli"}


@pytest.mark.slow
def test_pip_install_puts_index_and_cli_inside_the_package(tmp_path: Path) -> None:
    target = tmp_path / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    proc = subprocess.run([*cmd, "--target", str(target), str(ROOT)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (target / "retriever" / "index" / "store.py").is_file()
    assert (target / "retriever" / "cli" / "app.py").is_file()
    assert not (target / "index").exists() and not (target / "cli").exists(), "generic top-level packages"
    # -I: no user site, no PYTHONPATH, no current folder, so the checkout cannot stand in.
    probe = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(target)!r}); {PROBE}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == [str(target / "retriever" / "index"), str(target / "retriever" / "cli")]


@pytest.mark.slow
def test_editable_install_maps_index_and_cli_to_the_checkout(tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, system_site_packages=False)
    python = env_dir / "bin" / "python"
    # The outer venv's pip and setuptools install into the bare one (seen only while installing).
    cmd = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps"]
    outer_site = next(p for p in sys.path if p.endswith("site-packages"))
    proc = subprocess.run(
        [*cmd, "--no-build-isolation", "-e", str(ROOT)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": outer_site},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    probe = subprocess.run([str(python), "-c", PROBE], cwd=tmp_path, capture_output=True, text=True)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split() == [str(ROOT / "index"), str(ROOT / "cli")]
