"""Recall@K for image-text retrieval, as reported by the ViLT, ALBEF and BLIP papers.

- Text retrieval (TR, image -> text): the share of images for which at least one of their
  captions ranks in the top K of all T captions.
- Image retrieval (IR, text -> image): the share of captions whose image ranks in the top K
  of all I images.

Ties are broken against the ground truth. The rank of a query's answer is the number of
wrong candidates whose score is greater than **or equal to** the best score of a right one
(0 = first); the query is a hit at K when that rank is below K. So a model that gives every
candidate the same score gets 0, not 100, and the result never depends on sort stability
(ALBEF's `argsort` leaves ties to the sort). Without ties the two agree exactly. Several right
captions of one image never push each other down. Unscored pairs may be given `-inf`: an
answer scored `-inf` ranks after every finite score and ties with the other `-inf` ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from retriever.errors import RetrieverError

__all__ = ["MetricsError", "RecallResult", "image_ranks", "recall_at_k", "text_ranks"]

# Rows per chunk are chosen so that a chunk holds about this many scores (32 MB as float64).
_CHUNK_ELEMENTS = 1 << 22


class MetricsError(RetrieverError, ValueError):
    """Score matrices and caption-image assignments that do not fit together."""


@dataclass(frozen=True)
class RecallResult:
    """Recall@1/5/10 in percent for text retrieval (tr_*) and image retrieval (ir_*)."""

    tr_r1: float
    tr_r5: float
    tr_r10: float
    ir_r1: float
    ir_r5: float
    ir_r10: float

    @property
    def rsum(self) -> float:
        """The sum of the six recalls (600 is perfect)."""
        return self.tr_r1 + self.tr_r5 + self.tr_r10 + self.ir_r1 + self.ir_r5 + self.ir_r10

    def as_dict(self) -> dict[str, float]:
        """The six recalls and `rsum`, keyed `tr_r1` ... `ir_r10`, `rsum`."""
        return {
            "tr_r1": self.tr_r1,
            "tr_r5": self.tr_r5,
            "tr_r10": self.tr_r10,
            "ir_r1": self.ir_r1,
            "ir_r5": self.ir_r5,
            "ir_r10": self.ir_r10,
            "rsum": self.rsum,
        }


def recall_at_k(
    scores_t2i: npt.ArrayLike,
    text_image: npt.ArrayLike,
    scores_i2t: npt.ArrayLike | None = None,
    *,
    chunk_rows: int | None = None,
) -> RecallResult:
    """Recall@1, 5 and 10 for both directions, in percent.

    `scores_t2i` is T x I (a row per caption, a column per image), `text_image` gives each
    caption's image index (length T), and `scores_i2t` is I x T, defaulting to `scores_t2i.T`
    (pass it when the two directions are scored differently, e.g. reranked separately).
    Scores may be `-inf` for unscored pairs, never NaN. Rows are processed `chunk_rows` at a
    time (default: about 4 M scores per chunk). For other cut-offs use `text_ranks` and
    `image_ranks`. Raises MetricsError for inconsistent shapes or assignments.
    """
    t2i = _as_scores(scores_t2i, "scores_t2i")
    i2t = t2i.T if scores_i2t is None else _as_scores(scores_i2t, "scores_i2t")
    if i2t.shape != t2i.shape[::-1]:
        raise MetricsError(f"scores_i2t has shape {i2t.shape}; expected {t2i.shape[::-1]} (I x T)")
    tr = text_ranks(i2t, text_image, chunk_rows=chunk_rows)
    ir = image_ranks(t2i, text_image, chunk_rows=chunk_rows)
    return RecallResult(
        tr_r1=_recall(tr, 1),
        tr_r5=_recall(tr, 5),
        tr_r10=_recall(tr, 10),
        ir_r1=_recall(ir, 1),
        ir_r5=_recall(ir, 5),
        ir_r10=_recall(ir, 10),
    )


def image_ranks(
    scores_t2i: npt.ArrayLike, text_image: npt.ArrayLike, *, chunk_rows: int | None = None
) -> npt.NDArray[np.int64]:
    """For each caption, the rank (0 = first) of its image among all images, ties counted against it.

    `scores_t2i` is T x I. Returns int64 of length T; Recall@K is the share below K.
    """
    scores = _as_scores(scores_t2i, "scores_t2i")
    n_texts, n_images = scores.shape
    owner = _as_text_image(text_image, n_texts, n_images)
    rows = _rows_per_chunk(n_images, chunk_rows)
    ranks = np.empty(n_texts, dtype=np.int64)
    for start in range(0, n_texts, rows):
        stop = min(start + rows, n_texts)
        chunk = _checked(scores[start:stop], "scores_t2i")
        truth = chunk[np.arange(stop - start), owner[start:stop]]
        # Minus one for the right image itself, which always ties with its own score.
        ranks[start:stop] = (chunk >= truth[:, None]).sum(axis=1) - 1
    return ranks


def text_ranks(
    scores_i2t: npt.ArrayLike, text_image: npt.ArrayLike, *, chunk_rows: int | None = None
) -> npt.NDArray[np.int64]:
    """For each image, the rank (0 = first) of its best-scored caption among all captions.

    `scores_i2t` is I x T. The rank counts the other images' captions scored at least as high
    as the image's best caption; its own captions never count. Returns int64 of length I.
    """
    scores = _as_scores(scores_i2t, "scores_i2t")
    n_images, n_texts = scores.shape
    owner = _as_text_image(text_image, n_texts, n_images)
    rows = _rows_per_chunk(n_texts, chunk_rows)
    ranks = np.empty(n_images, dtype=np.int64)
    for start in range(0, n_images, rows):
        stop = min(start + rows, n_images)
        chunk = _checked(scores[start:stop], "scores_i2t")
        own = owner[None, :] == np.arange(start, stop)[:, None]
        best = np.where(own, chunk, -np.inf).max(axis=1)
        ranks[start:stop] = ((chunk >= best[:, None]) & ~own).sum(axis=1)
    return ranks


def _recall(ranks: npt.NDArray[np.int64], k: int) -> float:
    return float(100.0 * np.count_nonzero(ranks < k) / ranks.size)


def _as_scores(scores: npt.ArrayLike, name: str) -> npt.NDArray[np.floating]:
    array = np.asarray(scores)
    if array.ndim != 2 or 0 in array.shape:
        raise MetricsError(f"{name} must be a non-empty 2-D matrix, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.floating):
        if not np.issubdtype(array.dtype, np.number) or np.issubdtype(array.dtype, np.complexfloating):
            raise MetricsError(f"{name} must hold real numbers, not {array.dtype}")
        array = array.astype(np.float64)
    return array


def _as_text_image(text_image: npt.ArrayLike, n_texts: int, n_images: int) -> npt.NDArray[np.int64]:
    owner = np.asarray(text_image)
    if owner.ndim != 1 or owner.shape[0] != n_texts:
        raise MetricsError(f"text_image must have one entry per caption ({n_texts}), got shape {owner.shape}")
    if not np.issubdtype(owner.dtype, np.integer):
        raise MetricsError(f"text_image must hold integers, not {owner.dtype}")
    if owner.min() < 0 or owner.max() >= n_images:
        raise MetricsError(f"text_image holds image indices outside 0..{n_images - 1}")
    counts = np.bincount(owner, minlength=n_images)
    if not counts.all():
        missing = int(np.flatnonzero(counts == 0)[0])
        raise MetricsError(f"image {missing} has no caption; text retrieval is undefined for it")
    return owner.astype(np.int64, copy=False)


def _rows_per_chunk(n_columns: int, chunk_rows: int | None) -> int:
    if chunk_rows is None:
        return max(1, _CHUNK_ELEMENTS // n_columns)
    if chunk_rows < 1:
        raise MetricsError(f"chunk_rows must be positive, not {chunk_rows}")
    return chunk_rows


def _checked(chunk: npt.NDArray[np.floating], name: str) -> npt.NDArray[np.floating]:
    if np.isnan(chunk).any():
        raise MetricsError(f"{name} contains NaN")
    return chunk
