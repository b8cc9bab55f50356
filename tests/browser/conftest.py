"""A headless Chromium (Debian's chromium + chromium-driver, driven by Selenium) and the real app, served
by uvicorn on a free loopback port over an index of generated images built with the tiny random models.

Without Chromium these tests fail with the command that installs it, unless RETRIEVER_SKIP_BROWSER=1.
Nothing is downloaded: Selenium Manager is switched off and the system chromedriver is used.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar, cast

import pytest

from tests.conftest import write_images

CHROMIUM = os.environ.get("RETRIEVER_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("RETRIEVER_CHROMEDRIVER", "/usr/bin/chromedriver")
INSTALL = "apt-get update && apt-get install -y chromium chromium-driver"
CHROMIUM_ARGS = (
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
)
#: Captions for the image→text searches.
CAPTIONS = (
    "a red square on a noisy background",
    "two dogs playing in the snow",
    "a bowl of fruit on a wooden table",
    "a city street at night",
    "green and blue stripes",
)
N_IMAGES = 8

T = TypeVar("T")


# -- the browser ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def browser_ready() -> None:
    """Skip (RETRIEVER_SKIP_BROWSER=1) or fail with the install command when there is no browser."""
    if os.environ.get("RETRIEVER_SKIP_BROWSER") == "1":
        pytest.skip("RETRIEVER_SKIP_BROWSER=1")
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.fail(
            f"the browser tests need Chromium and its driver, and {', '.join(missing)} is not there. "
            f"Install them with `{INSTALL}`, or set RETRIEVER_SKIP_BROWSER=1 to skip these tests.",
            pytrace=False,
        )
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.fail(
            "the browser tests need Selenium: `pip install 'selenium>=4.11'`, "
            "or set RETRIEVER_SKIP_BROWSER=1 to skip these tests.",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def _browser_or_skip(browser_ready: None) -> None:
    """Every test here needs the browser: decide before any index or server is built."""


@pytest.fixture(scope="session")
def driver(browser_ready: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One headless Chromium for the session, with a fresh profile and the console log kept."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SE_OFFLINE", "true")  # never let Selenium Manager download a browser or driver
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in CHROMIUM_ARGS:
            options.add_argument(arg)
        options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
        options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        browser = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    browser.set_page_load_timeout(30)
    try:
        yield browser
    finally:
        browser.quit()


# -- the index and the server -----------------------------------------------------------------------


@dataclass(frozen=True)
class BrowserIndex:
    """An index of ``N_IMAGES`` generated images and ``CAPTIONS``."""

    home: Path
    photos: list[Path]


@pytest.fixture(scope="session")
def browser_index(
    browser_ready: None, tmp_path_factory: pytest.TempPathFactory, tiny_models: tuple[Any, Any]
) -> BrowserIndex:
    from retriever.indexing import index_folder, model_info
    from retriever.search_index import SearchIndex

    prefilter, reranker = tiny_models
    root = tmp_path_factory.mktemp("browser-index")
    photos = write_images(root / "photos", N_IMAGES)
    home = root / "index"
    search_index = SearchIndex(home)
    try:
        report = index_folder(search_index, prefilter, reranker, root / "photos")
        assert report.added == N_IMAGES, report.as_dict()
        with search_index.writer():
            search_index.check_models(model_info(prefilter, reranker), record=True)
            vectors = prefilter.encode_texts(list(CAPTIONS))
            search_index.commit_texts([(None, t, v) for t, v in zip(CAPTIONS, vectors, strict=True)])
    finally:
        search_index.close()
    return BrowserIndex(home, photos)


@dataclass
class LiveServer:
    """The app served by uvicorn on a thread."""

    url: str
    server: Any
    thread: threading.Thread
    extra: dict[str, Any] = field(default_factory=dict)

    def get_json(self, path: str) -> tuple[int, Any]:
        """GET a JSON answer (any status)."""
        request = urllib.request.Request(self.url + path, headers={"Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def post_file(self, path: str, file: Path, fields: dict[str, str]) -> tuple[int, Any]:
        """POST a multipart form with one ``file`` part (what the page's image search sends)."""
        boundary = uuid.uuid4().hex
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
            for k, v in fields.items()
        ]
        parts.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{file.name}"\r\n'
            f"Content-Type: image/png\r\n\r\n".encode()
            + file.read_bytes()
            + b"\r\n"
        )
        body = b"".join(parts) + f"--{boundary}--\r\n".encode()
        request = urllib.request.Request(
            self.url + path,
            data=body,
            headers={
                "Content-Type": f"multipart/form-data; boundary={boundary}",
                "Accept": "application/json",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"null")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def start_server(settings: Any, loader: Any = None) -> LiveServer:
    """``create_app(settings)`` served on a free 127.0.0.1 port; returns once it accepts requests."""
    import uvicorn

    from retriever.api.app import create_app

    app = create_app(settings, loader=loader)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError("the app did not start (see the log above)")
        time.sleep(0.05)
    return LiveServer(f"http://127.0.0.1:{port}/", server, thread)


def wait_healthy(live: LiveServer, timeout: float = 120.0) -> dict[str, Any]:
    """Wait until /health says the models are loaded."""
    deadline = time.monotonic() + timeout
    while True:
        status, body = live.get_json("health")
        if status == 200 and body["status"] == "ok":
            return dict(body)
        assert body.get("status") != "error", f"the models failed to load: {body}"
        if time.monotonic() > deadline:
            raise TimeoutError(f"the models did not load in {timeout} s: {body}")
        time.sleep(0.1)


def browser_settings(index: BrowserIndex, **overrides: Any) -> Any:
    """Settings for the index: its own models (recorded when it was built), on the CPU."""
    from retriever.api.settings import Settings

    return Settings(index_dir=index.home, device="cpu", **overrides)


@pytest.fixture(scope="session")
def live_server(browser_index: BrowserIndex) -> Iterator[LiveServer]:
    """The app over the tiny index, models loaded."""
    live = start_server(browser_settings(browser_index))
    try:
        wait_healthy(live)
        yield live
    finally:
        live.stop()


# -- page helpers -----------------------------------------------------------------------------------


def wait_for(
    driver: Any,
    condition: Callable[[Any], T | None],
    timeout: float = 30.0,
    message: str | Callable[[], str] = "",
) -> T:
    """Poll ``condition(driver)`` until it is truthy and return its value; fail with ``message`` (a
    callable is asked at the time of the failure, to report the page's state then) after ``timeout``."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        value = WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)
    except TimeoutException:
        text = message() if callable(message) else message
        raise AssertionError(f"waited {timeout} s in vain: {text or condition}") from None
    return cast(T, value)  # until() returns only a truthy value


def js_errors(driver: Any) -> list[str]:
    """JavaScript errors logged since the last call (failed requests the test asked for are not errors)."""
    return [e["message"] for e in driver.get_log("browser") if e.get("source") == "javascript"]


@pytest.fixture
def page(driver: Any, live_server: LiveServer) -> Iterator[Any]:
    """The search page, freshly loaded; fails the test on any JavaScript error it logged."""
    driver.get(live_server.url)
    wait_for(driver, lambda d: d.execute_script("return document.documentElement.dataset.ready === 'true'"))
    driver.get_log("browser")  # start from an empty log
    yield driver
    errors = js_errors(driver)
    assert not errors, f"the page logged JavaScript errors: {errors}"
