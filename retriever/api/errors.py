"""Errors as HTTP answers: project exceptions mapped to statuses, every body ``{"detail": str}``."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from retriever.errors import (
    BadQueryError,
    DatabaseFailureError,
    ImageDecodeError,
    IndexDamagedError,
    IndexLockedError,
    IndexMismatchError,
    ModelMismatchError,
    NotFoundError,
    ResourceError,
    RetrieverError,
)

from .schemas import ErrorResponse

log = logging.getLogger(__name__)


class OutsideRootsError(RetrieverError):
    """A path the server was asked to index lies outside the folders it may index (or none are set)."""


#: Status of each project error; the first matching class in this order wins, RetrieverError last.
STATUS_OF: tuple[tuple[type[RetrieverError], int], ...] = (
    (BadQueryError, 422),
    (ImageDecodeError, 422),
    (OutsideRootsError, 403),
    (NotFoundError, 404),
    (IndexLockedError, 409),
    (ModelMismatchError, 409),
    (IndexDamagedError, 503),
    (IndexMismatchError, 503),
    (DatabaseFailureError, 503),
    (ResourceError, 503),
    (RetrieverError, 400),
)

_DESCRIPTIONS = {
    400: "The request body cannot be parsed (not UTF-8, say), or the request cannot be carried out on this "
    "index.",
    401: "The API key is missing or wrong.",
    403: "The path is outside the folders this server may index, or indexing over the API is off.",
    404: "No such image, job or path.",
    409: "Another writer holds the index, or the index was built with other models.",
    413: "The upload is larger than the server accepts (bytes or pixels).",
    422: "The request is not valid: a parameter out of range, an empty query, an unreadable image.",
    503: "The models are still loading (see Retry-After) or could not be loaded, or the index is damaged, "
    "or the database or disk is unavailable; the detail says which and how to repair it.",
}


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for these error statuses, each with the ``{"detail": str}`` body."""
    return {code: {"model": ErrorResponse, "description": _DESCRIPTIONS[code]} for code in codes}


def status_of(exc: RetrieverError) -> int:
    """The HTTP status a project error maps to."""
    return next(code for cls, code in STATUS_OF if isinstance(exc, cls))


def _json(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for error in exc.errors():
        # The first element of loc is where the value came from (query, path, body); the rest names it.
        where = ".".join(str(p) for p in error.get("loc", ())[1:])
        message = str(error.get("msg", "invalid value"))
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts) or "invalid request"


async def _retriever_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RetrieverError)  # registered for RetrieverError only
    return _json(status_of(exc), str(exc))


async def _validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return _json(422, _validation_message(exc))


async def _http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return _json(exc.status_code, str(exc.detail), dict(exc.headers or {}))


async def _database_error(_request: Request, exc: Exception) -> JSONResponse:
    # Looked up before the RetrieverError handler (the most specific class wins): a failing database is
    # the operator's to fix, and the client's to retry, so it says so and comes with Retry-After.
    assert isinstance(exc, DatabaseFailureError)
    reason = exc.reason
    log.error("database error: %s", reason)
    return _json(503, f"the database is unavailable ({reason}); try again later", {"Retry-After": "10"})


async def _os_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, OSError)
    # A full disk or a permission problem in the index folder (thumbnails, FAISS files): the server
    # stays up and says what the operator must fix; nothing already indexed is lost.
    log.error("file system error: %s", exc)
    where = f" ({exc.filename})" if exc.filename else ""
    return _json(503, f"the server cannot read or write its files: {exc.strerror or exc}{where}")


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error with a JSON ``{"detail": str}`` body and its status."""
    app.add_exception_handler(RetrieverError, _retriever_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(DatabaseFailureError, _database_error)
    app.add_exception_handler(OSError, _os_error)
