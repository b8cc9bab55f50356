"""``retriever serve``: the HTTP API and the search page, with uvicorn."""

from __future__ import annotations

import contextlib
import ipaddress
from pathlib import Path
from typing import Annotated

import typer

from retriever.api.settings import (
    DEFAULT_MAX_UPLOAD_BYTES,
    DEFAULT_MAX_UPLOAD_PIXELS,
    Settings,
    allowed_hosts_for,
)
from retriever.errors import RetrieverError

from .common import default_home, errors_as_messages, fail, keep_freed_setting, setup_process
from .options import DbUrl, Device, IndexDir, ModelPreset, Prefilter, Reranker

_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(
    host: Annotated[
        str, typer.Option("--host", help="Address to listen on. 0.0.0.0 exposes the server to the network.")
    ] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="Port to listen on.")] = 8000,
    index_dir: IndexDir = None,
    db_url: DbUrl = None,
    model: ModelPreset = None,
    prefilter: Prefilter = None,
    reranker: Reranker = None,
    device: Device = "auto",
    roots: Annotated[
        list[Path] | None,
        typer.Option(
            "--root",
            envvar="RETRIEVER_ROOTS",
            help="A folder that POST /v1/index may index (repeat for more; RETRIEVER_ROOTS takes a "
            "list separated like PATH). Default: none, and indexing over the API is refused.",
            show_default=False,
        ),
    ] = None,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="RETRIEVER_API_KEY",
            help="Key that the writing endpoints require (X-API-Key or Authorization: Bearer). Prefer "
            "RETRIEVER_API_KEY: a command-line argument is visible to other users of the machine.",
            show_default=False,
        ),
    ] = None,
    allowed_hosts: Annotated[
        list[str] | None,
        typer.Option(
            "--allowed-host",
            envvar="RETRIEVER_ALLOWED_HOSTS",
            metavar="NAME",
            help="A name the server may be reached by, as the Host header gives it (repeat for more, or "
            "separate with commas; *.example.com: its subdomains; *: any name). The loopback names and the "
            "--host address are always allowed; requests for other names are refused with 400, which keeps "
            "web pages on other sites from reading the API through a DNS name pointed at this server.",
            show_default=False,
        ),
    ] = None,
    max_upload_bytes: Annotated[
        int,
        typer.Option(
            "--max-upload-bytes", envvar="RETRIEVER_MAX_UPLOAD_BYTES", min=1, help="Largest upload."
        ),
    ] = DEFAULT_MAX_UPLOAD_BYTES,
    max_upload_pixels: Annotated[
        int,
        typer.Option(
            "--max-upload-pixels", envvar="RETRIEVER_MAX_UPLOAD_PIXELS", min=1, help="Largest upload image."
        ),
    ] = DEFAULT_MAX_UPLOAD_PIXELS,
    log_level: Annotated[
        str, typer.Option("--log-level", help="uvicorn's log level: " + ", ".join(_LOG_LEVELS) + ".")
    ] = "info",
) -> None:
    """Serve the search API and page: models load in the background, searches answer 503 until then."""
    import uvicorn

    from retriever.api.app import create_app

    if log_level not in _LOG_LEVELS:
        fail(f"--log-level {log_level}: use one of {', '.join(_LOG_LEVELS)}", 2)
    resolved_roots = []
    for root in roots or []:
        real = root.expanduser().resolve()
        if not real.is_dir():
            fail(f"--root {root}: no such folder", 2)
        resolved_roots.append(real)
    if model is not None:
        from retriever.factory import preset

        with errors_as_messages():
            preset_prefilter, preset_reranker = preset(model)
        prefilter, reranker = prefilter or preset_prefilter, reranker or preset_reranker
    try:
        hosts = allowed_hosts_for(allowed_hosts or [], listen_host=host)
    except ValueError as exc:
        fail(f"--allowed-host: {exc}", 2)
    if not _is_loopback(host) and not api_key:
        typer.secho(
            f"warning: listening on {host} without an API key: anyone who can reach it may index and delete",
            fg=typer.colors.YELLOW,
            err=True,
        )
    if not _is_loopback(host) and not allowed_hosts:
        typer.secho(
            f"note: listening on {host}, but answering only to {', '.join(hosts)}: give the names clients "
            "use to reach the server with --allowed-host (or RETRIEVER_ALLOWED_HOSTS)",
            err=True,
        )
    settings = Settings(
        index_dir=(index_dir or default_home()).expanduser().resolve(),
        db_url=db_url,
        prefilter=prefilter,
        reranker=reranker,
        device=device,
        roots=tuple(resolved_roots),
        api_key=api_key or None,
        allowed_hosts=hosts,
        max_upload_bytes=max_upload_bytes,
        max_upload_pixels=max_upload_pixels,
    )
    with errors_as_messages():
        # Open the index once before serving, so a damaged or mismatched one is one line, not a failed
        # start-up's traceback in uvicorn's log.
        from retriever.search_index import SearchIndex

        SearchIndex(settings.index_dir, settings.db_url).close()
        keep_freed = keep_freed_setting()
    # The process set-up, once, before the runtime loads the models on its own thread. A device torch cannot
    # use is left to the runtime, which reports it on /health.
    with contextlib.suppress(RetrieverError):
        setup_process(device, keep_freed)
    uvicorn.run(create_app(settings), host=host, port=port, log_level=log_level)
