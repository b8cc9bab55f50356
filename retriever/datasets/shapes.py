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
- Objects are kept apart by a gap of `OBJECT_GAP` pixels between their bounding boxes and
  `EDGE_MARGIN` pixels from the image border, so anti-aliased edges never touch.
- Gaussian noise (sigma drawn from 0..8 per image) is added to the background only, equally
  to the three channels, so the background stays gray and object fills stay solid.
- Edges are anti-aliased by drawing each object's mask at 4x and averaging it down.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Final

import numpy as np
from PIL import Image, ImageDraw

from retriever.datasets.karpathy import DatasetError

__all__ = [
    "COLORS",
    "RELATIONS",
    "SHAPES",
    "SIZES",
    "SPLITS",
    "TWIN_ROLES",
    "ObjectSpec",
    "PlannedImage",
    "Scene",
    "ShapesError",
    "all_objects",
    "generate",
    "max_test_images",
    "plan_scenes",
    "render",
    "twin_bases",
]


class ShapesError(DatasetError):
    """A shapes set cannot be built as asked (bad arguments, or more test images than the rules admit)."""


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

COLOR_JITTER: Final = 15
# Extent (circle diameter, square side, triangle base and height) as a share of min(W, H).
EXTENT_RANGE: Final[dict[str, tuple[float, float]]] = {"small": (0.14, 0.20), "large": (0.30, 0.38)}
IMAGE_SIDE_RANGE: Final = (224, 320)
BACKGROUND_RANGE: Final = (20, 80)
MAX_NOISE_SIGMA: Final = 8.0
FAR: Final = 0.35  # minimum center distance along the relation's axis, as a share of W or H
NEAR: Final = 0.15  # maximum center distance across it
EDGE_MARGIN: Final = 2
OBJECT_GAP: Final = 4
# Share of train/val images that come in twin groups: binding is learned from such hard negatives.
TRAIN_TWIN_SHARE: Final = 0.5

_SUPERSAMPLE: Final = 4
_PLACE_BATCH: Final = 512
_PLACE_ROUNDS: Final = 200
_SPLIT_CODE: Final[dict[str, int]] = {"train": 1, "val": 2, "test": 3}
_PARALLEL_MIN_IMAGES: Final = 200


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


@lru_cache(maxsize=1024)
def _mask(shape: str, extent: int) -> Image.Image | None:
    """Coverage mask of a circle or upright triangle filling an extent x extent box (None: a full square)."""
    if shape == "square":
        return None
    side = extent * _SUPERSAMPLE
    big = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(big)
    if shape == "circle":
        draw.ellipse((0, 0, side - 1, side - 1), fill=255)
    else:
        draw.polygon([((side - 1) / 2, 0), (side - 1, side - 1), (0, side - 1)], fill=255)
    return big.reduce(_SUPERSAMPLE)


def _extent(size: str, m: int, rng: np.random.Generator) -> int:
    low, high = EXTENT_RANGE[size]
    # Integer extents strictly inside the real interval, so the rule holds exactly.
    return int(rng.integers(int(np.ceil(low * m)), int(np.floor(high * m)), endpoint=True))


def _place(
    scene: Scene, extents: tuple[int, int], width: int, height: int, rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """Top-left corners (xA, yA, xB, yB), uniform over all placements that meet the rules."""
    da, db = extents
    # How far below the box center a triangle's centroid lies.
    shift_a = da / 6 if scene.a.shape == "triangle" else 0.0
    shift_b = db / 6 if scene.b.shape == "triangle" else 0.0
    relation = scene.relation
    for _ in range(_PLACE_ROUNDS):
        xa = rng.integers(EDGE_MARGIN, width - EDGE_MARGIN - da, endpoint=True, size=_PLACE_BATCH)
        ya = rng.integers(EDGE_MARGIN, height - EDGE_MARGIN - da, endpoint=True, size=_PLACE_BATCH)
        xb = rng.integers(EDGE_MARGIN, width - EDGE_MARGIN - db, endpoint=True, size=_PLACE_BATCH)
        yb = rng.integers(EDGE_MARGIN, height - EDGE_MARGIN - db, endpoint=True, size=_PLACE_BATCH)
        dx = (xb + db / 2) - (xa + da / 2)  # center of B minus center of A
        dy_box = (yb + db / 2) - (ya + da / 2)
        dy_centroid = dy_box + (shift_b - shift_a)
        if relation in ("left of", "right of"):
            along = dx if relation == "left of" else -dx
            ok = (along >= FAR * width) & (np.abs(dy_box) <= NEAR * height)
            ok &= np.abs(dy_centroid) <= NEAR * height
        else:
            sign = 1.0 if relation == "above" else -1.0
            ok = (sign * dy_box >= FAR * height) & (sign * dy_centroid >= FAR * height)
            ok &= np.abs(dx) <= NEAR * width
        gap_x = np.maximum(xb - (xa + da), xa - (xb + db))
        gap_y = np.maximum(yb - (ya + da), ya - (yb + db))
        ok &= (gap_x >= OBJECT_GAP) | (gap_y >= OBJECT_GAP)
        hits = np.flatnonzero(ok)
        if hits.size:
            j = int(hits[0])
            return int(xa[j]), int(ya[j]), int(xb[j]), int(yb[j])
    # Unreachable for the spec's ranges (every image size admits placements); kept so a bad
    # constant change fails loudly instead of looping.
    raise ShapesError(f"could not place {scene} in a {width}x{height} image")


def render(scene: Scene, rng: np.random.Generator) -> tuple[Image.Image, dict[str, Any]]:
    """Draw one scene with its own image size, background, jitter and positions.

    Returns the RGB image and its metadata: `width`, `height`, `background` (gray level),
    `noise_sigma`, `relation` and `objects` (role, shape, color, rgb, size, extent, box as
    [x0, y0, x1, y1] with x1 - x0 = extent, center).
    """
    width = int(rng.integers(IMAGE_SIDE_RANGE[0], IMAGE_SIDE_RANGE[1], endpoint=True))
    height = int(rng.integers(IMAGE_SIDE_RANGE[0], IMAGE_SIDE_RANGE[1], endpoint=True))
    gray = int(rng.integers(BACKGROUND_RANGE[0], BACKGROUND_RANGE[1], endpoint=True))
    sigma = float(rng.uniform(0.0, MAX_NOISE_SIGMA))
    noise = rng.standard_normal((height, width), dtype=np.float32) * np.float32(sigma)
    plane = Image.fromarray(np.clip(np.rint(noise + np.float32(gray)), 0, 255).astype(np.uint8))
    image = Image.merge("RGB", (plane, plane, plane))

    m = min(width, height)
    extents = (_extent(scene.a.size, m, rng), _extent(scene.b.size, m, rng))
    fills = []
    for spec in (scene.a, scene.b):
        jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER, endpoint=True, size=3)
        base = np.array(COLORS[spec.color], dtype=np.int64)
        fills.append(tuple(int(c) for c in np.clip(base + jitter, 0, 255)))
    xa, ya, xb, yb = _place(scene, extents, width, height, rng)

    objects: list[dict[str, Any]] = []
    for role, spec, extent, fill, (x0, y0) in zip(
        ("A", "B"), (scene.a, scene.b), extents, fills, ((xa, ya), (xb, yb)), strict=True
    ):
        box = (x0, y0, x0 + extent, y0 + extent)
        image.paste(fill, box, _mask(spec.shape, extent))
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
    return image, meta


_Job = tuple[Scene, int, int, int, str]


def _render_job(job: _Job) -> dict[str, Any]:
    scene, seed, split_code, index, path = job
    rng = np.random.default_rng(np.random.SeedSequence([seed, split_code, 1, index]))
    image, meta = render(scene, rng)
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
    out_dir: Path, n_images: int, seed: int, split: str = "test", workers: int | None = None
) -> Path:
    """Build a shapes set in `out_dir` and return the path of its `dataset.json`.

    Images are `000000.png`, ... with `imgid` equal to their index and sentids `5*imgid + k`.
    Each entry adds `objects`, `relation`, `twin_group`, `twin_role`, `width`, `height`,
    `background` and `noise_sigma` to the Karpathy fields. The output depends only on
    (`n_images`, `seed`, `split`), never on `workers` (default: all cores for large sets, one
    process for small ones). Existing files of the same names are overwritten.

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
        (item.scene, seed, _SPLIT_CODE[split], index, str(out_dir / filenames[index]))
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
        partial.write_text(json.dumps({"dataset": "shapes", "images": entries}), encoding="utf-8")
        partial.replace(json_path)
    except OSError as exc:
        raise ShapesError(f"cannot write {json_path}: {exc}") from exc
    return json_path
