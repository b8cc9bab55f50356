"""The shapes benchmark: two-object scenes whose captions have word-for-word "twins".

Implements `/work/shared/specs/shapes-benchmark.md`. A scene holds objects A and B and the
relation of A to B; its five captions name both objects fully. A test set is made of twin
groups: a base scene and the three scenes that use the same words in another arrangement
(colors swapped, shapes swapped, positions swapped), so a bag-of-words model cannot tell them
apart. Every image is rendered independently and written as PNG, with a `dataset.json` in
Karpathy's split format that `retriever.datasets.karpathy.load_karpathy` reads.

Choices the spec leaves open:

- An object's center is the center of its bounding box (the extent square). So that a model
  or a checker that takes a triangle's centroid instead still sees the same relation, the
  relation thresholds are met with both definitions.
- By default objects are kept `OBJECT_GAP` pixels apart and `EDGE_MARGIN` from the border, so
  anti-aliased edges never touch; other renderers go down to the spec's 0 and 0.
- Gaussian noise is added to the background only, so object fills stay solid.
- How each image is drawn inside the spec's envelope is a `RenderSettings` (`shapes_render.py`):
  by default noise of sigma uniform in 0..8, equal in the three channels, and edges anti-aliased at
  4x; `ENVELOPE` covers the whole envelope, for training; the variants are other test renderers.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

import numpy as np
from PIL import Image

from retriever.datasets.shapes_render import (
    DEFAULT_RENDER,
    ENVELOPE,
    RENDERERS,
    RenderSettings,
    ShapesError,
    background,
    render_settings,
    shape_mask,
)

__all__ = [
    "COLORS",
    "DEFAULT_RENDER",
    "ENVELOPE",
    "EVAL_TEST_SEEDS",
    "RELATIONS",
    "RENDERERS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TWIN_ROLES",
    "ObjectSpec",
    "PlannedImage",
    "RenderSettings",
    "Scene",
    "ShapesError",
    "all_objects",
    "eval_seed_of",
    "generate",
    "max_test_images",
    "plan_scenes",
    "render",
    "render_entries",
    "render_settings",
    "scene_of_entry",
    "twin_bases",
]


COLORS: Final[dict[str, tuple[int, int, int]]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (230, 210, 40),
    "purple": (140, 60, 180),
    "orange": (240, 140, 30),
    "white": (235, 235, 235),
    "brown": (140, 90, 40),
}
SHAPES: Final[tuple[str, ...]] = ("circle", "square", "triangle")
SIZES: Final[tuple[str, ...]] = ("small", "large")
RELATIONS: Final[tuple[str, ...]] = ("left of", "right of", "above", "below")
INVERSE: Final[dict[str, str]] = {
    "left of": "right of",
    "right of": "left of",
    "above": "below",
    "below": "above",
}
SPLITS: Final[tuple[str, ...]] = ("train", "val", "test")
TWIN_ROLES: Final[tuple[str, ...]] = ("base", "colors_swapped", "shapes_swapped", "positions_swapped")
SINGLE_ROLE: Final = "single"

FAR: Final = 0.35  # minimum center distance along the relation's axis, as a share of W or H
NEAR: Final = 0.15  # maximum center distance across it
# The default renderer's margins (`RenderSettings.edge_margin`, `.object_gap`).
EDGE_MARGIN: Final = DEFAULT_RENDER.edge_margin.low
OBJECT_GAP: Final = DEFAULT_RENDER.object_gap.low
# Share of train/val images that come in twin groups: binding is learned from such hard negatives.
TRAIN_TWIN_SHARE: Final = 0.5

_PLACE_BATCH: Final = 512
_PLACE_ROUNDS: Final = 200
_SPLIT_CODE: Final[dict[str, int]] = {"train": 1, "val": 2, "test": 3}
_PARALLEL_MIN_IMAGES: Final = 200
# Third element of a render stream's seed: `generate` draws its images from stream 1; images redrawn
# from a set's scenes (`render_entries`, training on another renderer) from stream 2, so they never
# repeat a generated set's images.
_GENERATE_STREAM: Final = 1
_RERENDER_STREAM: Final = 2

#: Seeds of the shapes test sets the project evaluates models on; no training data may be drawn with
#: them (`eval_seed_of` recognises such a set, and `retriever train` refuses it). 7: README's and the
#: demo's test set and the train/eval integration test's; 31337: the precision test's and
#: docs/bench/hardware-choices.md's 400 images; 90210: the model README's 1000 images
#: (EVAL-test1000.json); 271828: the codec bench's fresh set; 424242: the shipped-model CI test's 120
#: images (EVAL-test120.json).
EVAL_TEST_SEEDS: Final = frozenset({7, 31337, 90210, 271828, 424242})


@dataclass(frozen=True)
class ObjectSpec:
    """What a caption says about one object."""

    size: str
    color: str
    shape: str

    def __post_init__(self) -> None:
        if self.size not in SIZES or self.color not in COLORS or self.shape not in SHAPES:
            raise ShapesError(f"unknown object {self.size!r} {self.color!r} {self.shape!r}")

    @property
    def words(self) -> str:
        """The object as the captions name it, e.g. `small red circle`."""
        return f"{self.size} {self.color} {self.shape}"


@dataclass(frozen=True)
class Scene:
    """Two objects and the relation of A to B."""

    a: ObjectSpec
    b: ObjectSpec
    relation: str

    def __post_init__(self) -> None:
        if self.relation not in INVERSE:
            raise ShapesError(f"unknown relation {self.relation!r}")
        if self.a == self.b:
            raise ShapesError("A and B must differ in at least one of color, shape, size")

    def captions(self) -> list[str]:
        """The five captions, in the order the spec fixes."""
        a, b, rel, inv = self.a.words, self.b.words, self.relation, INVERSE[self.relation]
        return [
            f"a {a} {rel} a {b}",
            f"a {b} {inv} a {a}",
            f"the {a} is {rel} the {b}",
            f"the {b} is {inv} the {a}",
            f"there is a {a} {rel} a {b}",
        ]

    def key(self) -> tuple[ObjectSpec, str, ObjectSpec]:
        """Canonical identity: `A rel B` and `B inv A` are the same scene, read as left-of or above."""
        if self.relation in ("left of", "above"):
            return (self.a, self.relation, self.b)
        return (self.b, INVERSE[self.relation], self.a)

    def colors_swapped(self) -> Scene:
        """A takes B's color and B takes A's."""
        return Scene(
            ObjectSpec(self.a.size, self.b.color, self.a.shape),
            ObjectSpec(self.b.size, self.a.color, self.b.shape),
            self.relation,
        )

    def shapes_swapped(self) -> Scene:
        """A takes B's shape and B takes A's."""
        return Scene(
            ObjectSpec(self.a.size, self.a.color, self.b.shape),
            ObjectSpec(self.b.size, self.b.color, self.a.shape),
            self.relation,
        )

    def positions_swapped(self) -> Scene:
        """The same two objects with the relation reversed."""
        return Scene(self.a, self.b, INVERSE[self.relation])

    def variants(self) -> tuple[Scene, Scene, Scene, Scene]:
        """This scene and its three twins, in the order of `TWIN_ROLES`."""
        return (self, self.colors_swapped(), self.shapes_swapped(), self.positions_swapped())


@dataclass(frozen=True)
class PlannedImage:
    """One image to render: its scene, its twin group and its role in the group."""

    scene: Scene
    twin_group: int
    twin_role: str


def all_objects() -> list[ObjectSpec]:
    """The 48 distinct objects (size x color x shape)."""
    return [ObjectSpec(size, color, shape) for size in SIZES for color in COLORS for shape in SHAPES]


@lru_cache(maxsize=1)
def _twin_bases() -> tuple[Scene, ...]:
    bases: list[Scene] = []
    objects = all_objects()
    for a in objects:
        for b in objects:
            if a == b:
                continue
            for relation in RELATIONS:
                scene = Scene(a, b, relation)
                if len({variant.key() for variant in scene.variants()}) == 4:
                    bases.append(scene)
    return tuple(bases)


def twin_bases() -> list[Scene]:
    """Every (A, B, relation) whose four twin variants are pairwise different, in a fixed order."""
    return list(_twin_bases())


@lru_cache(maxsize=1)
def max_test_images() -> int:
    """The most images a test set can hold: the number of distinct scenes that have four distinct twins.

    Drawing base scenes at random until none fits always reaches this bound (2,688), because
    whenever one twin group is taken, the group made of the other scenes it overlaps with is
    still free.
    """
    return len({scene.key() for scene in _twin_bases()})


def plan_scenes(n_images: int, seed: int, split: str = "test") -> list[PlannedImage]:
    """The scenes of a set, in file order, without rendering anything.

    Test sets are twin groups drawn at random until `n_images / 4` fit (each candidate base is
    looked at once, so an impossible request ends after one pass and raises ShapesError).
    Train and val sets mix twin groups (about `TRAIN_TWIN_SHARE` of the images) with single
    random scenes, and need not be unique.
    """
    _check_request(n_images, seed, split)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SPLIT_CODE[split], 0]))
    if split == "test":
        return _plan_test(n_images, rng)
    return _plan_train(n_images, rng)


def _check_request(n_images: int, seed: int, split: str) -> None:
    if split not in _SPLIT_CODE:
        raise ShapesError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    if n_images < 1:
        raise ShapesError(f"asked for {n_images} images; need at least 1")
    if seed < 0:
        raise ShapesError(f"seed must be a non-negative integer, not {seed}")
    if split == "test":
        if n_images % 4:
            raise ShapesError(f"a test set is made of twin groups of 4; {n_images} is not a multiple of 4")
        if n_images > max_test_images():
            raise ShapesError(
                f"a test set holds at most {max_test_images()} images under the twin rules; {n_images} asked"
            )


def _plan_test(n_images: int, rng: np.random.Generator) -> list[PlannedImage]:
    bases = _twin_bases()
    used: set[tuple[ObjectSpec, str, ObjectSpec]] = set()
    planned: list[PlannedImage] = []
    # A candidate rejected once stays rejected (the used set only grows), so one pass over a
    # random order is the same as drawing at random until none fits, and it always ends.
    for index in rng.permutation(len(bases)):
        if len(planned) >= n_images:
            break
        variants = bases[int(index)].variants()
        keys = [variant.key() for variant in variants]
        if used.intersection(keys):
            continue
        used.update(keys)
        group = len(planned) // 4
        planned.extend(PlannedImage(v, group, role) for v, role in zip(variants, TWIN_ROLES, strict=True))
    if len(planned) < n_images:
        raise ShapesError(
            f"only {len(planned)} test images fit under the twin rules in this draw; {n_images} asked"
        )
    return planned


def _plan_train(n_images: int, rng: np.random.Generator) -> list[PlannedImage]:
    bases = _twin_bases()
    objects = all_objects()
    n_groups = int(n_images * TRAIN_TWIN_SHARE) // 4
    units: list[tuple[Scene, ...]] = [
        bases[int(i)].variants() for i in rng.integers(len(bases), size=n_groups)
    ]
    for _ in range(n_images - 4 * n_groups):
        a_index, b_index = rng.choice(len(objects), size=2, replace=False)
        relation = RELATIONS[int(rng.integers(len(RELATIONS)))]
        units.append((Scene(objects[int(a_index)], objects[int(b_index)], relation),))
    planned: list[PlannedImage] = []
    for group, unit_index in enumerate(rng.permutation(len(units))):
        unit = units[int(unit_index)]
        roles = TWIN_ROLES if len(unit) == 4 else (SINGLE_ROLE,)
        planned.extend(PlannedImage(scene, group, role) for scene, role in zip(unit, roles, strict=True))
    return planned


def _place(
    scene: Scene,
    extents: tuple[int, int],
    width: int,
    height: int,
    rng: np.random.Generator,
    margin: int = EDGE_MARGIN,
    gap: int = OBJECT_GAP,
    tight: bool = False,
) -> tuple[int, int, int, int]:
    """Top-left corners (xA, yA, xB, yB), uniform over all placements that meet the rules.

    With `tight`, the placement of the first batch with valid ones that comes closest to the
    relation's thresholds (along its axis and across it) instead: the hardest layouts a renderer
    may draw.
    """
    da, db = extents
    # How far below the box center a triangle's centroid lies.
    shift_a = da / 6 if scene.a.shape == "triangle" else 0.0
    shift_b = db / 6 if scene.b.shape == "triangle" else 0.0
    relation = scene.relation
    for _ in range(_PLACE_ROUNDS):
        xa = rng.integers(margin, width - margin - da, endpoint=True, size=_PLACE_BATCH)
        ya = rng.integers(margin, height - margin - da, endpoint=True, size=_PLACE_BATCH)
        xb = rng.integers(margin, width - margin - db, endpoint=True, size=_PLACE_BATCH)
        yb = rng.integers(margin, height - margin - db, endpoint=True, size=_PLACE_BATCH)
        dx = (xb + db / 2) - (xa + da / 2)  # center of B minus center of A
        dy_box = (yb + db / 2) - (ya + da / 2)
        dy_centroid = dy_box + (shift_b - shift_a)
        if relation in ("left of", "right of"):
            along = dx if relation == "left of" else -dx
            across = np.maximum(np.abs(dy_box), np.abs(dy_centroid))
            ok = (along >= FAR * width) & (across <= NEAR * height)
            slack = (along - FAR * width) / width + (NEAR * height - across) / height
        else:
            sign = 1.0 if relation == "above" else -1.0
            along = np.minimum(sign * dy_box, sign * dy_centroid)
            ok = (along >= FAR * height) & (np.abs(dx) <= NEAR * width)
            slack = (along - FAR * height) / height + (NEAR * width - np.abs(dx)) / width
        gap_x = np.maximum(xb - (xa + da), xa - (xb + db))
        gap_y = np.maximum(yb - (ya + da), ya - (yb + db))
        ok &= (gap_x >= gap) | (gap_y >= gap)
        hits = np.flatnonzero(ok)
        if hits.size:
            j = int(hits[np.argmin(slack[hits])]) if tight else int(hits[0])
            return int(xa[j]), int(ya[j]), int(xb[j]), int(yb[j])
    # Unreachable for the spec's ranges (every image size admits placements); kept so a bad
    # constant change fails loudly instead of looping.
    raise ShapesError(f"could not place {scene} in a {width}x{height} image")


def render(
    scene: Scene, rng: np.random.Generator, settings: RenderSettings = DEFAULT_RENDER
) -> tuple[Image.Image, dict[str, Any]]:
    """Draw one scene with its own image size, background, jitter and positions, drawn from `settings`.

    Returns the RGB image and its metadata: `width`, `height`, `background` (gray level),
    `noise_sigma`, `relation` and `objects` (role, shape, color, rgb, size, extent, box as
    [x0, y0, x1, y1] with x1 - x0 = extent, center). Settings other than the default add `render`:
    the choices drawn for this image that the other fields do not show (`supersample`, `noise`
    gray or rgb, `edge_margin`, `object_gap`, `placement` uniform or tight). The default settings draw
    exactly what the generator always drew, so its sets stay byte-identical.
    """
    width = settings.width.draw(rng)
    height = settings.height.draw(rng)
    gray = settings.background.draw(rng)
    sigma = settings.noise_sigma.draw(rng)
    per_channel = bool(settings.rgb_noise) and bool(rng.random() < settings.rgb_noise)
    image = background(width, height, gray, sigma, per_channel, rng)

    m = min(width, height)
    spans = {"small": settings.small, "large": settings.large}
    extents = (spans[scene.a.size].extent(m, rng), spans[scene.b.size].extent(m, rng))
    fills = []
    for spec in (scene.a, scene.b):
        jitter = settings.jitter.draw_many(rng, 3)
        base = np.array(COLORS[spec.color], dtype=np.int64)
        fills.append(tuple(int(c) for c in np.clip(base + jitter, 0, 255)))
    factors = settings.supersample
    supersample = factors[int(rng.integers(len(factors)))] if len(factors) > 1 else factors[0]
    margin = settings.edge_margin.draw(rng)
    gap = settings.object_gap.draw(rng)
    tight = bool(settings.tight) and bool(rng.random() < settings.tight)
    xa, ya, xb, yb = _place(scene, extents, width, height, rng, margin, gap, tight)

    objects: list[dict[str, Any]] = []
    for role, spec, extent, fill, (x0, y0) in zip(
        ("A", "B"), (scene.a, scene.b), extents, fills, ((xa, ya), (xb, yb)), strict=True
    ):
        box = (x0, y0, x0 + extent, y0 + extent)
        image.paste(fill, box, shape_mask(spec.shape, extent, supersample))
        objects.append(
            {
                "role": role,
                "shape": spec.shape,
                "color": spec.color,
                "rgb": list(fill),
                "size": spec.size,
                "extent": extent,
                "box": list(box),
                "center": [x0 + extent / 2, y0 + extent / 2],
            }
        )
    meta: dict[str, Any] = {
        "width": width,
        "height": height,
        "background": gray,
        "noise_sigma": round(sigma, 4),
        "relation": scene.relation,
        "objects": objects,
    }
    if settings != DEFAULT_RENDER:
        meta["render"] = {
            "supersample": supersample,
            "noise": "rgb" if per_channel else "gray",
            "edge_margin": margin,
            "object_gap": gap,
            "placement": "tight" if tight else "uniform",
        }
    return image, meta


def scene_of_entry(entry: Mapping[str, Any]) -> Scene:
    """The scene a shapes `dataset.json` entry shows (its `objects` and `relation`)."""
    try:
        a, b = (ObjectSpec(o["size"], o["color"], o["shape"]) for o in entry["objects"])
        return Scene(a, b, entry["relation"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ShapesError(f"{entry.get('filename', 'an entry')} is not a shapes scene: {exc}") from exc


def render_entries(
    entries: Sequence[Mapping[str, Any]], settings: RenderSettings, seed: int
) -> Iterator[tuple[Image.Image, dict[str, Any]]]:
    """Each entry's scene drawn again with `settings`, in order: a set's scenes under another renderer.

    Training uses this to see a renderer's whole range without writing the images to disk. The images
    come from a stream of `seed` of their own, one per entry index, so they repeat no generated set's
    files. Raises ShapesError before drawing anything for an entry that is not a shapes scene or for
    one of `EVAL_TEST_SEEDS`.
    """
    if seed in EVAL_TEST_SEEDS:
        raise ShapesError(f"seed {seed} draws the test sets the project evaluates on; use another seed")
    scenes = [scene_of_entry(entry) for entry in entries]

    def draw() -> Iterator[tuple[Image.Image, dict[str, Any]]]:
        for index, scene in enumerate(scenes):
            stream = [seed, _SPLIT_CODE["train"], _RERENDER_STREAM, index]
            yield render(scene, np.random.default_rng(np.random.SeedSequence(stream)), settings)

    return draw()


@lru_cache(maxsize=len(EVAL_TEST_SEEDS))
def _largest_test_set(seed: int) -> tuple[Scene, ...]:
    return tuple(p.scene for p in plan_scenes(max_test_images(), seed, "test"))


def eval_seed_of(entries: Sequence[Mapping[str, Any]]) -> int | None:
    """The seed of `EVAL_TEST_SEEDS` these shapes entries were generated with (any split), or None.

    A set's scenes, in order, depend only on (count, seed, split), so comparing them with those seeds'
    plans recognises a set although `dataset.json` does not record its seed. A test set of N images
    is the first N of its seed's largest one, so any leading part of it is recognised too. Entries
    that are not shapes scenes (another dataset) give None.
    """
    try:
        scenes = [scene_of_entry(entry) for entry in entries]
    except ShapesError:
        return None
    n = len(scenes)
    for seed in sorted(EVAL_TEST_SEEDS):
        head = min(n, max_test_images())
        if head and list(_largest_test_set(seed)[:head]) == scenes[:head]:
            return seed
        for split in ("train", "val"):
            if n and [p.scene for p in plan_scenes(n, seed, split)] == scenes:
                return seed
    return None


_Job = tuple[Scene, int, int, int, str, RenderSettings]


def _render_job(job: _Job) -> dict[str, Any]:
    scene, seed, split_code, index, path, settings = job
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_code, _GENERATE_STREAM, index]))
    image, meta = render(scene, rng, settings)
    # Level 1: the noisy background barely compresses further, and level 6 is 3x slower.
    image.save(path, format="PNG", compress_level=1)
    return meta


def _run_jobs(jobs: Sequence[_Job], workers: int) -> Iterable[dict[str, Any]]:
    if workers <= 1:
        return [_render_job(job) for job in jobs]
    # fork where it is safe (Linux): spawn would re-import the caller's __main__, which breaks scripts
    # without a main guard, and costs an interpreter start per worker. The children only run
    # numpy and PIL code, so locks held by the parent's other threads are never touched.
    context = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        chunksize = max(1, min(64, len(jobs) // (workers * 4)))
        return list(pool.map(_render_job, jobs, chunksize=chunksize))


def generate(
    out_dir: Path,
    n_images: int,
    seed: int,
    split: str = "test",
    workers: int | None = None,
    settings: RenderSettings = DEFAULT_RENDER,
) -> Path:
    """Build a shapes set in `out_dir` and return the path of its `dataset.json`.

    Images are `000000.png`, ... with `imgid` equal to their index and sentids `5*imgid + k`.
    Each entry adds `objects`, `relation`, `twin_group`, `twin_role`, `width`, `height`,
    `background` and `noise_sigma` to the Karpathy fields. The output depends only on
    (`n_images`, `seed`, `split`, `settings`), never on `workers` (default: all cores for large
    sets, one process for small ones). Existing files of the same names are overwritten.

    The scenes depend on (`n_images`, `seed`, `split`) alone, so sets drawn with other `settings`
    show the same scenes rendered differently: paired test sets, whose scores differ only by the
    renderer. Settings other than the default are recorded as a top-level `render` and in each
    entry's `render`.

    Raises ShapesError for an unknown split, a bad count or seed, or a test set larger than
    the twin rules admit (checked before anything is written).
    """
    planned = plan_scenes(n_images, seed, split)
    if workers is None:
        workers = min(os.cpu_count() or 1, 8) if n_images >= _PARALLEL_MIN_IMAGES else 1
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ShapesError(f"cannot create {out_dir}: {exc}") from exc
    digits = max(6, len(str(n_images - 1)))
    filenames = [f"{index:0{digits}d}.png" for index in range(n_images)]
    jobs = [
        (item.scene, seed, _SPLIT_CODE[split], index, str(out_dir / filenames[index]), settings)
        for index, item in enumerate(planned)
    ]
    try:
        metas = list(_run_jobs(jobs, workers))
    except OSError as exc:
        raise ShapesError(f"cannot write images to {out_dir}: {exc}") from exc

    entries = []
    for index, (item, meta) in enumerate(zip(planned, metas, strict=True)):
        sentids = [5 * index + k for k in range(5)]
        entries.append(
            {
                "filename": filenames[index],
                "filepath": "",
                "split": split,
                "imgid": index,
                "sentids": sentids,
                "sentences": [
                    {"raw": raw, "tokens": raw.split(), "imgid": index, "sentid": sentid}
                    for raw, sentid in zip(item.scene.captions(), sentids, strict=True)
                ],
                "twin_group": item.twin_group,
                "twin_role": item.twin_role,
                **meta,
            }
        )
    json_path = out_dir / "dataset.json"
    partial = out_dir / "dataset.json.partial"
    try:
        document: dict[str, Any] = {"dataset": "shapes"}
        if settings != DEFAULT_RENDER:
            document["render"] = settings.as_json()
        document["images"] = entries
        partial.write_text(json.dumps(document), encoding="utf-8")
        partial.replace(json_path)
    except OSError as exc:
        raise ShapesError(f"cannot write {json_path}: {exc}") from exc
    return json_path
