"""The shapes benchmark, checked rule by rule against the spec from the files it writes."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from retriever.cli.datasets import app as datasets_app
from retriever.datasets.shapes import (
    ObjectSpec,
    Scene,
    ShapesError,
    generate,
    max_test_images,
    plan_scenes,
    render,
)
from tests.unit.shapes_spec import (
    INVERSE,
    ROLES,
    Entry,
    check_captions,
    check_objects,
    check_relation,
    check_size_and_background,
    expected_captions,
    load,
    pixels,
    scene_key,
    triple,
)


@pytest.fixture(scope="module")
def test_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Entry]]:
    out = tmp_path_factory.mktemp("shapes_test")
    json_path = generate(out, 48, seed=7, split="test", workers=1)
    assert json_path == out / "dataset.json"
    return out, load(json_path)


@pytest.fixture(scope="module")
def train_set(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Entry]]:
    out = tmp_path_factory.mktemp("shapes_train")
    return out, load(generate(out, 40, seed=7, split="train", workers=1))


@pytest.fixture(params=["test", "train"])
def any_set(request: pytest.FixtureRequest) -> tuple[Path, list[Entry]]:
    fixture: tuple[Path, list[Entry]] = request.getfixturevalue(f"{request.param}_set")
    return fixture


def test_karpathy_fields(any_set: tuple[Path, list[Entry]]) -> None:
    folder, entries = any_set
    split = "test" if "test" in folder.name else "train"
    seen_sentids: set[int] = set()
    for index, entry in enumerate(entries):
        assert entry["imgid"] == index
        assert entry["filepath"] == ""
        assert entry["split"] == split
        assert (folder / entry["filename"]).is_file()
        assert len(entry["sentences"]) == 5
        assert entry["sentids"] == [s["sentid"] for s in entry["sentences"]]
        for sentence in entry["sentences"]:
            assert sentence["imgid"] == index
            assert sentence["tokens"] == sentence["raw"].split(" ")
        seen_sentids.update(entry["sentids"])
    assert len(seen_sentids) == 5 * len(entries)


def test_image_size_and_background(any_set: tuple[Path, list[Entry]]) -> None:
    folder, entries = any_set
    for entry in entries:
        check_size_and_background(pixels(folder, entry), entry)


def test_objects_extent_color_shape_and_placement(any_set: tuple[Path, list[Entry]]) -> None:
    folder, entries = any_set
    for entry in entries:
        check_objects(pixels(folder, entry), entry)


def test_relation_thresholds(any_set: tuple[Path, list[Entry]]) -> None:
    _, entries = any_set
    for entry in entries:
        check_relation(entry)


def test_captions_exact_forms_and_order(any_set: tuple[Path, list[Entry]]) -> None:
    _, entries = any_set
    for entry in entries:
        check_captions(entry)


def test_each_caption_matches_exactly_one_scene(test_set: tuple[Path, list[Entry]]) -> None:
    _, entries = test_set
    matches: dict[str, set[int]] = defaultdict(set)
    for entry in entries:
        a, b = entry["objects"]
        swapped = {**entry, "objects": [b, a], "relation": INVERSE[entry["relation"]]}
        # Every caption that describes this scene, read either way round.
        for caption in expected_captions(entry) + expected_captions(swapped):
            matches[caption].add(entry["imgid"])
    for entry in entries:
        for sentence in entry["sentences"]:
            assert matches[sentence["raw"]] == {entry["imgid"]}


def test_twin_groups(test_set: tuple[Path, list[Entry]]) -> None:
    _, entries = test_set
    groups: dict[int, list[Entry]] = defaultdict(list)
    for entry in entries:
        groups[entry["twin_group"]].append(entry)
    assert len(groups) == 12
    for members in groups.values():
        assert [m["twin_role"] for m in members] == list(ROLES)
        base, colors, shapes, positions = members
        (ba, bb), (ca, cb), (sa, sb), (pa, pb) = (m["objects"] for m in members)
        assert (triple(ca), triple(cb)) == (
            (ba["size"], bb["color"], ba["shape"]),
            (bb["size"], ba["color"], bb["shape"]),
        )
        assert (triple(sa), triple(sb)) == (
            (ba["size"], ba["color"], bb["shape"]),
            (bb["size"], bb["color"], ba["shape"]),
        )
        assert (triple(pa), triple(pb)) == (triple(ba), triple(bb))
        assert colors["relation"] == shapes["relation"] == base["relation"]
        assert positions["relation"] == INVERSE[base["relation"]]
        assert len({scene_key(m) for m in members}) == 4
        # Same words, other arrangement: the color and shape twins' captions are permutations of
        # the base's, and the position twin's first four are the base's other reading.
        bags = [sorted(s["tokens"]) for s in base["sentences"]]
        for member in (colors, shapes):
            assert [sorted(s["tokens"]) for s in member["sentences"]] == bags
        other_reading = [bags[1], bags[0], bags[3], bags[2]]
        assert [sorted(s["tokens"]) for s in positions["sentences"][:4]] == other_reading
        # Rendered independently: not one image size, background and layout shared by all four.
        renders = {(m["width"], m["height"], m["background"], m["objects"][0]["box"][0]) for m in members}
        assert len(renders) > 1


def test_scenes_unique_across_the_test_set(test_set: tuple[Path, list[Entry]]) -> None:
    _, entries = test_set
    assert len({scene_key(e) for e in entries}) == len(entries)


def test_train_split_has_twin_groups_and_singles(train_set: tuple[Path, list[Entry]]) -> None:
    _, entries = train_set
    groups: dict[int, list[Entry]] = defaultdict(list)
    for entry in entries:
        groups[entry["twin_group"]].append(entry)
    in_twins = [m for members in groups.values() if len(members) == 4 for m in members]
    assert len(in_twins) >= 0.4 * len(entries)
    assert any(len(members) == 1 for members in groups.values())
    for members in groups.values():
        assert len(members) in (1, 4)
        if len(members) == 4:
            assert len({scene_key(m) for m in members}) == 4
            assert members[3]["relation"] == INVERSE[members[0]["relation"]]


def test_test_set_size_must_be_a_multiple_of_four(tmp_path: Path) -> None:
    with pytest.raises(ShapesError, match="multiple of 4"):
        generate(tmp_path, 6, seed=0)
    assert not (tmp_path / "dataset.json").exists()


def test_too_many_test_images_rejected_quickly(tmp_path: Path) -> None:
    started = time.perf_counter()
    with pytest.raises(ShapesError, match="2688"):
        generate(tmp_path, 3000, seed=0)
    with pytest.raises(ShapesError):
        plan_scenes(2692, seed=0)
    assert time.perf_counter() - started < 5
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_draw_stops_at_2688(seed: int) -> None:
    assert max_test_images() == 2688
    planned = plan_scenes(2688, seed=seed)
    keys = {p.scene.key() for p in planned}
    assert len(keys) == 2688
    assert len({p.twin_group for p in planned}) == 672


@pytest.mark.parametrize(
    ("n_images", "seed", "split"),
    [(0, 0, "train"), (4, -1, "test"), (4, 0, "dev")],
)
def test_bad_requests_raise(tmp_path: Path, n_images: int, seed: int, split: str) -> None:
    with pytest.raises(ShapesError):
        generate(tmp_path, n_images, seed=seed, split=split)


def test_deterministic_for_a_seed_and_any_worker_count(tmp_path: Path) -> None:
    def files(folder: Path) -> dict[str, bytes]:
        return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}

    first = files(generate(tmp_path / "a", 12, seed=3, workers=1).parent)
    again = files(generate(tmp_path / "b", 12, seed=3, workers=2).parent)
    other = files(generate(tmp_path / "c", 12, seed=4, workers=1).parent)
    assert first == again
    assert first["dataset.json"] != other["dataset.json"]
    train = files(generate(tmp_path / "d", 12, seed=3, split="train").parent)
    assert train["000000.png"] != first["000000.png"]


def test_render_returns_the_scene_it_was_given() -> None:
    scene = Scene(ObjectSpec("small", "red", "circle"), ObjectSpec("large", "blue", "triangle"), "above")
    image, meta = render(scene, np.random.default_rng(0))
    assert image.size == (meta["width"], meta["height"])
    assert meta["relation"] == "above"
    assert [(o["size"], o["color"], o["shape"]) for o in meta["objects"]] == [
        ("small", "red", "circle"),
        ("large", "blue", "triangle"),
    ]
    assert scene.captions()[0] == "a small red circle above a large blue triangle"
    assert scene.key() == Scene(scene.b, scene.a, "below").key()


def test_scene_rejects_identical_objects() -> None:
    obj = ObjectSpec("small", "red", "circle")
    with pytest.raises(ShapesError):
        Scene(obj, obj, "left of")
    with pytest.raises(ShapesError):
        ObjectSpec("tiny", "red", "circle")


def _cli() -> typer.Typer:
    root = typer.Typer()
    root.add_typer(datasets_app, name="datasets")
    return root


def test_cli_writes_a_set_and_prints_one_line(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        _cli(), ["datasets", "shapes", "--out", str(tmp_path), "--images", "8", "--seed", "1"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1
    assert "8 images" in lines[0] and "40 captions" in lines[0] and "dataset.json" in lines[0]
    assert len(load(tmp_path / "dataset.json")) == 8


def test_cli_reports_errors_without_traceback(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        _cli(), ["datasets", "shapes", "--out", str(tmp_path), "--images", "6", "--split", "test"]
    )
    assert result.exit_code == 2
    assert "multiple of 4" in result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
