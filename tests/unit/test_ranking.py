"""Ranking and fusion, exactly: the real index and search code with the exact fakes of ``tests.fakes``.

Every expected order is computed here from the fakes' vectors and logit table (brute-force cosines,
``logit + logit_scale * cosine``, ties by higher cosine then lower id), never copied from a run. The
designed cases use dyadic cosines and quarter logits, which float32 holds exactly, so the code's sums are
the reference's and a tie is a tie in both; each designed case also asserts that the orders a broken
search would give (no fusion term, a sign error, the scale left out, cosine alone) differ from the
right one, so the test can fail.
"""

from __future__ import annotations

import copy
import math
import re
import shutil
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from retriever.errors import IndexDamagedError, RetrieverError
from retriever.indexing import index_folder
from retriever.search import Hit, _rank, search_image, search_image_texts, search_text
from retriever.search_index import SearchIndex
from tests.fakes import FakeEncoder, FakeReranker, image_key, solid_image

DIM = 8
HIDDEN = 4
SCALE = 10.0
QUERY = "things that are red"
#: Absolute tolerance for scores computed in float32 by the code and in float64 here (random vectors).
ATOL = 1e-6

#: The designed text→image case: image name → (cosine to the query, ITM logit of (QUERY, image)).
#: Fused (scale 10): I 9.5, C 9.25, H 8.25, B 7.5, D 6.0 = E 6.0 (D has the higher cosine), F 5.75 = G
#: 5.75 (same cosine: lower id first), A 2.75; J's logit is the highest of all, but its cosine is the lowest,
#: outside the top 9 the default test reranks.
IMAGES: dict[str, tuple[float, float]] = {
    "A": (0.875, -6.0),
    "B": (0.75, 0.0),
    "C": (0.625, 3.0),
    "D": (0.5, 1.0),
    "E": (0.25, 3.5),
    "F": (0.375, 2.0),
    "G": (0.375, 2.0),
    "H": (0.125, 7.0),
    "I": (0.0, 9.5),
    "J": (-0.25, 20.0),
}
#: The order the files sort in (so their ids): E before D and G before F, so that a tie broken by id
#: alone, instead of by cosine first, gives another order.
FILE_ORDER = "GEJIHCABDF"

#: The designed image→text case: caption → (cosine to the query image, ITM logit). Fused: field 11.5,
#: square 10.25 = triangles 10.25 (square has the higher cosine), circle 8.5, star 6.75, dog 1.75; the cat
#: is the ITM's favourite and the prefilter's last. The triangles are stored first (the lower id), so a tie
#: broken by id alone gives another order.
CAPTIONS: dict[str, tuple[float, float]] = {
    "a red circle": (0.75, 1.0),
    "two green triangles": (0.5, 5.25),
    "a blue square": (0.625, 4.0),
    "a yellow star": (0.875, -2.0),
    "an empty field": (0.25, 9.0),
    "a dog": (0.125, 0.5),
    "a cat": (-0.125, 30.0),
}


def along(cosine: float, axis: int, side: int) -> np.ndarray:
    """A unit vector whose dot product with ``e_axis`` is exactly ``cosine``: the rest lies on ``e_side``."""
    vec = np.zeros(DIM, dtype=np.float32)
    vec[axis] = cosine
    vec[side] = math.sqrt(1.0 - cosine * cosine)
    return vec


def basis(axis: int) -> np.ndarray:
    vec = np.zeros(DIM, dtype=np.float32)
    vec[axis] = 1.0
    return vec


@dataclass
class World:
    """An index built by ``index_folder`` with the fakes, and what the test knows of it."""

    search_index: SearchIndex
    encoder: FakeEncoder
    reranker: FakeReranker
    ids: dict[str, int]  # image name → row id
    keys: dict[str, str]  # image name → image key
    paths: dict[str, str]  # image name → indexed path

    def name(self, hit: Hit) -> str:
        return next(n for n, i in self.ids.items() if i == hit.id)


def build(tmp_path: Path, vectors: Mapping[str, np.ndarray], file_order: str | None = None) -> World:
    """Write one distinct image per name, give each its vector, and index them with the fakes."""
    encoder = FakeEncoder(DIM, logit_scale=SCALE)
    reranker = FakeReranker(HIDDEN)
    photos = tmp_path / "photos"
    photos.mkdir()
    order = list(file_order) if file_order else list(vectors)
    keys: dict[str, str] = {}
    for n, name in enumerate(vectors):
        image = solid_image(n + 1)
        keys[name] = encoder.add_image(image, vectors[name])
        image.save(photos / f"{order.index(name):03d}-{name}.png")
    search_index = SearchIndex(tmp_path / "index")
    report = index_folder(search_index, encoder, reranker, photos)
    assert report.added == len(vectors) and not report.skipped
    states = search_index.store.file_states()
    paths = {Path(p).stem.split("-", 1)[1]: p for p in states}
    ids = {name: states[p].id for name, p in paths.items()}
    assert sorted(ids) == sorted(vectors)
    return World(search_index, encoder, reranker, ids, keys, paths)


@pytest.fixture(scope="module")
def designed_once(tmp_path_factory: pytest.TempPathFactory) -> World:
    """The designed text→image case, indexed once: IMAGES, with QUERY along e_0 and each image's rest on
    its own axis. Tests get copies (``designed``)."""
    vectors = {name: along(cos, 0, 1 + n % (DIM - 1)) for n, (name, (cos, _)) in enumerate(IMAGES.items())}
    world = build(tmp_path_factory.mktemp("designed"), vectors, FILE_ORDER)
    world.encoder.add_text(QUERY, basis(0))
    for name, (_, logit) in IMAGES.items():
        world.reranker.set_logit(QUERY, world.keys[name], logit)
    world.search_index.close()
    return world


@pytest.fixture
def designed(designed_once: World, tmp_path: Path) -> Iterator[World]:
    """A copy of the designed index (its folder and database) and of its fakes, for one test to change."""
    home = tmp_path / "index"
    shutil.copytree(designed_once.search_index.home, home)
    once = designed_once
    world = World(
        SearchIndex(home),
        copy.deepcopy(once.encoder),
        copy.deepcopy(once.reranker),
        dict(once.ids),
        dict(once.keys),
        dict(once.paths),
    )
    yield world
    world.search_index.close()


# -- references ---------------------------------------------------------------------------------------


def cosines(world: World, query: np.ndarray) -> dict[str, float]:
    """Brute force: the cosine of every indexed image with the query vector, in float64."""
    q = query.astype(np.float64)
    return {
        name: float(world.encoder.image_vector(key).astype(np.float64) @ q)
        for name, key in world.keys.items()
    }


def by_cosine(cos: Mapping[str, float], ids: Mapping[str, int]) -> list[str]:
    return sorted(cos, key=lambda n: (-cos[n], ids[n]))


def ranked(
    names: list[str],
    cos: Mapping[str, float],
    logit: Mapping[str, float],
    ids: Mapping[str, int],
    score: Callable[[float, float], float],
) -> list[str]:
    """``names`` by ``score(logit, cosine)``, ties by higher cosine, then lower id (search's rule)."""
    return sorted(names, key=lambda n: (-score(logit[n], cos[n]), -cos[n], ids[n]))


def fused(scale: float) -> Callable[[float, float], float]:
    return lambda logit, cos: logit + scale * cos


def itm_only(logit: float, cos: float) -> float:
    return logit


def wrong_orders(
    names: list[str], cos: Mapping[str, float], logit: Mapping[str, float], ids: Mapping[str, int]
) -> list[list[str]]:
    """The orders a broken fusion would give: no fusion term, a sign error, no scale, cosine alone."""
    broken: list[Callable[[float, float], float]] = [
        itm_only,
        lambda lg, c: lg - SCALE * c,
        lambda lg, c: lg + c,
        lambda lg, c: SCALE * c,
    ]
    orders = [ranked(names, cos, logit, ids, f) for f in broken]
    orders.append(sorted(names, key=lambda n: (-(logit[n] + SCALE * cos[n]), ids[n])))  # tie by id only
    return orders


# -- (a) the prefilter is brute-force cosine ------------------------------------------------------------


def random_unit(rng: np.random.Generator) -> np.ndarray:
    x = rng.standard_normal(DIM)
    out: np.ndarray = (x / np.linalg.norm(x)).astype(np.float32)
    return out


def check_prefilter(world: World, query: np.ndarray, run: Callable[[int], list[Hit]]) -> None:
    """``run(k)`` returns the brute-force top ``k`` by cosine with ``query``, best first."""
    cos = cosines(world, query)
    expected = by_cosine(cos, world.ids)
    gaps = np.diff(sorted(cos.values()))
    assert gaps.min() > 1e-4, "the seed must give no near-ties, or the order would be ambiguous"
    for k in (1, 5, len(cos)):
        hits = run(k)
        assert [world.name(h) for h in hits] == expected[:k]
        for h in hits:
            assert h.score == h.prefilter_score
            assert h.prefilter_score == pytest.approx(cos[world.name(h)], abs=ATOL)
            assert h.rerank_score is None
            assert h.path == world.paths[world.name(h)]


def test_prefilter_order_is_brute_force_cosine_order(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    world = build(tmp_path, {f"r{n:02d}": random_unit(rng) for n in range(24)})
    query_text = world.encoder.add_text("random query", random_unit(rng))
    query_image = solid_image(9999)
    query_vec = world.encoder.image_vector(world.encoder.add_image(query_image, random_unit(rng)))

    def text_to_image(k: int) -> list[Hit]:
        return search_text(world.search_index, world.encoder, None, "random query", k=k).hits

    def image_to_image(k: int) -> list[Hit]:
        return search_image(world.search_index, world.encoder, query_image, k=k).hits

    check_prefilter(world, query_text, text_to_image)
    check_prefilter(world, query_vec, image_to_image)
    assert world.reranker.calls == []  # no reranker was given: nothing may have been scored


def test_designed_prefilter_scores_are_exact(designed: World) -> None:
    hits = search_text(designed.search_index, designed.encoder, None, QUERY, k=len(IMAGES)).hits
    cos = {n: c for n, (c, _) in IMAGES.items()}
    assert [designed.name(h) for h in hits] == by_cosine(cos, designed.ids)
    assert [h.prefilter_score for h in hits] == [cos[designed.name(h)] for h in hits]


# -- (b) after the rerank: ITM logit + logit_scale x cosine ---------------------------------------------


def check_reranked(world: World, hits: list[Hit], expected: list[str], scale: float) -> None:
    assert [world.name(h) for h in hits] == expected
    for h in hits:
        cos, logit = IMAGES[world.name(h)]
        assert h.prefilter_score == cos
        assert h.rerank_score == logit
        assert h.score == logit + scale * cos
        assert h.path == world.paths[world.name(h)]


def test_rerank_orders_by_fused_score(designed: World) -> None:
    cos = {n: c for n, (c, _) in IMAGES.items()}
    logit = {n: lg for n, (_, lg) in IMAGES.items()}
    candidates = by_cosine(cos, designed.ids)[:9]
    expected = ranked(candidates, cos, logit, designed.ids, fused(SCALE))
    assert all(expected != wrong for wrong in wrong_orders(candidates, cos, logit, designed.ids))
    assert designed.ids["E"] < designed.ids["D"] and designed.ids["G"] < designed.ids["F"]

    result = search_text(designed.search_index, designed.encoder, designed.reranker, QUERY, k=9, candidates=9)
    check_reranked(designed, result.hits, expected, SCALE)
    assert "J" not in {designed.name(h) for h in result.hits}  # the ITM's favourite, never a candidate


def test_fusion_uses_the_encoders_own_logit_scale(designed: World) -> None:
    cos = {n: c for n, (c, _) in IMAGES.items()}
    logit = {n: lg for n, (_, lg) in IMAGES.items()}
    candidates = by_cosine(cos, designed.ids)[:9]
    seen = []
    for scale in (SCALE, 2.0, 40.0):
        designed.encoder.logit_scale = scale
        expected = ranked(candidates, cos, logit, designed.ids, fused(scale))
        seen.append(expected)
        hits = search_text(
            designed.search_index, designed.encoder, designed.reranker, QUERY, k=9, candidates=9
        ).hits
        check_reranked(designed, hits, expected, scale)
    assert len({tuple(s) for s in seen}) == 3, "each scale must rank differently, or the check proves nothing"


def test_rank_breaks_ties_by_prefilter_cosine_then_id() -> None:
    hits = [
        Hit(9, 6.0, 0.25, 3.5),
        Hit(3, 6.0, 0.25, 3.5),
        Hit(7, 6.0, 0.5, 1.0),
        Hit(1, 5.0, 0.875, -3.75),
        Hit(5, 7.0, -0.5, 12.0),
    ]
    assert [h.id for h in _rank(hits, 5)] == [5, 7, 3, 9, 1]
    assert [h.id for h in _rank(list(reversed(hits)), 5)] == [5, 7, 3, 9, 1]
    assert [h.id for h in _rank(hits, 2)] == [5, 7]


# -- (c) fuse=False: the ITM logit alone ----------------------------------------------------------------


def test_itm_only_ranks_by_the_logit_alone(designed: World) -> None:
    cos = {n: c for n, (c, _) in IMAGES.items()}
    logit = {n: lg for n, (_, lg) in IMAGES.items()}
    candidates = by_cosine(cos, designed.ids)[:9]
    expected = ranked(candidates, cos, logit, designed.ids, itm_only)
    assert expected != ranked(candidates, cos, logit, designed.ids, fused(SCALE))

    hits = search_text(
        designed.search_index, designed.encoder, designed.reranker, QUERY, k=9, candidates=9, fuse=False
    ).hits
    assert [designed.name(h) for h in hits] == expected
    for h in hits:
        c, lg = IMAGES[designed.name(h)]
        assert (h.score, h.rerank_score, h.prefilter_score) == (lg, lg, c)


# -- (d) k and candidates -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("k", "candidates", "sent"), [(2, 4, 4), (3, 3, 3), (6, 3, 6), (1, 9, 9), (50, 4, 10)]
)
def test_only_the_top_candidates_are_reranked_and_k_come_back(
    designed: World, k: int, candidates: int, sent: int
) -> None:
    cos = {n: c for n, (c, _) in IMAGES.items()}
    logit = {n: lg for n, (_, lg) in IMAGES.items()}
    top = by_cosine(cos, designed.ids)[:sent]
    progress: list[tuple[int, int]] = []

    result = search_text(
        designed.search_index,
        designed.encoder,
        designed.reranker,
        "  things that \n are   red ",
        k=k,
        candidates=candidates,
        on_progress=lambda done, total: progress.append((done, total)),
    )
    assert designed.encoder.text_calls == [[QUERY]]  # the query is cleaned before it is encoded
    assert len(designed.reranker.calls) == 1
    asked = designed.reranker.asked
    assert sorted(asked) == sorted((QUERY, designed.keys[n]) for n in top)  # each candidate once
    names = {key: n for n, key in designed.keys.items()}
    asked_cos = [cos[names[key]] for _, key in asked]
    assert asked_cos == sorted(asked_cos, reverse=True)  # in prefilter order (F and G tie: either first)
    assert progress[-1] == (sent, sent)
    expected = ranked(top, cos, logit, designed.ids, fused(SCALE))[:k]
    assert len(result.hits) == min(k, len(IMAGES))
    check_reranked(designed, result.hits, expected, SCALE)


def test_without_a_reranker_k_hits_by_cosine(designed: World) -> None:
    cos = {n: c for n, (c, _) in IMAGES.items()}
    hits = search_text(designed.search_index, designed.encoder, None, QUERY, k=3, candidates=100).hits
    assert [designed.name(h) for h in hits] == by_cosine(cos, designed.ids)[:3]
    assert all(h.rerank_score is None and h.score == h.prefilter_score for h in hits)
    assert designed.reranker.calls == []


@pytest.mark.parametrize(("k", "candidates"), [(0, 10), (-1, 10), (5, 0)])
def test_k_and_candidates_must_be_positive(designed: World, k: int, candidates: int) -> None:
    with pytest.raises(RetrieverError, match="must be at least 1"):
        search_text(
            designed.search_index, designed.encoder, designed.reranker, QUERY, k=k, candidates=candidates
        )
    assert designed.reranker.calls == []


# -- (e) image→text over the caption collection ---------------------------------------------------------


@pytest.fixture
def captioned(designed: World) -> tuple[World, str]:
    """The designed index plus CAPTIONS, the query image along e_1 and each caption's rest on its own axis."""
    world = designed
    query = solid_image(4242)
    qkey = world.encoder.add_image(query, basis(1))
    with pytest.raises(RetrieverError, match="caption collection is empty"):
        search_image_texts(world.search_index, world.encoder, world.reranker, query)
    sides = [0, 2, 3, 4, 5, 6, 7]
    for n, (text, (cos, logit)) in enumerate(CAPTIONS.items()):
        world.encoder.add_text(text, along(cos, 1, sides[n % len(sides)]))
        world.reranker.set_logit(text, qkey, logit)
    items = [(f"cap-{n}", t) for n, t in enumerate(CAPTIONS)]
    vectors = world.encoder.encode_texts([t for _, t in items])
    assert world.search_index.commit_texts([(i, t, v) for (i, t), v in zip(items, vectors, strict=True)]) == 7
    world.encoder.text_calls.clear()
    return world, qkey


def text_ids(world: World) -> dict[str, int]:
    records = world.search_index.store.list_texts()
    return {r.text: r.id for r in records}


@pytest.mark.parametrize(
    ("k", "candidates", "fuse"), [(6, 6, True), (2, 4, True), (5, 2, True), (6, 6, False)]
)
def test_image_to_text_reranks_the_top_candidates(
    captioned: tuple[World, str], k: int, candidates: int, fuse: bool
) -> None:
    world, qkey = captioned
    ids = text_ids(world)
    cos = {t: c for t, (c, _) in CAPTIONS.items()}
    logit = {t: lg for t, (_, lg) in CAPTIONS.items()}
    sent = by_cosine(cos, ids)[: max(k, candidates)]
    expected = ranked(sent, cos, logit, ids, fused(SCALE) if fuse else itm_only)
    if fuse and len(sent) == 6:
        assert ids["two green triangles"] < ids["a blue square"]
        assert all(expected != wrong for wrong in wrong_orders(sent, cos, logit, ids))
    elif len(sent) == 6:
        assert expected != ranked(sent, cos, logit, ids, fused(SCALE))
    world.reranker.embedded.clear()

    hits = search_image_texts(
        world.search_index,
        world.encoder,
        world.reranker,
        solid_image(4242),
        k=k,
        candidates=candidates,
        fuse=fuse,
    ).hits
    assert world.reranker.embedded == [qkey]  # the query image's tokens are computed once
    assert world.reranker.asked == [(t, qkey) for t in sent]
    assert [h.text for h in hits] == expected[:k]
    assert "a cat" not in {h.text for h in hits}
    for h in hits:
        assert h.text is not None
        c, lg = CAPTIONS[h.text]
        assert h.id == ids[h.text] and h.ext_id == f"cap-{list(CAPTIONS).index(h.text)}"
        assert (h.prefilter_score, h.rerank_score) == (c, lg)
        assert h.score == (lg + SCALE * c if fuse else lg)


def test_image_to_text_without_a_reranker_is_cosine_order(captioned: tuple[World, str]) -> None:
    world, _ = captioned
    cos = {t: c for t, (c, _) in CAPTIONS.items()}
    hits = search_image_texts(world.search_index, world.encoder, None, solid_image(4242), k=4).hits
    assert [h.text for h in hits] == by_cosine(cos, text_ids(world))[:4]
    assert [h.score for h in hits] == [cos[h.text or ""] for h in hits]
    assert world.reranker.calls == []


# -- (f) non-finite logits ------------------------------------------------------------------------------


def test_non_finite_logits_name_the_damaged_images(designed: World) -> None:
    for name, value in (("C", math.nan), ("F", math.inf)):
        designed.reranker.set_logit(QUERY, designed.keys[name], value)
    designed.reranker.set_logit(QUERY, designed.keys["J"], math.nan)  # outside the candidates: never asked

    with pytest.raises(IndexDamagedError) as caught:
        search_text(designed.search_index, designed.encoder, designed.reranker, QUERY, k=3, candidates=9)
    message = str(caught.value)
    for name in ("C", "F"):
        assert f"image {designed.ids[name]} ({designed.paths[name]})" in message
    for name in set(IMAGES) - {"C", "F"}:
        assert f"image {designed.ids[name]} " not in message
    assert "--rebuild" in message

    designed.reranker.set_logit(QUERY, designed.keys["C"], IMAGES["C"][1])
    designed.reranker.set_logit(QUERY, designed.keys["F"], IMAGES["F"][1])
    hits = search_text(
        designed.search_index, designed.encoder, designed.reranker, QUERY, k=3, candidates=9
    ).hits
    assert len(hits) == 3  # J's NaN is not a candidate's


def test_many_damaged_images_are_counted(designed: World) -> None:
    for name in IMAGES:
        designed.reranker.set_logit(QUERY, designed.keys[name], -math.inf)
    with pytest.raises(IndexDamagedError, match=r"and 6 more"):
        search_text(designed.search_index, designed.encoder, designed.reranker, QUERY, k=3, candidates=9)


def test_damaged_cached_tokens_are_named(designed: World) -> None:
    """NaN tokens in the patch cache itself (the fake reranker scores them NaN, as ViLT would)."""
    record = designed.search_index.store.images([designed.ids["B"]])[designed.ids["B"]]
    cache = designed.search_index.patches()
    with open(cache.path, "r+b") as f:
        f.seek(record.patch_offset * cache.row_bytes)
        f.write(np.full(record.patch_tokens * HIDDEN, np.nan, dtype=np.float16).tobytes())
    fresh = SearchIndex(designed.search_index.home)
    try:
        with pytest.raises(
            IndexDamagedError, match=re.escape(f"image {designed.ids['B']} ({designed.paths['B']})")
        ):
            search_text(fresh, designed.encoder, designed.reranker, QUERY, k=3, candidates=9)
    finally:
        fresh.close()


def test_image_to_text_non_finite_logits_raise(captioned: tuple[World, str]) -> None:
    world, qkey = captioned
    world.reranker.set_logit("a blue square", qkey, math.nan)
    with pytest.raises(IndexDamagedError, match="non-finite"):
        search_image_texts(
            world.search_index, world.encoder, world.reranker, solid_image(4242), k=3, candidates=6
        )
    # Outside the candidates, a NaN is never asked about.
    world.reranker.set_logit("a blue square", qkey, CAPTIONS["a blue square"][1])
    world.reranker.set_logit("a cat", qkey, math.nan)
    result = search_image_texts(
        world.search_index, world.encoder, world.reranker, solid_image(4242), k=3, candidates=6
    )
    assert len(result.hits) == 3
    assert ("a cat", qkey) not in world.reranker.calls[-1]


def test_fakes_round_trip_through_the_patch_cache(designed: World) -> None:
    """The fake's tokens survive the float16 cache: loaded tokens name the image they were made for."""
    records = designed.search_index.store.images(list(designed.ids.values()))
    tokens = designed.search_index.load_tokens([records[i] for i in designed.ids.values()])
    keys = [designed.reranker.key_of_tokens(t) for t in tokens]
    assert keys == [designed.keys[n] for n in designed.ids]
    assert image_key(solid_image(1)) == designed.keys["A"]
