"""The search page with the model shipped in the package: a typed caption finds its image first.

Unlike the tiny random models, the shipped shapes model really retrieves, so here the right
thumbnail is known in advance: the image the caption was written for.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from tests.browser.conftest import LiveServer, start_server, wait_for, wait_healthy
from tests.browser.test_search_page import one, type_query, wait_hits


@pytest.fixture(scope="module")
def shapes_site(
    browser_ready: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, dict[str, Any]]]:
    import torch

    from retriever.api.settings import Settings
    from retriever.datasets.shapes import generate
    from retriever.factory import load_prefilter, load_reranker, preset
    from retriever.indexing import index_folder
    from retriever.search_index import SearchIndex

    pre_dir, re_dir = preset("shapes")
    root = tmp_path_factory.mktemp("shapes-site")
    dataset = generate(root / "photos", 12, seed=31337, split="val", workers=1)
    entries = json.loads(dataset.read_text())["images"]
    # A scene without a twin in the folder: its caption names objects no other image has together.
    target = next(e for e in entries if e.get("twin_role") == "single")
    search_index = SearchIndex(root / "index")
    cpu = torch.device("cpu")
    try:
        report = index_folder(
            search_index, load_prefilter(pre_dir, cpu), load_reranker(re_dir, cpu), root / "photos"
        )
        assert report.added == 12, report.as_dict()
    finally:
        search_index.close()
    live = start_server(Settings(index_dir=root / "index", device="cpu"))
    try:
        wait_healthy(live)
        yield live, target
    finally:
        live.stop()


def test_typed_caption_finds_its_image_first(
    driver: Any, shapes_site: tuple[LiveServer, dict[str, Any]]
) -> None:
    live, target = shapes_site
    driver.get(live.url)
    wait_for(driver, lambda d: d.execute_script("return document.documentElement.dataset.ready === 'true'"))
    type_query(driver, target["sentences"][0]["raw"])
    hits = wait_hits(driver)
    assert hits[0].find_element("css selector", ".filename").text == target["filename"]
    assert one(driver, "#error").is_displayed() is False
