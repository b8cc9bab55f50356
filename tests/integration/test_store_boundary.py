"""The storage boundary: the store owns all SQL, its failures are project errors, a snapshot only reads."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from sqlalchemy import text

from retriever.api.snapshots import IndexSnapshot
from retriever.errors import (
    BadQueryError,
    DatabaseFailureError,
    EmptyQueryError,
    QueryTooLongError,
    RetrieverError,
    StoreError,
)
from retriever.index.patches import PatchCacheShortError
from retriever.index.store import Encoded, ImageBatch, MetadataStore, NewImage, NoStoreError
from retriever.search import MAX_QUERY_CHARS, clean_query
from retriever.search_index import SearchIndex, SearchIndexReader

DIM = 4
MODELS = ("prefilter-model", "reranker-model")


@pytest.fixture
def store(db_url: str) -> Iterator[MetadataStore]:
    opened = MetadataStore(db_url)
    yield opened
    opened.close()


def _images(store: MetadataStore, n: int) -> list[int]:
    rng = np.random.default_rng(0)
    upserts = [
        NewImage(
            f"/photos/{i}.png", 100 + i, 1.5 + i, f"hash{i}", Encoded(rng.random(DIM, np.float32), 8, 6, i, 1)
        )
        for i in range(n)
    ]
    return sorted(store.apply(ImageBatch(upserts=upserts), MODELS).added_ids.tolist())


def test_a_failure_after_opening_is_a_project_error_with_the_drivers_reason(store: MetadataStore) -> None:
    with store.engine.begin() as conn:
        conn.execute(text("DROP TABLE texts"))
    with pytest.raises(DatabaseFailureError) as info:
        store.count_texts()
    assert isinstance(info.value, RetrieverError) and isinstance(info.value, StoreError)
    assert "texts" in info.value.reason and str(info.value) == f"database error: {info.value.reason}"


def test_image_page_is_in_id_order(store: MetadataStore) -> None:
    ids = _images(store, 5)
    page = store.image_page(1, 3)
    assert [r.id for r in page] == ids[1:4]
    assert page[0].path == "/photos/1.png" and (page[0].width, page[0].height) == (8, 6)
    assert store.image_page(5, 10) == []


def test_clear_all_empties_both_collections_and_moves_the_generations_on(store: MetadataStore) -> None:
    _images(store, 2)
    store.add_texts([("c1", "a caption", np.ones(DIM, np.float32))])
    before = {kind: store.generation(kind) for kind in ("images", "texts")}
    store.clear_all({"roots": "{}", "prefilter": "other"})
    assert (store.count_images(), store.count_texts()) == (0, 0)
    assert all(store.generation(kind) > before[kind] for kind in before)
    assert store.get_meta("prefilter") == "other" and store.get_meta("roots") == "{}"


def test_every_error_class_of_the_storage_layer_is_a_project_error() -> None:
    for cls in (NoStoreError, PatchCacheShortError, DatabaseFailureError):
        assert issubclass(cls, RetrieverError)


def test_the_servers_snapshot_has_no_write_method() -> None:
    assert issubclass(IndexSnapshot, SearchIndexReader) and not issubclass(IndexSnapshot, SearchIndex)
    writes = {
        name for name in set(vars(SearchIndex)) - set(vars(SearchIndexReader)) if not name.startswith("__")
    }
    assert {"commit", "remove_images", "reset", "commit_texts", "writer"} <= writes
    assert not [name for name in writes if hasattr(IndexSnapshot, name)]


def test_an_over_long_query_is_refused_as_too_long_not_as_empty() -> None:
    with pytest.raises(QueryTooLongError, match="characters long"):
        clean_query("x" * (MAX_QUERY_CHARS + 1))
    with pytest.raises(EmptyQueryError):
        clean_query("  ")
    assert issubclass(QueryTooLongError, BadQueryError) and issubclass(EmptyQueryError, BadQueryError)
    assert not issubclass(QueryTooLongError, EmptyQueryError)
