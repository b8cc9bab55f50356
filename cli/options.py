"""Command-line options shared by several commands (each also settable by an environment variable)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

IndexDir = Annotated[
    Path | None,
    typer.Option(
        "--index-dir",
        envvar="RETRIEVER_HOME",
        help="Where the index lives. Default: $XDG_DATA_HOME/retriever or ~/.local/share/retriever.",
        show_default=False,
    ),
]
DbUrl = Annotated[
    str | None,
    typer.Option(
        "--db-url",
        envvar="RETRIEVER_DB_URL",
        help="SQLAlchemy URL of the metadata database, e.g. postgresql://user@host/db. "
        "Default: SQLite in the index dir.",
        show_default=False,
    ),
]
Prefilter = Annotated[
    str | None,
    typer.Option(
        "--prefilter",
        envvar="RETRIEVER_PREFILTER",
        help="CLIPModel hub id or local folder. Default: the --model preset, else the index's own (for "
        "commands that use an index), else openai/clip-vit-base-patch32.",
        show_default=False,
    ),
]
Reranker = Annotated[
    str | None,
    typer.Option(
        "--reranker",
        envvar="RETRIEVER_RERANKER",
        help="ViltForImageAndTextRetrieval hub id or local folder. "
        "Default: the --model preset, else the index's own (for commands that use an index), "
        "else dandelin/vilt-b32-finetuned-coco.",
        show_default=False,
    ),
]
Device = Annotated[
    str,
    typer.Option(
        "--device", envvar="RETRIEVER_DEVICE", help="auto (CUDA when torch sees a GPU), cpu or cuda."
    ),
]
JsonOut = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of a table.")]
ModelPreset = Annotated[
    str | None,
    typer.Option(
        "--model",
        envvar="RETRIEVER_MODEL",
        help="A named pair of models: shapes (shipped with retriever, works offline), coco (the public "
        "CLIP + ViLT COCO checkpoints) or flickr30k. --prefilter and --reranker override it.",
        show_default=False,
    ),
]
