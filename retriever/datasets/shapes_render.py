"""How a shapes image is drawn: every choice of the renderer made explicit, and the named renderers.

The spec (`/work/shared/specs/shapes-benchmark.md`) fixes an envelope (image sizes, background level and
noise, colour jitter, object extents, edges) and leaves each choice inside it to the implementation.
Test sets drawn by other implementations land anywhere in that envelope, so a model trained only on
this generator's habits (always anti-aliased at 4x, noise never exactly absent, objects never touching
the border or each other) may be measured on images unlike any it saw. `RenderSettings` names each of
those choices:

- `DEFAULT_RENDER` is the generator's original renderer, draw for draw: the shipped model's training
  and evaluation sets are made with it, and stay byte-identical;
- `ENVELOPE` draws every image's settings across the whole envelope, each end over-weighted (the
  corners are where renderers disagree), for training;
- the variants (`hard-edges-noisy`, `soft-small`, `large-canvas`, `wide`) are fixed renderers that
  differ from the default, for test sets that measure how much a model depends on one renderer.

Every setting is checked against the spec when it is made, so no renderer can leave the envelope.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Final

import numpy as np
from PIL import Image, ImageDraw

from retriever.datasets.karpathy import DatasetError

__all__ = [
    "BACKGROUND_RANGE",
    "COLOR_JITTER",
    "DEFAULT_RENDER",
    "ENVELOPE",
    "EXTENT_RANGE",
    "IMAGE_SIDE_RANGE",
    "MAX_NOISE_SIGMA",
    "RENDERERS",
    "FloatSpan",
    "IntSpan",
    "RenderSettings",
    "ShapesError",
    "background",
    "render_settings",
    "shape_mask",
]

# The spec's envelope.
COLOR_JITTER: Final = 15
# Extent (circle diameter, square side, triangle base and height) as a share of min(W, H).
EXTENT_RANGE: Final[dict[str, tuple[float, float]]] = {"small": (0.14, 0.20), "large": (0.30, 0.38)}
IMAGE_SIDE_RANGE: Final = (224, 320)
BACKGROUND_RANGE: Final = (20, 80)
MAX_NOISE_SIGMA: Final = 8.0


class ShapesError(DatasetError):
    """A shapes set cannot be built as asked (bad arguments, more test images than the rules admit, or
    render settings outside the spec's envelope)."""


def _check_share(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ShapesError(f"{name} is a share of images and must lie in 0..1, not {value}")


@dataclass(frozen=True)
class IntSpan:
    """Integers from `low` to `high` (both included), uniform; `ends` of the draws land exactly on an end.

    A span with `low == high` draws nothing from the generator, so adding a fixed setting leaves the
    random stream (and every image drawn before it existed) unchanged.
    """

    low: int
    high: int
    ends: float = 0.0

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ShapesError(f"empty span {self.low}..{self.high}")
        _check_share("ends", self.ends)

    def draw(self, rng: np.random.Generator) -> int:
        """One value."""
        if self.low == self.high:
            return self.low
        if self.ends and rng.random() < self.ends:
            return self.low if rng.random() < 0.5 else self.high
        return int(rng.integers(self.low, self.high, endpoint=True))

    def draw_many(self, rng: np.random.Generator, size: int) -> np.ndarray:
        """`size` independent values, as int64."""
        if self.low == self.high:
            return np.full(size, self.low, dtype=np.int64)
        values = rng.integers(self.low, self.high, endpoint=True, size=size)
        if self.ends:
            at_end = rng.random(size) < self.ends
            low_end = rng.random(size) < 0.5
            values = np.where(at_end, np.where(low_end, self.low, self.high), values)
        return values.astype(np.int64)


@dataclass(frozen=True)
class FloatSpan:
    """Reals from `low` to `high`, uniform; `ends` of the draws land exactly on an end (see `IntSpan`)."""

    low: float
    high: float
    ends: float = 0.0

    def __post_init__(self) -> None:
        if self.low > self.high:
            raise ShapesError(f"empty span {self.low}..{self.high}")
        _check_share("ends", self.ends)

    def draw(self, rng: np.random.Generator) -> float:
        """One value."""
        if self.low == self.high:
            return self.low
        if self.ends and rng.random() < self.ends:
            return self.low if rng.random() < 0.5 else self.high
        return float(rng.uniform(self.low, self.high))

    def extent(self, m: int, rng: np.random.Generator) -> int:
        """An integer extent from `low * m` to `high * m` (shares of m), strictly inside the real interval."""
        return IntSpan(math.ceil(self.low * m), math.floor(self.high * m), self.ends).draw(rng)


def _inside(name: str, low: float, high: float, bounds: tuple[float, float]) -> None:
    if low < bounds[0] or high > bounds[1]:
        raise ShapesError(f"{name} {low}..{high} leaves the spec's range {bounds[0]}..{bounds[1]}")


@dataclass(frozen=True)
class RenderSettings:
    """Every choice the renderer makes inside the spec's envelope; spans are drawn per image.

    `name` and `description` only label the settings: two settings that draw alike are equal.
    """

    name: str = field(default="custom", compare=False)
    description: str = field(default="", compare=False)
    width: IntSpan = IntSpan(*IMAGE_SIDE_RANGE)
    height: IntSpan = IntSpan(*IMAGE_SIDE_RANGE)
    background: IntSpan = IntSpan(*BACKGROUND_RANGE)
    noise_sigma: FloatSpan = FloatSpan(0.0, MAX_NOISE_SIGMA)
    # Share of images whose noise is drawn per channel: the spec's "per-pixel Gaussian noise" reads
    # either way, so the background is gray only on average then.
    rgb_noise: float = 0.0
    jitter: IntSpan = IntSpan(-COLOR_JITTER, COLOR_JITTER)  # per channel, around the palette colour
    small: FloatSpan = FloatSpan(*EXTENT_RANGE["small"])
    large: FloatSpan = FloatSpan(*EXTENT_RANGE["large"])
    # Mask drawn at this many times the size and averaged down; 1 is hard edges. One is drawn per image.
    supersample: tuple[int, ...] = (4,)
    # Pixels kept free between the objects' boxes and the border, and between the two boxes: the spec
    # only asks that objects lie inside and do not overlap (0 and 0).
    edge_margin: IntSpan = IntSpan(2, 2)
    object_gap: IntSpan = IntSpan(4, 4)
    # Share of images placed "tight": the relation only just met (centres near 0.35 W or H apart
    # along its axis, near 0.15 across it) instead of uniform over all valid placements.
    tight: float = 0.0

    def __post_init__(self) -> None:
        _inside("width", self.width.low, self.width.high, IMAGE_SIDE_RANGE)
        _inside("height", self.height.low, self.height.high, IMAGE_SIDE_RANGE)
        _inside("background", self.background.low, self.background.high, BACKGROUND_RANGE)
        _inside("noise sigma", self.noise_sigma.low, self.noise_sigma.high, (0.0, MAX_NOISE_SIGMA))
        _inside("colour jitter", self.jitter.low, self.jitter.high, (-COLOR_JITTER, COLOR_JITTER))
        for size in ("small", "large"):
            span: FloatSpan = getattr(self, size)
            _inside(f"{size} extent", span.low, span.high, EXTENT_RANGE[size])
            # Every m the image sizes allow must leave an integer extent inside the range.
            for m in range(min(self.width.low, self.height.low), min(self.width.high, self.height.high) + 1):
                if math.ceil(span.low * m) > math.floor(span.high * m):
                    raise ShapesError(f"{size} extent {span.low}..{span.high} holds no whole pixel at m={m}")
        if not self.supersample or min(self.supersample) < 1:
            raise ShapesError(f"supersample factors must be at least 1, not {self.supersample}")
        if self.edge_margin.low < 0 or self.object_gap.low < 0:
            raise ShapesError("the edge margin and the gap between objects cannot be negative")
        _check_share("rgb_noise", self.rgb_noise)
        _check_share("tight", self.tight)

    def as_json(self) -> dict[str, Any]:
        """The settings as `dataset.json` and `TRAINING.json` record them."""
        spans = ("width", "height", "background", "noise_sigma", "jitter", "small", "large")
        record: dict[str, Any] = {"name": self.name}
        for key in (*spans, "edge_margin", "object_gap"):
            span = getattr(self, key)
            record[key] = {"low": span.low, "high": span.high, "ends": span.ends}
        record.update(rgb_noise=self.rgb_noise, supersample=list(self.supersample), tight=self.tight)
        return record


DEFAULT_RENDER: Final = RenderSettings(
    name="default",
    description="the original renderer (uniform spans, 4x anti-aliasing, gray noise, 2 px margin, 4 px gap)",
)

ENVELOPE: Final = RenderSettings(
    name="envelope",
    description="for training: every image's settings drawn across the spec's whole envelope, half of "
    "each span's draws exactly at an end; hard and 2-8x anti-aliased edges, gray or per-channel noise, "
    "objects touching the border and each other, tight placements",
    width=IntSpan(*IMAGE_SIDE_RANGE, ends=0.5),
    height=IntSpan(*IMAGE_SIDE_RANGE, ends=0.5),
    background=IntSpan(*BACKGROUND_RANGE, ends=0.5),
    noise_sigma=FloatSpan(0.0, MAX_NOISE_SIGMA, ends=0.5),
    rgb_noise=0.5,
    jitter=IntSpan(-COLOR_JITTER, COLOR_JITTER, ends=0.5),
    small=FloatSpan(*EXTENT_RANGE["small"], ends=0.5),
    large=FloatSpan(*EXTENT_RANGE["large"], ends=0.5),
    # Hard edges and the smoothest edges are the ends here, a third of the images each.
    supersample=(1, 1, 2, 4, 8, 8),
    edge_margin=IntSpan(0, 2, ends=0.5),
    object_gap=IntSpan(0, 4, ends=0.5),
    tight=0.5,
)

_VARIANTS: Final = (
    RenderSettings(
        name="hard-edges-noisy",
        description="hard edges, strong noise (sigma 6-8) drawn per channel, every fill channel "
        "jittered by exactly +-15",
        noise_sigma=FloatSpan(6.0, MAX_NOISE_SIGMA, ends=0.5),
        rgb_noise=1.0,
        jitter=IntSpan(-COLOR_JITTER, COLOR_JITTER, ends=1.0),
        supersample=(1,),
    ),
    RenderSettings(
        name="soft-small",
        description="small images (224-240 px), no noise, 8x anti-aliasing, extents at the low end of "
        "each range",
        width=IntSpan(224, 240),
        height=IntSpan(224, 240),
        noise_sigma=FloatSpan(0.0, 0.0),
        small=FloatSpan(0.14, 0.15),
        large=FloatSpan(0.30, 0.31),
        supersample=(8,),
    ),
    RenderSettings(
        name="large-canvas",
        description="large images (304-320 px), extents at the high end of each range, objects "
        "placed tight, touching the border and each other allowed",
        width=IntSpan(304, 320),
        height=IntSpan(304, 320),
        small=FloatSpan(0.19, 0.20),
        large=FloatSpan(0.37, 0.38),
        edge_margin=IntSpan(0, 0),
        object_gap=IntSpan(0, 0),
        tight=1.0,
    ),
    RenderSettings(
        name="wide",
        description="wide, short images (304-320 x 224-240), the darkest or lightest background, 2x "
        "anti-aliasing",
        width=IntSpan(304, 320),
        height=IntSpan(224, 240),
        background=IntSpan(*BACKGROUND_RANGE, ends=1.0),
        supersample=(2,),
    ),
)

RENDERERS: Final[dict[str, RenderSettings]] = {
    settings.name: settings for settings in (DEFAULT_RENDER, ENVELOPE, *_VARIANTS)
}


def render_settings(name: str) -> RenderSettings:
    """The named renderer; ShapesError lists the names when there is no such renderer."""
    try:
        return RENDERERS[name]
    except KeyError:
        raise ShapesError(f"unknown renderer {name!r}; expected one of {', '.join(RENDERERS)}") from None


# Enough for every (shape, extent, factor) the envelope draws, so training never redraws a mask.
@lru_cache(maxsize=4096)
def shape_mask(shape: str, extent: int, supersample: int) -> Image.Image | None:
    """Coverage mask of a circle or upright triangle filling an extent x extent box (None: a full square).

    Drawn at `supersample` times the size and averaged down, which anti-aliases the edges; 1 draws
    hard edges.
    """
    if shape == "square":
        return None
    side = extent * supersample
    big = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(big)
    if shape == "circle":
        draw.ellipse((0, 0, side - 1, side - 1), fill=255)
    else:
        draw.polygon([((side - 1) / 2, 0), (side - 1, side - 1), (0, side - 1)], fill=255)
    return big.reduce(supersample) if supersample > 1 else big


def background(
    width: int, height: int, gray: int, sigma: float, per_channel: bool, rng: np.random.Generator
) -> Image.Image:
    """A gray `width` x `height` RGB image with Gaussian noise of `sigma`, equal in the three channels
    or drawn for each (`per_channel`)."""
    shape = (height, width, 3) if per_channel else (height, width)
    noise = rng.standard_normal(shape, dtype=np.float32) * np.float32(sigma)
    pixels = np.clip(np.rint(noise + np.float32(gray)), 0, 255).astype(np.uint8)
    if per_channel:
        return Image.fromarray(pixels)
    plane = Image.fromarray(pixels)
    return Image.merge("RGB", (plane, plane, plane))
