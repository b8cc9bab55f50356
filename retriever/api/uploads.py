"""Uploaded images: bounded reads and decoding with a pixel limit, and a request body cap for the server."""

from __future__ import annotations

import io
import warnings
from typing import BinaryIO

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from PIL import Image
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The formats decode_image accepts: the header is read by the same Pillow plugins, and no others.
from retriever.images import _PIL_FORMATS, decode_image

_CHUNK = 1 << 20


def _too_large(message: str) -> HTTPException:
    return HTTPException(413, message)


def read_limited(file: BinaryIO, max_bytes: int) -> bytes:
    """Read a whole upload in chunks, stopping with 413 as soon as it passes ``max_bytes``."""
    chunks: list[bytes] = []
    size = 0
    while chunk := file.read(_CHUNK):
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(f"the upload is larger than the limit of {max_bytes:,} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def decode_upload(data: bytes, max_pixels: int) -> Image.Image:
    """An uploaded image as RGB; 413 past ``max_pixels``, ``ImageDecodeError`` when it is no image.

    The pixel count is read from the header first, so an oversized image is refused with 413 before any
    pixels are decoded; whatever else is wrong with the bytes, ``decode_image`` reports.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as img:
                width, height = img.size
        except Image.DecompressionBombError:
            raise _too_large(f"the image has more pixels than the limit of {max_pixels:,}") from None
        except Exception:
            width = height = 0
    if width * height > max_pixels:
        raise _too_large(f"the image is {width}×{height} pixels; the limit is {max_pixels:,} pixels")
    return decode_image(data, max_pixels=max_pixels).image


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_bytes`` with 413, reading no further than the limit.

    A declared Content-Length over the limit is refused before the body is read at all; a body without
    one (chunked) is counted as it streams in.
    """

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = JSONResponse(
                {"detail": f"the request body is larger than the limit of {self.max_bytes:,} bytes"},
                status_code=413,
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # Raised inside the body read, FastAPI passes it on as the HTTP error it is.
                    raise _too_large(f"the request body is larger than the limit of {self.max_bytes:,} bytes")
            return message

        await self.app(scope, limited, send)
