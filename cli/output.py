"""Terminal output: progress bars on a terminal, tables by default, JSON on request."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Any

import typer

if TYPE_CHECKING:  # the engine (and torch) load only in the commands that need them
    from tqdm import tqdm

    from retriever.indexing import IndexReport
    from retriever.search import SearchResult


class Bar:
    """A tqdm bar on stderr, shown only when stderr is a terminal."""

    def __init__(self, desc: str, unit: str, delay: float) -> None:
        from tqdm import tqdm

        self._bar: tqdm[Any] = tqdm(
            desc=desc, unit=unit, total=0, file=sys.stderr, delay=delay, dynamic_ncols=True
        )

    @classmethod
    def for_terminal(cls, desc: str, *, unit: str, delay: float = 0.0) -> Bar | None:
        """A bar on a terminal; elsewhere (logs, CI, nohup) a line of progress every so often."""
        if sys.stderr.isatty():
            return cls(desc, unit, delay)
        return LineProgress(desc, unit, delay)

    def update(self, done: int, total: int) -> None:
        """Move the bar to ``done`` of ``total``."""
        if self._bar.total != total:
            self._bar.total = total
        self._bar.n = done
        self._bar.refresh()

    def postfix(self, **values: str) -> None:
        """Show figures (loss, throughput) after the bar."""
        self._bar.set_postfix(values, refresh=False)

    def write(self, message: str) -> None:
        """Print a line above the bar."""
        self._bar.write(message, file=sys.stderr)

    def close(self) -> None:
        """Remove the bar."""
        self._bar.close()


class LineProgress(Bar):
    """Progress for a log: one plain line on stderr at most every ``EVERY_S`` seconds, and at the end."""

    EVERY_S = 10.0

    def __init__(self, desc: str, unit: str, delay: float) -> None:
        import time

        self._clock = time.monotonic
        self._desc, self._unit = desc, unit
        self._last = self._clock() + max(delay, 0.0) - self.EVERY_S
        self._done = self._total = -1
        self._postfix = ""

    def update(self, done: int, total: int) -> None:
        """Print ``done/total`` when enough time has passed, or when the work is complete."""
        now = self._clock()
        finished = total > 0 and done >= total and done != self._done
        if total > 0 and (finished or now - self._last >= self.EVERY_S):
            typer.echo(f"{self._desc}: {done}/{total} {self._unit}{self._postfix}", err=True)
            self._last = now
        self._done, self._total = done, total

    def postfix(self, **values: str) -> None:
        """Figures to add to the next line."""
        self._postfix = "  " + " ".join(f"{k}={v}" for k, v in values.items())

    def write(self, message: str) -> None:
        """Print a line."""
        typer.echo(message, err=True)

    def close(self) -> None:
        """Nothing to remove."""


def hits_json(result: SearchResult) -> dict[str, Any]:
    """The ``--json`` form of a search result."""
    results: list[dict[str, Any]] = []
    for rank, hit in enumerate(result.hits, start=1):
        item: dict[str, Any] = {"rank": rank}
        if hit.text is not None:
            # A caption's id is the one given in the JSONL file, else its number in the collection.
            item["id"] = hit.ext_id if hit.ext_id is not None else str(hit.id)
            item["text"] = hit.text
        else:
            item["id"] = hit.id
            item["path"] = hit.path
        item["score"] = hit.score
        item["rerank_score"] = hit.rerank_score
        item["prefilter_score"] = hit.prefilter_score
        results.append(item)
    return {
        "query": result.query,
        "results": results,
        "seconds": {k: round(v, 4) for k, v in result.timings.items()},
    }


def print_hits(result: SearchResult, *, as_json: bool) -> None:
    """Print search results as a table, or as one JSON object."""
    if as_json:
        typer.echo(json.dumps(hits_json(result)))
        return
    if not result.hits:
        typer.echo("no results")
        return
    reranked = any(h.rerank_score is not None for h in result.hits)
    what_head = "text" if result.hits[0].text is not None else "path"
    # The same three numbers, under the same names, as the API and the page: the score hits are ranked
    # by first, then the ITM logit (rerank_score) and the prefilter cosine (prefilter_score).
    typer.echo(f"{'rank':>4}  {'score':>9}  {'ITM':>9}  {'cosine':>9}  {what_head}")
    for rank, hit in enumerate(result.hits, start=1):
        what = hit.text if hit.text is not None else hit.path
        itm = f"{hit.rerank_score:>9.4f}" if hit.rerank_score is not None else f"{'-':>9}"
        typer.echo(f"{rank:>4}  {hit.score:>9.4f}  {itm}  {hit.prefilter_score:>9.4f}  {what}")
    if reranked and any(h.score != h.rerank_score for h in result.hits):
        typer.echo("ranked by score = ITM logit + prefilter logit (scale × cosine); --itm-only: ITM alone")
    elif reranked:
        typer.echo("ranked by the ITM logit (--itm-only)")
    else:
        typer.echo("ranked by the prefilter cosine (no rerank)")


def print_report(report: IndexReport) -> None:
    """The summary at the end of an index run."""
    parts = [
        f"added {report.added}",
        f"updated {report.updated}",
        f"removed {report.removed}",
        f"unchanged {report.unchanged}",
        f"skipped {len(report.skipped)}",
    ]
    typer.echo(", ".join(parts) + f" in {report.seconds:.1f} s")
    if report.reused:
        typer.echo(f"{report.reused} reused stored vectors (renamed or duplicate files)")
    if report.repaired:
        typer.echo(f"{report.repaired} images had lost their cached tokens and were encoded again")
    reasons: dict[str, int] = {}
    for _, reason in report.skipped:
        reasons[reason] = reasons.get(reason, 0) + 1
    for reason, n in sorted(reasons.items(), key=lambda kv: -kv[1]):
        typer.echo(f"  skipped {n}: {reason}")


def _size(n: int | None) -> str:
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def print_status(facts: dict[str, Any], *, as_json: bool) -> None:
    """Print ``retriever status``."""
    if as_json:
        typer.echo(json.dumps(facts))
        return
    models = facts["models"] or {}
    lines = [
        ("index dir", facts["index_dir"]),
        ("database", facts["database"]),
        ("images", facts["images"]),
        ("texts", facts["texts"]),
        ("prefilter", f"{models.get('prefilter', '-')} (dim {models.get('dim', '-')})"),
        ("reranker", models.get("reranker", "-")),
        ("index size", _size(facts["disk_bytes"])),
        ("patch cache", _size(facts["patch_cache_bytes"])),
        ("cache per image", _size(facts["cache_bytes_per_image"])),
    ]
    roots = facts.get("roots") or {}
    for n, (path, when) in enumerate(sorted(roots.items())):
        lines.append(("indexed" if n == 0 else "", f"{path} (last run {when})"))
    for key, value in lines:
        typer.echo(f"{key:>16}: {value}")
    for problem in facts.get("problems") or []:
        typer.secho(f"damaged: {problem}", fg=typer.colors.RED, err=True)
