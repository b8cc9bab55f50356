"""Tests for retriever.index.store (and SearchIndex consistency) on SQLite and PostgreSQL.

Every store test runs on both backends. The PostgreSQL cases create a throwaway database per test on
the server at 127.0.0.1:5432 and drop it afterwards; when the server is unreachable they fail (CI always
has it) unless ``RETRIEVER_SKIP_POSTGRES=1`` is set.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from sqlalchemy import create_engine, inspect, text

from retriever.errors import ModelMismatchError, StoreError
from retriever.index.database import normalize_url
from retriever.index.schema import SCHEMA_VERSION
from retriever.index.store import Encoded, ImageBatch, MetadataStore, NewImage
from retriever.index.vectors import VectorIndex, generation_path, load_generation
from retriever.search_index import ModelInfo, SearchIndex

DIM = 8
HIDDEN = 6
MODELS = ("prefilter-model", "reranker-model")


@pytest.fixture
def open_store(db_url: str) -> Iterator[Callable[[], MetadataStore]]:
    """Open MetadataStores on ``db_url``; all are closed at the end of the test."""
    stores: list[MetadataStore] = []

    def _open() -> MetadataStore:
        store = MetadataStore(db_url)
        stores.append(store)
        return store

    yield _open
    for store in stores:
        store.close()


@pytest.fixture
def store(open_store: Callable[[], MetadataStore]) -> MetadataStore:
    return open_store()


def _unit(rng: np.random.Generator, n: int, dim: int = DIM) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    out: np.ndarray = (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)
    return out


def _new(
    i: int,
    vector: np.ndarray,
    *,
    path: str | None = None,
    replace_id: int | None = None,
    offset: int = 0,
    tokens: int = 1,
) -> NewImage:
    return NewImage(
        path=path or f"/photos/img_{i:04d}.png",
        size=1000 + i,
        mtime=1_700_000_000.5 + i,
        content_hash=f"{i:064x}",
        encoded=Encoded(vector, 64 + i, 32 + i, offset, tokens),
        replace_id=replace_id,
    )


# -- store ----------------------------------------------------------------------------------------


def test_fresh_database_gets_current_schema(store: MetadataStore) -> None:
    assert store.schema_version() == SCHEMA_VERSION
    assert store.generation("images") == 0
    assert store.generation("texts") == 0
    assert store.count_images() == 0
    assert store.count_texts() == 0
    ids, vecs = store.image_vectors(DIM)
    assert ids.shape == (0,)
    assert vecs.shape == (0, DIM)
    tables = set(inspect(store.engine).get_table_names())
    assert {"retriever_meta", "images", "texts"} <= tables
    assert store.backend in ("sqlite", "postgresql")


def test_reopen_keeps_schema_and_meta(open_store: Callable[[], MetadataStore]) -> None:
    first = open_store()
    first.set_meta({"dim": "8", "prefilter": "p"})
    first.set_meta({"dim": "16"})  # update in place
    first.close()
    again = open_store()
    assert again.schema_version() == SCHEMA_VERSION
    assert again.get_meta("dim") == "16"
    assert again.get_meta("prefilter") == "p"
    assert again.get_meta("missing") is None


def test_apply_inserts_updates_deletes_and_bumps_generation(store: MetadataStore) -> None:
    rng = np.random.default_rng(1)
    vecs = _unit(rng, 4)
    applied = store.apply(ImageBatch(upserts=[_new(i, vecs[i]) for i in range(4)]), MODELS)
    assert applied.generation == 1
    assert store.generation("images") == 1
    assert store.generation("texts") == 0
    ids = applied.added_ids.tolist()
    assert len(set(ids)) == 4
    np.testing.assert_array_equal(applied.added_vectors, vecs)
    assert applied.added_vectors.dtype == np.float32
    assert applied.removed_ids.size == 0
    records = store.images(ids)
    assert [records[i].path for i in ids] == [f"/photos/img_{i:04d}.png" for i in range(4)]
    rec = records[ids[2]]
    assert (rec.size, rec.mtime, rec.content_hash) == (1002, 1_700_000_002.5, f"{2:064x}")
    assert (rec.width, rec.height, rec.patch_offset, rec.patch_tokens) == (66, 34, 0, 1)
    assert (rec.prefilter_model, rec.reranker_model) == MODELS

    # Replace ids[0] in place (a changed file, renamed too), delete ids[1], insert one more.
    new_vecs = _unit(rng, 2)
    batch = ImageBatch(
        upserts=[
            _new(10, new_vecs[0], path="/photos/renamed.png", replace_id=ids[0], offset=7, tokens=3),
            _new(11, new_vecs[1]),
        ],
        deletes=[ids[1]],
    )
    applied2 = store.apply(batch, MODELS)
    assert applied2.generation == 2
    assert store.generation("images") == 2
    assert sorted(applied2.removed_ids.tolist()) == sorted([ids[1], ids[0]])
    assert applied2.added_ids[0] == ids[0]  # same id kept
    new_id = int(applied2.added_ids[1])
    assert new_id not in ids
    np.testing.assert_array_equal(applied2.added_vectors, new_vecs)
    assert store.count_images() == 4
    records = store.images([*ids, new_id])
    assert set(records) == {ids[0], ids[2], ids[3], new_id}
    replaced = records[ids[0]]
    assert replaced.path == "/photos/renamed.png"
    assert replaced.content_hash == f"{10:064x}"
    assert (replaced.patch_offset, replaced.patch_tokens) == (7, 3)
    db_ids, db_vecs = store.image_vectors(DIM)
    expected = {ids[0]: new_vecs[0], ids[2]: vecs[2], ids[3]: vecs[3], new_id: new_vecs[1]}
    assert db_ids.tolist() == sorted(expected)
    for i, v in zip(db_ids.tolist(), db_vecs, strict=True):
        np.testing.assert_array_equal(v, expected[i])
    assert sorted(store.patch_extents()) == [(0, 1), (7, 3)]

    # A batch with nothing in it still commits (and bumps the generation).
    empty = store.apply(ImageBatch(), MODELS)
    assert empty.generation == 3
    assert empty.added_ids.size == 0 and empty.removed_ids.size == 0

    assert store.delete_images([ids[2], ids[3]]) == 4
    assert store.generation("images") == 4
    assert set(store.images([*ids, new_id])) == {ids[0], new_id}


def test_file_states_under_filters_by_folder_prefix(store: MetadataStore) -> None:
    rng = np.random.default_rng(2)
    paths = ["/a/b/1.png", "/a/b/sub/2.png", "/a/bc/3.png", "/a/b.png", "/a/4.png", "/x/a/b/5.png"]
    v = _unit(rng, len(paths))
    applied = store.apply(ImageBatch(upserts=[_new(i, v[i], path=p) for i, p in enumerate(paths)]), MODELS)
    id_of = dict(zip(paths, applied.added_ids.tolist(), strict=True))
    everything = store.file_states()
    assert set(everything) == set(paths)
    state = everything["/a/bc/3.png"]
    assert (state.id, state.size, state.mtime, state.content_hash) == (
        id_of["/a/bc/3.png"],
        1002,
        1_700_000_002.5,
        f"{2:064x}",
    )
    assert set(store.file_states(under="/a/b")) == {"/a/b/1.png", "/a/b/sub/2.png"}
    assert set(store.file_states(under="/a/b/")) == {"/a/b/1.png", "/a/b/sub/2.png"}
    assert set(store.file_states(under="/a/bc")) == {"/a/bc/3.png"}
    assert set(store.file_states(under="/a")) == set(paths) - {"/x/a/b/5.png"}
    assert set(store.file_states(under="/a/b/sub")) == {"/a/b/sub/2.png"}
    assert store.file_states(under="/nowhere") == {}
    assert store.file_states(under="/a/b/1.png") == {}  # a file is not a folder


def test_file_states_prefix_with_like_wildcards_is_literal(store: MetadataStore) -> None:
    rng = np.random.default_rng(3)
    paths = ["/d_1/x.png", "/dx1/y.png", "/e%/z.png", "/e9/w.png"]
    v = _unit(rng, len(paths))
    store.apply(ImageBatch(upserts=[_new(i, v[i], path=p) for i, p in enumerate(paths)]), MODELS)
    assert set(store.file_states(under="/d_1")) == {"/d_1/x.png"}
    assert set(store.file_states(under="/e%")) == {"/e%/z.png"}


def test_encoded_by_hash_finds_stored_encodings(store: MetadataStore) -> None:
    rng = np.random.default_rng(4)
    v = _unit(rng, 3)
    store.apply(ImageBatch(upserts=[_new(i, v[i], offset=10 * i, tokens=i + 2) for i in range(3)]), MODELS)
    wanted = [f"{i:064x}" for i in range(3)]
    # Many unknown hashes too, so the lookup spans several chunks.
    unknown = [f"{'f' * 56}{i:08x}" for i in range(1200)]
    found = store.encoded_by_hash([*unknown, *wanted, wanted[0]])
    assert set(found) == set(wanted)
    for i, h in enumerate(wanted):
        enc = found[h]
        np.testing.assert_array_equal(enc.vector, v[i])
        assert enc.vector.dtype == np.float32
        assert (enc.width, enc.height, enc.patch_offset, enc.patch_tokens) == (64 + i, 32 + i, 10 * i, i + 2)
    assert store.encoded_by_hash([]) == {}
    assert store.encoded_by_hash(unknown[:3]) == {}


def test_images_and_texts_by_ids_ignore_missing(store: MetadataStore) -> None:
    rng = np.random.default_rng(5)
    v = _unit(rng, 2)
    applied = store.apply(ImageBatch(upserts=[_new(i, v[i]) for i in range(2)]), MODELS)
    ids = applied.added_ids
    missing = int(ids.max()) + 1000
    got = store.images([*ids.tolist(), missing, -1])
    assert set(got) == set(ids.tolist())
    assert store.images([missing]) == {}
    assert store.images([]) == {}

    _, text_ids, _ = store.add_texts([(None, "a cat", v[0]), ("dog-1", "a dog", v[1])])
    tmissing = int(text_ids.max()) + 1000
    texts = store.texts([*text_ids.tolist(), tmissing])
    assert set(texts) == set(text_ids.tolist())
    assert texts[int(text_ids[0])].text == "a cat"
    assert texts[int(text_ids[0])].ext_id is None
    assert texts[int(text_ids[1])].ext_id == "dog-1"
    assert store.texts([tmissing]) == {}
    assert store.texts([]) == {}


def test_image_vectors_round_trip_float32_exactly(store: MetadataStore) -> None:
    rng = np.random.default_rng(6)
    vecs = rng.standard_normal((50, DIM)).astype(np.float32)
    vecs[0] = [0.0, -0.0, 1e-45, -3.4028235e38, 3.4028235e38, np.inf, -np.inf, 1.0 / 3.0]
    applied = store.apply(ImageBatch(upserts=[_new(i, vecs[i]) for i in range(50)]), MODELS)
    ids, got = store.image_vectors(DIM)
    assert got.dtype == np.float32
    assert got.shape == (50, DIM)
    assert ids.dtype == np.int64
    assert ids.tolist() == sorted(applied.added_ids.tolist())
    by_id = dict(zip(applied.added_ids.tolist(), vecs, strict=True))
    for i, v in zip(ids.tolist(), got, strict=True):
        assert v.tobytes() == by_id[i].tobytes()  # bit-exact, signed zero and infinities included


def test_add_texts_with_ext_id_replaces_existing_caption(store: MetadataStore) -> None:
    rng = np.random.default_rng(7)
    v = _unit(rng, 5)
    gen1, ids1, vecs1 = store.add_texts([("c1", "first", v[0]), ("c2", "second", v[1]), (None, "anon", v[2])])
    assert gen1 == 1
    assert store.generation("texts") == 1
    assert store.generation("images") == 0
    np.testing.assert_array_equal(vecs1, v[:3])
    gen2, ids2, vecs2 = store.add_texts([("c1", "first, edited", v[3]), (None, "anon", v[4])])
    assert gen2 == 2
    assert ids2[0] == ids1[0]  # replaced in place
    assert ids2[1] not in ids1.tolist()  # captions without ext_id are always new
    np.testing.assert_array_equal(vecs2, v[3:5])
    assert store.count_texts() == 4
    texts = store.texts([*ids1.tolist(), *ids2.tolist()])
    assert texts[int(ids1[0])].text == "first, edited"
    assert texts[int(ids1[1])].text == "second"
    ids, vecs = store.text_vectors(DIM)
    by_id = dict(zip(ids.tolist(), vecs, strict=True))
    np.testing.assert_array_equal(by_id[int(ids1[0])], v[3])
    np.testing.assert_array_equal(by_id[int(ids1[1])], v[1])


def _create_version_1(url: str, vector: np.ndarray) -> datetime:
    """A version-1 database built with raw DDL: only retriever_meta and images, one image row."""
    engine = create_engine(normalize_url(url))
    pg = engine.dialect.name == "postgresql"
    pk = "SERIAL PRIMARY KEY" if pg else "INTEGER PRIMARY KEY AUTOINCREMENT"
    blob = "BYTEA" if pg else "BLOB"
    stamp = "TIMESTAMP WITH TIME ZONE" if pg else "DATETIME"
    indexed_at = datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC)
    with engine.begin() as conn:
        conn.execute(text("CREATE TABLE retriever_meta (key VARCHAR(64) PRIMARY KEY, value TEXT NOT NULL)"))
        conn.execute(
            text(
                f"""CREATE TABLE images (
                    id {pk},
                    path VARCHAR(4096) NOT NULL UNIQUE,
                    size BIGINT NOT NULL,
                    mtime FLOAT NOT NULL,
                    content_hash VARCHAR(64) NOT NULL,
                    width INTEGER NOT NULL,
                    height INTEGER NOT NULL,
                    indexed_at {stamp} NOT NULL,
                    prefilter_model VARCHAR(512) NOT NULL,
                    reranker_model VARCHAR(512) NOT NULL,
                    vector {blob} NOT NULL,
                    patch_offset BIGINT NOT NULL,
                    patch_tokens INTEGER NOT NULL
                )"""
            )
        )
        conn.execute(text("CREATE INDEX ix_images_content_hash ON images (content_hash)"))
        conn.execute(
            text("INSERT INTO retriever_meta (key, value) VALUES ('schema_version', '1'), ('dim', '8')")
        )
        conn.execute(
            text(
                "INSERT INTO images (path, size, mtime, content_hash, width, height, indexed_at,"
                " prefilter_model, reranker_model, vector, patch_offset, patch_tokens) VALUES"
                " ('/old/one.png', 123, 1.5, :h, 40, 30, :t, 'p-old', 'r-old', :v, 0, 9)"
            ),
            {
                "h": "ab" * 32,
                # SQLAlchemy keeps SQLite datetimes as ISO text; give the v1 row the same form.
                "t": indexed_at if pg else "2024-01-02 03:04:05.000000",
                "v": vector.astype(np.float32).tobytes(),
            },
        )
    engine.dispose()
    return indexed_at


def test_migrates_version_1_database(db_url: str, open_store: Callable[[], MetadataStore]) -> None:
    rng = np.random.default_rng(8)
    old_vec = _unit(rng, 1)[0]
    indexed_at = _create_version_1(db_url, old_vec)
    store = open_store()
    assert store.schema_version() == SCHEMA_VERSION
    assert "texts" in inspect(store.engine).get_table_names()
    assert store.get_meta("dim") == "8"
    # The image row is intact.
    ((path, state),) = store.file_states().items()
    assert (path, state.size, state.mtime, state.content_hash) == ("/old/one.png", 123, 1.5, "ab" * 32)
    rec = store.images([state.id])[state.id]
    assert (rec.width, rec.height, rec.patch_offset, rec.patch_tokens) == (40, 30, 0, 9)
    assert (rec.prefilter_model, rec.reranker_model) == ("p-old", "r-old")
    if rec.indexed_at.tzinfo is None:  # SQLite keeps no zone
        assert rec.indexed_at == indexed_at.replace(tzinfo=None)
    else:
        assert rec.indexed_at == indexed_at
    ids, vecs = store.image_vectors(DIM)
    assert ids.tolist() == [state.id]
    assert vecs[0].tobytes() == old_vec.tobytes()
    # The new texts table works.
    tv = _unit(rng, 2)
    _, tids, _ = store.add_texts([("t1", "hello", tv[0]), (None, "world", tv[1])])
    assert {r.text for r in store.texts(tids.tolist()).values()} == {"hello", "world"}
    # The old images table still takes new rows next to the migrated one.
    applied = store.apply(ImageBatch(upserts=[_new(1, _unit(rng, 1)[0])]), MODELS)
    assert int(applied.added_ids[0]) != state.id
    assert store.count_images() == 2
    store.close()
    # Re-opening a migrated database migrates nothing again.
    again = open_store()
    assert again.schema_version() == SCHEMA_VERSION
    assert again.count_texts() == 2
    assert again.count_images() == 2


def test_a_migrated_database_never_reuses_an_id(db_url: str, open_store: Callable[[], MetadataStore]) -> None:
    rng = np.random.default_rng(10)
    _create_version_1(db_url, _unit(rng, 1)[0])
    store = open_store()
    added = store.apply(ImageBatch(upserts=[_new(i, v) for i, v in enumerate(_unit(rng, 2), 1)]), MODELS)
    newest = int(added.added_ids.max())
    store.delete_images([newest])
    again = store.apply(ImageBatch(upserts=[_new(9, _unit(rng, 1)[0])]), MODELS)
    assert int(again.added_ids[0]) > newest
    store.close()


def test_newer_schema_version_is_refused(open_store: Callable[[], MetadataStore]) -> None:
    store = open_store()
    store.set_meta({"schema_version": "99"})
    store.close()
    with pytest.raises(StoreError, match="99"):
        open_store()


@pytest.mark.parametrize(
    "url",
    [
        pytest.param("postgresql://postgres@127.0.0.1:1/x", id="postgresql"),
        pytest.param("sqlite:////nonexistent-dir-for-retriever-tests/sub/x.db", id="sqlite"),
    ],
)
def test_unreachable_database_raises_store_error_quickly(url: str) -> None:
    start = time.monotonic()
    with pytest.raises(StoreError) as info:
        MetadataStore(url)
    assert time.monotonic() - start < 10
    message = str(info.value)
    assert message.startswith("cannot open the database")
    assert "\n" not in message
    assert len(message) < 500


def test_not_a_url_raises_store_error() -> None:
    with pytest.raises(StoreError, match="not a database URL"):
        MetadataStore("this is not a url")


def test_normalize_url() -> None:
    assert normalize_url("postgresql://u:pw@h:5433/db") == "postgresql+psycopg://u:pw@h:5433/db"
    assert normalize_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgresql+psycopg://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalize_url("postgresql+psycopg2://u@h/db") == "postgresql+psycopg2://u@h/db"
    assert normalize_url("sqlite:////tmp/x.db") == "sqlite:////tmp/x.db"
    assert normalize_url("sqlite://") == "sqlite://"


# -- search index -----------------------------------------------------------------------------------


INFO = ModelInfo(
    prefilter="tiny-clip",
    prefilter_fingerprint="clip-fp-1",
    dim=DIM,
    reranker="tiny-vilt",
    reranker_fingerprint="vilt-fp-1",
    hidden=HIDDEN,
)


def _all_ids(index: VectorIndex) -> list[int]:
    if len(index) == 0:
        return []
    _, ids = index.search(np.ones((1, index.dim), dtype=np.float32), len(index) + 3)
    return sorted(int(i) for i in ids[0] if i >= 0)


def _image_batch(
    search_index: SearchIndex, rng: np.random.Generator, start: int, n: int
) -> tuple[ImageBatch, list[np.ndarray]]:
    tokens = [rng.standard_normal((int(rng.integers(1, 6)), HIDDEN)).astype(np.float32) for _ in range(n)]
    extents = search_index.patches().append(tokens)
    vecs = _unit(rng, n)
    upserts = [_new(start + i, vecs[i], offset=o, tokens=t) for i, (o, t) in enumerate(extents)]
    return ImageBatch(upserts=upserts), tokens


def test_library_rebuilds_stale_vectors_from_database(tmp_path: Path, db_url: str) -> None:
    rng = np.random.default_rng(9)
    home = tmp_path / "index"
    lib = SearchIndex(home, db_url)
    try:
        lib.check_models(INFO, record=True)
        assert lib.models() == INFO
        batch1, tokens1 = _image_batch(lib, rng, 0, 30)
        applied1 = lib.commit(batch1, INFO)
        lib.save_vectors()
        gen1 = applied1.generation
        assert generation_path(home, "images", gen1).exists()
        # A further commit reaches the database, then the process "crashes" before save_vectors.
        batch2, _ = _image_batch(lib, rng, 100, 12)
        ids1 = applied1.added_ids.tolist()
        batch2.deletes = ids1[:5]
        batch2.upserts.append(_new(200, _unit(rng, 1)[0], replace_id=ids1[5], offset=0, tokens=1))
        applied2 = lib.commit(batch2, INFO)
        assert applied2.generation > gen1
    finally:
        lib.close()

    # Only the stale file is on disk, and it holds the first batch.
    stale = load_generation(home, "images", gen1, DIM)
    assert stale is not None
    assert _all_ids(stale) == sorted(ids1)
    assert load_generation(home, "images", applied2.generation, DIM) is None

    lib2 = SearchIndex(home, db_url)
    try:
        lib2.check_models(INFO, record=False)
        db_ids, db_vecs = lib2.store.image_vectors(DIM)
        assert len(db_ids) == 30 - 5 + 12
        index = lib2.vectors("images")
        assert len(index) == len(db_ids)
        assert _all_ids(index) == sorted(db_ids.tolist())
        assert not set(ids1[:5]) & set(_all_ids(index))
        # Search equals brute force over the database's vectors.
        queries = _unit(rng, 5)
        scores, got = index.search(queries, 10)
        truth = queries @ db_vecs.T
        row_of = {int(i): r for r, i in enumerate(db_ids)}
        for q in range(len(queries)):
            expected = np.sort(truth[q])[::-1][:10]
            np.testing.assert_allclose(scores[q], expected, rtol=0, atol=1e-5)
            for j, i in enumerate(got[q]):
                assert abs(truth[q][row_of[int(i)]] - scores[q][j]) <= 1e-5
        # The replaced row is found under its new vector.
        replaced = db_vecs[row_of[ids1[5]]]
        _, top = index.search(replaced[None, :], 1)
        assert int(top[0, 0]) == ids1[5]
        # The rebuilt index was saved for the current generation, and the stale file removed.
        current = generation_path(home, "images", lib2.store.generation("images"))
        assert current.exists()
        assert not generation_path(home, "images", gen1).exists()
        # Each row's patch extent still addresses its own tokens.
        records = lib2.store.images(applied1.added_ids[6:].tolist())
        for i, toks in zip(applied1.added_ids[6:].tolist(), tokens1[6:], strict=True):
            rec = records[i]
            (loaded,) = lib2.patches().load([(rec.patch_offset, rec.patch_tokens)])
            np.testing.assert_array_equal(loaded, toks.astype(np.float16))
    finally:
        lib2.close()


def test_library_refuses_other_models_and_reset_empties(tmp_path: Path, db_url: str) -> None:
    rng = np.random.default_rng(10)
    home = tmp_path / "index"
    lib = SearchIndex(home, db_url)
    try:
        lib.check_models(INFO, record=True)
        batch, _ = _image_batch(lib, rng, 0, 8)
        lib.commit(batch, INFO)
        lib.save_vectors()
        tv = _unit(rng, 3)
        assert lib.commit_texts([("a", "one", tv[0]), ("b", "two", tv[1]), (None, "three", tv[2])]) == 3
        assert len(lib.vectors("texts")) == 3

        lib.check_models(INFO, record=True)  # the same models are fine
        with pytest.raises(ModelMismatchError, match="prefilter"):
            lib.check_models(
                ModelInfo("other-clip", "clip-fp-2", DIM, "tiny-vilt", "vilt-fp-1", HIDDEN), record=True
            )
        with pytest.raises(ModelMismatchError, match="prefilter"):
            lib.check_models(
                ModelInfo("tiny-clip", "clip-fp-1", DIM * 2, "tiny-vilt", "vilt-fp-1", HIDDEN), record=False
            )
        with pytest.raises(ModelMismatchError, match="reranker"):
            lib.check_models(
                ModelInfo("tiny-clip", "clip-fp-1", DIM, "other-vilt", "vilt-fp-2", HIDDEN), record=True
            )
        assert lib.models() == INFO  # a refused check records nothing

        new_info = ModelInfo("clip-2", "clip-fp-2", DIM * 2, "vilt-2", "vilt-fp-2", HIDDEN + 2)
        images_gen = lib.store.generation("images")
        lib.reset(new_info)
        assert lib.store.count_images() == 0
        assert lib.store.count_texts() == 0
        assert lib.models() == new_info
        assert lib.store.generation("images") > images_gen
        assert list(home.glob("*.faiss")) == []
        assert list(home.glob("patches-*.f16")) == []
        assert len(lib.vectors("images")) == 0
        assert len(lib.vectors("texts")) == 0
        assert lib.vectors("images").dim == DIM * 2
        assert lib.patches().rows == 0
        assert lib.patches().hidden == HIDDEN + 2
        lib.check_models(new_info, record=False)
        with pytest.raises(ModelMismatchError):
            lib.check_models(INFO, record=False)
    finally:
        lib.close()

    # A new SearchIndex on the same database sees the reset too.
    lib2 = SearchIndex(home, db_url)
    try:
        assert lib2.models() == new_info
        assert len(lib2.vectors("images")) == 0
    finally:
        lib2.close()


def test_commit_texts_with_repeated_ext_id_in_one_call(tmp_path: Path, db_url: str) -> None:
    rng = np.random.default_rng(11)
    lib = SearchIndex(tmp_path / "index", db_url)
    try:
        lib.check_models(INFO, record=True)
        v = _unit(rng, 2)
        lib.commit_texts([("same", "old caption", v[0]), ("same", "new caption", v[1])])
        assert lib.store.count_texts() == 1
        db_ids, _ = lib.store.text_vectors(DIM)
        index = lib.vectors("texts")
        # FAISS must hold exactly the database's captions, under their current vectors.
        assert len(index) == lib.store.count_texts()
        assert _all_ids(index) == db_ids.tolist()
        scores, _ = index.search(v[:1], 2)
        assert float(scores[0, 0]) < 0.999  # the replaced caption's old vector is gone
    finally:
        lib.close()
