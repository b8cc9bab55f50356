"""The Dockerfile, read without a Docker engine: base image, user, port, health check, command, the
torch pin, and COPY lines that carry every folder the package builds from."""

from __future__ import annotations

import re
import tomllib
import zipfile

import pytest

from tests.deploy.files import (
    PYPROJECT,
    ROOT,
    build_args,
    dockerfile,
    dockerignore,
    env_values,
    final_stage,
    serve_command_options,
)
from tests.lint import build_wheel, package_dirs


def _only(keyword: str) -> list[str]:
    found = [ins for ins in final_stage(dockerfile()) if ins.keyword == keyword]
    assert found, f"the Dockerfile's final stage has no {keyword}"
    return found[-1].words()


def _pyproject_torch_pin() -> str:
    deps: list[str] = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    pins = [d for d in deps if re.match(r"torch\s*==", d)]
    assert len(pins) == 1, f"pyproject.toml should pin torch exactly once, found {pins}"
    return pins[0].split("==", 1)[1].split(";")[0].strip()


def test_base_image_is_python_3_11_slim() -> None:
    base = _only("FROM")[0]
    assert re.fullmatch(r"python:3\.11(\.\d+)?-slim(-\w+)?", base), base
    requires = tomllib.loads(PYPROJECT.read_text())["project"]["requires-python"]
    assert requires.strip() == ">=3.11", f"the base image's Python must satisfy requires-python {requires}"


def test_runs_as_a_non_root_user() -> None:
    stage = final_stage(dockerfile())
    users = [i for i, ins in enumerate(stage) if ins.keyword == "USER"]
    assert users, "no USER: the server would run as root"
    user = stage[users[-1]].rest.split(":")[0].strip()
    assert user not in ("root", "0", ""), f"USER {user} is root"
    cmd_at = max(i for i, ins in enumerate(stage) if ins.keyword == "CMD")
    assert users[-1] < cmd_at, "USER must come before CMD"
    created = " ".join(ins.rest for ins in stage if ins.keyword == "RUN")
    assert re.search(rf"useradd\b[^&;]*\b{re.escape(user)}\b", created), f"user {user} is never created"


def test_exposes_the_port_the_command_serves_on() -> None:
    assert _only("EXPOSE") == ["8000"]
    cmd = _only("CMD")
    assert cmd[:2] == ["retriever", "serve"], f"CMD should run `retriever serve`, is {cmd}"
    assert cmd[cmd.index("--port") + 1] == "8000"


def test_command_listens_on_all_interfaces_in_exec_form() -> None:
    stage = final_stage(dockerfile())
    cmd = [ins for ins in stage if ins.keyword == "CMD"][-1]
    assert cmd.exec_form is not None, "CMD should be in exec (JSON) form so that signals reach the server"
    words = cmd.exec_form
    assert "--host" in words and words[words.index("--host") + 1] == "0.0.0.0"
    assert not any(ins.keyword == "ENTRYPOINT" for ins in stage), "an ENTRYPOINT would prefix the CMD"


def test_command_options_exist_in_the_cli() -> None:
    cmd = _only("CMD")
    options = serve_command_options()
    given = [w for w in cmd[2:] if w.startswith("--")]
    unknown = [w for w in given if w not in options]
    assert not unknown, f"CMD passes {unknown}, which `retriever serve` does not take ({sorted(options)})"


def test_healthcheck_requests_health_on_the_served_port() -> None:
    words = _only("HEALTHCHECK")
    assert words and words[0] == "CMD", f"HEALTHCHECK should run a command, is {words}"
    command = " ".join(words[1:])
    assert re.search(r"https?://(127\.0\.0\.1|localhost):8000/health\b", command), command
    assert "curl" not in command and "wget" not in command, "python:3.11-slim has neither curl nor wget"


def test_index_home_is_set() -> None:
    env = env_values(final_stage(dockerfile()))
    assert env.get("RETRIEVER_HOME") == "/data/index"
    assert env.get("HF_HOME", "").startswith("/data/"), "the model cache should live under /data"


def test_torch_pin_equals_pyproject_and_comes_from_the_cpu_index() -> None:
    stage = final_stage(dockerfile())
    runs = [ins.rest for ins in stage if ins.keyword == "RUN"]
    torch_runs = [r for r in runs if re.search(r"\btorch==", r)]
    assert len(torch_runs) == 1, f"expected one RUN that installs torch, found {len(torch_runs)}"
    pin = re.search(r"\btorch==([0-9][\w.+]*)", torch_runs[0])
    assert pin, torch_runs[0]
    assert pin.group(1) == _pyproject_torch_pin()
    index_url = re.search(r"--index-url\s+\"?([^\s\"]+)", torch_runs[0])
    assert index_url, "torch must come from an explicit index"
    url = index_url.group(1)
    if url.startswith("${"):
        url = build_args(stage)[url.strip("${}")]
    assert url == "https://download.pytorch.org/whl/cpu", "the default image must take the CPU torch"
    install_at = next(
        i
        for i, ins in enumerate(stage)
        if ins.keyword == "RUN" and re.search(r"pip install\b.*\.", ins.rest) and "torch==" not in ins.rest
    )
    torch_at = next(i for i, ins in enumerate(stage) if ins.keyword == "RUN" and "torch==" in ins.rest)
    assert torch_at < install_at, "torch must be installed before the package, or pip pulls the CUDA build"


def test_gpu_build_arg_installs_the_gpu_extra() -> None:
    stage = final_stage(dockerfile())
    assert "EXTRAS" in build_args(stage), "the Dockerfile needs ARG EXTRAS for the GPU build"
    install = " ".join(ins.rest for ins in stage if ins.keyword == "RUN" and "${EXTRAS}" in ins.rest)
    assert '".[${EXTRAS}]"' in install, "the package must be installed with the extras from the build arg"
    extras = tomllib.loads(PYPROJECT.read_text())["project"]["optional-dependencies"]
    assert "gpu" in extras, "pyproject.toml has no gpu extra"


def _copy_sources() -> set[str]:
    stage = final_stage(dockerfile())
    return {w.rstrip("/") for ins in stage if ins.keyword in ("COPY", "ADD") for w in ins.words()[:-1]}


def test_copies_every_folder_the_build_reads() -> None:
    # The build reads pyproject.toml, the README it names, retriever/ and each folder pyproject maps
    # to a package (index/ and cli/): each must be copied, as a plain folder, past .dockerignore.
    sources = _copy_sources()
    needed = {"pyproject.toml", "retriever", *package_dirs().values()}
    assert needed <= sources, f"the Dockerfile does not COPY {sorted(needed - sources)}"
    assert any(s.startswith("README") for s in sources), "the Dockerfile does not COPY the README"
    ignore = dockerignore()
    for needed_file in ("pyproject.toml", "retriever/search.py", "index/store.py", "cli/app.py"):
        assert not ignore.excluded(needed_file), f".dockerignore leaves out {needed_file}"
    for secret in (".env", ".git/config", ".venv/bin/python", "tests/conftest.py"):
        assert ignore.excluded(secret), f".dockerignore should leave out {secret}"


def test_copied_folders_hold_no_links() -> None:
    for source in _copy_sources():
        path = ROOT / source
        if "*" in source or not path.exists():
            continue
        found = [str(p.relative_to(ROOT)) for p in [path, *path.rglob("*")] if p.is_symlink()]
        assert not found, f"links in what the image copies: {found}"


@pytest.fixture(scope="module")
def context_wheel(tmp_path_factory: pytest.TempPathFactory) -> zipfile.ZipFile:
    """The wheel pip builds from the checkout's files: what the copied folders hold."""
    return zipfile.ZipFile(build_wheel(tmp_path_factory.mktemp("wheel")))


def test_image_sources_build_a_wheel_with_the_mapped_packages(context_wheel: zipfile.ZipFile) -> None:
    names = set(context_wheel.namelist())
    for needed in ("retriever/index/store.py", "retriever/cli/app.py", "retriever/search.py"):
        assert needed in names, f"{needed} is missing from the wheel built from the image's sources"
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "retriever = retriever.cli:main" in context_wheel.read(entry_points).decode()


def test_image_wheel_ships_the_search_page(context_wheel: zipfile.ZipFile) -> None:
    names = set(context_wheel.namelist())
    missing = [
        f"retriever/api/static/{name}"
        for name in ("index.html", "app.js", "style.css")
        if f"retriever/api/static/{name}" not in names
    ]
    assert not missing, (
        f"{missing} are not in the wheel, so `pip install .` (the Docker image) serves no search page: "
        "pyproject.toml's [tool.setuptools.package-data] needs retriever = [..., 'api/static/*']"
    )
