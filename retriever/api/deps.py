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


def _wrong_key() -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        "this endpoint needs the server's API key, in the X-API-Key header or as Authorization: Bearer",
        headers={"WWW-Authenticate": "Bearer"},
    )


def _holds_key(
    settings: Settings, api_key: str | None, bearer: HTTPAuthorizationCredentials | None
) -> bool | None:
    """True when a given key is the server's, False when one was given and none is, None when none was."""
    assert settings.api_key is not None
    given = [key for key in (api_key, bearer.credentials if bearer is not None else None) if key is not None]
    if not given:
        return None
    expected = settings.api_key.encode()
    return any(secrets.compare_digest(key.encode(), expected) for key in given)


def require_api_key(
    settings: SettingsDep,
    api_key: Annotated[str | None, Security(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> None:
    """Let a writing request through only with the configured API key (when one is configured)."""
    if settings.api_key is None:
        return
    if not _holds_key(settings, api_key, bearer):
        raise _wrong_key()


WriterDep = Depends(require_api_key)


def is_key_holder(
    settings: SettingsDep,
    api_key: Annotated[str | None, Security(_api_key_header)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> bool:
    """Whether the request proves it comes from the operator: it carries the server's API key.

    Never when the server has no key (nothing to prove it with). A key that is given but wrong is refused
    with 401 rather than quietly ignored, so a client with a stale key finds out.
    """
    if settings.api_key is None:
        return False
    holds = _holds_key(settings, api_key, bearer)
    if holds is False:
        raise _wrong_key()
    return holds is True


KeyHolderDep = Annotated[bool, Depends(is_key_holder)]
#: OpenAPI security of an operation where the key is optional: any of the schemes, or none (``{}``).
OPTIONAL_KEY: dict[str, object] = {"security": [{}]}
