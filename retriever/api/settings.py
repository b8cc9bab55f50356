"""Server settings: built once at the edge (the ``retriever serve`` command) and passed to ``create_app``."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

#: Largest image upload accepted by the image search, in bytes (20 MiB).
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: Largest image upload accepted by the image search, in pixels (40 MP).
DEFAULT_MAX_UPLOAD_PIXELS = 40_000_000
#: The Host header names a server answers to unless told more (any port): the loopback names.
LOOPBACK_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
#: Addresses that listen on every interface, and so name no host.
_WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::"})
_HOST_LABEL = r"[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?"
_HOST_NAME = re.compile(rf"{_HOST_LABEL}(?:\.{_HOST_LABEL})*\.?")


def normalize_host(name: str) -> str:
    """A host name or address as Host headers are compared: lower case, IPv6 without brackets, compressed.

    Raises ``ValueError`` for anything that is not a host name, an IP address, ``*`` (any host) or
    ``*.domain`` (the domain's subdomains).
    """
    text = name.lower()
    if text == "*":
        return text
    bare = text[1:-1] if text.startswith("[") and text.endswith("]") else text
    try:
        return ipaddress.ip_address(bare).compressed
    except ValueError:
        pass
    domain = bare[2:] if bare.startswith("*.") else bare
    if not _HOST_NAME.fullmatch(domain):
        raise ValueError(
            f"allowed host {name!r} is not a host name, an IP address, '*' or '*.domain' (give it without "
            "scheme, port or path)"
        )
    # A trailing dot names the same host (the DNS root); headers are compared without it.
    return bare.rstrip(".")


def allowed_hosts_for(names: Iterable[str], listen_host: str | None = None) -> tuple[str, ...]:
    """The Host names a server started with these ``names`` answers to: the loopback names, the address it
    listens on (unless that is every interface), and ``names``, each of which may be a comma-separated list.
    ``*`` among them allows any host. Raises ``ValueError`` for a name that is no host name.
    """
    given = [normalize_host(part.strip()) for name in names for part in name.split(",") if part.strip()]
    if "*" in given:
        return ("*",)
    listening = []
    if listen_host is not None and listen_host.strip() not in _WILDCARD_ADDRESSES:
        listening.append(normalize_host(listen_host.strip()))
    return tuple(dict.fromkeys([*LOOPBACK_HOSTS, *listening, *given]))


@dataclass(frozen=True)
class Settings:
    """Everything the API server is configured with.

    ``roots`` are the only folders ``POST /v1/index`` may index; none means indexing over the API is off.
    ``api_key``, when set, is required by every endpoint that writes, and shows the paths in ``/v1/status``.
    ``allowed_hosts`` are the names a request's Host header may give (any port; ``*`` any name, ``*.domain``
    its subdomains): others are refused, so that a page on another site cannot read the API through a
    DNS name rebound to this server. The rerank batching knobs say how many (text, image) pairs one merged
    forward pass may hold (None: ``retriever.hardware``'s choice) and how long the batcher waits for more
    requests. ``device`` is a name ``retriever.hardware.resolve_device`` takes; the runtime resolves it.
    """

    index_dir: Path
    db_url: str | None = None
    prefilter: str | None = None
    reranker: str | None = None
    device: str = "auto"
    roots: tuple[Path, ...] = ()
    api_key: str | None = None
    allowed_hosts: tuple[str, ...] = LOOPBACK_HOSTS
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS
    rerank_batch_pairs: int | None = None
    rerank_batch_wait_s: float = 0.005
    retry_after_s: int = 5

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_upload_pixels", "rerank_batch_pairs", "retry_after_s"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.rerank_batch_wait_s < 0:
            raise ValueError(f"rerank_batch_wait_s must not be negative, got {self.rerank_batch_wait_s}")
        if self.api_key == "":
            raise ValueError("api_key must not be empty; leave it unset to turn authentication off")
        if not self.allowed_hosts:
            raise ValueError("allowed_hosts must name at least one host ('*' allows any)")
        for name in self.allowed_hosts:
            normalize_host(name)
