"""What the server tells and serves to whom: the Host header check (DNS rebinding), the paths that
/v1/status shows only to the key holder, and OPTIONS/405 answers whose Allow header lists every method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from retriever.api.app import create_app
from retriever.api.settings import Settings
from tests.api.conftest import API_KEY, AppFactory

LOOPBACK = {"localhost", "127.0.0.1", "::1"}


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    """Nothing here depends on the database backend; the endpoint tests cover both."""
    return f"sqlite:///{tmp_path / 'store.db'}"


def _is_json_error(response: Any, status: int) -> str:
    assert response.status_code == status, (
        f"{response.request.method} {response.request.url}: {response.text}"
    )
    assert response.headers["content-type"].startswith("application/json")
    detail = response.json()["detail"]
    assert isinstance(detail, str) and detail
    return detail


# -- the Host header ----------------------------------------------------------------------------------

#: Keyless routes a page on another site could read through a rebound DNS name, if the Host were not checked.
KEYLESS_READS = (
    "/health",
    "/v1/status",
    "/v1/images",
    "/v1/images/1",
    "/v1/images/1/file",
    "/v1/images/1/thumbnail",
    "/v1/search?q=a+red+square",
    "/",
    "/openapi.json",
)


def test_a_foreign_host_header_is_refused_everywhere(indexed: Path, make_client: AppFactory) -> None:
    client = make_client()
    assert client.get("/v1/images/1/file").status_code == 200
    for host in ("evil.example", "evil.example:8000", "127.0.0.1.evil.example", "localhost.evil.example"):
        for url in KEYLESS_READS:
            detail = _is_json_error(client.get(url, headers={"Host": host}), 400)
            assert host.split(":")[0] in detail, detail
            # The answer names the allowed names and how to add one.
            assert "localhost" in detail and "testserver" in detail, detail
            assert "--allowed-host" in detail and "RETRIEVER_ALLOWED_HOSTS" in detail, detail
        _is_json_error(client.delete("/v1/images/1", headers={"Host": host}), 400)
        _is_json_error(client.request("OPTIONS", "/v1/images/1", headers={"Host": host}), 400)
    assert client.get("/v1/images/1/file").status_code == 200


def test_loopback_names_are_allowed_by_default(tmp_path: Path) -> None:
    settings = Settings(index_dir=tmp_path / "index")
    assert set(settings.allowed_hosts) == LOOPBACK
    # /openapi.json needs no runtime, so the app is not started.
    client = TestClient(create_app(settings), base_url="http://localhost")
    for host in (
        "localhost",
        "localhost:8000",
        "LocalHost:80",
        "127.0.0.1",
        "127.0.0.1:8000",
        "[::1]",
        "[::1]:8000",
    ):
        response = client.get("/openapi.json", headers={"Host": host})
        assert response.status_code == 200, (host, response.text)
    for host in ("testserver", "evil.example", "[::2]:8000", "127.0.0.2", "", "localhost:8000:1"):
        _is_json_error(client.get("/openapi.json", headers={"Host": host}), 400)


def test_allowed_hosts_add_names_and_star_allows_any(tmp_path: Path) -> None:
    named = TestClient(create_app(Settings(index_dir=tmp_path, allowed_hosts=("photos.example", "*.lan"))))
    for host, status in (
        ("photos.example", 200),
        ("Photos.Example:443", 200),
        ("a.lan", 200),
        ("x.y.lan", 200),
        ("lan", 400),
        ("photos.example.evil", 400),
        ("localhost", 400),
    ):
        assert named.get("/openapi.json", headers={"Host": host}).status_code == status, host
    anything = TestClient(create_app(Settings(index_dir=tmp_path, allowed_hosts=("*",))))
    for host in ("evil.example", "testserver", "10.0.0.7:8000"):
        assert anything.get("/openapi.json", headers={"Host": host}).status_code == 200, host


@pytest.mark.parametrize(
    "bad", ["", " ", "a b", "http://x", "host/path", "x.example:8000", "a*.example", "*x"]
)
def test_settings_refuse_a_malformed_allowed_host(tmp_path: Path, bad: str) -> None:
    with pytest.raises(ValueError, match="allowed host"):
        Settings(index_dir=tmp_path, allowed_hosts=(bad,))


def _serve_settings(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, *args: str, env: str | None = None
) -> Settings:
    """The Settings ``retriever serve ARGS`` would start the server with (uvicorn is not started)."""
    import uvicorn

    import retriever.api.app
    from retriever.cli.app import app

    captured: list[Settings] = []
    real_create_app = retriever.api.app.create_app

    def capture(settings: Settings, **kwargs: Any) -> Any:
        captured.append(settings)
        return real_create_app(settings, **kwargs)

    monkeypatch.setattr(retriever.api.app, "create_app", capture)
    monkeypatch.setattr(uvicorn, "run", lambda *a, **k: None)
    if env is None:
        monkeypatch.delenv("RETRIEVER_ALLOWED_HOSTS", raising=False)
    else:
        monkeypatch.setenv("RETRIEVER_ALLOWED_HOSTS", env)
    result = CliRunner().invoke(app, ["serve", "--index-dir", str(tmp_path / "index"), *args])
    assert result.exit_code == 0, result.output
    assert len(captured) == 1
    return captured[0]


def test_serve_takes_allowed_hosts_from_options_and_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    assert set(_serve_settings(monkeypatch, tmp_path).allowed_hosts) == LOOPBACK
    given = _serve_settings(
        monkeypatch, tmp_path, "--allowed-host", "Photos.Example", "--allowed-host", "b.lan,c.lan"
    )
    assert set(given.allowed_hosts) == LOOPBACK | {"photos.example", "b.lan", "c.lan"}
    from_env = _serve_settings(monkeypatch, tmp_path, env="api, api-gpu,,photos.example")
    assert set(from_env.allowed_hosts) == LOOPBACK | {"api", "api-gpu", "photos.example"}
    assert _serve_settings(monkeypatch, tmp_path, env="*").allowed_hosts == ("*",)
    # A server started on one address answers to that address too.
    on_lan = _serve_settings(monkeypatch, tmp_path, "--host", "192.168.1.5", "--api-key", "k")
    assert set(on_lan.allowed_hosts) == LOOPBACK | {"192.168.1.5"}
    on_all = _serve_settings(monkeypatch, tmp_path, "--host", "0.0.0.0", "--api-key", "k")
    assert set(on_all.allowed_hosts) == LOOPBACK


def test_serve_refuses_a_malformed_allowed_host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from retriever.cli.app import app

    monkeypatch.delenv("RETRIEVER_ALLOWED_HOSTS", raising=False)
    result = CliRunner().invoke(
        app, ["serve", "--index-dir", str(tmp_path / "index"), "--allowed-host", "http://photos.example"]
    )
    assert result.exit_code == 2, result.output
    assert "--allowed-host" in result.output and "http://photos.example" in result.output, result.output


# -- /v1/status ---------------------------------------------------------------------------------------


def test_status_shows_paths_only_with_the_key(indexed: Path, make_client: AppFactory, tmp_path: Path) -> None:
    client = make_client(api_key=API_KEY)
    anonymous = client.get("/v1/status")
    assert anonymous.status_code == 200
    body = anonymous.json()
    assert body["index_dir"] is None and body["database"] is None
    assert body["images"] == 8 and body["texts"] == 2 and body["models"]["dim"] > 0
    assert str(tmp_path) not in anonymous.text and "sqlite" not in anonymous.text
    for headers in ({"X-API-Key": API_KEY}, {"Authorization": f"Bearer {API_KEY}"}):
        full = client.get("/v1/status", headers=headers).json()
        assert full["index_dir"] == str(indexed) and "store.db" in full["database"]
        assert {k: v for k, v in full.items() if k not in ("index_dir", "database")} == {
            k: v for k, v in body.items() if k not in ("index_dir", "database")
        }
    for wrong in ({"X-API-Key": "wrong"}, {"Authorization": "Bearer wrong"}):
        _is_json_error(client.get("/v1/status", headers=wrong), 401)


def test_status_shows_no_paths_when_the_server_has_no_key(
    indexed: Path, make_client: AppFactory, tmp_path: Path
) -> None:
    client = make_client()
    for headers in ({}, {"X-API-Key": "anything"}, {"Authorization": "Bearer anything"}):
        response = client.get("/v1/status", headers=headers)
        assert response.status_code == 200
        assert response.json()["index_dir"] is None and response.json()["database"] is None
        assert str(tmp_path) not in response.text


def test_status_schema_documents_the_optional_paths(make_client: AppFactory) -> None:
    openapi = make_client(wait=False).get("/openapi.json").json()
    status = openapi["components"]["schemas"]["StatusPublic"]
    for name in ("index_dir", "database"):
        assert name not in status.get("required", []), name
        assert "API key" in status["properties"][name]["description"]
    operation = openapi["paths"]["/v1/status"]["get"]
    # {} in the alternatives: the key is optional here.
    assert {} in operation["security"] and {"APIKeyHeader": []} in operation["security"]
    assert "401" in operation["responses"]


# -- OPTIONS and Allow --------------------------------------------------------------------------------

#: Every method each path answers to, as the routes declare them (HEAD where a route accepts it).
METHODS_OF = {
    "/v1/images/1": {"GET", "DELETE", "OPTIONS"},
    "/v1/images": {"GET", "OPTIONS"},
    "/v1/images/1/file": {"GET", "OPTIONS"},
    "/v1/index": {"POST", "OPTIONS"},
    "/v1/texts": {"POST", "OPTIONS"},
    "/v1/search/image": {"POST", "OPTIONS"},
    "/v1/jobs/abc": {"GET", "OPTIONS"},
    "/health": {"GET", "OPTIONS"},
    "/openapi.json": {"GET", "HEAD", "OPTIONS"},
    "/static/app.js": {"GET", "HEAD", "OPTIONS"},
}
PROBED = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "TRACE")


def _allow(response: Any) -> set[str]:
    return {m.strip() for m in response.headers.get("allow", "").split(",") if m.strip()}


def test_options_lists_every_method_of_the_path(indexed: Path, make_client: AppFactory) -> None:
    # With a key, DELETE and the POSTs stop at 401 and change nothing.
    client = make_client(api_key=API_KEY)
    for path, methods in METHODS_OF.items():
        response = client.request("OPTIONS", path)
        assert response.status_code in (200, 204), (path, response.text)
        assert _allow(response) == methods, (path, response.headers.get("allow"))
        # The header says what the server does: every other method is 405 (with the same Allow).
        for method in PROBED:
            answer = client.request(method, path)
            if method in methods:
                assert answer.status_code != 405, (method, path)
            else:
                assert answer.status_code == 405, (method, path, answer.status_code)
                assert _allow(answer) == methods, (method, path, answer.headers.get("allow"))
    for missing in ("/v1/nothing", "/v1/images/1/nothing", "/v2/images/1"):
        _is_json_error(client.request("OPTIONS", missing), 404)


def test_serve_takes_a_model_preset_like_every_other_command(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from retriever.factory import preset

    settings = _serve_settings(monkeypatch, tmp_path, "--model", "shapes")
    assert (settings.prefilter, settings.reranker) == preset("shapes")
    monkeypatch.setenv("RETRIEVER_MODEL", "shapes")
    pinned = _serve_settings(monkeypatch, tmp_path, "--reranker", str(tmp_path / "mine"))
    assert (pinned.prefilter, pinned.reranker) == (preset("shapes")[0], str(tmp_path / "mine"))
