"""The API's routes, one module per resource."""

from __future__ import annotations

from fastapi import APIRouter

from . import images, indexing, search, system, texts

api_router = APIRouter(prefix="/v1")
api_router.include_router(system.router)
api_router.include_router(search.router)
api_router.include_router(images.router)
api_router.include_router(indexing.router)
api_router.include_router(texts.router)

__all__ = ["api_router"]
