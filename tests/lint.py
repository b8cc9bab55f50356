"""The static checks, run over the package as it installs.

``index/`` and ``cli/`` install as ``retriever.index`` and ``retriever.cli`` through the build
backend's package-directory mapping. Import hooks make that work at run time, but mypy and
import-linter read folders, not hooks: from the source tree they would see a ``retriever`` package
without ``index`` and ``cli``. So both run over the tree the real build writes: the wheel pip builds
from a copy of the checkout, unpacked under ``build/lint/``, with ``tests/`` beside it. mypy's messages
are mapped back to the source paths.

    python -m tests.lint            # ruff, mypy and the import contracts
    python -m tests.lint mypy       # one of: ruff, mypy, imports
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGE = ROOT / "build" / "lint"


def package_dirs() -> dict[str, str]:
    """Installed package name -> source folder, for the packages whose folder is not their name."""
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    return dict(tool.get("package-dir", {}))


def source_path(installed: str) -> str:
    """``retriever/index/store.py`` (as installed) -> ``index/store.py`` (in the checkout)."""
    for package, folder in sorted(package_dirs().items(), key=lambda kv: -len(kv[0])):
        prefix = package.replace(".", "/") + "/"
        if installed.startswith(prefix):
            return folder.rstrip("/") + "/" + installed[len(prefix) :]
    return installed


def _tracked_files() -> list[str]:
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    return [name for name in listed.stdout.decode().split("\0") if name and (ROOT / name).is_file()]


def build_wheel(dest: Path) -> Path:
    """The wheel pip builds from a copy of the checkout (tracked and new files, never build output)."""
    with tempfile.TemporaryDirectory(prefix="retriever-src-") as tmp:
        src = Path(tmp) / "src"
        for name in _tracked_files():
            target = src / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target)
        pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
        proc = subprocess.run([*pip_wheel, "-w", str(dest), str(src)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the wheel failed:\n{proc.stdout}{proc.stderr}")
    (wheel,) = dest.glob("retriever-*.whl")
    return wheel


@contextmanager
def staged() -> Iterator[Path]:
    """The installed tree (the wheel unpacked) plus ``tests/``, at a fixed place so mypy's cache holds."""
    STAGE.mkdir(parents=True, exist_ok=True)
    with open(STAGE / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs at once would unpack over each other
        site = STAGE / "site"
        shutil.rmtree(site, ignore_errors=True)
        with (
            tempfile.TemporaryDirectory(prefix="retriever-wheel-") as tmp,
            zipfile.ZipFile(build_wheel(Path(tmp))) as wheel,
        ):
            wheel.extractall(site)
        shutil.copytree(ROOT / "tests", site / "tests", ignore=shutil.ignore_patterns("__pycache__"))
        yield site


def run_ruff() -> tuple[int, str]:
    out = ""
    for args in (["check", "."], ["format", "--check", "."]):
        proc = subprocess.run([sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            return proc.returncode, proc.stdout + proc.stderr
        out += proc.stdout
    return 0, out


def run_mypy(site: Path) -> tuple[int, str]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "pyproject.toml"),
            "--cache-dir",
            str(STAGE / "mypy-cache"),
            "retriever",
            "tests",
        ],
        cwd=site,
        capture_output=True,
        text=True,
    )
    lines = [source_path(line) for line in (proc.stdout + proc.stderr).splitlines()]
    return proc.returncode, "\n".join(lines)


def run_import_contracts(site: Path) -> tuple[int, str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    lint_imports = Path(sys.executable).with_name("lint-imports")
    proc = subprocess.run(
        [str(lint_imports), str(ROOT / "pyproject.toml"), "--no-cache"],
        cwd=site,
        env=env,
        capture_output=True,
        text=True,
    )
    return proc.returncode, proc.stdout + proc.stderr


def main(argv: list[str]) -> int:
    wanted = argv or ["ruff", "mypy", "imports"]
    unknown = set(wanted) - {"ruff", "mypy", "imports"}
    if unknown:
        print(f"unknown check(s) {', '.join(sorted(unknown))}: use ruff, mypy or imports", file=sys.stderr)
        return 2
    failed = 0
    if "ruff" in wanted:
        code, out = run_ruff()
        print(out, end="" if out.endswith("\n") or not out else "\n")
        failed |= code
    if {"mypy", "imports"} & set(wanted):
        with staged() as site:
            for name, check in (("mypy", run_mypy), ("imports", run_import_contracts)):
                if name in wanted:
                    code, out = check(site)
                    print(out, end="" if out.endswith("\n") or not out else "\n")
                    failed |= code
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
