"""Server settings: built once at the edge (the ``retriever serve`` command) and passed to ``create_app``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

#: Largest image upload accepted by the image search, in bytes (20 MiB).
DEFAULT_MAX_UPLOAD_BYTES = 20 * 1024 * 1024
#: Largest image upload accepted by the image search, in pixels (40 MP).
DEFAULT_MAX_UPLOAD_PIXELS = 40_000_000


@dataclass(frozen=True)
class Settings:
    """Everything the API server is configured with.

    ``roots`` are the only folders ``POST /v1/index`` may index; none means indexing over the API is off.
    ``api_key``, when set, is required by every endpoint that writes. The rerank batching knobs say how many
    (text, image) pairs one merged forward pass may hold and how long the batcher waits for more requests.
    """

    index_dir: Path
    db_url: str | None = None
    prefilter: str | None = None
    reranker: str | None = None
    device: str = "auto"
    roots: tuple[Path, ...] = ()
    api_key: str | None = None
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD_BYTES
    max_upload_pixels: int = DEFAULT_MAX_UPLOAD_PIXELS
    rerank_batch_pairs: int = 64
    rerank_batch_wait_s: float = 0.005
    retry_after_s: int = 5

    def __post_init__(self) -> None:
        for name in ("max_upload_bytes", "max_upload_pixels", "rerank_batch_pairs", "retry_after_s"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.rerank_batch_wait_s < 0:
            raise ValueError(f"rerank_batch_wait_s must not be negative, got {self.rerank_batch_wait_s}")
        if self.api_key == "":
            raise ValueError("api_key must not be empty; leave it unset to turn authentication off")
