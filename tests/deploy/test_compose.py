"""docker-compose.yml, read without a Docker engine: services, health checks, ports, volumes, the
environment the app reads (cross-checked against the sources and docs/deployment.md), the GPU profile;
and `docker compose config` where the compose plugin is installed."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.deploy.files import (
    COMPOSE,
    DEPLOYMENT_DOC,
    ROOT,
    build_args,
    compose,
    dockerfile,
    env_names_read_by_sources,
    env_values,
    environment,
    final_stage,
    interpolate,
    is_named_volume,
    serve_command_options,
    volume_mounts,
)

API_SERVICES = ("api", "api-gpu")
#: What the API needs from the compose file to work at all.
ESSENTIAL_ENV = ("RETRIEVER_HOME", "RETRIEVER_DB_URL", "RETRIEVER_ROOTS", "RETRIEVER_API_KEY")
#: Names the compose file may set that the package does not read itself (libraries read them).
FOREIGN_ENV = {"HF_HOME"}


def _services() -> dict[str, dict[str, Any]]:
    services = compose().get("services")
    assert isinstance(services, dict) and services, "docker-compose.yml has no services"
    return services


def _service(name: str) -> dict[str, Any]:
    services = _services()
    assert name in services, f"no service {name!r} in docker-compose.yml (has {sorted(services)})"
    return services[name]


def _mount(service: str, target: str) -> tuple[str, str, str]:
    mounts = {t: (s, t, m) for s, t, m in volume_mounts(_service(service))}
    assert target in mounts, f"{service} mounts nothing at {target} (mounts {sorted(mounts)})"
    return mounts[target]


def _words(test: Any) -> str:
    """A healthcheck's test as one string (list forms ["CMD", ...] / ["CMD-SHELL", "..."] or a string)."""
    if isinstance(test, list):
        assert test and test[0] in ("CMD", "CMD-SHELL"), f"healthcheck test should start with CMD: {test}"
        return " ".join(str(t) for t in test[1:])
    return str(test)


def test_services_and_profiles() -> None:
    services = _services()
    assert {"api", "db", "api-gpu"} <= set(services), sorted(services)
    assert _service("api-gpu").get("profiles") == ["gpu"]
    for name in ("api", "db"):
        assert not _service(name).get("profiles"), f"{name} must start without a profile"


def test_every_service_has_an_image_or_a_build() -> None:
    for name, service in _services().items():
        assert service.get("image") or service.get("build"), f"service {name} has neither image nor build"
    for name in API_SERVICES:
        build = _service(name).get("build")
        context = build if isinstance(build, str) else (build or {}).get("context")
        assert context in (".", "./"), f"{name} should build the repository's Dockerfile, builds {build}"
    assert re.fullmatch(r"postgres:16(\.\d+)*(-\w+)?", _service("db")["image"])


def test_api_waits_for_a_healthy_database() -> None:
    for name in API_SERVICES:
        depends = _service(name).get("depends_on")
        assert isinstance(depends, dict), f"{name}.depends_on should be a mapping with conditions"
        assert depends.get("db", {}).get("condition") == "service_healthy", (
            f"{name} must wait for a healthy db"
        )
    assert _service("db").get("healthcheck"), "db has no healthcheck, so service_healthy never comes"


def test_named_volumes_are_declared_and_mounted() -> None:
    declared = compose().get("volumes") or {}
    for name, service in _services().items():
        for source, target, _mode in volume_mounts(service):
            if is_named_volume(source):
                assert source in declared, f"{name} mounts volume {source!r} at {target}, not declared"
    for owner, target in (("api", "/data/index"), ("api", "/data/hf"), ("db", "/var/lib/postgresql/data")):
        source, _, _ = _mount(owner, target)
        assert is_named_volume(source), f"{owner}:{target} should be a named volume, is {source!r}"
    index_src = _mount("api", "/data/index")[0]
    assert index_src == _mount("api-gpu", "/data/index")[0], "api and api-gpu should share the index volume"


def test_photos_are_mounted_read_only_from_photos_dir() -> None:
    for name in API_SERVICES:
        source, _target, mode = _mount(name, "/photos")
        assert mode.split(",")[0] == "ro", f"{name} should mount the photos read-only"
        assert interpolate(source, {}) == "./photos", source
        assert interpolate(source, {"PHOTOS_DIR": "/srv/pics"}) == "/srv/pics", source


def test_api_environment_matches_the_mounts_and_the_database() -> None:
    db_env = environment(_service("db"))
    for name in API_SERVICES:
        env = environment(_service(name))
        for var in ESSENTIAL_ENV:
            assert env.get(var), f"{name} does not set {var}"
        assert env["RETRIEVER_HOME"] == _mount(name, "/data/index")[1]
        assert env["RETRIEVER_ROOTS"] == _mount(name, "/photos")[1]
        assert env.get("HF_HOME") == _mount(name, "/data/hf")[1], "the HF cache must be on its volume"
        assert re.fullmatch(r"\$\{RETRIEVER_API_KEY(:[?-][^}]*)?\}", env["RETRIEVER_API_KEY"]), (
            "the API key must come from the environment, not be written in the file"
        )
        url = urlsplit(env["RETRIEVER_DB_URL"])
        assert url.scheme in ("postgresql", "postgresql+psycopg"), url.scheme
        assert url.hostname == "db" and (url.port or 5432) == 5432
        assert url.username == db_env["POSTGRES_USER"] and url.password == db_env["POSTGRES_PASSWORD"]
        assert url.path.lstrip("/") == db_env["POSTGRES_DB"]


def test_api_key_is_required_or_defaulted() -> None:
    value = environment(_service("api"))["RETRIEVER_API_KEY"]
    try:
        interpolate(value, {})
    except KeyError:
        pass  # ${RETRIEVER_API_KEY:?...}: compose refuses to start without it
    else:
        assert ":-" in value and "RETRIEVER_API_KEY" in DEPLOYMENT_DOC.read_text(), (
            "a default API key must be documented"
        )
    assert interpolate(value, {"RETRIEVER_API_KEY": "s3cret"}) == "s3cret"


def _code_env_names() -> dict[str, list[str]]:
    names = env_names_read_by_sources()
    assert names, (
        "no RETRIEVER_* environment variable found in the sources: has the way they are read changed?"
    )
    return names


def test_every_env_var_the_code_reads_is_documented() -> None:
    doc = DEPLOYMENT_DOC.read_text()
    missing = {n: files for n, files in _code_env_names().items() if not re.search(rf"\b{n}\b", doc)}
    assert not missing, f"read by the code but not in docs/deployment.md: {missing}"


def test_every_env_var_serve_reads_is_documented_and_the_essential_ones_are_set() -> None:
    read = {env for env in serve_command_options().values() if env}
    assert set(ESSENTIAL_ENV) <= read, f"retriever serve does not read {set(ESSENTIAL_ENV) - read}"
    doc = DEPLOYMENT_DOC.read_text()
    undocumented = sorted(n for n in read if not re.search(rf"`{n}`", doc))
    assert not undocumented, f"retriever serve reads {undocumented}, not in docs/deployment.md"
    assert read <= set(_code_env_names()), "the source scan misses variables serve reads"


def test_compose_sets_only_env_vars_the_code_reads() -> None:
    code = _code_env_names()
    for var in ESSENTIAL_ENV:
        assert var in code, f"{var} is set for the API but no source reads it (renamed?)"
    for name in API_SERVICES:
        unknown = set(environment(_service(name))) - set(code) - FOREIGN_ENV
        assert not unknown, f"{name} sets {sorted(unknown)}, which nothing in the package reads (typo?)"


def test_ports_are_loopback_and_match_the_image() -> None:
    stage = final_stage(dockerfile())
    exposed = next(ins.words() for ins in stage if ins.keyword == "EXPOSE")
    for name in API_SERVICES:
        ports = _service(name).get("ports")
        assert ports == ["127.0.0.1:8000:8000"], f"{name}.ports should publish 8000 on loopback only: {ports}"
        host_ip, _host_port, container_port = str(ports[0]).split(":")
        assert host_ip == "127.0.0.1"
        assert [container_port] == exposed
    assert not _service("db").get("ports"), "the database should not be published on the host"


def test_api_healthcheck_requests_health_on_8000() -> None:
    for name in API_SERVICES:
        check = _service(name).get("healthcheck")
        assert check and check.get("test"), f"{name} has no healthcheck"
        test = _words(check["test"])
        assert re.search(r"https?://(127\.0\.0\.1|localhost):8000/health\b", test), test
        assert "curl" not in test and "wget" not in test, "the slim image has neither curl nor wget"
        assert str(check.get("start_period", "")).strip(), "model loading needs a start_period"


def test_api_answers_to_the_names_it_is_reached_by() -> None:
    from retriever.api.settings import allowed_hosts_for

    for name in API_SERVICES:
        service = _service(name)
        value = environment(service).get("RETRIEVER_ALLOWED_HOSTS", "")
        hosts = set(allowed_hosts_for([interpolate(value, {})], listen_host="0.0.0.0"))
        assert "*" not in hosts, f"{name} answers to any Host: DNS rebinding reaches the keyless routes"
        # Other containers call it by its service name; the health check and the published port use loopback.
        health = urlsplit(re.findall(r"https?://[^'\"\s]+", _words(service["healthcheck"]["test"]))[0])
        assert {*API_SERVICES, "localhost", "127.0.0.1", health.hostname} <= hosts, sorted(hosts)
        more = allowed_hosts_for([interpolate(value, {"RETRIEVER_ALLOWED_HOSTS": "photos.example.com"})])
        assert {"photos.example.com", *API_SERVICES} <= set(more), "RETRIEVER_ALLOWED_HOSTS should add names"


def test_db_healthcheck_uses_pg_isready() -> None:
    check = _service("db").get("healthcheck") or {}
    test = _words(check.get("test"))
    user = environment(_service("db"))["POSTGRES_USER"]
    assert re.search(rf"\bpg_isready\b.*-U\s+{re.escape(user)}\b", test), test
    assert environment(_service("db")).get("POSTGRES_PASSWORD"), "postgres:16 refuses to start without one"


def test_gpu_service_reserves_a_gpu_and_builds_the_gpu_extra() -> None:
    gpu = _service("api-gpu")
    devices = gpu.get("deploy", {}).get("resources", {}).get("reservations", {}).get("devices")
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}], devices
    args = (gpu.get("build") or {}).get("args") or {}
    assert args.get("EXTRAS") == "gpu", f"api-gpu should build with EXTRAS=gpu, has {args}"
    assert set(args) <= set(build_args(final_stage(dockerfile()))), (
        "api-gpu passes build args the Dockerfile lacks"
    )
    command = gpu.get("command") or []
    on_cuda = environment(gpu).get("RETRIEVER_DEVICE") == "cuda" or (
        "--device" in command and command[command.index("--device") + 1] == "cuda"
    )
    assert on_cuda, "api-gpu should run on cuda"
    if command:
        assert command[:2] == ["retriever", "serve"] and "0.0.0.0" in command
    assert gpu.get("image") != _service("api").get("image"), "the CPU and GPU images need different tags"


def test_dockerfile_and_compose_agree_on_the_index_dir() -> None:
    env = env_values(final_stage(dockerfile()))
    assert env.get("RETRIEVER_HOME") == environment(_service("api"))["RETRIEVER_HOME"]


def _compose_plugin() -> bool:
    if shutil.which("docker") is None:
        return False
    proc = subprocess.run(["docker", "compose", "version"], capture_output=True, text=True, check=False)
    return proc.returncode == 0


@pytest.mark.skipif(not _compose_plugin(), reason="the docker compose plugin is not installed")
def test_docker_compose_config_accepts_the_file() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RETRIEVER_API_KEY", "PHOTOS_DIR")}
    base = ["docker", "compose", "-f", str(COMPOSE), "--project-directory", str(ROOT)]
    ok = subprocess.run(
        [*base, "--profile", "gpu", "config", "-q"],
        env={**env, "RETRIEVER_API_KEY": "test-key"},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ok.returncode == 0, ok.stderr
    unset = subprocess.run(
        [*base, "config", "-q"], env=env, capture_output=True, text=True, timeout=60, check=False
    )
    if unset.returncode == 0:
        assert "RETRIEVER_API_KEY" in DEPLOYMENT_DOC.read_text()
    else:
        assert "RETRIEVER_API_KEY" in unset.stderr, unset.stderr
