"""The ``retriever`` command line: index a folder, search it, manage captions, report status."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer

from .bench import bench_command
from .common import Context, errors_as_messages, fail
from .datasets import app as datasets_app
from .evaluate import evaluate_command
from .options import DbUrl, Device, IndexDir, JsonOut, ModelPreset, Prefilter, Reranker
from .output import Bar, print_hits, print_report, print_status
from .serve import serve
from .train import train_command

app = typer.Typer(
    help="Image-text retrieval: a FAISS prefilter and a ViLT image-text-matching rerank over cached patches.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
texts_app = typer.Typer(help="The caption collection searched by image→text queries.", no_args_is_help=True)
app.add_typer(texts_app, name="texts")
app.add_typer(datasets_app, name="datasets", help="Generate benchmark datasets.")


def _progress_fn(bar: Bar | None) -> Callable[[int, int], None] | None:
    if bar is None:
        return None

    def update(done: int, total: int) -> None:
        bar.update(done, total)

    return update


@app.command()
def index(
    folder: Annotated[
        Path, typer.Argument(help="Folder of images (searched recursively) or one image file.")
    ],
    rebuild: Annotated[
        bool,
        typer.Option("--rebuild", help="Drop everything indexed and start over, e.g. with other models."),
    ] = False,
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, max=1024, help="Images per batch.")] = 16,
    index_dir: IndexDir = None,
    db_url: DbUrl = None,
    model: ModelPreset = None,
    prefilter: Prefilter = None,
    reranker: Reranker = None,
    device: Device = "auto",
    json_out: JsonOut = False,
) -> None:
    """Index the images under FOLDER: new and changed files are encoded, gone ones removed."""
    from retriever.indexing import Progress, index_folder

    if not folder.exists():
        fail(f"no such folder: {folder}", 2)
    with errors_as_messages():
        ctx = Context(index_dir, db_url, device)
        pre_id, re_id = ctx.model_ids(prefilter, reranker, model)
        pre, rer = ctx.load_prefilter(pre_id), ctx.load_reranker(re_id)
        bar = Bar.for_terminal("indexing", unit="img")

        def on_progress(p: Progress) -> None:
            if p.skipped is not None:
                path, reason = p.skipped
                (bar.write if bar else lambda m: typer.echo(m, err=True))(f"skipped {path}: {reason}")
            if bar is not None:
                bar.update(p.done, p.total)

        try:
            report = index_folder(
                ctx.library, pre, rer, folder, batch_size=batch_size, rebuild=rebuild, on_progress=on_progress
            )
        except KeyboardInterrupt:
            if bar:
                bar.close()
            fail("interrupted; what was indexed so far is kept, and the next run goes on from there", 130)
        if bar:
            bar.close()
    if json_out:
        typer.echo(json.dumps(report.as_dict()))
    else:
        print_report(report)


@app.command()
def search(
    query: Annotated[
        str | None, typer.Argument(help="Text to search images for.", show_default=False)
    ] = None,
    image: Annotated[
        Path | None,
        typer.Option("--image", help="Search with this image instead of text.", show_default=False),
    ] = None,
    texts: Annotated[
        bool, typer.Option("--texts", help="With --image: rank the caption collection instead of images.")
    ] = False,
    k: Annotated[int, typer.Option("--k", min=1, max=1000, help="Results to show.")] = 10,
    candidates: Annotated[
        int | None,
        typer.Option(
            "--candidates",
            min=1,
            max=10000,
            help="Prefilter candidates the ViLT rerank scores. Default: 20 on a CPU (about 0.3 s each for "
            "ViLT-B/32 on 2 cores), 100 on a GPU.",
            show_default=False,
        ),
    ] = None,
    no_rerank: Annotated[
        bool, typer.Option("--no-rerank", help="Prefilter only; score is the cosine.")
    ] = False,
    itm_only: Annotated[
        bool,
        typer.Option("--itm-only", help="Rank by the ViLT ITM logit alone, not ITM + the prefilter's logit."),
    ] = False,
    index_dir: IndexDir = None,
    db_url: DbUrl = None,
    model: ModelPreset = None,
    prefilter: Prefilter = None,
    reranker: Reranker = None,
    device: Device = "auto",
    json_out: JsonOut = False,
) -> None:
    """Search by text (text→image), by image (--image: image→image) or for captions (--image --texts)."""
    from retriever.factory import default_candidates
    from retriever.images import read_and_decode
    from retriever.indexing import model_info
    from retriever.search import clean_query, search_image, search_image_texts, search_text

    if (query is None) == (image is None):
        fail("give either a text query or --image PATH", 2)
    if texts and image is None:
        fail("--texts needs --image PATH", 2)
    with errors_as_messages():
        if query is not None:
            query = clean_query(query)
        decoded = read_and_decode(image)[1].image if image is not None else None
        ctx = Context(index_dir, db_url, device)
        if ctx.library.models() is None:
            fail(f"the index at {ctx.library.home} is empty: run `retriever index DIR` first", 1)
        pre_id, re_id = ctx.model_ids(prefilter, reranker, model)
        pre = ctx.load_prefilter(pre_id)
        rer = None
        if not no_rerank and not (image is not None and not texts):
            rer = ctx.load_reranker(re_id)
            ctx.library.check_models(model_info(pre, rer), record=False)
        n_candidates = candidates or default_candidates(ctx.device)
        bar = Bar.for_terminal("reranking", unit="pair", delay=1.0) if rer is not None else None
        if decoded is None:
            assert query is not None
            result = search_text(
                ctx.library,
                pre,
                rer,
                query,
                k=k,
                candidates=n_candidates,
                on_progress=_progress_fn(bar),
                fuse=not itm_only,
            )
        elif texts:
            result = search_image_texts(
                ctx.library,
                pre,
                rer,
                decoded,
                k=k,
                candidates=n_candidates,
                label=str(image),
                on_progress=_progress_fn(bar),
                fuse=not itm_only,
            )
        else:
            result = search_image(ctx.library, pre, decoded, k=k, label=str(image))
        if bar:
            bar.close()
    print_hits(result, as_json=json_out)


@texts_app.command("add")
def texts_add(
    file: Annotated[
        Path, typer.Argument(help="One caption per line, or JSONL with 'text' and optional 'id'.")
    ],
    index_dir: IndexDir = None,
    db_url: DbUrl = None,
    model: ModelPreset = None,
    prefilter: Prefilter = None,
    reranker: Reranker = None,
    device: Device = "auto",
) -> None:
    """Add captions to the collection that `search --image PATH --texts` ranks."""
    from retriever.captions import read_captions
    from retriever.indexing import model_info

    with errors_as_messages():
        items = read_captions(file)
        ctx = Context(index_dir, db_url, device)
        pre_id, re_id = ctx.model_ids(prefilter, reranker, model)
        pre, rer = ctx.load_prefilter(pre_id), ctx.load_reranker(re_id)
        with ctx.library.writer():
            ctx.library.check_models(model_info(pre, rer), record=True)
            vectors = pre.encode_texts([t for _, t in items])
            n = ctx.library.commit_texts([(i, t, v) for (i, t), v in zip(items, vectors, strict=True)])
    typer.echo(f"added {n} captions ({ctx.library.store.count_texts()} in the collection)")


@app.command()
def status(index_dir: IndexDir = None, db_url: DbUrl = None, json_out: JsonOut = False) -> None:
    """Counts, models and sizes of the index."""
    with errors_as_messages():
        ctx = Context(index_dir, db_url, "cpu")
        facts = ctx.library.status()
    print_status(facts, as_json=json_out)


# Commands that live in their own modules are registered here, one line each.
app.command("eval")(evaluate_command)
app.command("train")(train_command)
app.command()(serve)
app.command("bench")(bench_command)
# (end of registrations)


def main() -> None:
    """Console-script entry point."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        app()
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
