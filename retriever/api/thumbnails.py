"""JPEG thumbnails of indexed images, made once and kept under the index dir's ``thumbs/`` folder."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from PIL import Image

from retriever.images import read_and_decode
from retriever.index.store import ImageRecord

THUMBS_DIR = "thumbs"


def thumbnail_path(home: Path, record: ImageRecord, size: int) -> Path:
    """Where the thumbnail of this record at this size is cached; the content hash keys out stale ones."""
    return home / THUMBS_DIR / f"{record.id}-{size}-{record.content_hash[:16]}.jpg"


def thumbnail(home: Path, record: ImageRecord, size: int, source: Path | None = None) -> Path:
    """The cached thumbnail (longer side ``size``, never enlarged), made now if missing from ``source``
    (the file's real path as checked by the caller; the recorded path by default).

    Raises:
        ImageDecodeError: the original cannot be read or decoded any more.
    """
    path = thumbnail_path(home, record, size)
    if path.exists():
        return path
    # Draft mode lets a JPEG decode at the smallest scale still at least ``size`` on its shorter side.
    image = read_and_decode(source or Path(record.path), draft_size=size)[1].image
    image.thumbnail((size, size), Image.Resampling.LANCZOS)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Written aside and renamed, so a concurrent request never serves half a file.
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="JPEG", quality=85)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def forget_thumbnails(home: Path, image_id: int) -> None:
    """Delete every cached thumbnail of an image."""
    for path in (home / THUMBS_DIR).glob(f"{image_id}-*.jpg"):
        path.unlink(missing_ok=True)
