"""The search page at ``/`` and its files under ``/static``."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, HTMLResponse, Response

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

_PLACEHOLDER = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>retriever</title></head>
<body><h1>retriever</h1><p>The search page is not installed. The API is at <a href="docs">docs</a>.</p></body>
</html>
"""

router = APIRouter(include_in_schema=False)


@router.get("/", response_model=None)
def index_page() -> Response:
    """The search page (a placeholder when the page's files are not installed)."""
    page = STATIC_DIR / "index.html"
    if page.is_file():
        return FileResponse(page, media_type="text/html")
    return HTMLResponse(_PLACEHOLDER)
