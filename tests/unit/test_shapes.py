"""The shapes benchmark, checked rule by rule against the spec from the files it writes."""

from __future__ import annotations

import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from PIL import Image
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

# The spec's tables, written out again here so that the tests do not trust the module's constants.
PALETTE = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
    "white": (235, 235, 235),
    "brown": (140, 90, 40),
}
EXTENTS = {"small": (0.14, 0.20), "large": (0.30, 0.38)}
INVERSE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
# Share of an object's box covered by its solid fill (anti-aliased edge pixels excluded).
ROLES = ("base", "colors_swapped", "shapes_swapped", "positions_swapped")
COVERAGE = {"circle": (0.70, 0.80), "square": (0.99, 1.0), "triangle": (0.44, 0.52)}

Entry = dict[str, Any]


def load(json_path: Path) -> list[Entry]:
    data = json.loads(json_path.read_text())
    assert data["dataset"] == "shapes"
    images: list[Entry] = data["images"]
    return images


def words(obj: Entry) -> str:
    return f"{obj['size']} {obj['color']} {obj['shape']}"


def expected_captions(entry: Entry) -> list[str]:
    a, b = (words(o) for o in entry["objects"])
    rel = entry["relation"]
    inv = INVERSE[rel]
    return [
        f"a {a} {rel} a {b}",
        f"a {b} {inv} a {a}",
        f"the {a} is {rel} the {b}",
        f"the {b} is {inv} the {a}",
        f"there is a {a} {rel} a {b}",
    ]


def triple(obj: Entry) -> tuple[str, str, str]:
    return (obj["size"], obj["color"], obj["shape"])


def scene_key(entry: Entry) -> tuple[Any, ...]:
    """Identity by size, color, shape of both objects and relation, read either way round."""
    a, b = (triple(o) for o in entry["objects"])
    rel = entry["relation"]
    return (a, rel, b) if rel in ("left of", "above") else (b, INVERSE[rel], a)


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


def pixels(folder: Path, entry: Entry) -> np.ndarray:
    with Image.open(folder / entry["filename"]) as image:
        assert image.format == "PNG"
        assert image.mode == "RGB"
        return np.asarray(image).astype(np.int64)


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
        rgb = pixels(folder, entry)
        height, width = rgb.shape[:2]
        assert (width, height) == (entry["width"], entry["height"])
        assert 224 <= width <= 320 and 224 <= height <= 320
        assert 20 <= entry["background"] <= 80
        assert 0 <= entry["noise_sigma"] <= 8
        outside = np.ones((height, width), dtype=bool)
        for obj in entry["objects"]:
            x0, y0, x1, y1 = obj["box"]
            outside[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = False
        background = rgb[outside]
        # Gray: all three channels equal everywhere outside the objects.
        assert (background[:, 0] == background[:, 1]).all() and (background[:, 1] == background[:, 2]).all()
        level = background[:, 0]
        assert abs(level.mean() - entry["background"]) < 0.5
        assert 19.5 <= level.mean() <= 80.5
        assert level.std() <= 8.5
        assert abs(level.std() - entry["noise_sigma"]) < 0.5
        # The corners, away from the objects, are background too.
        for corner in (rgb[:4, :4], rgb[:4, -4:], rgb[-4:, :4], rgb[-4:, -4:]):
            assert 20 - 4 * 8 <= corner.mean() <= 80 + 4 * 8


def test_objects_extent_color_shape_and_placement(any_set: tuple[Path, list[Entry]]) -> None:
    folder, entries = any_set
    for entry in entries:
        rgb = pixels(folder, entry)
        width, height = entry["width"], entry["height"]
        m = min(width, height)
        objects = entry["objects"]
        assert [o["role"] for o in objects] == ["A", "B"]
        assert triple(objects[0]) != triple(objects[1])
        for obj in objects:
            x0, y0, x1, y1 = obj["box"]
            extent = x1 - x0
            assert y1 - y0 == extent == obj["extent"]
            low, high = EXTENTS[obj["size"]]
            assert low * m <= extent <= high * m, (obj, m)
            assert x0 >= 0 and y0 >= 0 and x1 <= width and y1 <= height
            assert obj["center"] == [(x0 + x1) / 2, (y0 + y1) / 2]
            fill = np.array(obj["rgb"])
            assert np.abs(fill - np.array(PALETTE[obj["color"]])).max() <= 15
            cx, cy = int(obj["center"][0]), int(obj["center"][1])
            assert np.abs(rgb[cy, cx] - fill).max() <= 1
            solid = np.abs(rgb[y0:y1, x0:x1] - fill).max(axis=2) <= 3
            low_cov, high_cov = COVERAGE[obj["shape"]]
            assert low_cov <= solid.mean() <= high_cov, (obj["shape"], solid.mean())
            quarter = extent // 4
            if obj["shape"] == "triangle":  # upright: narrow at the top, wide at the base
                assert solid[:quarter].mean() < 0.2 < 0.75 < solid[-quarter:].mean()
        (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = (o["box"] for o in objects)
        apart_x = bx0 >= ax1 or ax0 >= bx1
        apart_y = by0 >= ay1 or ay0 >= by1
        assert apart_x or apart_y, "objects overlap"


def centroid_y(obj: Entry) -> float:
    y0: float
    y1: float
    _, y0, _, y1 = obj["box"]
    return y0 + 2 * (y1 - y0) / 3 if obj["shape"] == "triangle" else (y0 + y1) / 2


def test_relation_thresholds(any_set: tuple[Path, list[Entry]]) -> None:
    _, entries = any_set
    for entry in entries:
        width, height = entry["width"], entry["height"]
        a, b = entry["objects"]
        dx = b["center"][0] - a["center"][0]
        # The relation holds with box centers and, for triangles, with centroids too.
        for dy in (b["center"][1] - a["center"][1], centroid_y(b) - centroid_y(a)):
            relation = entry["relation"]
            if relation == "left of":
                assert dx >= 0.35 * width and abs(dy) <= 0.15 * height
            elif relation == "right of":
                assert -dx >= 0.35 * width and abs(dy) <= 0.15 * height
            elif relation == "above":
                assert dy >= 0.35 * height and abs(dx) <= 0.15 * width
            else:
                assert relation == "below"
                assert -dy >= 0.35 * height and abs(dx) <= 0.15 * width


def test_captions_exact_forms_and_order(any_set: tuple[Path, list[Entry]]) -> None:
    _, entries = any_set
    for entry in entries:
        assert [s["raw"] for s in entry["sentences"]] == expected_captions(entry)


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
