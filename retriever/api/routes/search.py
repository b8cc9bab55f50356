"""Searches: text→image, image→image and image→text."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Query, UploadFile

from .. import service
from ..deps import ModelsDep, RuntimeDep
from ..errors import error_responses
from ..schemas import NOT_BLANK, ImageQueryResponse, ImageSearchResponse
from ..uploads import decode_upload, read_limited

router = APIRouter(prefix="/search", tags=["search"])

_K_HELP = "How many results to return."
_CANDIDATES_HELP = (
    "How many prefilter candidates the ViLT rerank scores. Default: 20 on a CPU, 100 on a GPU. "
    "Never fewer than k: a search returns k results whenever the index holds that many."
)
_RERANK_HELP = "Rerank the prefilter's candidates with ViLT image-text matching."


@router.get("", response_model=ImageSearchResponse, responses=error_responses(400, 422, 503))
def search_text(
    runtime: RuntimeDep,
    models: ModelsDep,
    q: Annotated[
        str,
        Query(
            min_length=1,
            max_length=1000,
            description="Words to search images for (not only whitespace).",
            json_schema_extra={"pattern": NOT_BLANK},
        ),
    ],
    k: Annotated[int, Query(ge=1, le=100, description=_K_HELP)] = 10,
    candidates: Annotated[int | None, Query(ge=1, le=1000, description=_CANDIDATES_HELP)] = None,
    rerank: Annotated[bool, Query(description=_RERANK_HELP)] = True,
) -> ImageSearchResponse:
    """Text→image: images ranked by how well they match the query."""
    return service.search_images_by_text(runtime, models, q, k, candidates, rerank)


@router.post(
    "/image",
    response_model=ImageQueryResponse,
    responses=error_responses(400, 413, 422, 503),
)
def search_image(
    runtime: RuntimeDep,
    models: ModelsDep,
    file: Annotated[UploadFile, File(description="The query image (JPEG, PNG, WebP, GIF, BMP or TIFF).")],
    target: Annotated[
        Literal["images", "texts"],
        Form(description="images: similar images (prefilter only); texts: matching captions."),
    ] = "images",
    k: Annotated[int, Form(ge=1, le=100, description=_K_HELP)] = 10,
    candidates: Annotated[int | None, Form(ge=1, le=1000, description=_CANDIDATES_HELP)] = None,
    rerank: Annotated[bool, Form(description=_RERANK_HELP + " Captions only.")] = True,
) -> ImageQueryResponse:
    """Image→image (``target=images``) or image→text over the caption collection (``target=texts``)."""
    settings = runtime.settings
    data = read_limited(file.file, settings.max_upload_bytes)
    image = decode_upload(data, settings.max_upload_pixels)
    label = file.filename or "upload"
    if target == "texts":
        return service.search_texts_by_image(runtime, models, image, label, k, candidates, rerank)
    return service.search_images_by_image(runtime, models, image, label, k)
