"""``retriever check``: verify the whole index; ``--repair`` fixes what it found."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from .common import Context, errors_as_messages
from .options import DbUrl, Device, IndexDir, JsonOut


def check_command(
    repair: Annotated[
        bool,
        typer.Option(
            "--repair",
            help="Index damaged images again from their files, drop the rows of files that are gone, and "
            "rebuild the FAISS files from the database.",
        ),
    ] = False,
    skip_files: Annotated[
        bool, typer.Option("--skip-files", help="Do not look for the indexed image files on disk.")
    ] = False,
    index_dir: IndexDir = None,
    db_url: DbUrl = None,
    device: Device = "auto",
    json_out: JsonOut = False,
) -> None:
    """Verify the index: every image has finite tokens and a unit vector, the FAISS files agree with the
    database, the database file is sound, the indexed files exist. Exits 1 on damage."""
    from retriever.checking import check_index, repair_index

    with errors_as_messages():
        ctx = Context(index_dir, db_url, device, read_only=not repair)
        report = check_index(ctx.search_index, files=not skip_files)
        repaired = None
        if repair and (report.damaged or report.gone_images):

            def reindex(paths: list[Path]) -> int:
                from retriever.indexing import index_folder

                pre_id, re_id = ctx.model_ids(None, None)
                pre, rer = ctx.load_prefilter(pre_id), ctx.load_reranker(re_id)
                return sum(index_folder(ctx.search_index, pre, rer, p).added for p in paths)

            repaired = repair_index(ctx.search_index, report, reindex)
            report = check_index(ctx.search_index, files=not skip_files)
    if json_out:
        facts = report.as_dict()
        if repaired is not None:
            facts["repaired"] = {
                "dropped": repaired.dropped,
                "reindexed": repaired.reindexed,
                "rebuilt": repaired.rebuilt,
            }
        typer.echo(json.dumps(facts))
    else:
        if repaired is not None:
            typer.echo(
                f"repaired: dropped {repaired.dropped} rows, indexed {repaired.reindexed} files again, "
                f"rebuilt {', '.join(repaired.rebuilt) or 'no'} FAISS files"
            )
        typer.echo(f"checked {report.images} images and {report.texts} captions")
        for f in report.findings:
            if f.severity == "damage":
                typer.secho(f"damaged ({f.part}): {f.message}", fg=typer.colors.RED, err=True)
            else:
                typer.echo(f"note ({f.part}): {f.message}")
        if report.damaged:
            typer.echo("repair: retriever check --repair", err=True)
        elif not report.findings:
            typer.echo("no damage found")
    if report.damaged:
        raise typer.Exit(1)
