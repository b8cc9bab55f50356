"""`retriever datasets`: build benchmark sets on disk."""

from __future__ import annotations

import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from retriever.datasets.shapes import generate
from retriever.errors import RetrieverError

HELP = "Build benchmark image-caption sets in the Karpathy split format."

app = typer.Typer(help=HELP, no_args_is_help=True)


class Split(StrEnum):
    """The splits a shapes set can be drawn for."""

    train = "train"
    val = "val"
    test = "test"


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
) -> None:
    """Generate a shapes benchmark set (two objects, one relation, five captions per image)."""
    started = time.perf_counter()
    try:
        path = generate(out, images, seed, split.value, workers=workers)
    except RetrieverError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from None
    seconds = time.perf_counter() - started
    typer.echo(f"shapes {split.value}: {images} images, {5 * images} captions, {path} ({seconds:.1f} s)")
