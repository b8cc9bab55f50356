"""The code passes the project's linters: ruff (lint and format), mypy in strict mode over the package
and the tests, and the import-layer contracts (pyproject's [tool.importlinter])."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import lint


@pytest.fixture(scope="module")
def installed_tree() -> Iterator[Path]:
    with lint.staged() as site:
        yield site


def test_ruff_passes() -> None:
    code, out = lint.run_ruff()
    assert code == 0, out


def test_mypy_passes(installed_tree: Path) -> None:
    code, out = lint.run_mypy(installed_tree)
    assert code == 0, out


def test_import_contracts_hold(installed_tree: Path) -> None:
    code, out = lint.run_import_contracts(installed_tree)
    assert code == 0, out


def test_lint_paths_map_back_to_the_checkout() -> None:
    # mypy reports paths in the installed tree; a reader needs the file they edit.
    assert lint.source_path("retriever/index/store.py") == "index/store.py"
    assert lint.source_path("retriever/cli/app.py") == "cli/app.py"
    assert lint.source_path("retriever/search.py") == "retriever/search.py"
    assert lint.source_path("tests/lint.py") == "tests/lint.py"


def test_import_contracts_catch_an_upward_import(installed_tree: Path, tmp_path: Path) -> None:
    # The contracts must be able to fail: storage importing the CLI breaks the layers.
    import shutil

    site = tmp_path / "site"
    shutil.copytree(installed_tree, site, ignore=shutil.ignore_patterns("tests"))
    with (site / "retriever" / "index" / "vectors.py").open("a") as f:
        f.write("\nimport retriever.cli.app  # noqa\n")
    code, out = lint.run_import_contracts(site)
    assert code != 0 and "retriever.index.vectors -> retriever.cli.app" in out, out


MAX_LINES = 600


def test_no_source_file_outgrows_a_sitting() -> None:
    # A file a reader can take in at once; past this, split it by what its parts do.
    root = Path(lint.ROOT)
    long = {
        str(p.relative_to(root)): n
        for folder in ("retriever", "index", "cli", "tests")
        for p in (root / folder).rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_library_code_never_reads_the_environment() -> None:
    # RETRIEVER_* and every other variable are read once, at the edge (cli/, the server's settings
    # built there), and passed down; the core and storage take arguments.
    import ast

    root = Path(lint.ROOT)
    found = []
    for folder in ("retriever", "index"):
        for path in (root / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                if (
                    isinstance(node, ast.Attribute)
                    and node.attr in ("environ", "getenv", "environb")
                    and isinstance(node.value, ast.Name)
                    and node.value.id == "os"
                ):
                    found.append(f"{path.relative_to(root)}:{node.lineno}")
    assert not found, f"environment read outside the edge: {found}"
