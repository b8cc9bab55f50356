"""The caption collection: idempotent adds, listing, removing and clearing, in the store and through the CLI.

The store and index cases run on both backends (``db_url``: SQLite and the PostgreSQL server); the CLI
cases run the real command as a subprocess with the tiny models.
"""

from __future__ import annotations

import fcntl
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from retriever.captions import caption_id, read_captions
from retriever.errors import IndexLockedError, NotFoundError, RetrieverError
from retriever.index.store import MetadataStore
from retriever.index.vectors import generation_path
from retriever.search_index import ModelInfo, SearchIndex
from tests.conftest import write_images
from tests.integration.test_cli import run

DIM = 8
MODELS = ModelInfo("pre", "pre-fp", DIM, "re", "re-fp", 6)


def _unit(n: int, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).standard_normal((n, DIM)).astype(np.float32)
    out: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


# -- reading caption files -------------------------------------------------------------------------


def test_captions_without_an_id_get_one_derived_from_their_text(tmp_path: Path) -> None:
    plain = tmp_path / "caps.txt"
    plain.write_text("a red dog\n\n  a   blue cat \na red dog\n")
    items = read_captions(plain)
    assert [t for _, t in items] == ["a red dog", "a blue cat", "a red dog"]
    ids = [i for i, _ in items]
    assert ids[0] == ids[2] == caption_id("a red dog") != ids[1]
    assert read_captions(plain) == items  # stable from one run to the next
    jsonl = tmp_path / "caps.jsonl"
    jsonl.write_text('{"id": "c1", "text": "a red dog"}\n{"text": "a  blue cat"}\n{"id": 7, "text": "x"}\n')
    assert read_captions(jsonl) == [("c1", "a red dog"), (caption_id("a blue cat"), "a blue cat"), ("7", "x")]


@pytest.mark.parametrize(
    "line",
    ['{"id": "", "text": "x"}', '{"id": "  ", "text": "x"}', '{"id": "' + "a" * 513 + '", "text": "x"}'],
)
def test_bad_ids_are_refused_with_the_line(tmp_path: Path, line: str) -> None:
    path = tmp_path / "caps.jsonl"
    path.write_text('{"text": "fine"}\n' + line + "\n")
    with pytest.raises(RetrieverError, match=r"caps\.jsonl:2: .*'id'"):
        read_captions(path)


# -- the store, on both backends -------------------------------------------------------------------


@pytest.fixture
def store(db_url: str) -> Iterator[MetadataStore]:
    store = MetadataStore(db_url)
    yield store
    store.close()


def test_store_lists_finds_and_deletes_texts(store: MetadataStore) -> None:
    v = _unit(4)
    _, ids, _ = store.add_texts(
        [("c1", "one", v[0]), (None, "two", v[1]), ("5", "three", v[2]), ("c4", "four", v[3])]
    )
    first, legacy, five, fourth = (int(i) for i in ids)
    listed = store.list_texts()
    assert [(r.id, r.ext_id, r.text) for r in listed] == [
        (first, "c1", "one"),
        (legacy, None, "two"),
        (five, "5", "three"),
        (fourth, "c4", "four"),
    ]
    assert [r.id for r in store.list_texts(limit=2)] == [first, legacy]
    assert store.texts_by_ext_id(["c1", "c4", "nope"]) == {"c1": "one", "c4": "four"}

    # A caption is found by the id that lists and searches show: its ext_id, or its row id when it has none.
    # An ext_id wins over a row id of the same spelling.
    found = store.find_texts(["c1", str(legacy), "5", "nope", str(first)])
    assert found == {"c1": first, str(legacy): legacy, "5": five}

    gen = store.generation("texts")
    new_gen, removed = store.delete_texts([first, legacy, 10_000])
    assert new_gen == gen + 1 == store.generation("texts")
    assert sorted(removed.tolist()) == sorted([first, legacy])
    assert [r.text for r in store.list_texts()] == ["three", "four"]
    assert store.count_texts() == 2

    cleared_gen, cleared = store.clear_texts()
    assert cleared_gen == new_gen + 1
    assert sorted(cleared.tolist()) == sorted([five, fourth])
    assert store.count_texts() == 0 and store.list_texts() == []
    assert store.generation("images") == 0  # images are not touched by caption changes


def test_store_deletes_many_texts_in_one_go(store: MetadataStore) -> None:
    v = _unit(1200, seed=1)
    store.add_texts([(f"c{i}", f"caption {i}", v[i]) for i in range(1200)])
    found = store.find_texts([f"c{i}" for i in range(0, 1200, 2)])
    assert len(found) == 600
    _, removed = store.delete_texts(list(found.values()))
    assert len(removed) == 600 and store.count_texts() == 600


# -- the search_index: the texts FAISS index follows every change ----------------------------------------


@pytest.fixture
def search_index(tmp_path: Path, db_url: str) -> Iterator[SearchIndex]:
    search_index = SearchIndex(tmp_path / "index", db_url)
    search_index.check_models(MODELS, record=True)
    yield search_index
    search_index.close()


def _assert_texts_consistent(search_index: SearchIndex) -> None:
    """The saved texts FAISS file is the database's generation, and holds exactly the database's rows."""
    gen = search_index.store.generation("texts")
    assert generation_path(search_index.home, "texts", gen).exists()
    assert sorted(p.name for p in search_index.home.glob("texts-*.faiss")) == [f"texts-{gen}.faiss"]
    fresh = SearchIndex(search_index.home, search_index.store.url, read_only=True)
    try:
        ids, _ = fresh.store.text_vectors(DIM)
        index = fresh.vectors("texts")
        assert len(index) == len(ids)
        if len(ids):
            _, found = index.search(np.ones((1, DIM), dtype=np.float32), len(ids) + 3)
            assert set(found[0][found[0] >= 0].tolist()) == set(ids.tolist())
    finally:
        fresh.close()


def test_adding_the_same_captions_twice_changes_nothing(search_index: SearchIndex, tmp_path: Path) -> None:
    path = tmp_path / "caps.txt"
    path.write_text("a red dog\na blue cat\na red dog\n")
    items = read_captions(path)
    v = _unit(3, seed=2)
    with search_index.writer():
        todo = search_index.texts_to_write(items)
        # The same caption twice in one file is written once (the last one, in its place).
        assert todo == [(caption_id("a blue cat"), "a blue cat"), (caption_id("a red dog"), "a red dog")]
        search_index.commit_texts([(i, t, v[n]) for n, (i, t) in enumerate(todo)])
        assert search_index.store.count_texts() == 2
        gen = search_index.store.generation("texts")
        # Again: everything is stored as it is, so nothing is encoded or written.
        assert search_index.texts_to_write(read_captions(path)) == []
        # An id whose text changed, and a caption without an id (the API's), are written.
        changed = [("c1", "new"), (caption_id("a red dog"), "a red dog"), (None, "anonymous")]
        search_index.commit_texts([("c1", "old", v[2])])
        assert search_index.texts_to_write(changed) == [("c1", "new"), (None, "anonymous")]
    assert search_index.store.generation("texts") == gen + 1
    _assert_texts_consistent(search_index)


def test_remove_and_clear_keep_faiss_consistent(search_index: SearchIndex) -> None:
    v = _unit(4, seed=3)
    with search_index.writer():
        search_index.commit_texts(
            [("c1", "one", v[0]), ("c2", "two", v[1]), ("c3", "three", v[2]), (None, "four", v[3])]
        )
        _assert_texts_consistent(search_index)
        ids = search_index.find_texts(["c2", "c3"])
        assert search_index.remove_texts(list(ids.values())) == 2
        _assert_texts_consistent(search_index)
        assert [r.text for r in search_index.store.list_texts()] == ["one", "four"]
        # The in-memory index of this search index followed too.
        _, found = search_index.vectors("texts").search(v[1:2], 4)
        assert not set(found[0].tolist()) & set(ids.values())
        assert search_index.clear_texts() == 2
        _assert_texts_consistent(search_index)
        assert search_index.store.count_texts() == 0 and len(search_index.vectors("texts")) == 0
        # Adding after a clear works as on a new collection.
        search_index.commit_texts([("c1", "one", v[0])])
        _assert_texts_consistent(search_index)


def test_find_texts_names_every_unknown_id(search_index: SearchIndex) -> None:
    with search_index.writer():
        search_index.commit_texts([("c1", "one", _unit(1)[0])])
    with pytest.raises(NotFoundError, match="nope, 99999"):
        search_index.find_texts(["c1", "nope", "99999"])


def test_changes_take_the_write_lock(search_index: SearchIndex) -> None:
    with search_index.writer():
        search_index.commit_texts([("c1", "one", _unit(1)[0])])
    with open(search_index.home / "write.lock", "a+") as held:  # another writer
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(IndexLockedError):
            search_index.remove_texts(list(search_index.find_texts(["c1"]).values()))
        with pytest.raises(IndexLockedError):
            search_index.clear_texts()
    assert search_index.store.count_texts() == 1
    assert (
        search_index.remove_texts(list(search_index.find_texts(["c1"]).values())) == 1
    )  # takes the lock itself
    _assert_texts_consistent(search_index)


# -- the command line ------------------------------------------------------------------------------


@pytest.fixture
def env(tiny_clip_dir: Path, tiny_vilt_dir: Path) -> dict[str, str]:
    return {"RETRIEVER_PREFILTER": str(tiny_clip_dir), "RETRIEVER_RERANKER": str(tiny_vilt_dir)}


def _listed(home: Path, *args: str) -> dict[str, Any]:
    out = json.loads(run("texts", "list", "--json", *args, home=home).stdout)
    assert isinstance(out, dict)
    return out


def _text_hits(home: Path, image: Path, env: dict[str, str]) -> list[dict[str, Any]]:
    out = run("search", "--image", image, "--texts", "--k", "20", "--json", home=home, **env)
    results = json.loads(out.stdout)["results"]
    assert isinstance(results, list)
    return results


def _count(home: Path) -> int:
    return int(json.loads(run("status", "--json", home=home).stdout)["texts"])


def test_cli_add_twice_keeps_one_copy_of_each_caption(tmp_path: Path, env: dict[str, str]) -> None:
    home, photos = tmp_path / "home", tmp_path / "photos"
    image = write_images(photos, 1)[0]  # a query; image→text search needs no indexed images
    plain = tmp_path / "caps.txt"
    plain.write_text("a red dog\na blue cat\na green bird\n")
    first = run("texts", "add", plain, home=home, **env)
    assert first.stdout == "added 3 captions, replaced 0, 0 unchanged (3 in the collection)\n"
    assert _count(home) == 3
    again = run("texts", "add", plain, home=home, **env)
    assert again.stdout == "added 0 captions, replaced 0, 3 unchanged (3 in the collection)\n"
    assert _count(home) == 3
    hits = _text_hits(home, image, env)
    assert sorted(h["text"] for h in hits) == ["a blue cat", "a green bird", "a red dog"]
    assert len({h["id"] for h in hits}) == 3

    # JSONL with ids replaces those ids, and lines without one are matched by their text.
    jsonl = tmp_path / "more.jsonl"
    jsonl.write_text('{"id": "c1", "text": "a cat"}\n{"text": "a red dog"}\n')
    run("texts", "add", jsonl, home=home, **env)
    jsonl.write_text('{"id": "c1", "text": "a black cat"}\n{"text": "a red dog"}\n')
    replaced = run("texts", "add", jsonl, home=home, **env)
    assert replaced.stdout == "added 0 captions, replaced 1, 1 unchanged (4 in the collection)\n"
    listed = _listed(home)
    assert listed["count"] == 4 and _count(home) == 4
    assert listed["data"] == [
        {"id": caption_id("a red dog"), "text": "a red dog"},
        {"id": caption_id("a blue cat"), "text": "a blue cat"},
        {"id": caption_id("a green bird"), "text": "a green bird"},
        {"id": "c1", "text": "a black cat"},
    ]


def test_cli_list_remove_clear(tmp_path: Path, env: dict[str, str]) -> None:
    home, photos = tmp_path / "home", tmp_path / "photos"
    image = write_images(photos, 1)[0]
    captions = tmp_path / "caps.jsonl"
    captions.write_text(
        '{"id": "c1", "text": "a red dog"}\n{"id": "c2", "text": "a blue cat"}\n{"text": "a green bird"}\n'
    )
    run("texts", "add", captions, home=home, **env)

    # list: every caption with the id that search shows; --limit cuts the list, not the count.
    listed = _listed(home)
    assert listed["count"] == 3
    assert listed["data"] == [
        {"id": "c1", "text": "a red dog"},
        {"id": "c2", "text": "a blue cat"},
        {"id": caption_id("a green bird"), "text": "a green bird"},
    ]
    assert _listed(home, "--limit", "2") == {"data": listed["data"][:2], "count": 3}
    table = run("texts", "list", home=home).stdout
    assert "c1" in table and "a blue cat" in table and caption_id("a green bird") in table

    # remove: an unknown id is named, exits 1 and removes nothing, even beside a known one.
    bad = run("texts", "remove", "c1", "nope", home=home, check=False)
    assert bad.returncode == 1 and "nope" in bad.stderr and "Traceback" not in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    assert _count(home) == 3
    run("texts", "remove", "c1", caption_id("a green bird"), home=home)
    assert _listed(home)["data"] == [{"id": "c2", "text": "a blue cat"}]
    assert [h["id"] for h in _text_hits(home, image, env)] == ["c2"]
    _assert_cli_texts_consistent(home)

    # clear: refused without --yes (exit 2, one line), done with it.
    refused = run("texts", "clear", home=home, check=False)
    assert refused.returncode == 2 and "--yes" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    assert _count(home) == 1
    run("texts", "clear", "--yes", home=home)
    assert _listed(home) == {"data": [], "count": 0}
    _assert_cli_texts_consistent(home)
    empty = run("search", "--image", image, "--texts", home=home, check=False, **env)
    assert empty.returncode == 1 and "empty" in empty.stderr
    run("texts", "add", captions, home=home, **env)
    assert _count(home) == 3


def _assert_cli_texts_consistent(home: Path) -> None:
    search_index = SearchIndex(home, read_only=True)
    try:
        gen = search_index.store.generation("texts")
        assert [p.name for p in home.glob("texts-*.faiss")] == [f"texts-{gen}.faiss"]
        ids, _ = search_index.store.text_vectors(1)
        assert len(search_index.vectors("texts")) == len(ids)
    finally:
        search_index.close()


def test_cli_remove_takes_the_row_id_of_a_caption_without_id(tmp_path: Path, env: dict[str, str]) -> None:
    # Captions stored without an id (by the API, or before ids were derived) show and take their row id.
    home = tmp_path / "home"
    captions = tmp_path / "caps.txt"
    captions.write_text("a red dog\n")
    run("texts", "add", captions, home=home, **env)
    search_index = SearchIndex(home)
    try:
        with search_index.writer():
            search_index.commit_texts(
                [(None, "an old caption", np.ones(search_index.vectors("texts").dim, np.float32))]
            )
    finally:
        search_index.close()
    rows = _listed(home)["data"]
    assert isinstance(rows, list)
    old = next(r for r in rows if r["text"] == "an old caption")
    assert str(old["id"]).isdigit()
    run("texts", "remove", str(old["id"]), home=home)
    assert [r["text"] for r in _listed(home)["data"]] == ["a red dog"]


def test_cli_list_writes_nothing(tmp_path: Path, env: dict[str, str]) -> None:
    home = tmp_path / "home"
    missing = run("texts", "list", home=home, check=False)
    assert missing.returncode == 1 and "no index" in missing.stderr
    assert not home.exists()
    captions = tmp_path / "caps.txt"
    captions.write_text("a red dog\na blue cat\n")
    run("texts", "add", captions, home=home, **env)
    # A stale FAISS file is rebuilt by the next writer; a reader must leave it as it is.
    for f in home.glob("texts-*.faiss"):
        f.unlink()
    before = {p.name: p.read_bytes() for p in home.iterdir() if not p.name.endswith(("-wal", "-shm"))}
    run("texts", "list", home=home)
    run("texts", "list", "--json", "--limit", "1", home=home)
    after = {p.name: p.read_bytes() for p in home.iterdir() if not p.name.endswith(("-wal", "-shm"))}
    assert after == before


def test_cli_changes_wait_for_the_write_lock(tmp_path: Path, env: dict[str, str]) -> None:
    home = tmp_path / "home"
    captions = tmp_path / "caps.txt"
    captions.write_text("a red dog\n")
    run("texts", "add", captions, home=home, **env)
    with open(home / "write.lock", "a+") as held:
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        for args in (["remove", caption_id("a red dog")], ["clear", "--yes"], ["add", str(captions)]):
            proc = run("texts", *args, home=home, check=False, **env)
            assert proc.returncode == 1 and "another process is writing" in proc.stderr, proc.stderr
    assert _count(home) == 1
