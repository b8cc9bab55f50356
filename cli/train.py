"""``retriever train``: train or fine-tune the prefilter and the reranker on a Karpathy-format dataset."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from retriever.datasets.shapes_render import RENDERERS

from .common import errors_as_messages, quiet_transformers
from .options import Device
from .output import Bar


def _known_renderer(name: str | None) -> str | None:
    if name is not None and name not in RENDERERS:
        raise typer.BadParameter(f"{name!r} is not one of {', '.join(RENDERERS)}")
    return name


def train_command(
    karpathy: Annotated[Path, typer.Option("--karpathy", help="A Karpathy-format dataset JSON.")],
    out: Annotated[Path, typer.Option("--out", help="Output folder (prefilter/, reranker/, TRAINING.json).")],
    images: Annotated[
        Path | None,
        typer.Option("--images", help="Images folder. Default: the JSON's folder.", show_default=False),
    ] = None,
    split: Annotated[
        str, typer.Option("--split", help="Which split of the JSON to train on (train, val, test, restval).")
    ] = "train",
    prefilter_init: Annotated[
        str | None,
        typer.Option(
            "--prefilter-init", help="Fine-tune this CLIPModel (hub id or folder).", show_default=False
        ),
    ] = None,
    reranker_init: Annotated[
        str | None,
        typer.Option(
            "--reranker-init",
            help="Fine-tune this ViltForImageAndTextRetrieval (hub id or folder).",
            show_default=False,
        ),
    ] = None,
    prefilter_steps: Annotated[
        int, typer.Option("--prefilter-steps", min=0, help="Contrastive steps of the dual encoder (0: skip).")
    ] = 600,
    reranker_steps: Annotated[
        int, typer.Option("--reranker-steps", min=0, help="ITM steps of ViLT on mined negatives (0: skip).")
    ] = 6000,
    prefilter_lr: Annotated[
        float | None,
        typer.Option("--prefilter-lr", help="1e-3 from scratch, 1e-5 fine-tuning.", show_default=False),
    ] = None,
    reranker_lr: Annotated[
        float | None,
        typer.Option("--reranker-lr", help="5e-4 from scratch, 1e-4 fine-tuning.", show_default=False),
    ] = None,
    seed: Annotated[
        int,
        typer.Option(
            "--seed", help="Seed of initialisation, sampling and mining (recorded in TRAINING.json)."
        ),
    ] = 0,
    precision: Annotated[
        str, typer.Option("--precision", help="auto (bf16 where native), fp32 or bf16.")
    ] = "auto",
    device: Device = "auto",
    render: Annotated[
        str | None,
        typer.Option(
            "--render",
            metavar="[" + "|".join(RENDERERS) + "]",
            callback=_known_renderer,
            help="Shapes sets only: draw the training images again from the dataset's scenes with this "
            "renderer (seeded by --seed) instead of reading its files; envelope covers everything the "
            "spec allows. Listed by `retriever datasets shapes --help`. Default: the files.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Train the dual encoder (contrastive), then ViLT ITM on negatives it mines. Resumes if interrupted."""
    from retriever.hardware import resolve_device
    from retriever.training.loop import StepInfo
    from retriever.training.run import TrainRequest, train

    quiet_transformers()
    with errors_as_messages():
        req = TrainRequest(
            dataset=karpathy,
            out=out,
            images_dir=images,
            split=split,
            prefilter_init=prefilter_init,
            reranker_init=reranker_init,
            prefilter_steps=prefilter_steps,
            reranker_steps=reranker_steps,
            prefilter_lr=prefilter_lr,
            reranker_lr=reranker_lr,
            seed=seed,
            device=str(resolve_device(device)),
            precision=precision,
            render=render,
        )
        bars: dict[str, Bar | None] = {}
        last: dict[str, StepInfo] = {}

        def on_step(info: StepInfo) -> None:
            bar = bars.get(info.stage)
            if info.stage not in bars:
                bar = bars[info.stage] = Bar.for_terminal(f"train {info.stage}", unit="step")
            last[info.stage] = info
            if bar is not None:
                bar.update(info.step, info.steps)
                bar.postfix(
                    loss=f"{info.loss:.3f}",
                    pairs_s=f"{info.pairs_per_s:.0f}",
                    **{k: f"{v:.3f}" for k, v in info.extra.items()},
                )
            elif info.step % 100 == 0 or info.step == info.steps:
                extra = " ".join(f"{k} {v:.3f}" for k, v in info.extra.items())
                typer.echo(
                    f"{info.stage} step {info.step}/{info.steps} loss {info.loss:.4f} {extra} "
                    f"{info.pairs_per_s:.0f} pairs/s",
                    err=True,
                )

        def on_status(message: str) -> None:
            typer.echo(message, err=True)

        command = "retriever " + " ".join(shlex.quote(a) for a in sys.argv[1:])
        folder = train(req, command=command, on_step=on_step, on_status=on_status)
        for bar in bars.values():
            if bar is not None:
                bar.close()
    typer.echo(f"models written to {folder}/prefilter and {folder}/reranker")
