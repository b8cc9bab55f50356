"""The shapes spec's rules, checked on one written image and its `dataset.json` entry.

Shared by the tests of the default renderer (`test_shapes.py`) and of the other renderers
(`test_shapes_render.py`): every renderer must satisfy the same rules. The spec's tables are written
out again here so that the checks do not trust the generator's constants.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

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
ROLES = ("base", "colors_swapped", "shapes_swapped", "positions_swapped")
# Share of an object's box covered by its solid fill (anti-aliased edge pixels excluded), for hard
# edges and every anti-aliasing factor the renderers use.
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


def pixels(folder: Path, entry: Entry) -> np.ndarray:
    with Image.open(folder / entry["filename"]) as image:
        assert image.format == "PNG"
        assert image.mode == "RGB"
        return np.asarray(image).astype(np.int64)


def centroid_y(obj: Entry) -> float:
    y0: float
    y1: float
    _, y0, _, y1 = obj["box"]
    return y0 + 2 * (y1 - y0) / 3 if obj["shape"] == "triangle" else (y0 + y1) / 2


def _outside_objects(entry: Entry, height: int, width: int) -> np.ndarray:
    outside = np.ones((height, width), dtype=bool)
    for obj in entry["objects"]:
        x0, y0, x1, y1 = obj["box"]
        outside[max(0, y0 - 1) : y1 + 1, max(0, x0 - 1) : x1 + 1] = False
    return outside


def check_size_and_background(rgb: np.ndarray, entry: Entry) -> None:
    """Image size in 224..320; a gray level in 20..80 with noise of sigma at most 8, outside the objects.

    Noise drawn per channel (`render.noise` "rgb", the other reading of the spec's per-pixel noise)
    keeps each channel's mean at the gray level; otherwise the three channels are equal everywhere.
    """
    height, width = rgb.shape[:2]
    assert (width, height) == (entry["width"], entry["height"])
    assert 224 <= width <= 320 and 224 <= height <= 320
    assert 20 <= entry["background"] <= 80
    assert 0 <= entry["noise_sigma"] <= 8
    outside = _outside_objects(entry, height, width)
    background = rgb[outside]
    per_channel = entry.get("render", {}).get("noise") == "rgb"
    if not per_channel:
        # Gray: all three channels equal everywhere outside the objects.
        assert (background[:, 0] == background[:, 1]).all() and (background[:, 1] == background[:, 2]).all()
    for level in background.T if per_channel else background.T[:1]:
        assert abs(level.mean() - entry["background"]) < 0.5
        assert 19.5 <= level.mean() <= 80.5
        assert level.std() <= 8.5
        assert abs(level.std() - entry["noise_sigma"]) < 0.5
    # The corners, away from the objects, are background too.
    for rows in (slice(0, 4), slice(-4, None)):
        for cols in (slice(0, 4), slice(-4, None)):
            corner = rgb[rows, cols][outside[rows, cols]]
            assert corner.size == 0 or 20 - 4 * 8 <= corner.mean() <= 80 + 4 * 8


def check_objects(rgb: np.ndarray, entry: Entry) -> None:
    """Extents in their ranges, fills within 15 of the palette, solid shapes, inside, not overlapping."""
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


def check_relation(entry: Entry) -> None:
    """The relation holds between box centers and, for triangles, between centroids too."""
    width, height = entry["width"], entry["height"]
    a, b = entry["objects"]
    dx = b["center"][0] - a["center"][0]
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


def check_captions(entry: Entry) -> None:
    """The five captions, in the spec's forms and order, name the objects the image holds."""
    assert [s["raw"] for s in entry["sentences"]] == expected_captions(entry)


def check_entry(folder: Path, entry: Entry) -> None:
    """Every per-image rule of the spec."""
    rgb = pixels(folder, entry)
    check_size_and_background(rgb, entry)
    check_objects(rgb, entry)
    check_relation(entry)
    check_captions(entry)
