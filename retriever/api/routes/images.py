"""Indexed images: metadata, listing, thumbnails, the original files, and removal from the index."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Query, Response, status
from fastapi.responses import FileResponse

from .. import service
from ..deps import RuntimeDep, WriterDep
from ..errors import error_responses
from ..schemas import MAX_ID, ImagePublic, ImagesPublic
from ..thumbnails import thumbnail

router = APIRouter(prefix="/images", tags=["images"])

ImageId = Annotated[int, Path(ge=1, le=MAX_ID, description="The image's id, as search results give it.")]


@router.get("", response_model=ImagesPublic, responses=error_responses(422, 503))
def list_images(
    runtime: RuntimeDep,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> ImagesPublic:
    """Indexed images in id order, a page at a time."""
    data, count = service.list_images(runtime.reader, offset, limit)
    return ImagesPublic(data=data, count=count)


@router.get("/{image_id}", response_model=ImagePublic, responses=error_responses(404, 422, 503))
def get_image(runtime: RuntimeDep, image_id: ImageId) -> ImagePublic:
    """An indexed image's metadata."""
    return service.image_public(service.get_image(runtime.reader, image_id))


@router.get(
    "/{image_id}/thumbnail",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/jpeg": {"schema": {"type": "string", "format": "binary"}}}},
        **error_responses(404, 422, 503),
    },
)
def get_thumbnail(
    runtime: RuntimeDep,
    image_id: ImageId,
    size: Annotated[int, Query(ge=32, le=1024, description="Longest side in pixels.")] = 256,
) -> FileResponse:
    """A JPEG thumbnail of the image (cached in the index dir after the first request)."""
    record = service.get_image(runtime.reader, image_id)
    source = service.existing_file(record, service.served_roots(runtime))
    path = thumbnail(runtime.settings.index_dir, record, size, source)
    return FileResponse(path, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})


@router.get(
    "/{image_id}/file",
    response_class=FileResponse,
    responses={
        200: {"content": {"image/*": {"schema": {"type": "string", "format": "binary"}}}},
        **error_responses(404, 422, 503),
    },
)
def get_file(runtime: RuntimeDep, image_id: ImageId) -> FileResponse:
    """The original image file, from the path the index recorded for this id."""
    path = service.existing_file(service.get_image(runtime.reader, image_id), service.served_roots(runtime))
    return FileResponse(path, filename=path.name, content_disposition_type="inline")


@router.delete(
    "/{image_id}",
    status_code=status.HTTP_204_NO_CONTENT,
    response_class=Response,
    dependencies=[WriterDep],
    responses=error_responses(401, 404, 409, 422, 503),
)
def delete_image(runtime: RuntimeDep, image_id: ImageId) -> None:
    """Remove an image from the index (not its file); re-indexing its folder finds it again."""
    service.delete_image(runtime, image_id)
