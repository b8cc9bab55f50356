"""``retriever eval``: Recall@K on a Karpathy-format split (Flickr30k, COCO, or a shapes set)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer

from .common import ModelContext, errors_as_messages
from .options import Device, JsonOut, ModelPreset, Prefilter, Reranker
from .output import Bar


def _table(result: dict[str, object]) -> str:
    rows = [
        ("prefilter", result["prefilter"]),
        ("rerank", result.get("rerank")),
        ("rerank, ITM only", result.get("rerank_itm_only")),
        ("brute force", result.get("brute_force")),
    ]
    keys = ["tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "rsum"]
    lines = [f"{'':>16}  " + "  ".join(f"{k:>7}" for k in keys) + "    pairs"]
    for name, row in rows:
        if isinstance(row, dict):
            pairs = row.get("pairs", "")
            lines.append(f"{name:>16}  " + "  ".join(f"{row[k]:>7.2f}" for k in keys) + f"  {pairs:>7}")
    return "\n".join(lines)


def default_work_dir() -> Path:
    """Where an evaluation keeps its pair-score checkpoints by default: a cache, not an index."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "retriever" / "eval"


def evaluate_command(
    karpathy: Annotated[Path, typer.Option("--karpathy", help="A Karpathy-format dataset JSON.")],
    images: Annotated[
        Path | None,
        typer.Option("--images", help="Images folder. Default: the JSON's folder.", show_default=False),
    ] = None,
    split: Annotated[str, typer.Option("--split", help="train, val, test or restval.")] = "test",
    candidates: Annotated[
        int,
        typer.Option(
            "--candidates",
            min=1,
            help="Top-K per query that ViLT reranks (ALBEF/BLIP: 128 on Flickr30k, 256 on COCO).",
        ),
    ] = 128,
    brute_force: Annotated[
        bool, typer.Option("--brute-force", help="Also score every pair with ViLT (small sets only).")
    ] = False,
    no_rerank: Annotated[bool, typer.Option("--no-rerank", help="Prefilter only.")] = False,
    itm_only: Annotated[
        bool,
        typer.Option(
            "--itm-only",
            help="Rank the candidates by the ITM logit alone (ALBEF), not ITM + prefilter logit (BLIP, "
            "what searches do).",
        ),
    ] = False,
    save_scores: Annotated[
        Path | None,
        typer.Option("--save-scores", help="Write the score matrices to this .npz file.", show_default=False),
    ] = None,
    work_dir: Annotated[
        Path | None,
        typer.Option(
            "--work-dir",
            help="Where pair scores are checkpointed, so an interrupted run resumes. "
            "Default: $XDG_CACHE_HOME/retriever/eval (~/.cache/retriever/eval).",
            show_default=False,
        ),
    ] = None,
    precision: Annotated[
        str, typer.Option("--precision", help="Rerank precision: auto, fp32, bf16, fp16 or int8.")
    ] = "auto",
    model: ModelPreset = None,
    prefilter: Prefilter = None,
    reranker: Reranker = None,
    device: Device = "auto",
    json_out: JsonOut = False,
) -> None:
    """Recall@1/5/10 in both directions: prefilter alone, then with the ViLT rerank, and brute force."""
    from retriever.datasets.karpathy import load_karpathy
    from retriever.evaluate import BRUTE_FORCE_WARN_PAIRS, evaluate

    with errors_as_messages():
        data = load_karpathy(karpathy, images, split)
        ctx = ModelContext(device)  # an evaluation reads no index, and creates none
        pre_id, re_id = ctx.model_ids(prefilter, reranker, model)
        pre = ctx.load_prefilter(pre_id)
        rer = None if no_rerank else ctx.load_reranker(re_id, precision)
        n_pairs = len(data.images) * len(data.texts)
        if brute_force and n_pairs > BRUTE_FORCE_WARN_PAIRS:
            typer.secho(
                f"warning: brute force scores all {n_pairs:,} pairs with ViLT; that is feasible only for "
                "small sets (ViLT-B/32: about 3 pairs/s on a 2-core CPU). Interrupt and re-run to resume.",
                fg=typer.colors.YELLOW,
                err=True,
            )
        bars: dict[str, Bar | None] = {}

        def on_stage(stage: str, done: int, total: int) -> None:
            if stage not in bars:
                for other in bars.values():
                    if other is not None:
                        other.close()
                bars[stage] = Bar.for_terminal(stage, unit="it")
            bar = bars[stage]
            if bar is not None:
                bar.update(done, total)

        result = evaluate(
            data,
            pre,
            rer,
            candidates=candidates,
            brute_force=brute_force,
            work_dir=work_dir or default_work_dir(),
            on_stage=on_stage,
            fuse=not itm_only,
        )
        for bar in bars.values():
            if bar is not None:
                bar.close()
    if save_scores is not None:
        result.save_scores(save_scores)
    out = result.as_dict()
    if json_out:
        typer.echo(json.dumps(out))
    else:
        typer.echo(f"{out['images']} images, {out['texts']} captions, candidates {candidates}")
        typer.echo(_table(out))
        typer.echo("seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in out["seconds"].items()))
