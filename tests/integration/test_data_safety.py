"""Data safety: nothing a user does loses the index, and damage is named instead of crashing.

Each test reproduces a reported defect with the tiny models on real files and both database backends.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retriever.errors import IndexDamagedError, IndexMismatchError, NoIndexError
from retriever.indexing import index_folder
from retriever.search import search_text
from retriever.search_index import SearchIndex
from tests.conftest import write_images


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    write_images(folder, 6)
    return folder


def _paths(search_index: SearchIndex) -> set[str]:
    return set(search_index.store.file_states())


def test_indexing_one_file_keeps_every_other_image(
    tmp_path: Path, db_url: str, photos: Path, tiny_models: tuple[Any, Any]
) -> None:
    pre, rer = tiny_models
    search_index = SearchIndex(tmp_path / "index", db_url)
    index_folder(search_index, pre, rer, photos)
    before = _paths(search_index)
    one = sorted(photos.iterdir())[2]

    report = index_folder(search_index, pre, rer, one)

    assert report.removed == 0 and report.unchanged == 1
    assert _paths(search_index) == before
    # A changed file given alone is updated, and still nothing else is touched.
    write_images(tmp_path / "other", 1, start_seed=77)
    shutil.copy(next((tmp_path / "other").iterdir()), one)
    again = index_folder(search_index, pre, rer, one)
    assert (again.updated, again.removed) == (1, 0)
    assert _paths(search_index) == before
    search_index.close()


def test_indexing_a_subfolder_removes_only_what_is_gone_under_it(
    tmp_path: Path, db_url: str, tiny_models: tuple[Any, Any]
) -> None:
    pre, rer = tiny_models
    root = tmp_path / "photos"
    a = write_images(root / "a", 3)
    write_images(root / "b", 3, start_seed=10)
    search_index = SearchIndex(tmp_path / "index", db_url)
    index_folder(search_index, pre, rer, root)
    a[0].unlink()

    report = index_folder(search_index, pre, rer, root / "a")

    assert report.removed == 1
    assert len(_paths(search_index)) == 5
    search_index.close()


def test_image_ids_are_never_reused(
    tmp_path: Path, db_url: str, photos: Path, tiny_models: tuple[Any, Any]
) -> None:
    pre, rer = tiny_models
    search_index = SearchIndex(tmp_path / "index", db_url)
    index_folder(search_index, pre, rer, photos)
    states = search_index.store.file_states()
    newest = max(states.values(), key=lambda s: s.id)
    info = search_index.models()
    assert info is not None
    search_index.remove_images([newest.id], info)
    (photos / "new.png").write_bytes(b"")
    write_images(tmp_path / "more", 1, start_seed=99)
    shutil.copy(next((tmp_path / "more").iterdir()), photos / "new.png")
    Path(next(p for p, s in states.items() if s.id == newest.id)).unlink()

    index_folder(search_index, pre, rer, photos)

    new_id = search_index.store.file_states()[str((photos / "new.png").resolve())].id
    assert new_id > newest.id
    search_index.close()


def test_a_server_view_follows_a_rebuild_from_another_process(
    tmp_path: Path, db_url: str, tiny_models: tuple[Any, Any]
) -> None:
    """A long-lived reader (the server's) must not keep reading the patch file a rebuild replaced."""
    from retriever.api.snapshots import IndexSnapshot

    pre, rer = tiny_models
    home = tmp_path / "index"
    first, second = tmp_path / "first", tmp_path / "second"
    write_images(first, 6)
    write_images(second, 5, start_seed=40)
    writer = SearchIndex(home, db_url)
    index_folder(writer, pre, rer, first)
    reader = IndexSnapshot(home, db_url, min_refresh_s=0.0)
    search_text(reader, pre, rer, "a red square", k=3, candidates=6)  # maps the first patch file

    other = SearchIndex(home, db_url)  # another process: `retriever index second --rebuild`
    index_folder(other, pre, rer, second, rebuild=True)
    other.close()

    served = search_text(reader, pre, rer, "a red square", k=5, candidates=5)
    fresh_library = SearchIndex(home, db_url)
    fresh = search_text(fresh_library, pre, rer, "a red square", k=5, candidates=5)
    assert [h.id for h in served.hits] == [h.id for h in fresh.hits]
    assert [h.score for h in served.hits] == pytest.approx([h.score for h in fresh.hits], abs=1e-5)
    for lib in (reader, writer, fresh_library):
        lib.close()


# -- a folder and its database belong together ------------------------------------------------------


def test_two_folders_sharing_one_database_are_refused(
    tmp_path: Path, db_url: str, tiny_models: tuple[Any, Any]
) -> None:
    if db_url.startswith("sqlite"):
        pytest.skip("an SQLite database given by URL can be shared the same way; PostgreSQL is the real case")
    pre, rer = tiny_models
    a, b = tmp_path / "a", tmp_path / "b"
    write_images(a, 3)
    write_images(b, 3, start_seed=20)
    first = SearchIndex(tmp_path / "pgA", db_url)
    index_folder(first, pre, rer, a)
    first.close()

    with pytest.raises(IndexMismatchError) as info:
        SearchIndex(tmp_path / "pgB", db_url)
    message = str(info.value)
    assert str(tmp_path / "pgA") in message and str(tmp_path / "pgB") in message
    assert "\n" not in message
    # The first index is untouched and still searches.
    again = SearchIndex(tmp_path / "pgA", db_url)
    assert len(search_text(again, pre, rer, "a red square", k=3, candidates=3).hits) == 3
    again.close()


def test_a_folder_given_another_database_is_refused(
    tmp_path: Path, db_url: str, photos: Path, tiny_models: tuple[Any, Any]
) -> None:
    pre, rer = tiny_models
    home = tmp_path / "index"
    search_index = SearchIndex(home, db_url)
    index_folder(search_index, pre, rer, photos)
    search_index.close()

    other_db = f"sqlite:///{tmp_path / 'other.db'}"
    with pytest.raises(IndexMismatchError, match=r"other\.db"):
        SearchIndex(home, other_db)


def test_a_read_only_open_of_a_missing_index_writes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "nowhere"
    with pytest.raises(NoIndexError, match="retriever index"):
        SearchIndex(home, read_only=True)
    assert not home.exists()


# -- damage is named --------------------------------------------------------------------------------


def _indexed(tmp_path: Path, db_url: str, photos: Path, tiny_models: tuple[Any, Any]) -> SearchIndex:
    pre, rer = tiny_models
    search_index = SearchIndex(tmp_path / "index", db_url)
    index_folder(search_index, pre, rer, photos)
    return search_index


@pytest.mark.parametrize("damage", ["truncated", "deleted"])
def test_a_damaged_patch_cache_is_named_and_a_plain_reindex_repairs_it(
    tmp_path: Path, db_url: str, photos: Path, tiny_models: tuple[Any, Any], damage: str
) -> None:
    pre, rer = tiny_models
    search_index = _indexed(tmp_path, db_url, photos, tiny_models)
    path = search_index.patches().path
    search_index.close()
    if damage == "truncated":
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
    else:
        path.unlink()

    search_index = SearchIndex(tmp_path / "index", db_url)
    problems = search_index.check()
    assert problems and "patch cache" in problems[0] and "retriever index" in problems[0]
    assert search_index.status()["problems"] == problems
    with pytest.raises(IndexDamagedError, match="patch cache"):
        search_text(search_index, pre, rer, "a red square", k=6, candidates=6)

    report = index_folder(search_index, pre, rer, photos)

    assert report.added + report.updated >= 3
    assert search_index.check() == []
    assert len(_paths(search_index)) == 6
    hits = search_text(search_index, pre, rer, "a red square", k=6, candidates=6).hits
    assert len(hits) == 6 and all(np.isfinite(h.score) for h in hits)
    search_index.close()


def test_non_finite_cached_tokens_are_named_not_returned(
    tmp_path: Path, db_url: str, photos: Path, tiny_models: tuple[Any, Any]
) -> None:
    pre, rer = tiny_models
    search_index = _indexed(tmp_path, db_url, photos, tiny_models)
    path = search_index.patches().path
    search_index.close()
    data = np.memmap(path, dtype=np.float16, mode="r+")
    data[:] = np.nan
    data.flush()
    del data

    search_index = SearchIndex(tmp_path / "index", db_url)
    with pytest.raises(IndexDamagedError, match="not finite"):
        search_text(search_index, pre, rer, "a red square", k=3, candidates=6)
    search_index.close()


def test_k_above_the_candidates_still_gives_k_reranked_results(
    tmp_path: Path, photos: Path, tiny_models: tuple[Any, Any]
) -> None:
    pre, rer = tiny_models
    search_index = SearchIndex(tmp_path / "index")
    index_folder(search_index, pre, rer, photos)

    hits = search_text(search_index, pre, rer, "a red square", k=6, candidates=2).hits

    assert len(hits) == 6 and all(h.rerank_score is not None for h in hits)
    search_index.close()
