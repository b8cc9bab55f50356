"""The index stage: find images under a folder, decode each once, encode and store what search needs."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .errors import ImageDecodeError
from .images import DEFAULT_MAX_PIXELS, DecodedImage, iter_image_files, read_and_decode
from .index.store import Encoded, FileState, ImageBatch, NewImage
from .search_index import ModelInfo, SearchIndex

if TYPE_CHECKING:  # the model types only: planning a run (plan_index) must not load torch
    from .encoders import DualEncoder
    from .rerank import Reranker


@dataclass
class IndexReport:
    """What an index run did."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    reused: int = 0
    repaired: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, object]:
        """JSON-friendly form."""
        return {
            "added": self.added,
            "updated": self.updated,
            "removed": self.removed,
            "unchanged": self.unchanged,
            "reused": self.reused,
            "repaired": self.repaired,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "seconds": round(self.seconds, 3),
        }


@dataclass(frozen=True)
class Progress:
    """One step of an index run, for a progress display."""

    done: int
    total: int
    path: str | None = None
    skipped: tuple[str, str] | None = None


ProgressFn = Callable[[Progress], None]


def model_info(prefilter: DualEncoder, reranker: Reranker) -> ModelInfo:
    """What the index records about the models that build it."""
    return ModelInfo(
        prefilter=prefilter.name,
        prefilter_fingerprint=prefilter.fingerprint,
        dim=prefilter.dim,
        reranker=reranker.name,
        reranker_fingerprint=reranker.fingerprint,
        hidden=reranker.hidden,
    )


@dataclass(frozen=True)
class _Pending:
    path: Path
    size: int
    mtime: float
    replace_id: int | None


@dataclass(frozen=True)
class _Read:
    pending: _Pending
    content_hash: str
    decoded: DecodedImage | None
    error: str | None


def _read(p: _Pending, known_hashes: set[str], max_pixels: int, draft_size: int | None) -> _Read:
    try:
        data, decoded = read_and_decode(p.path, max_pixels=max_pixels, draft_size=draft_size)
    except ImageDecodeError as exc:
        return _Read(p, "", None, str(exc))
    digest = hashlib.sha256(data).hexdigest()
    # Known content needs no pixels; drop them early to keep memory flat.
    return _Read(p, digest, None if digest in known_hashes else decoded, None)


def _batches(items: Sequence[_Pending], size: int) -> Iterator[Sequence[_Pending]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


@dataclass
class IndexPlan:
    """What an index run would do, found without any model: files to encode, rows to remove."""

    pending: list[_Pending] = field(default_factory=list)
    gone: list[int] = field(default_factory=list)
    unchanged: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    linked: list[Path] = field(default_factory=list)

    @property
    def nothing_to_do(self) -> bool:
        """True when no file is new or changed and none is gone."""
        return not self.pending and not self.gone


def plan_index(
    search_index: SearchIndex,
    root: Path,
    *,
    within: Sequence[Path] | None = None,
    on_skip: Callable[[str, str], None] | None = None,
) -> IndexPlan:
    """Compare the files under ``root`` (a folder, or one file) with the index, reading no image.

    Under a folder, rows whose files are no longer there are gone; for one file, nothing else is.
    """
    plan = IndexPlan()
    root = root.expanduser().resolve()

    def skip(path: str, reason: str) -> None:
        plan.skipped.append((path, reason))
        if on_skip is not None:
            on_skip(path, reason)

    files = list(iter_image_files(root, within=within, on_skip=skip, linked=plan.linked))
    if root.is_dir():
        known = search_index.store.file_states(under=str(root))
    else:
        known = search_index.store.file_states(path=str(root))
    for path in files:
        try:
            st = path.stat()
        except OSError as exc:
            skip(str(path), f"unreadable: {exc.strerror or exc}")
            continue
        state: FileState | None = known.get(str(path))
        if state is not None and state.size == st.st_size and state.mtime == st.st_mtime:
            plan.unchanged += 1
            continue
        plan.pending.append(_Pending(path, st.st_size, st.st_mtime, state.id if state else None))
    seen = {str(p) for p in files}
    plan.gone = [s.id for path, s in known.items() if path not in seen]
    return plan


def index_folder(
    search_index: SearchIndex,
    prefilter: DualEncoder,
    reranker: Reranker,
    root: Path,
    *,
    batch_size: int = 16,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = 640,
    rebuild: bool = False,
    within: Sequence[Path] | None = None,
    on_progress: ProgressFn | None = None,
) -> IndexReport:
    """Bring the index up to date with the images under ``root`` (a folder, or one image file).

    Unchanged files (same size and mtime) are not read. Files whose content hash is already indexed
    (renames, duplicates) reuse the stored vectors and tokens. Files gone from the folder are removed;
    a single file is added or updated and nothing else is touched. Rows whose tokens the patch cache lacks
    (a cache cut short or deleted) are dropped first, so their files are encoded again. With ``within``
    (a server's roots), files and folders whose real path lies outside those folders are skipped. Each
    batch commits on its own, so an interrupted run keeps what it finished.
    """
    started = time.perf_counter()
    report = IndexReport()
    info = model_info(prefilter, reranker)
    root = root.expanduser().resolve()

    def skip(path: str, reason: str) -> None:
        report.skipped.append((path, reason))
        if on_progress is not None:
            on_progress(Progress(0, 0, path, (path, reason)))

    with search_index.writer():
        if rebuild:
            search_index.reset(info)
        else:
            search_index.check_models(info, record=True)
            report.repaired = len(search_index.drop_images_without_tokens())
        plan = plan_index(search_index, root, within=within, on_skip=skip)
        report.unchanged = plan.unchanged
        pending, gone, linked = plan.pending, plan.gone, plan.linked

        total = len(pending)
        done = 0
        encoded_here: dict[str, Encoded] = {}
        with ThreadPoolExecutor(max_workers=2) as pool:
            for chunk in _batches(pending, batch_size):
                known_hashes = set(encoded_here)
                read = partial(_read, known_hashes=known_hashes, max_pixels=max_pixels, draft_size=draft_size)
                reads = list(pool.map(read, chunk))
                stored = search_index.store.encoded_by_hash(r.content_hash for r in reads if r.error is None)
                stored.update(encoded_here)
                skipped_before = len(report.skipped)
                batch = _encode_batch(search_index, prefilter, reranker, reads, stored, report)
                skipped_now = dict(report.skipped[skipped_before:])
                encoded_here.update(
                    {u.content_hash: u.encoded for u in batch.upserts if u.content_hash not in stored}
                )
                if batch.upserts:
                    search_index.commit(batch, info)
                for r in reads:
                    done += 1
                    if on_progress is not None:
                        name = str(r.pending.path)
                        skipped = (name, skipped_now[name]) if name in skipped_now else None
                        on_progress(Progress(done, total, name, skipped))
        if gone:
            search_index.commit(ImageBatch(deletes=gone), info)
            report.removed = len(gone)
        search_index.save_vectors()
        search_index.record_roots([root, *linked])
    report.seconds = time.perf_counter() - started
    return report


def _encode_batch(
    search_index: SearchIndex,
    prefilter: DualEncoder,
    reranker: Reranker,
    reads: Sequence[_Read],
    stored: dict[str, Encoded],
    report: IndexReport,
) -> ImageBatch:
    batch = ImageBatch()
    fresh: list[tuple[_Read, DecodedImage]] = []
    for r in reads:
        if r.error is not None:
            report.skipped.append((str(r.pending.path), r.error))
        elif r.content_hash in stored:
            report.reused += 1
            batch.upserts.append(_new_image(r, stored[r.content_hash]))
        elif r.decoded is not None:
            fresh.append((r, r.decoded))
        else:
            # Content seen earlier in this run whose encoding is not at hand: decode it after all.
            try:
                _, decoded = read_and_decode(r.pending.path)
            except ImageDecodeError as exc:
                report.skipped.append((str(r.pending.path), str(exc)))
                continue
            fresh.append((r, decoded))
    if fresh:
        # Duplicates inside one batch are encoded once.
        unique: dict[str, DecodedImage] = {}
        for r, decoded in fresh:
            unique.setdefault(r.content_hash, decoded)
        encoded, failed = _encode_isolated(prefilter, reranker, unique)
        extents = search_index.patches().append([tokens for _, tokens in encoded.values()]) if encoded else []
        by_hash = {
            h: Encoded(np.asarray(vec), unique[h].width, unique[h].height, offset, n)
            for (h, (vec, _)), (offset, n) in zip(encoded.items(), extents, strict=True)
        }
        for r, _ in fresh:
            if r.content_hash in failed:
                report.skipped.append((str(r.pending.path), failed[r.content_hash]))
            else:
                batch.upserts.append(_new_image(r, by_hash[r.content_hash]))
    for u in batch.upserts:
        if u.replace_id is None:
            report.added += 1
        else:
            report.updated += 1
    return batch


#: The longest reason an encoding failure leaves in the report: one line, like a decode error's.
_MAX_REASON = 200


def _encode(
    prefilter: DualEncoder, reranker: Reranker, images: Sequence[DecodedImage]
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(prefilter vector, reranker tokens) of each image, the prefilter run as one batch."""
    pictures = [d.image for d in images]
    vectors = prefilter.encode_images(pictures)
    return [(vec, reranker.embed_image(img)) for vec, img in zip(vectors, pictures, strict=True)]


def _encode_isolated(
    prefilter: DualEncoder, reranker: Reranker, images: dict[str, DecodedImage]
) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], dict[str, str]]:
    """Encode images (by content hash) so that one that cannot be encoded costs only itself.

    The batch is encoded at once; if that raises, each image is encoded alone, and one that still fails
    is left out. Returns the (vector, tokens) of each image that encoded, and for each that did not, a
    one-line reason for the report. Any ``Exception`` counts: the models are third-party code that fails
    on odd input with ValueError, RuntimeError, IndexError and more, and letting one through would lose
    the whole batch and stop the run at the same file every time. Nothing is written here, so a failed
    write (disk full) is not mistaken for a bad image.
    """
    hashes = list(images)
    try:
        return dict(zip(hashes, _encode(prefilter, reranker, list(images.values())), strict=True)), {}
    except Exception as exc:
        if len(hashes) == 1:
            return {}, {hashes[0]: _encode_failure(exc)}
    encoded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    failed: dict[str, str] = {}
    for h, decoded in images.items():
        try:
            (encoded[h],) = _encode(prefilter, reranker, [decoded])
        except Exception as exc:
            failed[h] = _encode_failure(exc)
    return encoded, failed


def _encode_failure(exc: Exception) -> str:
    """A report line for an image the models could not encode."""
    lines = str(exc).strip().splitlines()
    detail = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    reason = f"could not be encoded ({detail})"
    return reason if len(reason) <= _MAX_REASON else reason[: _MAX_REASON - 1] + "…"


def _new_image(r: _Read, encoded: Encoded) -> NewImage:
    p = r.pending
    return NewImage(str(p.path), p.size, p.mtime, r.content_hash, encoded, p.replace_id)
