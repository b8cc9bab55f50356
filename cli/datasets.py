"""`retriever datasets`: build benchmark sets on disk."""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from retriever.datasets.shapes import RENDERERS, generate, render_settings
from retriever.errors import RetrieverError

HELP = "Build benchmark image-caption sets in the Karpathy split format."

app = typer.Typer(help=HELP, no_args_is_help=True)


class Split(StrEnum):
    """The splits a shapes set can be drawn for."""

    train = "train"
    val = "val"
    test = "test"


# `--help` lists every renderer with what it changes; the names come from the one registry.
RENDER_HELP = "How images are drawn inside the spec's envelope. " + "; ".join(
    f"{name}: {settings.description}" for name, settings in RENDERERS.items()
)


def _known_renderer(name: str) -> str:
    if name not in RENDERERS:
        raise typer.BadParameter(f"{name!r} is not one of {', '.join(RENDERERS)}")
    return name


@app.callback()
def _datasets() -> None:
    """Build benchmark image-caption sets in the Karpathy split format."""


@app.command("shapes")
def shapes(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the PNGs and dataset.json into.")],
    images: Annotated[int, typer.Option("--images", min=1, help="Number of images (test: a multiple of 4).")],
    seed: Annotated[int, typer.Option("--seed", min=0, help="Random seed; same seed, same set.")] = 0,
    split: Annotated[Split, typer.Option("--split", help="Split to draw; test sets are made of twins.")] = (
        Split.test
    ),
    workers: Annotated[
        int | None, typer.Option("--workers", min=1, help="Rendering processes (default: all cores).")
    ] = None,
    render: Annotated[
        str,
        typer.Option(
            "--render", metavar="[" + "|".join(RENDERERS) + "]", callback=_known_renderer, help=RENDER_HELP
        ),
    ] = "default",
) -> None:
    """Generate a shapes benchmark set (two objects, one relation, five captions per image).

    The scenes depend only on --images, --seed and --split, so sets drawn with another --render show
    the same scenes drawn differently.
    """
    started = time.perf_counter()
    try:
        path = generate(out, images, seed, split.value, workers=workers, settings=render_settings(render))
    except RetrieverError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    seconds = time.perf_counter() - started
    drawn = "" if render == "default" else f", render {render}"
    typer.echo(
        f"shapes {split.value}: {images} images, {5 * images} captions{drawn}, {path} ({seconds:.1f} s)"
    )
