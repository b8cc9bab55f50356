"""Exact fakes of the two models, so ranking and fusion are tested without loading any model.

``FakeEncoder`` is a ``retriever.encoders.DualEncoder`` whose vectors are exactly the ones it was given
(keyed by the text, or by the image's pixels), with a known ``logit_scale``. ``FakeReranker`` is a
``retriever.rerank.Reranker`` whose ITM logits come from a table keyed by (text, image key); the visual
tokens it makes carry the image's key through the patch cache, so a search that loads the cached tokens
of image X and asks about them is answered with the table's logit for X, and the reranker records which
(text, image) pairs it was asked about.

Both work with the real pipeline end to end: ``retriever.indexing.index_folder`` encodes image files with
them (the decoded pixels of a lossless file give the same key as the image that was written), and
``retriever.search`` ranks with them. Neither imports torch.

A test that wants exact cosines gives vectors whose dot products are exact in float32 (for example
``c * e_0 + sqrt(1 - c**2) * e_j`` with a dyadic ``c`` against the query ``e_0``), and logits that are
exact too (multiples of 1/4 with a ``logit_scale`` of 10), so that ties are real ties in the code's
float32 arithmetic as in the test's reference.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image

if TYPE_CHECKING:  # the protocols only: the fakes stay torch-free at run time
    from retriever.encoders import DualEncoder
    from retriever.rerank import Reranker

#: How far from 1 the norm of a given vector may be (the prefilter's outputs are L2-normalized).
UNIT_TOLERANCE = 1e-6
#: Token tags are small integers so that they survive the patch cache's float16 exactly.
MAX_TAG = 2048

ImageOrKey = Image.Image | str
ProgressFn = Callable[[int, int], None]


def image_key(image: Image.Image) -> str:
    """The key of an image: a digest of its RGB pixels and size (the same after a lossless round trip)."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.sha256(f"{rgb.size[0]}x{rgb.size[1]}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()[:16]


def key_of(image: ImageOrKey) -> str:
    """``image_key`` of an image; a string is taken to be a key already."""
    return image if isinstance(image, str) else image_key(image)


def solid_image(n: int, size: tuple[int, int] = (4, 4)) -> Image.Image:
    """A distinct small RGB image for each ``n`` in [0, 2**24): one colour, ``n`` in its channels."""
    if not 0 <= n < 1 << 24:
        raise ValueError(f"n must be in [0, 2**24), got {n}")
    return Image.new("RGB", size, (n & 0xFF, (n >> 8) & 0xFF, (n >> 16) & 0xFF))


def derived_vector(key: str, dim: int) -> np.ndarray:
    """A unit float32 vector that depends only on ``key`` and ``dim``."""
    seed = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    x = np.random.default_rng(seed).standard_normal(dim)
    out: np.ndarray = (x / np.linalg.norm(x)).astype(np.float32)
    return out


def unit_vector(values: npt.ArrayLike, dim: int) -> np.ndarray:
    """``values`` as a read-only float32 vector of ``dim`` entries, checked to be finite and of norm 1.

    Not normalized here: the vector is kept exactly as given, so a test's reference sees the same bits.
    """
    vec = np.array(values, dtype=np.float32).reshape(-1)
    if vec.shape != (dim,):
        raise ValueError(f"expected a vector of {dim} entries, got shape {vec.shape}")
    norm = float(np.linalg.norm(vec.astype(np.float64)))
    if not np.isfinite(vec).all() or abs(norm - 1.0) > UNIT_TOLERANCE:
        raise ValueError(f"expected a finite unit vector, got norm {norm}")
    vec.flags.writeable = False
    return vec


class FakeEncoder:
    """A ``DualEncoder`` that maps each known text and image to the exact vector it was given.

    ``unknown="error"`` (the default) raises ``KeyError`` for a text or image nobody registered, so a test
    learns when the code encodes something other than it expected (an uncleaned query, another picture);
    ``unknown="derive"`` gives it ``derived_vector`` of its key instead and remembers that. Every call is
    recorded: ``text_calls`` holds the texts of each ``encode_texts`` call, ``image_calls`` the image keys
    of each ``encode_images`` call.
    """

    def __init__(
        self,
        dim: int,
        *,
        logit_scale: float = 10.0,
        name: str = "fake-prefilter",
        fingerprint: str = "fake-prefilter-1",
        unknown: Literal["error", "derive"] = "error",
        texts: Mapping[str, npt.ArrayLike] | None = None,
        images: Mapping[str, npt.ArrayLike] | None = None,
    ) -> None:
        if dim <= 0:
            raise ValueError(f"dim must be positive, got {dim}")
        self.name = name
        self.fingerprint = fingerprint
        self.dim = dim
        self.logit_scale = float(logit_scale)
        self.unknown = unknown
        self.text_vectors: dict[str, np.ndarray] = {}
        self.image_vectors: dict[str, np.ndarray] = {}
        self.text_calls: list[list[str]] = []
        self.image_calls: list[list[str]] = []
        for text, vec in (texts or {}).items():
            self.add_text(text, vec)
        for key, vec in (images or {}).items():
            self.add_image(key, vec)

    def add_text(self, text: str, vector: npt.ArrayLike) -> np.ndarray:
        """Register the vector of ``text`` (a unit vector, kept exactly); returns it."""
        self.text_vectors[text] = unit_vector(vector, self.dim)
        return self.text_vectors[text]

    def add_image(self, image: ImageOrKey, vector: npt.ArrayLike) -> str:
        """Register the vector of an image (or of an image key); returns the key."""
        key = key_of(image)
        self.image_vectors[key] = unit_vector(vector, self.dim)
        return key

    def text_vector(self, text: str) -> np.ndarray:
        """The vector ``encode_texts`` gives ``text``."""
        return self._lookup(self.text_vectors, text, "text")

    def image_vector(self, image: ImageOrKey) -> np.ndarray:
        """The vector ``encode_images`` gives this image (or image key)."""
        return self._lookup(self.image_vectors, key_of(image), "image")

    def _lookup(self, table: dict[str, np.ndarray], key: str, kind: str) -> np.ndarray:
        if key not in table:
            if self.unknown == "error":
                raise KeyError(f"FakeEncoder has no vector for the {kind} {key!r}")
            table[key] = unit_vector(derived_vector(f"{kind}:{key}", self.dim), self.dim)
        return table[key]

    def _stack(self, vectors: Iterable[np.ndarray]) -> np.ndarray:
        rows = list(vectors)
        if not rows:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.ascontiguousarray(np.stack(rows), dtype=np.float32)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """The registered vectors of ``texts``: (n, dim) float32."""
        self.text_calls.append(list(texts))
        return self._stack(self.text_vector(t) for t in texts)

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """The registered vectors of ``images`` (by pixel key): (n, dim) float32."""
        keys = [image_key(img) for img in images]
        self.image_calls.append(keys)
        return self._stack(self.image_vector(k) for k in keys)


class FakeReranker:
    """A ``Reranker`` whose ITM logit of (text, image) is ``logits[(text, image key)]``.

    ``embed_image`` gives each image key a small integer tag and returns tokens of shape
    (2 + tag % 3, hidden) filled with the tag (token counts differ between images, as ViLT's do, and the
    tag is exact in the float16 patch cache). ``score_pairs`` reads the key back from the tokens: tokens
    this reranker did not make raise ``ValueError``, tokens that are not finite (a damaged cache) give a
    NaN logit as a real model would. A pair missing from the table raises ``KeyError`` unless ``default``
    is set.

    Recorded: ``embedded`` (the key of each ``embed_image`` call, in order) and ``calls`` (the
    (text, image key) pairs of each ``score_pairs`` call, in the order asked); ``asked`` flattens them.
    """

    def __init__(
        self,
        hidden: int = 4,
        *,
        logits: Mapping[tuple[str, str], float] | None = None,
        default: float | None = None,
        name: str = "fake-reranker",
        fingerprint: str = "fake-reranker-1",
    ) -> None:
        if hidden <= 0:
            raise ValueError(f"hidden must be positive, got {hidden}")
        self.name = name
        self.fingerprint = fingerprint
        self.hidden = hidden
        self.default = default
        self.logits: dict[tuple[str, str], float] = dict(logits or {})
        self.embedded: list[str] = []
        self.calls: list[list[tuple[str, str]]] = []
        self._tags: dict[str, int] = {}
        self._keys: dict[int, str] = {}

    @property
    def asked(self) -> list[tuple[str, str]]:
        """Every (text, image key) pair ``score_pairs`` was asked about, over all calls."""
        return [pair for call in self.calls for pair in call]

    def set_logit(self, text: str, image: ImageOrKey, logit: float) -> None:
        """The logit ``score_pairs`` gives (text, image)."""
        self.logits[(text, key_of(image))] = float(logit)

    def logit(self, text: str, image: ImageOrKey) -> float:
        """The logit of (text, image) from the table (or ``default``)."""
        key = (text, key_of(image))
        if key in self.logits:
            return self.logits[key]
        if self.default is not None:
            return self.default
        raise KeyError(f"FakeReranker has no logit for the text {text!r} and the image {key[1]!r}")

    def tag(self, image: ImageOrKey) -> int:
        """The tag of an image (or image key), given on first use."""
        key = key_of(image)
        if key not in self._tags:
            tag = len(self._tags) + 1  # 0 stays free: a zeroed run of the cache is nobody's tokens
            if tag >= MAX_TAG:
                raise ValueError(f"FakeReranker tells at most {MAX_TAG - 1} images apart")
            self._tags[key], self._keys[tag] = tag, key
        return self._tags[key]

    def tokens(self, image: ImageOrKey) -> np.ndarray:
        """The visual tokens ``embed_image`` gives this image (or image key)."""
        tag = self.tag(image)
        return np.full((2 + tag % 3, self.hidden), float(tag), dtype=np.float32)

    def key_of_tokens(self, tokens: np.ndarray) -> str | None:
        """The image key these tokens carry; None when they are not finite."""
        arr = np.asarray(tokens, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.hidden or arr.shape[0] < 1:
            raise ValueError(f"expected (tokens, {self.hidden}) tokens, got {arr.shape}")
        if not np.isfinite(arr).all():
            return None
        tag = float(arr[0, 0])
        if not (arr == tag).all() or int(tag) != tag or int(tag) not in self._keys:
            raise ValueError("tokens that no embed_image of this FakeReranker made")
        return self._keys[int(tag)]

    def embed_image(self, image: Image.Image) -> np.ndarray:
        """Tokens that carry the image's key."""
        key = image_key(image)
        self.embedded.append(key)
        return self.tokens(key)

    def score_pairs(
        self,
        texts: Sequence[str],
        images: Sequence[np.ndarray],
        pairs: Sequence[tuple[int, int]],
        on_progress: ProgressFn | None = None,
    ) -> np.ndarray:
        """The table's logit of each (text index, image index) pair, in the order given."""
        keys = [self.key_of_tokens(tokens) for tokens in images]
        asked: list[tuple[str, str]] = []
        scores = np.empty(len(pairs), dtype=np.float32)
        for n, (t, i) in enumerate(pairs):
            key = keys[i]
            asked.append((texts[t], key if key is not None else "<non-finite tokens>"))
            scores[n] = np.nan if key is None else self.logit(texts[t], key)
        self.calls.append(asked)
        if on_progress is not None and pairs:
            on_progress(len(pairs), len(pairs))
        return scores


if TYPE_CHECKING:

    def _conforms(encoder: FakeEncoder, reranker: FakeReranker) -> tuple[DualEncoder, Reranker]:
        """mypy checks here that the fakes satisfy the protocols search and indexing are typed with."""
        return encoder, reranker
