"""What every command shares: building the index and models from options, and mapping errors to exits."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import typer

from retriever.errors import EmptyQueryError, ImageDecodeError, RetrieverError


def default_home() -> Path:
    """The index dir when neither --index-dir nor RETRIEVER_HOME is given."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "retriever"


def fail(message: str, code: int = 1) -> NoReturn:
    """Print an error without a traceback and exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


@contextmanager
def errors_as_messages() -> Iterator[None]:
    """Map the library's typed errors to short messages and exit codes."""
    try:
        yield
    except (EmptyQueryError, ImageDecodeError) as exc:
        fail(str(exc), 2)
    except RetrieverError as exc:
        fail(str(exc), 1)


def quiet_transformers() -> None:
    """Silence transformers' loading bars and notices, which are noise on a command line."""
    # The "no torchvision, using the PIL processor" notice says nothing a user can act on.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


class Context:
    """What every command needs, built once from the options: the index and, on demand, the models."""

    def __init__(self, index_dir: Path | None, db_url: str | None, device: str) -> None:
        from retriever.factory import resolve_device
        from retriever.library import Library

        self.device = resolve_device(device)
        self.library = Library((index_dir or default_home()).expanduser().resolve(), db_url)

    def model_ids(
        self, prefilter: str | None, reranker: str | None, model: str | None = None
    ) -> tuple[str, str]:
        """Explicit models first, then a --model preset, then the index's own models, then the defaults."""
        from retriever.factory import DEFAULT_PREFILTER, DEFAULT_RERANKER, preset

        if model is not None:
            pre, rer = preset(model)
            return prefilter or pre, reranker or rer
        info = self.library.models()
        return (
            prefilter or (info.prefilter if info else DEFAULT_PREFILTER),
            reranker or (info.reranker if info else DEFAULT_RERANKER),
        )

    def load_prefilter(self, model_id: str) -> Any:
        from retriever.factory import load_prefilter

        quiet_transformers()
        return load_prefilter(model_id, self.device)

    def load_reranker(self, model_id: str, precision: str = "auto") -> Any:
        from retriever.factory import load_reranker

        quiet_transformers()
        return load_reranker(model_id, self.device, precision)
