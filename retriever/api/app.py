"""The app factory: ``create_app(settings)`` builds a FastAPI app; its lifespan owns the runtime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from retriever import __version__

from .errors import install_error_handlers
from .middleware import AllowMiddleware, HostCheckMiddleware
from .routes import api_router
from .routes.pages import STATIC_DIR
from .routes.pages import router as pages_router
from .routes.system import health_router
from .runtime import FactoryLoader, ModelLoader, Runtime
from .settings import Settings
from .uploads import BodyLimitMiddleware

#: Room for the multipart framing and form fields around an upload of the largest accepted size.
_BODY_SLACK_BYTES = 64 * 1024


def create_app(settings: Settings, *, loader: ModelLoader | None = None) -> FastAPI:
    """A FastAPI app serving the index of ``settings``.

    Nothing is opened until the app starts (its lifespan): then the index is opened and the models start
    loading on a background thread through ``loader`` (``retriever.factory`` by default; tests pass their
    own). The running state is ``app.state.runtime``.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = Runtime(settings, loader or FactoryLoader())
        app.state.runtime = runtime
        try:
            yield
        finally:
            runtime.close()

    app = FastAPI(
        title="retriever",
        version=__version__,
        summary="Image-text retrieval: a CLIP prefilter and a ViLT image-text-matching rerank.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    # The last one added runs first: the Host is checked before anything else is looked at.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_upload_bytes + _BODY_SLACK_BYTES)
    app.add_middleware(AllowMiddleware, routes=app.router.routes)
    app.add_middleware(HostCheckMiddleware, allowed_hosts=settings.allowed_hosts)
    app.include_router(health_router)
    app.include_router(api_router)
    app.include_router(pages_router)
    if STATIC_DIR.is_dir():
        app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app
