"""The caption collection that image→text searches rank."""

from __future__ import annotations

from fastapi import APIRouter

from .. import service
from ..deps import ModelsDep, RuntimeDep, WriterDep
from ..errors import error_responses
from ..schemas import TextsAdded, TextsCreate

router = APIRouter(prefix="/texts", tags=["texts"])


@router.post(
    "",
    response_model=TextsAdded,
    dependencies=[WriterDep],
    responses=error_responses(400, 401, 409, 422, 503),
)
def add_texts(runtime: RuntimeDep, models: ModelsDep, body: TextsCreate) -> TextsAdded:
    """Add captions; a caption whose ``id`` exists already replaces it."""
    added, count = service.add_texts(runtime, models, body.texts)
    return TextsAdded(added=added, count=count)
