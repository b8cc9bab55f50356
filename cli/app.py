"""The ``retriever`` command line: index a folder, search it, manage captions, report status."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from . import INTERRUPTED
from .bench import bench_command
from .check import check_command
from .common import Context, errors_as_messages, fail
from .datasets import app as datasets_app
from .evaluate import evaluate_command
from .options import DbUrl, Device, IndexDir, JsonOut, ModelPreset, Prefilter, Reranker
from .output import Bar, print_hits, print_report, print_status
from .serve import serve
from .train import train_command

if TYPE_CHECKING:
    from retriever.indexing import IndexReport
    from retriever.search_index import SearchIndex

_HELP_NAMES = {"help_option_names": ["-h", "--help"]}
app = typer.Typer(
    help="Image-text retrieval: a FAISS prefilter and a ViLT image-text-matching rerank over cached patches.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings=_HELP_NAMES,
)
texts_app = typer.Typer(
    help="The caption collection searched by image→text queries.",
    no_args_is_help=True,
    context_settings=_HELP_NAMES,
)


def _version(value: bool) -> None:
    if value:
        from retriever import __version__

        typer.echo(f"retriever {__version__}")
        raise typer.Exit()


@app.callback()
def _main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Image-text retrieval: a FAISS prefilter and a ViLT image-text-matching rerank over cached patches."""


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
        Path,
        typer.Argument(metavar="FOLDER", help="Folder of images (searched recursively) or one image file."),
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
    with errors_as_messages(), ExitStack() as stack:
        ctx = Context(index_dir, db_url, device, rebind=rebuild)
        stack.callback(ctx.discard_if_unused)  # a first run that fails leaves no empty index behind
        # The lock first: a second writer hears at once that it must wait, not after loading models.
        stack.enter_context(ctx.search_index.writer())
        pre_id, re_id = ctx.model_ids(prefilter, reranker, model)
        if (
            not rebuild
            and (early := _nothing_to_index(ctx.search_index, folder, (pre_id, re_id))) is not None
        ):
            _print_index_report(early, json_out)
            return
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
                ctx.search_index,
                pre,
                rer,
                folder,
                batch_size=batch_size,
                rebuild=rebuild,
                on_progress=on_progress,
            )
        except KeyboardInterrupt:
            if bar:
                bar.close()
            fail(
                "interrupted; what was indexed so far is kept, and the next run goes on from there",
                INTERRUPTED,
            )
        if bar:
            bar.close()
    _print_index_report(report, json_out)


def _print_index_report(report: IndexReport, json_out: bool) -> None:
    if json_out:
        typer.echo(json.dumps(report.as_dict()))
    else:
        print_report(report)


def _nothing_to_index(
    search_index: SearchIndex, folder: Path, model_ids: tuple[str, str]
) -> IndexReport | None:
    """The report of a run with nothing to do, found without loading a model (seconds of start-up), or
    None when there is work: a new, changed or gone file, damage to repair, or other models asked for."""
    import time

    from retriever.indexing import IndexReport, plan_index
    from retriever.presets import model_name

    started = time.perf_counter()
    info = search_index.models()
    asked = tuple(model_name(m) for m in model_ids)
    if info is None or (info.prefilter, info.reranker) != asked or search_index.check():
        return None
    plan = plan_index(search_index, folder)
    if not plan.nothing_to_do:
        return None
    for path, reason in plan.skipped:
        typer.echo(f"skipped {path}: {reason}", err=True)
    search_index.record_roots([folder.expanduser().resolve(), *plan.linked])
    return IndexReport(unchanged=plan.unchanged, skipped=plan.skipped, seconds=time.perf_counter() - started)


@app.command()
def search(
    query: Annotated[
        str | None, typer.Argument(metavar="QUERY", help="Text to search images for.", show_default=False)
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
            help="Prefilter candidates the ViLT rerank scores (never fewer than --k, so --k results come "
            "back). Default: 20 on a CPU, 100 on a GPU.",
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
    from retriever.indexing import model_info
    from retriever.search import clean_query, search_image, search_image_texts, search_text

    if (query is None) == (image is None):
        fail("give either a text query or --image PATH", 2)
    if texts and image is None:
        fail("--texts needs --image PATH", 2)
    with errors_as_messages():
        if query is not None:
            query = clean_query(query)
        decoded = _query_image(image) if image is not None else None
        ctx = Context(index_dir, db_url, device, read_only=True)
        if ctx.search_index.models() is None:
            fail(f"the index at {ctx.search_index.home} is empty: run `retriever index DIR` first", 1)
        pre_id, re_id = ctx.model_ids(prefilter, reranker, model)
        pre = ctx.load_prefilter(pre_id)
        rer = None
        if not no_rerank and not (image is not None and not texts):
            rer = ctx.load_reranker(re_id)
            ctx.search_index.check_models(model_info(pre, rer), record=False)
        n_candidates = candidates or ctx.plan.candidates
        bar = Bar.for_terminal("reranking", unit="pair", delay=1.0) if rer is not None else None
        if decoded is None:
            assert query is not None
            result = search_text(
                ctx.search_index,
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
                ctx.search_index,
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
            result = search_image(ctx.search_index, pre, decoded, k=k, label=str(image))
        if bar:
            bar.close()
    print_hits(result, as_json=json_out)


def _query_image(path: Path) -> Any:
    """The query image, decoded; its errors name the file."""
    from retriever.errors import ImageDecodeError
    from retriever.images import read_and_decode

    try:
        return read_and_decode(path)[1].image
    except ImageDecodeError as exc:
        raise ImageDecodeError(f"--image {path}: {exc}") from None


@texts_app.command("add")
def texts_add(
    file: Annotated[
        Path,
        typer.Argument(metavar="FILE", help="One caption per line, or JSONL with 'text' and optional 'id'."),
    ],
    index_dir: IndexDir = None,
    db_url: DbUrl = None,
    model: ModelPreset = None,
    prefilter: Prefilter = None,
    reranker: Reranker = None,
    device: Device = "auto",
) -> None:
    """Add captions to the collection that `search --image PATH --texts` ranks.

    Adding is idempotent: a caption without an id is stored under an id derived from its text ("t-" and
    16 hex digits of its SHA-256), so adding the same file again keeps one copy of each caption. A caption
    whose id is stored already replaces it (a JSONL "id" names the caption to replace); one stored with
    the same text is left as it is and not encoded again.
    """
    from retriever.captions import read_captions
    from retriever.indexing import model_info

    with errors_as_messages(), ExitStack() as stack:
        items = read_captions(file)
        ctx = Context(index_dir, db_url, device)
        stack.callback(ctx.discard_if_unused)  # a first command that fails leaves no empty index behind
        with ctx.search_index.writer():  # before the models load, so a second writer hears at once
            todo = ctx.search_index.texts_to_write(items)
            before = ctx.search_index.store.count_texts()
            if todo:  # the models load only when there is something to encode
                pre_id, re_id = ctx.model_ids(prefilter, reranker, model)
                pre, rer = ctx.load_prefilter(pre_id), ctx.load_reranker(re_id)
                ctx.search_index.check_models(model_info(pre, rer), record=True)
                vectors = pre.encode_texts([t for _, t in todo])
                ctx.search_index.commit_texts([(i, t, v) for (i, t), v in zip(todo, vectors, strict=True)])
            count = ctx.search_index.store.count_texts()
    added = count - before
    unchanged = len({i for i, _ in items}) - len(todo)
    typer.echo(
        f"added {added} captions, replaced {len(todo) - added}, {unchanged} unchanged "
        f"({count} in the collection)"
    )


@texts_app.command("list")
def texts_list(
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Show only the first N captions.", show_default=False)
    ] = None,
    index_dir: IndexDir = None,
    db_url: DbUrl = None,
    json_out: JsonOut = False,
) -> None:
    """List the captions, oldest first, with the id that search results show and `texts remove` takes.

    Opens the index read-only: writes nothing. --json prints ``{"data": [{"id", "text"}, ...], "count"}``,
    where count is the whole collection's, however many --limit shows.
    """
    with errors_as_messages():
        ctx = Context(index_dir, db_url, "cpu", read_only=True)
        records = ctx.search_index.store.list_texts(limit)
        count = ctx.search_index.store.count_texts()
        ctx.search_index.close()
    rows = [{"id": r.shown_id, "text": r.text} for r in records]
    if json_out:
        typer.echo(json.dumps({"data": rows, "count": count}, ensure_ascii=False))
        return
    for row in rows:
        typer.echo(f"{row['id']}\t{row['text']}")
    if len(rows) < count:
        typer.echo(f"({len(rows)} of {count} captions shown)", err=True)
    elif not rows:
        typer.echo("the caption collection is empty", err=True)


@texts_app.command("remove")
def texts_remove(
    ids: Annotated[
        list[str],
        typer.Argument(
            metavar="ID...", help="Ids of captions, as `texts list` and search results show them."
        ),
    ],
    index_dir: IndexDir = None,
    db_url: DbUrl = None,
) -> None:
    """Remove captions by id. When an id names no caption, nothing is removed and the id is named (exit 1)."""
    with errors_as_messages(), ExitStack() as stack:
        ctx = Context(index_dir, db_url, "cpu")
        stack.callback(ctx.discard_if_unused)
        with ctx.search_index.writer():
            rows = ctx.search_index.find_texts(ids)
            removed = ctx.search_index.remove_texts(list(rows.values()))
            count = ctx.search_index.store.count_texts()
    typer.echo(f"removed {removed} captions ({count} in the collection)")


@texts_app.command("clear")
def texts_clear(
    yes: Annotated[bool, typer.Option("--yes", help="Confirm that every caption is to be removed.")] = False,
    index_dir: IndexDir = None,
    db_url: DbUrl = None,
) -> None:
    """Remove every caption. Asks no question, so it needs --yes (without it: exit 2, nothing removed)."""
    if not yes:
        fail("`texts clear` removes every caption and asks no question: run it again with --yes", 2)
    with errors_as_messages(), ExitStack() as stack:
        ctx = Context(index_dir, db_url, "cpu")
        stack.callback(ctx.discard_if_unused)
        removed = ctx.search_index.clear_texts()
    typer.echo(f"removed {removed} captions (0 in the collection)")


@app.command()
def status(index_dir: IndexDir = None, db_url: DbUrl = None, json_out: JsonOut = False) -> None:
    """Counts, models and sizes of the index."""
    with errors_as_messages():
        ctx = Context(index_dir, db_url, "cpu", read_only=True)
        facts = ctx.search_index.status()
    print_status(facts, as_json=json_out)
    if facts["problems"]:
        raise typer.Exit(1)


# Commands that live in their own modules are registered here, one line each.
app.command("eval")(evaluate_command)
app.command("train")(train_command)
app.command()(serve)
app.command("bench")(bench_command)
app.command("check")(check_command)
# (end of registrations)


def main() -> None:
    """Run the command line; ``retriever.cli.main``, the console script, wraps it for Ctrl-C."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    app()
