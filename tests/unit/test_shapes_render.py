"""The shapes renderers: every one inside the spec's envelope, the envelope reaching both ends of each
range, the default unchanged draw for draw, and training kept off the evaluation seeds."""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch
import typer
from PIL import Image
from typer.testing import CliRunner

from retriever.cli.datasets import app as datasets_app
from retriever.datasets.karpathy import load_karpathy
from retriever.datasets.shapes import (
    DEFAULT_RENDER,
    ENVELOPE,
    EVAL_TEST_SEEDS,
    RENDERERS,
    ShapesError,
    eval_seed_of,
    generate,
    plan_scenes,
    render,
    render_entries,
    render_settings,
)
from retriever.datasets.shapes_render import FloatSpan, IntSpan, RenderSettings
from retriever.errors import RetrieverError
from tests.unit.shapes_spec import (
    EXTENTS,
    Entry,
    check_entry,
    check_objects,
    check_relation,
    check_size_and_background,
    load,
    pixels,
    scene_key,
)

ROOT = Path(__file__).resolve().parents[2]
VARIANTS = [name for name in RENDERERS if name != "default"]


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Entry]]]:
    """The same 16 test scenes under every renderer."""
    drawn = {}
    for name, settings in RENDERERS.items():
        out = tmp_path_factory.mktemp(f"shapes_{name}")
        drawn[name] = (out, load(generate(out, 16, seed=5, split="test", workers=1, settings=settings)))
    return drawn


@pytest.mark.parametrize("name", VARIANTS)
def test_every_renderer_follows_the_spec(name: str, sets: dict[str, tuple[Path, list[Entry]]]) -> None:
    folder, entries = sets[name]
    for entry in entries:
        check_entry(folder, entry)
    assert len({scene_key(e) for e in entries}) == len(entries)
    document = json.loads((folder / "dataset.json").read_text())
    assert document["render"]["name"] == name
    assert all(set(e["render"]) >= {"supersample", "noise", "placement"} for e in entries)
    # A Karpathy reader sees an ordinary set.
    assert len(load_karpathy(folder / "dataset.json", split="test").texts) == 5 * len(entries)


@pytest.mark.parametrize("name", VARIANTS)
def test_a_renderer_changes_the_drawing_not_the_scenes(
    name: str, sets: dict[str, tuple[Path, list[Entry]]]
) -> None:
    (base_folder, base), (folder, other) = sets["default"], sets[name]
    keep = ("relation", "twin_group", "twin_role", "sentences", "filename")
    assert [{k: e[k] for k in keep} for e in other] == [{k: e[k] for k in keep} for e in base]
    changed = [
        not np.array_equal(pixels(base_folder, a), pixels(folder, b))
        for a, b in zip(base, other, strict=True)
    ]
    assert all(changed)


def test_variant_settings_show_in_the_images(sets: dict[str, tuple[Path, list[Entry]]]) -> None:
    sizes = {name: [(e["width"], e["height"]) for e in entries] for name, (_, entries) in sets.items()}
    assert all(w <= 240 and h <= 240 for w, h in sizes["soft-small"])
    assert all(w >= 304 and h >= 304 for w, h in sizes["large-canvas"])
    assert all(w >= 304 and h <= 240 for w, h in sizes["wide"])
    assert {e["background"] for e in sets["wide"][1]} <= {20, 80}
    assert all(e["noise_sigma"] == 0 for e in sets["soft-small"][1])
    noisy = sets["hard-edges-noisy"][1]
    assert all(e["noise_sigma"] >= 6 and e["render"]["noise"] == "rgb" for e in noisy)
    palette = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "white": (235, 235, 235)}
    for entry in noisy:
        for obj in entry["objects"]:
            offsets = np.abs(np.array(obj["rgb"]) - np.array(palette.get(obj["color"], obj["rgb"])))
            assert set(offsets.tolist()) <= {0, 15}  # 0 only for colours left out of this short table


def _in_between(rgb: np.ndarray, entry: Entry) -> float:
    """Share of the objects' box pixels that are neither their fill nor background: the blended edge."""
    sigma, gray = entry["noise_sigma"], entry["background"]
    shares = []
    for obj in entry["objects"]:
        x0, y0, x1, y1 = obj["box"]
        box = rgb[y0:y1, x0:x1]
        fill = np.abs(box - np.array(obj["rgb"])).max(axis=2) <= 3
        back = np.abs(box - gray).max(axis=2) <= 6 * sigma + 1  # noise tails included
        if obj["shape"] != "square":
            shares.append(float((~fill & ~back).mean()))
    return max(shares, default=0.0)


def test_hard_edges_are_hard_and_default_edges_blend(sets: dict[str, tuple[Path, list[Entry]]]) -> None:
    folder, entries = sets["hard-edges-noisy"]
    assert all(_in_between(pixels(folder, e), e) == 0 for e in entries)
    folder, entries = sets["default"]
    assert any(_in_between(pixels(folder, e), e) > 0.01 for e in entries)


def test_the_envelope_reaches_both_ends_of_every_range() -> None:
    scenes = [p.scene for p in plan_scenes(160, seed=11, split="train")]
    seen: dict[str, set[Any]] = {key: set() for key in ("width", "height", "background", "sigma", "jitter")}
    extent_ends: set[tuple[str, str]] = set()
    drawn: dict[str, set[Any]] = {
        key: set() for key in ("supersample", "noise", "placement", "margin", "gap")
    }
    for index, scene in enumerate(scenes):
        image, meta = render(scene, np.random.default_rng(index), ENVELOPE)
        rgb = np.asarray(image).astype(np.int64)
        check_size_and_background(rgb, meta)
        check_objects(rgb, meta)
        check_relation(meta)
        seen["width"].add(meta["width"])
        seen["height"].add(meta["height"])
        seen["background"].add(meta["background"])
        seen["sigma"].add(meta["noise_sigma"])
        m = min(meta["width"], meta["height"])
        for obj in meta["objects"]:
            low, high = EXTENTS[obj["size"]]
            if obj["extent"] == math.ceil(low * m):
                extent_ends.add((obj["size"], "low"))
            if obj["extent"] == math.floor(high * m):
                extent_ends.add((obj["size"], "high"))
        offsets = [
            c - p for o in meta["objects"] for c, p in zip(o["rgb"], _palette(o["color"]), strict=True)
        ]
        seen["jitter"].update(offsets)
        for key, field in (("supersample", "supersample"), ("noise", "noise"), ("placement", "placement")):
            drawn[key].add(meta["render"][field])
        drawn["margin"].add(meta["render"]["edge_margin"])
        drawn["gap"].add(meta["render"]["object_gap"])
    assert {224, 320} <= seen["width"] and {224, 320} <= seen["height"]
    assert {20, 80} <= seen["background"]
    assert {0.0, 8.0} <= seen["sigma"]
    assert {-15, 15} <= seen["jitter"]
    assert extent_ends == {(size, end) for size in ("small", "large") for end in ("low", "high")}
    assert {1, 8} <= drawn["supersample"] and len(drawn["supersample"]) == 4
    assert drawn["noise"] == {"gray", "rgb"} and drawn["placement"] == {"uniform", "tight"}
    assert {0, 2} <= drawn["margin"] and {0, 4} <= drawn["gap"]


def _palette(color: str) -> tuple[int, int, int]:
    from retriever.datasets.shapes import COLORS

    return COLORS[color]


# sha256 of dataset.json and of the decoded pixels of every PNG, from the generator before render
# settings existed: the default renderer must keep drawing exactly these sets (the shipped model's
# training and evaluation sets among them).
GOLDEN = {
    "test": (
        "17e45d8e96fb9363d5f8a23c3d4ac48381d68f44b78dbc304c7cf9ea492217ef",
        "b22873a9c4297a728b482e4de134e5ad917ece6b8fe9e3864d7bfea0cc880593",
    ),
    "train": (
        "67b35e2fe846434b4cea4ce05966654ce0b1cecbd6d60a8d88559aa71a6d3c91",
        "451679f52776eb9be6eac07589c14de98f8f00dcf677ed8ad5778e9e80267947",
    ),
}


@pytest.mark.parametrize(("split", "n_images"), [("test", 8), ("train", 6)])
def test_the_default_renderer_draws_what_it_always_drew(tmp_path: Path, split: str, n_images: int) -> None:
    json_path = generate(tmp_path, n_images, seed=3, split=split, workers=1, settings=DEFAULT_RENDER)
    digest = hashlib.sha256()
    for png in sorted(tmp_path.glob("*.png")):
        with Image.open(png) as image:
            digest.update(np.asarray(image).tobytes())
    assert (hashlib.sha256(json_path.read_bytes()).hexdigest(), digest.hexdigest()) == GOLDEN[split]


@pytest.mark.parametrize(
    "changes",
    [
        {"width": IntSpan(200, 320)},
        {"height": IntSpan(224, 330)},
        {"background": IntSpan(10, 80)},
        {"noise_sigma": FloatSpan(0.0, 9.0)},
        {"jitter": IntSpan(-16, 15)},
        {"small": FloatSpan(0.13, 0.20)},
        {"large": FloatSpan(0.30, 0.39)},
        {"small": FloatSpan(0.150, 0.152)},  # no whole pixel at some m
        {"supersample": (0,)},
        {"supersample": ()},
        {"edge_margin": IntSpan(-1, 0)},
        {"tight": 1.5},
    ],
)
def test_settings_outside_the_envelope_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ShapesError):
        RenderSettings(**changes)


def test_spans_refuse_bad_bounds_and_unknown_names() -> None:
    with pytest.raises(ShapesError):
        IntSpan(3, 2)
    with pytest.raises(ShapesError):
        FloatSpan(0.0, 1.0, ends=2.0)
    with pytest.raises(ShapesError, match="envelope"):
        render_settings("nope")
    assert render_settings("envelope") is ENVELOPE
    # Names label settings; equality is about what they draw.
    assert RenderSettings(name="mine") == DEFAULT_RENDER


def _cli() -> typer.Typer:
    root = typer.Typer()
    root.add_typer(datasets_app, name="datasets")
    return root


def test_cli_render_option(tmp_path: Path) -> None:
    runner = CliRunner()
    help_text = runner.invoke(_cli(), ["datasets", "shapes", "--help"], env={"COLUMNS": "200"}).output
    for name in RENDERERS:
        assert name in help_text
    args = ["datasets", "shapes", "--out", str(tmp_path), "--images", "4", "--seed", "2"]
    result = runner.invoke(_cli(), [*args, "--render", "soft-small"])
    assert result.exit_code == 0, result.output
    assert "render soft-small" in result.output
    assert json.loads((tmp_path / "dataset.json").read_text())["render"]["name"] == "soft-small"
    bad = runner.invoke(_cli(), [*args, "--render", "blurry"])
    assert bad.exit_code == 2 and "blurry" in bad.output


def _entries(seed: int, split: str, n: int) -> list[dict[str, Any]]:
    """Entries as generate writes them, without drawing the images (the guard reads scenes only)."""
    return [
        {
            "objects": [{"size": o.size, "color": o.color, "shape": o.shape} for o in (p.scene.a, p.scene.b)],
            "relation": p.scene.relation,
        }
        for p in plan_scenes(n, seed, split)
    ]


def test_the_evaluation_seeds_are_recognised_in_any_split() -> None:
    for seed in sorted(EVAL_TEST_SEEDS):
        assert eval_seed_of(_entries(seed, "test", 40)) == seed
        assert eval_seed_of(_entries(seed, "test", 40)[:10]) == seed  # a leading part of a test set
        assert eval_seed_of(_entries(seed, "train", 30)) == seed
    assert eval_seed_of(_entries(101, "train", 30)) is None  # the shipped model's training seed
    assert eval_seed_of(_entries(8, "test", 40)) is None
    assert eval_seed_of([{"filename": "photo.jpg", "sentences": []}]) is None


def test_eval_seeds_cover_the_seeds_the_docs_evaluate_on() -> None:
    documented: set[int] = set()
    for doc in ("retriever/models/shapes/README.md", "docs/bench/hardware-choices.md"):
        documented |= {int(s) for s in re.findall(r"\(seed (\d+)", (ROOT / doc).read_text())}
    for test in ("tests/integration/test_shipped_model.py", "tests/integration/test_precision_recall.py"):
        text = (ROOT / test).read_text()
        documented |= {int(s) for s in re.findall(r"seed=(\d+), split=\"test\"", text)}
    assert documented and documented <= EVAL_TEST_SEEDS


def test_training_refuses_evaluation_sets_and_seeds(tmp_path: Path) -> None:
    from retriever.training.run import TrainRequest, train

    test_set = generate(tmp_path / "test", 8, seed=424242, split="test", workers=1)
    with pytest.raises(RetrieverError, match="424242"):
        train(TrainRequest(dataset=test_set, out=tmp_path / "a", split="test"))
    train_set = generate(tmp_path / "train", 8, seed=90210, split="train", workers=1)
    with pytest.raises(RetrieverError, match="90210"):
        train(TrainRequest(dataset=train_set, out=tmp_path / "b"))
    fresh = generate(tmp_path / "fresh", 8, seed=12, split="train", workers=1)
    with pytest.raises(RetrieverError, match="--seed 31337"):
        train(TrainRequest(dataset=fresh, out=tmp_path / "c", render="envelope", seed=31337))
    with pytest.raises(ShapesError, match="seed 7"):
        render_entries(load(fresh), ENVELOPE, 7)
    # --render needs shapes scenes to draw: another dataset is refused before any model is built.
    other = tmp_path / "photos.json"
    entry = {"filename": "fresh/000000.png", "split": "train", "sentences": [{"raw": "a photo", "sentid": 0}]}
    other.write_text(json.dumps({"dataset": "photos", "images": [entry]}))
    with pytest.raises(ShapesError, match="not a shapes scene"):
        train(TrainRequest(dataset=other, out=tmp_path / "d", render="envelope"))


def test_training_record_names_the_renderer(tmp_path: Path) -> None:
    from retriever.training.run import TrainRequest, _render_record

    fresh = tmp_path / "dataset.json"
    drawn = _render_record(TrainRequest(dataset=fresh, out=tmp_path, render="envelope", seed=3), {})
    assert drawn is not None
    assert drawn["name"] == "envelope" and drawn["drawn_by_training"] and drawn["seed"] == 3
    assert drawn["settings"]["supersample"] == list(ENVELOPE.supersample)
    files = _render_record(TrainRequest(dataset=fresh, out=tmp_path), {"dataset": "shapes"})
    assert files == {"name": "default", "drawn_by_training": False, "settings": {"name": "default"}}
    wide = _render_record(
        TrainRequest(dataset=fresh, out=tmp_path),
        {"dataset": "shapes", "render": RENDERERS["wide"].as_json()},
    )
    assert wide is not None and wide["name"] == "wide"
    assert _render_record(TrainRequest(dataset=fresh, out=tmp_path), {"dataset": "flickr30k"}) is None


class _Pixels:
    """An image processor reduced to what load_train_data calls: a fixed-size tensor per image."""

    def to_dict(self) -> dict[str, Any]:
        return {"size": 16}

    def __call__(self, images: list[Image.Image], return_tensors: str) -> dict[str, torch.Tensor]:
        array = np.asarray(images[0].convert("RGB").resize((16, 16)), dtype=np.float32) / 255
        return {"pixel_values": torch.from_numpy(array.transpose(2, 0, 1))[None]}


class _Words:
    """A tokenizer with one token per word, with character offsets."""

    def __call__(self, text: Any, **kwargs: Any) -> dict[str, Any]:
        if isinstance(text, list):
            return {"input_ids": [[len(w) for w in t.split()] for t in text]}
        offsets, start = [], 0
        for word in text.split():
            offsets.append((start, start + len(word)))
            start += len(word) + 1
        return {"offset_mapping": offsets}


def test_training_data_drawn_with_a_renderer(tmp_path: Path) -> None:
    from retriever.training.data import load_train_data

    json_path = generate(tmp_path / "set", 8, seed=12, split="train", workers=1)
    split = load_karpathy(json_path, split="train")
    raw = load(json_path)
    processor = SimpleNamespace(image_processor=_Pixels(), tokenizer=_Words())
    files = load_train_data(split, raw, processor, processor)
    drawn = load_train_data(
        split, raw, processor, processor, cache_dir=tmp_path / "cache", render=ENVELOPE, render_seed=4
    )
    cached = load_train_data(
        split, raw, processor, processor, cache_dir=tmp_path / "cache", render=ENVELOPE, render_seed=4
    )
    metas = [meta for _, meta in render_entries(raw, ENVELOPE, 4)]
    assert files.texts == drawn.texts and files.groups == drawn.groups
    assert not any(torch.equal(a, b) for a, b in zip(files.vilt_pixels, drawn.vilt_pixels, strict=True))
    assert drawn.grounding is not None and cached.grounding is not None
    # The grounding targets come from the new drawings' boxes, also when the pixels come from the cache.
    a = metas[0]["objects"][0]
    x0, y0, x1, y1 = a["box"]
    w, h = metas[0]["width"], metas[0]["height"]
    expected = [(x0 + x1) / 2 / w, (y0 + y1) / 2 / h, (x1 - x0) / w, (y1 - y0) / h]
    np.testing.assert_allclose(drawn.grounding.target[0, 0], expected, rtol=1e-6)
    np.testing.assert_array_equal(drawn.grounding.target, cached.grounding.target)
    assert all(torch.equal(a, b) for a, b in zip(drawn.vilt_pixels, cached.vilt_pixels, strict=True))
