"""The index stage over real files with the tiny models: incremental runs and bad files."""

from __future__ import annotations

import os
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest

from retriever.encoders import ClipEncoder
from retriever.indexing import index_folder
from retriever.rerank import ViltReranker
from retriever.search import search_image, search_text
from retriever.search_index import SearchIndex
from tests.conftest import random_image, write_images


@pytest.fixture
def search_index(tmp_path: Path, db_url: str) -> SearchIndex:
    """An empty index on each backend (SQLite, and the PostgreSQL server)."""
    return SearchIndex(tmp_path / "index", db_url)


def indexed_paths(search_index: SearchIndex) -> set[str]:
    return set(search_index.store.file_states())


def assert_consistent(search_index: SearchIndex) -> None:
    """Every FAISS id has its row and its cached tokens, and every row is in FAISS."""
    fresh = SearchIndex(search_index.home, search_index.store.url)
    states = fresh.store.file_states()
    ids = {s.id for s in states.values()}
    index = fresh.vectors("images")
    assert len(index) == len(ids)
    if ids:
        _, found = index.search(np.eye(index.dim, dtype=np.float32)[:1], len(ids))
        assert set(found[0].tolist()) == ids
        records = fresh.store.images(sorted(ids))
        tokens = fresh.patches().load([(r.patch_offset, r.patch_tokens) for r in records.values()])
        assert all(t.shape[0] > 1 and np.isfinite(t).all() for t in tokens)
    fresh.close()


def test_incremental_add_modify_delete_rename_duplicate(
    search_index: SearchIndex, tiny_models: tuple[ClipEncoder, ViltReranker], tmp_path: Path
) -> None:
    pre, rer = tiny_models
    photos = tmp_path / "photos"
    paths = write_images(photos, 6)

    first = index_folder(search_index, pre, rer, photos)
    assert (first.added, first.updated, first.removed, first.unchanged) == (6, 0, 0, 0)
    assert indexed_paths(search_index) == {str(p.resolve()) for p in paths}
    cache_rows = search_index.patches().rows

    # Unchanged: nothing is read or encoded, so the patch cache does not grow.
    again = index_folder(search_index, pre, rer, photos)
    assert (again.added, again.updated, again.unchanged) == (0, 0, 6)
    assert search_index.patches().rows == cache_rows

    # Modified in place: re-encoded under the same id, and image search finds the new content.
    old_id = search_index.store.file_states()[str(paths[0].resolve())].id
    new_content = random_image(999, (80, 80))
    new_content.save(paths[0])
    os.utime(paths[0], (1e9, 1e9))
    changed = index_folder(search_index, pre, rer, photos)
    assert (changed.added, changed.updated, changed.unchanged) == (0, 1, 5)
    assert search_index.store.file_states()[str(paths[0].resolve())].id == old_id
    top = search_image(search_index, pre, new_content, k=1).hits[0]
    assert top.path == str(paths[0].resolve()) and top.score == pytest.approx(1.0, abs=1e-4)

    # Deleted: gone from the store and from results.
    paths[1].unlink()
    removed = index_folder(search_index, pre, rer, photos)
    assert removed.removed == 1
    assert str(paths[1].resolve()) not in indexed_paths(search_index)
    hits = search_text(search_index, pre, rer, "a red circle", k=10, candidates=10).hits
    assert str(paths[1].resolve()) not in {h.path for h in hits}
    assert len(hits) == 5

    # Renamed and duplicated: same content hash, stored vectors and tokens reused, nothing encoded.
    rows = search_index.patches().rows
    renamed = photos / "renamed.png"
    paths[2].rename(renamed)
    shutil.copy(paths[3], photos / "copy_of_3.png")
    moved = index_folder(search_index, pre, rer, photos)
    assert moved.reused == 2 and moved.removed == 1 and moved.added == 2
    assert search_index.patches().rows == rows
    states = search_index.store.file_states()
    assert str(renamed.resolve()) in states and str(paths[2].resolve()) not in states
    assert (
        states[str((photos / "copy_of_3.png").resolve())].content_hash
        == states[str(paths[3].resolve())].content_hash
    )
    assert_consistent(search_index)


def _truncated_png(path: Path) -> None:
    buf = path.with_suffix(".tmp.png")
    random_image(5, (64, 64)).save(buf)
    data = buf.read_bytes()
    buf.unlink()
    path.write_bytes(data[: len(data) // 2])


def _bomb_png(path: Path) -> None:
    """A valid tiny PNG whose header claims 40000×40000 pixels."""
    buf = path.with_suffix(".tmp.png")
    random_image(6, (8, 8)).save(buf)
    data = bytearray(buf.read_bytes())
    buf.unlink()
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = (40000).to_bytes(4, "big") * 2
    crc = zlib.crc32(bytes(data[ihdr : ihdr + 17]))
    data[ihdr + 17 : ihdr + 21] = crc.to_bytes(4, "big")
    path.write_bytes(bytes(data))


def test_bad_files_are_skipped_and_nothing_is_lost(
    search_index: SearchIndex, tiny_models: tuple[ClipEncoder, ViltReranker], tmp_path: Path
) -> None:
    pre, rer = tiny_models
    photos = tmp_path / "photos"
    good = write_images(photos, 4)
    first = index_folder(search_index, pre, rer, photos)
    assert first.added == 4

    (photos / "empty.jpg").write_bytes(b"")
    (photos / "notes.png").write_text("this is not an image")
    _truncated_png(photos / "truncated.png")
    _bomb_png(photos / "bomb.png")
    (photos / "folder.jpg").mkdir()  # a directory named like an image
    more = write_images(photos, 2, start_seed=50)

    report = index_folder(search_index, pre, rer, photos)
    skipped = dict(report.skipped)
    bad = {n: str((photos / n).resolve()) for n in ["empty.jpg", "notes.png", "truncated.png", "bomb.png"]}
    assert set(skipped) >= set(bad.values())
    assert "empty" in skipped[bad["empty.jpg"]]
    assert "not an image" in skipped[bad["notes.png"]]
    assert "truncated" in skipped[bad["truncated.png"]] or "corrupt" in skipped[bad["truncated.png"]]
    assert "too large" in skipped[bad["bomb.png"]]
    assert report.added == 2
    assert indexed_paths(search_index) == {str(p.resolve()) for p in good + more}
    assert_consistent(search_index)
