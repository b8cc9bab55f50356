"""ASGI middleware in front of the routes: the Host header check, and OPTIONS and 405 answers that list
every method a path takes."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

from fastapi.responses import JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import BaseRoute, Match, Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .settings import normalize_host

#: Longest Host header quoted back in a refusal.
_QUOTE_CHARS = 100
#: The methods an Allow header may list, in its order.
_METHOD_ORDER = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def host_of(header: str) -> str | None:
    """The host a Host header names, normalized like ``normalize_host``; None when it is malformed."""
    text = header.strip().lower()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1 :]
        try:
            host = ipaddress.IPv6Address(host).compressed
        except ValueError:
            return None
    else:
        host, colon, port = text.partition(":")
        rest = colon + port
        try:
            host = ipaddress.IPv4Address(host).compressed
        except ValueError:
            host = host.rstrip(".")
    if rest and not (rest.startswith(":") and rest[1:].isascii() and rest[1:].isdigit()):
        return None
    return host or None


class HostCheckMiddleware:
    """Refuse (400) requests whose Host header names none of ``allowed_hosts``.

    A page on another site can point a DNS name of its own at this server and then read the keyless routes
    as same-origin; its requests still carry its own name in the Host header, which is what this checks.
    """

    def __init__(self, app: ASGIApp, allowed_hosts: Sequence[str]) -> None:
        self.app = app
        self.allowed = tuple(normalize_host(name) for name in allowed_hosts)
        self.any_host = "*" in self.allowed
        self.exact = frozenset(name for name in self.allowed if not name.startswith("*."))
        self.suffixes = tuple(name[1:] for name in self.allowed if name.startswith("*."))

    def allows(self, header: str) -> bool:
        """Whether a request with this Host header value may pass."""
        if self.any_host:
            return True
        host = host_of(header)
        if host is None:
            return False
        return host in self.exact or any(host.endswith(suffix) for suffix in self.suffixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("host", "")
        if self.allows(header):
            await self.app(scope, receive, send)
            return
        given = f"the Host {header[:_QUOTE_CHARS]!r}" if header else "a request without a Host header"
        names = ", ".join(f"[{n}]" if ":" in n else n for n in self.allowed)
        response = JSONResponse(
            {
                "detail": f"this server does not answer to {given}; it answers to {names} (any port). "
                "To add a name, start it with --allowed-host NAME (repeatable) or "
                "RETRIEVER_ALLOWED_HOSTS=NAME,NAME ('*' allows any)."
            },
            status_code=400,
        )
        await response(scope, receive, send)


def _ordered(methods: set[str]) -> str:
    return ", ".join(m for m in _METHOD_ORDER if m in methods)


class AllowMiddleware:
    """Answer OPTIONS on any routed path (204, no body) with an Allow header listing every method its routes
    take, and give 405 answers the same list.

    Starlette's router stops at the first route whose path matches and lists only that route's methods, so
    ``GET /v1/images/{id}`` hid ``DELETE /v1/images/{id}``. A path no route matches goes on to the router
    and its 404.
    """

    def __init__(self, app: ASGIApp, routes: Sequence[BaseRoute]) -> None:
        self.app = app
        # The app's own list, read per request, so routes added after this middleware count as well.
        self.routes = routes

    def methods_of(self, scope: Scope) -> set[str]:
        """Every method the routes take on the scope's path, OPTIONS included; empty when none matches.

        Each route is asked (``matches``, what the router itself asks) whether it takes the path with each
        standard method: FastAPI's included routers keep their routes to themselves.
        """
        methods: set[str] = set()
        for route in self.routes:
            if isinstance(route, Mount):
                # A mount takes every method as far as matching goes; the only one here serves files.
                if isinstance(route.app, StaticFiles) and route.matches(scope)[0] is not Match.NONE:
                    methods |= {"GET", "HEAD"}
                continue
            methods |= {m for m in _METHOD_ORDER if route.matches({**scope, "method": m})[0] is Match.FULL}
        return methods | {"OPTIONS"} if methods else methods

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if scope["method"] == "OPTIONS":
            methods = self.methods_of(scope)
            if methods:
                await Response(status_code=204, headers={"Allow": _ordered(methods)})(scope, receive, send)
                return

        # The router rewrites the scope it routes (a mount's root_path): keep the request as it came.
        request_scope = dict(scope)

        async def send_with_allow(message: Message) -> None:
            if message["type"] == "http.response.start" and message["status"] == 405:
                methods = self.methods_of(request_scope)
                if methods:
                    MutableHeaders(scope=message)["Allow"] = _ordered(methods)
            await send(message)

        await self.app(scope, receive, send_with_allow)
