"""The search page in headless Chromium against the real app: text search, image search (picker and
drop), captions, the detail view, errors, and the models-loading state.

The tiny models are random, so which image a text "should" find means nothing; the page is checked
against the API's own answer to the same request. An indexed image searched with itself comes first
whatever the model (cosine 1).
"""

from __future__ import annotations

import base64
import shutil
import threading
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode, urlsplit

import pytest
from PIL import Image

from tests.browser.conftest import (
    CAPTIONS,
    N_IMAGES,
    BrowserIndex,
    LiveServer,
    browser_settings,
    js_errors,
    start_server,
    wait_for,
)

SCREENSHOT = Path("/tmp/retriever-page.png")


def by_css(driver: Any, selector: str) -> list[Any]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def one(driver: Any, selector: str) -> Any:
    from selenium.webdriver.common.by import By

    return driver.find_element(By.CSS_SELECTOR, selector)


def type_query(driver: Any, text: str, *, press_enter: bool = True) -> None:
    from selenium.webdriver.common.keys import Keys

    box = one(driver, "#q")
    box.clear()
    box.send_keys(text)
    if press_enter:
        box.send_keys(Keys.ENTER)
    else:
        one(driver, "#search-btn").click()


def wait_hits(driver: Any, selector: str = "#results .hit[data-id]") -> list[Any]:
    def ready(d: Any) -> list[Any] | None:
        if one(d, "#status").get_attribute("data-state") != "done":
            return None
        return by_css(d, selector) or None

    return wait_for(
        driver,
        ready,
        message=lambda: (
            f"no {selector} appeared; status: {one(driver, '#status').text!r}, "
            f"error: {one(driver, '#error').text!r}"
        ),
    )


def images_loaded(driver: Any, selector: str) -> bool:
    return bool(
        driver.execute_script(
            "const imgs = [...document.querySelectorAll(arguments[0])];"
            "return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);",
            selector,
        )
    )


def api_search(live: LiveServer, query: str) -> list[dict[str, Any]]:
    status, body = live.get_json("v1/search?" + urlencode({"q": query, "k": 24, "rerank": "true"}))
    assert status == 200, body
    hits: list[dict[str, Any]] = body["data"]
    assert hits, "the API found nothing: the index is empty?"
    return hits


def test_text_search_shows_the_apis_hits_with_names_and_scores(
    page: Any, live_server: LiveServer, tmp_path: Path
) -> None:
    query = "two dogs playing in the snow"
    type_query(page, query)
    hits = wait_hits(page)
    expected = api_search(live_server, query)

    assert [h.get_attribute("data-id") for h in hits] == [str(h["id"]) for h in expected]
    first, want = hits[0], expected[0]
    assert first.get_attribute("data-rank") == "1"
    assert first.find_element("css selector", ".filename").text == want["filename"]
    itm = first.find_element("css selector", ".score-itm")
    cos = first.find_element("css selector", ".score-cos")
    assert itm.find_element("css selector", ".score-label").text == "ITM"
    main = first.find_element("css selector", ".score-main")
    assert first.find_elements("css selector", ".score")[0] == main, "the ranking score comes first"
    assert float(main.find_element("css selector", ".score-value").text) == pytest.approx(
        want["score"], abs=0.006
    )
    assert cos.find_element("css selector", ".score-label").text == "cos"
    assert float(itm.find_element("css selector", ".score-value").text) == pytest.approx(
        want["rerank_score"], abs=0.006
    )
    assert float(cos.find_element("css selector", ".score-value").text) == pytest.approx(
        want["prefilter_score"], abs=0.0006
    )
    thumb = first.find_element("css selector", "img")
    assert thumb.get_attribute("alt") == want["filename"]
    assert thumb.get_attribute("src").endswith(f"/v1/images/{want['id']}/thumbnail?size=256")
    wait_for(page, lambda d: images_loaded(d, "#results .hit img"), message="thumbnails did not load")

    assert one(page, "#status").text.startswith(f"{len(expected)} image")
    assert one(page, "#error").is_displayed() is False
    assert one(page, "#search-btn").is_enabled()
    assert one(page, "#health").text == f"{N_IMAGES} images · {len(CAPTIONS)} captions"
    assert parse_qs(urlsplit(page.current_url).query).get("q") == [query], (
        "the query should be in the address"
    )

    shot = tmp_path / "search-page.png"
    assert page.save_screenshot(str(shot)), "the screenshot failed"
    shutil.copyfile(shot, SCREENSHOT)
    with Image.open(shot) as im:
        assert im.size[0] >= 1000 and im.size[1] >= 600


def test_button_shows_the_busy_state_while_searching(page: Any, live_server: LiveServer) -> None:
    # Record every state the status line and the button go through, however fast the search is.
    page.execute_script(
        "window.__states = [];"
        "const s = document.querySelector('#status'), b = document.querySelector('#search-btn');"
        "new MutationObserver(() => window.__states.push([s.dataset.state, s.textContent, b.disabled,"
        "  b.textContent])).observe(s, {attributes: true, childList: true, subtree: true});"
    )
    type_query(page, "a bowl of fruit", press_enter=False)
    wait_hits(page)
    states = page.execute_script("return window.__states")
    busy = [s for s in states if s[0] == "busy"]
    assert busy, f"the status never showed a busy state: {states}"
    assert all(s[2] is True for s in busy), f"the button was usable while searching: {busy}"
    assert any("Searching" in s[1] for s in busy) and any("Searching" in s[3] for s in busy)
    assert states[-1][0] == "done" and states[-1][2] is False


def test_query_in_the_address_runs_on_load(page: Any, live_server: LiveServer) -> None:
    page.get(live_server.url + "?" + urlencode({"q": "green and blue stripes"}))
    hits = wait_hits(page)
    expected = api_search(live_server, "green and blue stripes")
    assert hits[0].get_attribute("data-id") == str(expected[0]["id"])
    assert one(page, "#q").get_attribute("value") == "green and blue stripes"


def test_image_search_finds_the_uploaded_image_first(page: Any, browser_index: BrowserIndex) -> None:
    photo = browser_index.photos[3]
    assert one(page, "#target-images").is_selected(), "similar images should be the default"
    one(page, "#file").send_keys(str(photo))
    hits = wait_hits(page)
    first = hits[0]
    assert first.find_element("css selector", ".filename").text == photo.name
    assert float(first.find_element("css selector", ".score-cos .score-value").text) == pytest.approx(
        1.0, abs=2e-3
    )
    # Image→image is never reranked: no ITM badge, and the score it is ranked by is the cosine.
    assert first.find_elements("css selector", ".score-itm") == []
    assert float(first.find_element("css selector", ".score-main .score-value").text) == pytest.approx(
        1.0, abs=6e-3
    )
    assert len(hits) == N_IMAGES
    assert one(page, "#query-image").is_displayed()
    assert one(page, "#query-image-name").text == photo.name


def test_caption_search_lists_the_apis_captions_then_toggles_back(
    page: Any, live_server: LiveServer, browser_index: BrowserIndex
) -> None:
    photo = browser_index.photos[0]
    one(page, "#target-texts").click()
    one(page, "#file").send_keys(str(photo))
    rows = wait_hits(page, "#results .caption[data-id]")
    status, body = live_server.post_file("v1/search/image", photo, {"target": "texts", "k": "24"})
    assert status == 200, body
    assert [r.find_element("css selector", ".caption-text").text for r in rows] == [
        h["text"] for h in body["data"]
    ]
    assert {r.find_element("css selector", ".caption-text").text for r in rows} == set(CAPTIONS)
    first = rows[0]
    assert first.find_element("css selector", ".score-itm .score-label").text == "ITM"
    assert float(first.find_element("css selector", ".score-itm .score-value").text) == pytest.approx(
        body["data"][0]["rerank_score"], abs=0.006
    )
    assert not by_css(page, "#results .hit"), "captions should render as a list, not as thumbnails"

    # Switching back to similar images searches again with the same image.
    one(page, "#target-images").click()
    hits = wait_hits(page)
    assert hits[0].find_element("css selector", ".filename").text == photo.name
    assert not by_css(page, "#results .caption")


def test_dropping_an_image_on_the_page_searches_with_it(page: Any, browser_index: BrowserIndex) -> None:
    photo = browser_index.photos[5]
    data = base64.b64encode(photo.read_bytes()).decode()
    page.execute_script(
        "const bytes = Uint8Array.from(atob(arguments[0]), c => c.charCodeAt(0));"
        "const dt = new DataTransfer();"
        "dt.items.add(new File([bytes], arguments[1], {type: 'image/png'}));"
        "const init = {dataTransfer: dt, bubbles: true, cancelable: true};"
        "window.dispatchEvent(new DragEvent('dragenter', init));"
        "window.__overlay = !document.querySelector('#drop-overlay').hidden;"
        "window.dispatchEvent(new DragEvent('drop', init));",
        data,
        photo.name,
    )
    assert page.execute_script("return window.__overlay") is True, (
        "dragging a file in should show the overlay"
    )
    hits = wait_hits(page)
    assert hits[0].find_element("css selector", ".filename").text == photo.name
    assert one(page, "#drop-overlay").is_displayed() is False


def test_thumbnail_opens_the_detail_view_and_escape_closes_it(page: Any, live_server: LiveServer) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    type_query(page, "a city street at night")
    hits = wait_hits(page)
    image_id = hits[0].get_attribute("data-id")
    status, meta = live_server.get_json(f"v1/images/{image_id}")
    assert status == 200, meta

    hits[0].find_element("css selector", ".thumb").click()
    wait_for(
        page, lambda d: d.execute_script("return document.querySelector('#modal').open"), message="no modal"
    )
    modal = one(page, "#modal")
    assert modal.is_displayed()
    assert modal.get_attribute("data-id") == image_id
    assert one(page, "#modal-title").text == meta["filename"]
    wait_for(page, lambda d: one(d, "#modal-meta").get_attribute("aria-busy") == "false")
    assert one(page, "#modal-meta dd[data-key=path]").text == meta["path"]
    assert one(page, "#modal-meta dd[data-key=dimensions]").text == f"{meta['width']} × {meta['height']}"
    assert one(page, "#modal-meta dd[data-key=content_hash]").text == meta["content_hash"][:16]
    assert one(page, "#modal-scores dd[data-key=rank]").text == "1"
    wait_for(page, lambda d: images_loaded(d, "#modal-img"), message="the image file did not load")
    assert one(page, "#modal-img").get_attribute("src").endswith(f"/v1/images/{image_id}/file")
    natural = page.execute_script("return document.querySelector('#modal-img').naturalWidth")
    assert natural == meta["width"], "the detail view should show the original file"
    assert one(page, "#modal-img").get_attribute("alt") == meta["filename"]

    ActionChains(page).send_keys(Keys.ESCAPE).perform()
    wait_for(page, lambda d: not d.execute_script("return document.querySelector('#modal').open"))
    assert not one(page, "#modal").is_displayed()
    assert page.execute_script(
        "return document.activeElement === document.querySelector('#results .thumb')"
    ), "focus should go back to the thumbnail that opened the view"

    # The close button works too.
    hits[1].find_element("css selector", ".thumb").click()
    wait_for(page, lambda d: d.execute_script("return document.querySelector('#modal').open"))
    one(page, "#modal-close").click()
    wait_for(page, lambda d: not d.execute_script("return document.querySelector('#modal').open"))


@pytest.mark.parametrize("query", ["", "   "], ids=["empty", "blank"])
def test_empty_query_says_what_to_do(page: Any, live_server: LiveServer, query: str) -> None:
    type_query(page, query)
    wait_for(page, lambda d: one(d, "#error").is_displayed(), message="no error message appeared")
    status, _ = live_server.get_json("v1/search?" + urlencode({"q": query, "k": 24, "rerank": "true"}))
    assert status == 422
    # In words, not the API's validation text ("q: String should have at least 1 character").
    assert one(page, "#error").text == "Type some words to search for, or drop an image."
    assert one(page, "#status").get_attribute("data-state") == "error"
    assert not by_css(page, "#results .hit")
    assert one(page, "#search-btn").is_enabled()

    type_query(page, "a red square")  # the next good search clears the error
    wait_hits(page)
    assert not one(page, "#error").is_displayed()


class GatedLoader:
    """Loads the models through the factory, but only once ``gate`` is set."""

    def __init__(self) -> None:
        from retriever.api.runtime import FactoryLoader

        self.gate = threading.Event()
        self._inner = FactoryLoader()

    def load_prefilter(self, model_id: str, device: Any) -> Any:
        if not self.gate.wait(120):
            raise TimeoutError("the test never opened the gate")
        return self._inner.load_prefilter(model_id, device)

    def load_reranker(self, model_id: str, device: Any) -> Any:
        return self._inner.load_reranker(model_id, device)


def test_loading_models_shows_the_retry_message_then_the_results(
    driver: Any, browser_index: BrowserIndex
) -> None:
    loader = GatedLoader()
    live = start_server(browser_settings(browser_index, retry_after_s=1), loader=loader)
    try:
        status, _ = live.get_json("v1/search?q=dog")
        assert status == 503, "searches should answer 503 while the models load"
        driver.get(live.url)
        wait_for(driver, lambda d: one(d, "#health").text.startswith("Loading models"))
        assert one(driver, "#health").get_attribute("data-state") == "loading"
        driver.get_log("browser")
        type_query(driver, "two dogs playing in the snow")
        wait_for(
            driver,
            lambda d: one(d, "#status").get_attribute("data-state") == "loading",
            message=lambda: f"no loading message; status: {one(driver, '#status').text!r}",
        )
        assert "Models are loading, retrying" in one(driver, "#status").text
        assert one(driver, "#results").get_attribute("aria-busy") == "true"
        assert not one(driver, "#error").is_displayed()
        assert not by_css(driver, "#results .hit")

        loader.gate.set()
        hits = wait_hits(driver)
        expected = api_search(live, "two dogs playing in the snow")
        assert hits[0].get_attribute("data-id") == str(expected[0]["id"])
        wait_for(driver, lambda d: one(d, "#health").get_attribute("data-state") == "ok")
        assert not js_errors(driver)
    finally:
        loader.gate.set()
        live.stop()
