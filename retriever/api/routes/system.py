"""Health and status of the server and its index."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter

from ..deps import OPTIONAL_KEY, KeyHolderDep, RuntimeDep
from ..errors import error_responses
from ..schemas import Health, StatusPublic

router = APIRouter(tags=["system"])
# /health sits outside /v1: load balancers and container health checks probe it.
health_router = APIRouter(tags=["system"])


@health_router.get("/health", response_model=Health, responses=error_responses(503))
def health(runtime: RuntimeDep) -> Health:
    """Whether the models are loaded (searches answer 503 until then), and how much is indexed."""
    state: Literal["loading", "ok", "error"]
    if runtime.models is not None:
        state = "ok"
    elif runtime.load_error is not None:
        state = "error"
    else:
        state = "loading"
    store = runtime.reader.store
    return Health(
        status=state,
        loading=list(runtime.loading),
        images=store.count_images(),
        texts=store.count_texts(),
        error=runtime.load_error,
    )


@router.get(
    "/status", response_model=StatusPublic, responses=error_responses(401, 503), openapi_extra=OPTIONAL_KEY
)
def index_status(runtime: RuntimeDep, key_holder: KeyHolderDep) -> StatusPublic:
    """Counts, models and sizes of the index: the facts of ``retriever status --json``.

    The index directory and the database URL only for requests with the server's API key (a wrong key is
    401); without one, and always when the server has no key, they are null.
    """
    status = StatusPublic.model_validate(runtime.reader.status())
    if key_holder:
        return status
    return status.model_copy(update={"index_dir": None, "database": None})
