"""The API's service layer: what the routes do to the index, in API terms (look-ups, listings, searches,
deletes and captions). It calls the index's and the store's methods; it talks no SQL itself."""

from __future__ import annotations

import os
import stat
from datetime import UTC
from pathlib import Path

from PIL import Image

from retriever.captions import caption_id
from retriever.errors import NotFoundError, RetrieverError
from retriever.images import is_inside
from retriever.index.store import ImageRecord
from retriever.indexing import model_info
from retriever.search import SearchResult, clean_query, search_image, search_image_texts, search_text
from retriever.search_index import SearchIndexReader

from .errors import OutsideRootsError
from .jobs import Job
from .runtime import Models, Runtime
from .schemas import (
    ImageHit,
    ImagePublic,
    ImageSearchResponse,
    IndexReportPublic,
    JobPublic,
    TextCreate,
    TextHit,
    TextSearchResponse,
)
from .thumbnails import forget_thumbnails

# -- images -------------------------------------------------------------------------------------------


def image_public(record: ImageRecord) -> ImagePublic:
    """The API form of an image record."""
    return ImagePublic(
        id=record.id,
        path=record.path,
        filename=os.path.basename(record.path),
        size=record.size,
        mtime=record.mtime,
        width=record.width,
        height=record.height,
        content_hash=record.content_hash,
        # The store writes UTC; SQLite hands it back without a zone, which is not an RFC 3339 date-time.
        indexed_at=record.indexed_at
        if record.indexed_at.tzinfo is not None
        else record.indexed_at.replace(tzinfo=UTC),
        prefilter_model=record.prefilter_model,
        reranker_model=record.reranker_model,
    )


def get_image(search_index: SearchIndexReader, image_id: int) -> ImageRecord:
    """The record of an indexed image; ``NotFoundError`` when there is none."""
    record = search_index.store.images([image_id]).get(image_id)
    if record is None:
        raise NotFoundError(f"no image with id {image_id}")
    return record


def served_roots(runtime: Runtime) -> tuple[str, ...]:
    """Real paths of the folders whose files the server may hand out: its ``--root`` folders, or, without
    any, the folders and files `retriever index` was given (with the folders it reached through links)."""
    if runtime.settings.roots:
        return tuple(os.path.realpath(r) for r in runtime.settings.roots)
    return tuple(runtime.reader.roots())


def existing_file(record: ImageRecord, roots: tuple[str, ...]) -> Path:
    """The real path of an indexed image's file, checked now, as it is about to be served.

    Links are resolved again at serve time: the file must still lie inside one of ``roots`` and still be
    the file that was indexed (same size and modification time), so a link or file swapped in after
    indexing is never served. ``NotFoundError`` otherwise, with the reason.
    """
    real = os.path.realpath(record.path)
    if not is_inside(real, roots):
        raise NotFoundError(
            f"the file of image {record.id} is not served: it now leads outside the folders this server "
            "serves (a symbolic link changed after indexing?)"
        )
    try:
        st = os.stat(real)
    except OSError:
        raise NotFoundError(f"the file of image {record.id} is gone: {record.path}") from None
    if not stat.S_ISREG(st.st_mode):
        raise NotFoundError(f"the file of image {record.id} is gone: {record.path}")
    if (st.st_size, st.st_mtime) != (record.size, record.mtime):
        raise NotFoundError(
            f"the file of image {record.id} changed since it was indexed: re-index its folder to serve it"
        )
    return Path(real)


def list_images(search_index: SearchIndexReader, offset: int, limit: int) -> tuple[list[ImagePublic], int]:
    """A page of images in id order, and how many there are in all."""
    page = [image_public(record) for record in search_index.store.image_page(offset, limit)]
    return page, search_index.store.count_images()


def delete_image(runtime: Runtime, image_id: int) -> None:
    """Remove an image from the index (its file stays); ``NotFoundError`` when there is none."""
    with runtime.writing() as search_index:
        info = search_index.models()
        if info is None or search_index.remove_images([image_id], info) == 0:
            raise NotFoundError(f"no image with id {image_id}")
    forget_thumbnails(runtime.settings.index_dir, image_id)


# -- search -------------------------------------------------------------------------------------------


def _seconds(result: SearchResult) -> dict[str, float]:
    seconds = {stage: round(t, 4) for stage, t in result.timings.items()}
    seconds["total"] = round(sum(result.timings.values()), 4)
    return seconds


def _image_response(result: SearchResult) -> ImageSearchResponse:
    hits = [
        ImageHit(
            rank=rank,
            id=h.id,
            path=h.path or "",
            filename=os.path.basename(h.path or ""),
            score=h.score,
            prefilter_score=h.prefilter_score,
            rerank_score=h.rerank_score,
        )
        for rank, h in enumerate(result.hits, start=1)
    ]
    return ImageSearchResponse(query=result.query, data=hits, count=len(hits), seconds=_seconds(result))


def _text_response(result: SearchResult) -> TextSearchResponse:
    hits = [
        TextHit(
            rank=rank,
            id=h.ext_id if h.ext_id is not None else str(h.id),
            text=h.text or "",
            score=h.score,
            prefilter_score=h.prefilter_score,
            rerank_score=h.rerank_score,
        )
        for rank, h in enumerate(result.hits, start=1)
    ]
    return TextSearchResponse(query=result.query, data=hits, count=len(hits), seconds=_seconds(result))


def _same_models(runtime: Runtime, models: Models) -> None:
    """Refuse to search an index that another process rebuilt with other models since the server loaded
    its own: their scores over its tokens would be meaningless (``ModelMismatchError``, a 409)."""
    runtime.reader.check_models(model_info(models.prefilter, models.reranker))


def search_images_by_text(
    runtime: Runtime, models: Models, q: str, k: int, candidates: int | None, rerank: bool
) -> ImageSearchResponse:
    """Text→image search; an index with nothing in it gives no hits."""
    query = clean_query(q)
    if runtime.reader.models() is None:
        return _image_response(SearchResult(query, []))
    _same_models(runtime, models)
    reranker = models.batcher if rerank else None
    n = candidates or models.default_candidates
    return _image_response(search_text(runtime.reader, models.prefilter, reranker, query, k=k, candidates=n))


def search_images_by_image(
    runtime: Runtime, models: Models, image: Image.Image, label: str, k: int
) -> ImageSearchResponse:
    """Image→image search by prefilter similarity."""
    if runtime.reader.models() is None:
        return _image_response(SearchResult(label, []))
    _same_models(runtime, models)
    return _image_response(search_image(runtime.reader, models.prefilter, image, k=k, label=label))


def search_texts_by_image(
    runtime: Runtime,
    models: Models,
    image: Image.Image,
    label: str,
    k: int,
    candidates: int | None,
    rerank: bool,
) -> TextSearchResponse:
    """Image→text search over the caption collection; an empty collection gives no hits."""
    if runtime.reader.models() is None or runtime.reader.store.count_texts() == 0:
        return _text_response(SearchResult(label, []))
    _same_models(runtime, models)
    reranker = models.batcher if rerank else None
    n = candidates or models.default_candidates
    return _text_response(
        search_image_texts(runtime.reader, models.prefilter, reranker, image, k=k, candidates=n, label=label)
    )


# -- captions -----------------------------------------------------------------------------------------


def add_texts(runtime: Runtime, models: Models, texts: list[TextCreate]) -> tuple[int, int]:
    """Encode and store captions; returns how many were written and how many the collection holds.

    A caption without an id is stored under one derived from its text (``captions.caption_id``), as
    `retriever texts add` does, so sending it again replaces it instead of adding a copy.
    """
    vectors = models.prefilter.encode_texts([t.text for t in texts])
    ids = [t.id if t.id is not None else caption_id(" ".join(t.text.split())) for t in texts]
    with runtime.writing() as search_index:
        search_index.check_models(model_info(models.prefilter, models.reranker), record=True)
        added = search_index.commit_texts(
            [(i, t.text, v) for i, t, v in zip(ids, texts, vectors, strict=True)]
        )
        return added, search_index.store.count_texts()


# -- jobs ---------------------------------------------------------------------------------------------


def job_public(job: Job) -> JobPublic:
    """The API form of a job."""
    return JobPublic(
        id=job.id,
        state=job.state,
        path=job.path,
        done=job.done,
        total=job.total,
        report=IndexReportPublic.model_validate(job.report.as_dict()) if job.report is not None else None,
        error=job.error,
        created_at=job.created_at,
        finished_at=job.finished_at,
    )


def resolve_index_path(roots: tuple[Path, ...], path: str) -> Path:
    """The real path of a folder to index, which must lie inside one of ``roots``.

    Symbolic links and ``..`` are resolved first, so neither leads outside a root. A relative path is taken
    from the first root.

    Raises:
        OutsideRootsError: no roots are configured, or the path lies outside all of them.
        NotFoundError: the path is inside a root but does not exist.
    """
    if not roots:
        raise OutsideRootsError(
            "indexing over the API is off: start the server with --root DIR (or RETRIEVER_ROOTS) "
            "to name the folders it may index"
        )
    try:
        real = os.path.realpath(os.path.join(roots[0], path))
    except (OSError, ValueError) as exc:
        raise RetrieverError(f"not a usable path: {exc}") from exc
    if not is_inside(real, [os.path.realpath(root) for root in roots]):
        allowed = ", ".join(str(r) for r in roots)
        raise OutsideRootsError(f"{path} is outside the folders this server may index ({allowed})")
    if not os.path.exists(real):
        raise NotFoundError(f"no such file or folder: {path}")
    return Path(real)
