"""The API's request and response bodies (separate from the database tables in ``retriever.index.schema``)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: The largest image id the store can hold (a 32-bit integer column on PostgreSQL).
MAX_ID = 2**31 - 1
#: A JSON Schema ``pattern`` for text that is not blank: it holds a character that ``str.split`` and
#: ``str.strip`` do not take for whitespace. Spelled out because ``\s`` means other characters in Python,
#: in JavaScript (which JSON Schema's patterns follow) and in Rust; the validators do the checking, this
#: only says in the schema what they accept.
NOT_BLANK = r"[^\t\n\v\f\r \x1c-\x1f\x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"
#: A JSON Schema ``pattern`` for text without NUL characters (which no file path holds).
NO_NUL = r"^[^\x00]*$"


class ErrorResponse(BaseModel):
    """Every error: a human-readable reason."""

    detail: str


# -- health and status --------------------------------------------------------------------------------


class Health(BaseModel):
    """Whether the server can search yet, and how much it holds."""

    status: Literal["loading", "ok", "error"] = Field(
        description="loading: models are still loading (searches answer 503); ok: ready; "
        "error: the models could not be loaded (see error)."
    )
    loading: list[Literal["prefilter", "reranker"]] = Field(description="Models still loading.")
    images: int
    texts: int
    error: str | None = None


class ModelsPublic(BaseModel):
    """The models an index was built with."""

    prefilter: str
    dim: int
    reranker: str


#: Where the paths of ``StatusPublic`` are shown.
_OPERATOR_ONLY = (
    " Only for requests with the server's API key; null without it, and always when the server has no key."
)


class StatusPublic(BaseModel):
    """Counts, models and sizes of the index, as ``retriever status --json`` reports them.

    The index directory and the database URL say where the server keeps its data, so they are shown only
    to the holder of the API key.
    """

    index_dir: str | None = Field(default=None, description="The index directory." + _OPERATOR_ONLY)
    database: str | None = Field(
        default=None, description="The metadata database's URL, password hidden." + _OPERATOR_ONLY
    )
    images: int
    texts: int
    models: ModelsPublic | None
    disk_bytes: int
    database_bytes: int | None
    patch_cache_bytes: int
    cache_bytes_per_image: int
    schema_version: int


# -- search -------------------------------------------------------------------------------------------


_SCORE = (
    "What hits are ranked by: after a rerank, the ITM logit plus the prefilter's logit (its learned scale "
    "times the cosine), or the ITM logit alone with itm_only; without a rerank, the prefilter cosine."
)
_RERANK_SCORE = "The ViLT image-text matching logit; null when the hit was not reranked."
_PREFILTER_SCORE = "The prefilter's (CLIP's) cosine similarity of query and hit."


class ImageHit(BaseModel):
    """One image found, with the score it is ranked by and the two scores that make it up."""

    rank: int
    id: int
    path: str
    filename: str
    score: float = Field(description=_SCORE)
    prefilter_score: float = Field(description=_PREFILTER_SCORE)
    rerank_score: float | None = Field(description=_RERANK_SCORE)


class TextHit(BaseModel):
    """One caption found. ``id`` is the caption's own id when it was given one, else its number."""

    rank: int
    id: str
    text: str
    score: float = Field(description=_SCORE)
    prefilter_score: float = Field(description=_PREFILTER_SCORE)
    rerank_score: float | None = Field(description=_RERANK_SCORE)


class _SearchResponse(BaseModel):
    query: str = Field(description="The query as searched (whitespace collapsed), or the upload's file name.")
    count: int
    seconds: dict[str, float] = Field(description="Seconds per stage, and their total.")


class ImageSearchResponse(_SearchResponse):
    """Ranked images, and the seconds each stage took."""

    target: Literal["images"] = "images"
    data: list[ImageHit]


class TextSearchResponse(_SearchResponse):
    """Ranked captions, and the seconds each stage took."""

    target: Literal["texts"] = "texts"
    data: list[TextHit]


ImageQueryResponse = Annotated[ImageSearchResponse | TextSearchResponse, Field(discriminator="target")]


# -- images -------------------------------------------------------------------------------------------


class ImagePublic(BaseModel):
    """An indexed image's metadata."""

    id: int
    path: str
    filename: str
    size: int = Field(description="Bytes of the file when it was indexed.")
    mtime: float = Field(description="Modification time of the file when it was indexed (Unix seconds).")
    width: int
    height: int
    content_hash: str
    indexed_at: datetime
    prefilter_model: str
    reranker_model: str


class ImagesPublic(BaseModel):
    """A page of indexed images, and how many there are in all."""

    data: list[ImagePublic]
    count: int


# -- indexing jobs ------------------------------------------------------------------------------------


class IndexRequest(BaseModel):
    """A folder (or one image file) to index; relative paths are taken from the first configured root."""

    model_config = ConfigDict(extra="forbid")

    path: str = Field(min_length=1, max_length=4096, json_schema_extra={"pattern": NO_NUL})

    @field_validator("path")
    @classmethod
    def _no_nul(cls, value: str) -> str:
        if "\0" in value:
            raise ValueError("the path must not contain NUL characters")
        return value


class SkippedFile(BaseModel):
    """A file an index run could not use, and why."""

    path: str
    reason: str


class IndexReportPublic(BaseModel):
    """What a finished index run did."""

    added: int
    updated: int
    removed: int
    unchanged: int
    reused: int
    skipped: list[SkippedFile]
    seconds: float


class JobPublic(BaseModel):
    """An index job: queued, running (with progress), done (with a report) or failed (with an error)."""

    id: str
    state: Literal["queued", "running", "done", "failed"]
    path: str
    done: int
    total: int
    report: IndexReportPublic | None
    error: str | None
    created_at: datetime
    finished_at: datetime | None


# -- captions -----------------------------------------------------------------------------------------


class TextCreate(BaseModel):
    """One caption; one with an ``id`` that exists already replaces that caption."""

    model_config = ConfigDict(extra="forbid")

    text: str = Field(min_length=1, max_length=10_000, json_schema_extra={"pattern": NOT_BLANK})
    id: str | None = Field(default=None, min_length=1, max_length=512)

    @field_validator("text")
    @classmethod
    def _not_blank(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("the text is empty")
        return value


class TextsCreate(BaseModel):
    """Captions to add to the collection that image→text searches rank."""

    model_config = ConfigDict(extra="forbid")

    texts: list[TextCreate] = Field(min_length=1, max_length=10_000)


class TextsAdded(BaseModel):
    """How many captions were written, and how many the collection holds now."""

    added: int
    count: int
