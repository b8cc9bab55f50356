"""The index stage: find images under a folder, decode each once, encode and store what search needs."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np

from .encoders import DualEncoder
from .errors import ImageDecodeError
from .images import DEFAULT_MAX_PIXELS, DecodedImage, iter_image_files, read_and_decode
from .index.store import Encoded, FileState, ImageBatch, NewImage
from .library import Library, ModelInfo
from .rerank import Reranker


@dataclass
class IndexReport:
    """What an index run did."""

    added: int = 0
    updated: int = 0
    removed: int = 0
    unchanged: int = 0
    reused: int = 0
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


def index_folder(
    library: Library,
    prefilter: DualEncoder,
    reranker: Reranker,
    root: Path,
    *,
    batch_size: int = 16,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_size: int | None = 640,
    rebuild: bool = False,
    on_progress: ProgressFn | None = None,
) -> IndexReport:
    """Bring the index up to date with the images under ``root``.

    Unchanged files (same size and mtime) are not read. Files whose content hash is already indexed
    (renames, duplicates) reuse the stored vectors and tokens. Files gone from ``root`` are removed.
    Each batch commits on its own, so an interrupted run keeps what it finished.
    """
    started = time.perf_counter()
    report = IndexReport()
    info = model_info(prefilter, reranker)
    root = root.expanduser().resolve()
    with library.writer():
        if rebuild:
            library.reset(info)
        else:
            library.check_models(info, record=True)
        files = list(iter_image_files(root))
        known = library.store.file_states(under=str(root) if root.is_dir() else None)
        pending: list[_Pending] = []
        for path in files:
            try:
                st = path.stat()
            except OSError as exc:
                report.skipped.append((str(path), f"unreadable: {exc.strerror or exc}"))
                continue
            state: FileState | None = known.get(str(path))
            if state is not None and state.size == st.st_size and state.mtime == st.st_mtime:
                report.unchanged += 1
                continue
            pending.append(_Pending(path, st.st_size, st.st_mtime, state.id if state else None))
        seen = {str(p) for p in files}
        gone = [s.id for path, s in known.items() if path not in seen]

        total = len(pending)
        done = 0
        encoded_here: dict[str, Encoded] = {}
        with ThreadPoolExecutor(max_workers=2) as pool:
            for chunk in _batches(pending, batch_size):
                known_hashes = set(encoded_here)
                read = partial(_read, known_hashes=known_hashes, max_pixels=max_pixels, draft_size=draft_size)
                reads = list(pool.map(read, chunk))
                stored = library.store.encoded_by_hash(r.content_hash for r in reads if r.error is None)
                stored.update(encoded_here)
                batch = _encode_batch(library, prefilter, reranker, reads, stored, report)
                encoded_here.update(
                    {u.content_hash: u.encoded for u in batch.upserts if u.content_hash not in stored}
                )
                if batch.upserts:
                    library.commit(batch, info)
                for r in reads:
                    done += 1
                    if on_progress is not None:
                        skipped = (str(r.pending.path), r.error) if r.error else None
                        on_progress(Progress(done, total, str(r.pending.path), skipped))
        if gone:
            library.commit(ImageBatch(deletes=gone), info)
            report.removed = len(gone)
        library.save_vectors()
    report.seconds = time.perf_counter() - started
    return report


def _encode_batch(
    library: Library,
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
        images = [d.image for d in unique.values()]
        vectors = prefilter.encode_images(images)
        extents = library.patches().append([reranker.embed_image(img) for img in images])
        by_hash = {
            h: Encoded(np.asarray(vec), d.width, d.height, offset, n)
            for (h, d), vec, (offset, n) in zip(unique.items(), vectors, extents, strict=True)
        }
        for r, _ in fresh:
            batch.upserts.append(_new_image(r, by_hash[r.content_hash]))
    for u in batch.upserts:
        if u.replace_id is None:
            report.added += 1
        else:
            report.updated += 1
    return batch


def _new_image(r: _Read, encoded: Encoded) -> NewImage:
    p = r.pending
    return NewImage(str(p.path), p.size, p.mtime, r.content_hash, encoded, p.replace_id)
