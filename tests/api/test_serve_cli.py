"""``retriever serve`` as a subprocess on a free loopback port, polled until its models are loaded."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import write_images


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(url: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_serve_answers_health_then_searches(tmp_path: Path, tiny_clip_dir: Path, tiny_vilt_dir: Path) -> None:
    port = _free_port()
    photos, other = tmp_path / "photos", tmp_path / "other"
    write_images(photos, 3)
    other.mkdir()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "RETRIEVER_HOME": str(tmp_path / "index"),
        "RETRIEVER_PREFILTER": str(tiny_clip_dir),
        "RETRIEVER_RERANKER": str(tiny_vilt_dir),
        "RETRIEVER_ROOTS": f"{other}{os.pathsep}{photos}",
    }
    env.pop("RETRIEVER_DB_URL", None)
    env.pop("RETRIEVER_API_KEY", None)
    server = subprocess.Popen(
        [sys.executable, "-m", "retriever", "serve", "--port", str(port), "--device", "cpu"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        health: Any = None
        while time.monotonic() < deadline:
            assert server.poll() is None, server.communicate()[0]
            try:
                health = _call(f"{base}/health")[1]
            except (urllib.error.URLError, ConnectionError):
                health = None
            if health is not None and health["status"] == "ok":
                break
            time.sleep(0.2)
        assert health == {"status": "ok", "loading": [], "images": 0, "texts": 0, "error": None}
        status, body = _call(f"{base}/v1/search?q=a%20dog")
        assert status == 200 and body["data"] == []
        status, body = _call(f"{base}/v1/search?q=%20")
        assert status == 422 and "empty" in body["detail"]
        status, body = _call(f"{base}/v1/index", {"path": str(tmp_path)})
        assert status == 403
        status, job = _call(f"{base}/v1/index", {"path": str(photos)})
        assert status == 202
        while job["state"] in ("queued", "running") and time.monotonic() < deadline:
            time.sleep(0.1)
            job = _call(f"{base}/v1/jobs/{job['id']}")[1]
        assert job["state"] == "done" and job["report"]["added"] == 3, job
        status, body = _call(f"{base}/v1/search?q=a%20dog&k=2")
        assert status == 200 and body["count"] == 2
    finally:
        server.send_signal(signal.SIGINT)
        try:
            output = server.communicate(timeout=30)[0]
        except subprocess.TimeoutExpired:
            server.kill()
            output = server.communicate()[0]
    assert server.returncode == 0, output
    assert f"127.0.0.1:{port}" in output


def test_serve_refuses_a_root_that_is_not_a_folder(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from retriever.cli.app import app

    result = CliRunner().invoke(
        app, ["serve", "--index-dir", str(tmp_path / "index"), "--root", str(tmp_path / "missing")]
    )
    assert result.exit_code == 2 and "no such folder" in result.output
