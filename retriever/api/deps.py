"""Dependencies the routes declare: the server's runtime and settings, loaded models, and the API key."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import Depends, HTTPException, Request, Security, status
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from .runtime import Models, Runtime
from .settings import Settings


def get_runtime(request: Request) -> Runtime:
    """The runtime the app's lifespan started."""
    runtime: Runtime = request.app.state.runtime
    return runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def get_settings(runtime: RuntimeDep) -> Settings:
    """The settings the app was created with."""
    return runtime.settings


SettingsDep = Annotated[Settings, Depends(get_settings)]


def get_models(runtime: RuntimeDep) -> Models:
    """The loaded models; 503 (with Retry-After while they are still loading) until they are."""
    models = runtime.models
    if models is not None:
        return models
    if runtime.load_error is not None:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, f"the models could not be loaded: {runtime.load_error}"
        )
    raise HTTPException(
        status.HTTP_503_SERVICE_UNAVAILABLE,
        "the models are still loading; try again shortly",
        headers={"Retry-After": str(runtime.settings.retry_after_s)},
    )


ModelsDep = Annotated[Models, Depends(get_models)]

_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="The server's API key.")
_bearer = HTTPBearer(auto_error=False, description="The server's API key as a bearer token.")


def require_api_key(
    settings: SettingsDep,
    api_key: Annotated[str | None, Security(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """Let a writing request through only with the configured API key (when one is configured)."""
    if settings.api_key is None:
        return
    expected = settings.api_key.encode()
    for given in (api_key, bearer.credentials if bearer is not None else None):
        if given is not None and secrets.compare_digest(given.encode(), expected):
            return
    raise HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        "this endpoint needs the server's API key, in the X-API-Key header or as Authorization: Bearer",
        headers={"WWW-Authenticate": "Bearer"},
    )


WriterDep = Depends(require_api_key)
