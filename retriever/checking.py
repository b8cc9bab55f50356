"""``retriever check``: verify a whole index, and repair what can be repaired.

Searches already refuse damage when they meet it (a run of tokens past the cache's end, non-finite
scores). A check looks everywhere at once: every image row has its tokens and they are finite, every
vector is finite and unit length, the saved FAISS files agree with the database, the database's own
file is sound, and the indexed files are still there. Damage is what makes answers wrong or refused;
notes are what is worth knowing but harms no answer (a FAISS file not saved yet, dead bytes in the
cache, a file gone from disk).

Repair never guesses: rows whose tokens or vector are damaged are dropped and their files indexed again
(the caller passes the encoder); rows whose files are gone are dropped; FAISS files are rebuilt from the
database, which holds every vector.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import RetrieverError
from .index.patches import PatchCacheShortError
from .index.vectors import VectorIndex, generation_path
from .search_index import SearchIndex, SearchIndexReader

#: Images whose tokens are read and checked at once: bounded memory on any index size.
TOKEN_CHUNK = 256
#: How far a stored vector's length may be from 1 (they are stored as float32 unit vectors).
NORM_TOLERANCE = 1e-3


@dataclass(frozen=True)
class Finding:
    """One thing the check found: ``damage`` (answers are wrong or refused) or a ``note``."""

    severity: str
    part: str
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"severity": self.severity, "part": self.part, "message": self.message}


@dataclass
class CheckReport:
    """What ``check_index`` found, and the rows a repair acts on."""

    images: int = 0
    texts: int = 0
    findings: list[Finding] = field(default_factory=list)
    #: (id, path) of images whose tokens or vector are damaged: a repair indexes their files again.
    damaged_images: list[tuple[int, str]] = field(default_factory=list)
    #: (id, path) of images whose files are gone: a repair drops their rows.
    gone_images: list[tuple[int, str]] = field(default_factory=list)
    #: FAISS files (images or texts) a repair rebuilds from the database.
    stale_vectors: list[str] = field(default_factory=list)

    @property
    def damaged(self) -> bool:
        return any(f.severity == "damage" for f in self.findings)

    def damage(self, part: str, message: str) -> None:
        self.findings.append(Finding("damage", part, message))

    def note(self, part: str, message: str) -> None:
        self.findings.append(Finding("note", part, message))

    def as_dict(self) -> dict[str, object]:
        return {
            "images": self.images,
            "texts": self.texts,
            "damaged": self.damaged,
            "findings": [f.as_dict() for f in self.findings],
            "damaged_images": [{"id": i, "path": p} for i, p in self.damaged_images],
            "gone_images": [{"id": i, "path": p} for i, p in self.gone_images],
        }


def _shown(items: Sequence[tuple[int, str]], limit: int = 5) -> str:
    names = ", ".join(f"{p} (id {i})" for i, p in items[:limit])
    return names + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _check_tokens(index: SearchIndexReader, report: CheckReport) -> None:
    cache = index.patches()
    have = cache.rows
    short = index.store.images_beyond(have)
    if short:
        report.damaged_images += short
        report.damage(
            "tokens", f"the patch cache {cache.path} lacks the tokens of {len(short)} images: {_shown(short)}"
        )
    short_ids = {i for i, _ in short}
    bad: list[tuple[int, str]] = []
    offset = 0
    while True:
        page = index.store.image_page(offset, TOKEN_CHUNK)
        if not page:
            break
        offset += len(page)
        readable = [r for r in page if r.id not in short_ids]
        try:
            arrays = cache.load([(r.patch_offset, r.patch_tokens) for r in readable])
        except PatchCacheShortError:  # cut short since the first look: the next check sees it whole
            continue
        bad += [(r.id, r.path) for r, a in zip(readable, arrays, strict=True) if not np.isfinite(a).all()]
    if bad:
        report.damaged_images += bad
        report.damage("tokens", f"{len(bad)} images have non-finite cached tokens: {_shown(bad)}")
    live = sum(n for _, n in index.store.patch_extents()) * cache.row_bytes
    dead = cache.nbytes - live
    if cache.nbytes and dead > 0:
        report.note(
            "tokens",
            f"{dead:,} of the patch cache's {cache.nbytes:,} bytes ({dead / cache.nbytes:.0%}) belong to no "
            "image (changed or deleted files); `retriever index DIR --rebuild` reclaims them",
        )


def _check_vectors(index: SearchIndexReader, report: CheckReport, dim: int) -> None:
    for kind in ("images", "texts"):
        ids, vecs = index.store.image_vectors(dim) if kind == "images" else index.store.text_vectors(dim)
        if len(ids):
            finite = np.isfinite(vecs).all(axis=1)
            norms = np.linalg.norm(np.where(finite[:, None], vecs, 0), axis=1)
            wrong = ~finite | (np.abs(norms - 1) > NORM_TOLERANCE)
            if wrong.any():
                bad_ids = [int(i) for i in ids[wrong]]
                if kind == "images":
                    records = index.store.images(bad_ids)
                    report.damaged_images += [(i, records[i].path) for i in bad_ids if i in records]
                report.damage(
                    "vectors", f"{len(bad_ids)} {kind} have damaged prefilter vectors (ids {bad_ids[:10]})"
                )
        _check_saved_vectors(index, report, kind, dim, np.sort(ids.astype(np.int64)))


def _check_saved_vectors(
    index: SearchIndexReader, report: CheckReport, kind: str, dim: int, want: np.ndarray
) -> None:
    generation = index.store.generation(kind)
    path = generation_path(index.home, kind, generation)
    for old in index.home.glob(f"{kind}-*.faiss"):
        if old != path:
            report.note("vectors", f"{old} is left from an older generation; the next write removes it")
    if not path.exists():
        if len(want):
            report.note(
                "vectors",
                f"the {kind} FAISS file for generation {generation} is not saved yet; "
                "searches rebuild it from the database",
            )
        return
    try:
        saved = VectorIndex.load(path, dim)
    except (RuntimeError, ValueError) as exc:
        report.stale_vectors.append(kind)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        report.damage("vectors", f"the {kind} FAISS file {path} cannot be read ({reason})")
        return
    have = saved.ids()
    if not np.array_equal(have, want):
        report.stale_vectors.append(kind)
        missing = np.setdiff1d(want, have).size
        extra = np.setdiff1d(have, want).size
        report.damage(
            "vectors",
            f"the {kind} FAISS file {path} disagrees with the database: "
            f"{missing} ids missing, {extra} unknown",
        )


def _check_files(index: SearchIndexReader, report: CheckReport) -> None:
    offset = 0
    gone: list[tuple[int, str]] = []
    while page := index.store.image_page(offset, 1000):
        offset += len(page)
        gone += [(r.id, r.path) for r in page if not os.path.exists(r.path)]
    if gone:
        report.gone_images = gone
        report.note("files", f"{len(gone)} indexed files are gone from disk: {_shown(gone)}")


def check_index(index: SearchIndexReader, *, files: bool = True) -> CheckReport:
    """Everything wrong with ``index``, damage and notes; ``files=False`` skips the look at the disk's
    image files (a stat each)."""
    report = CheckReport(images=index.store.count_images(), texts=index.store.count_texts())
    for problem in index.store.integrity_problems():
        report.damage("database", f"the database reports: {problem}")
    info = index.models()
    if info is None:
        if report.images or report.texts:
            report.damage("database", "rows exist but the index records no models")
        return report
    _check_tokens(index, report)
    _check_vectors(index, report, info.dim)
    if files:
        _check_files(index, report)
    report.damaged_images = sorted(set(report.damaged_images))
    return report


@dataclass
class RepairReport:
    """What ``repair_index`` did."""

    dropped: int = 0
    reindexed: int = 0
    rebuilt: list[str] = field(default_factory=list)


def repair_index(
    index: SearchIndex, report: CheckReport, reindex: Callable[[list[Path]], int] | None = None
) -> RepairReport:
    """Act on a check: drop the rows of damaged images and of gone files, index the damaged images'
    files again through ``reindex`` (it gets the paths, returns how many it indexed), and rebuild the
    FAISS files from the database.

    Raises:
        RetrieverError: damaged images whose files exist, but no ``reindex`` to encode them with.
    """
    done = RepairReport()
    info = index.models()
    if info is None:
        return done
    again = [Path(p) for _, p in report.damaged_images if os.path.exists(p)]
    if again and reindex is None:
        raise RetrieverError("re-encoding damaged images needs the index's models")
    with index.writer():
        for kind in report.stale_vectors:
            generation_path(index.home, kind, index.store.generation(kind)).unlink(missing_ok=True)
            done.rebuilt.append(kind)
        drop = sorted({i for i, _ in report.damaged_images} | {i for i, _ in report.gone_images})
        if drop:
            done.dropped = index.remove_images(drop, info)
        for kind in ("images", "texts"):
            index.vectors(kind)  # rebuilt from the database where the file was dropped
        index.save_vectors()
        if again and reindex is not None:
            done.reindexed = reindex(again)
    return done
