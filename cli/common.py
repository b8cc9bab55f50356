"""What every command shares: building the index and models from options, and mapping errors to exits."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import typer

from retriever.errors import EmptyQueryError, ImageDecodeError, RetrieverError

from . import INTERRUPTED, said

#: What to do about each refused write, by errno. Every write keeps the index consistent (see
#: retriever.library), so the advice is always to fix the cause and run the same command again.
_OS_ADVICE: dict[int, str] = {
    errno.ENOSPC: "no space left on the device: free some space and run the command again",
    errno.EDQUOT: "the disk quota is exhausted: free some space and run the command again",
    errno.EACCES: "permission denied: check who owns it, or choose another --index-dir",
    errno.EPERM: "operation not permitted: check who owns it, or choose another --index-dir",
    errno.EROFS: "the file system is read-only: choose another --index-dir",
    errno.EMFILE: "too many open files: raise the limit (ulimit -n) and run the command again",
}


def os_error_message(exc: OSError) -> str:
    """One line for a refused read or write: what, where, and what to do."""
    where = f" ({exc.filename})" if exc.filename else ""
    advice = _OS_ADVICE.get(exc.errno or 0, f"{exc.strerror or exc}")
    return f"{advice}{where}; what was indexed before is kept"


def database_error_message(exc: Exception) -> str:
    """One line for an error the database driver raised mid-command (full, locked, damaged)."""
    from sqlalchemy.exc import DatabaseError

    from retriever.index.store import database_reason

    reason = database_reason(exc) if isinstance(exc, DatabaseError) else str(exc)
    lowered = reason.lower()
    if "disk i/o" in lowered:
        return f"the database could not write ({reason}): is the disk full? Free some space and run again"
    if "full" in lowered:
        return f"the database is full ({reason}): free some space and run the command again"
    if "malformed" in lowered or "not a database" in lowered or "corrupt" in lowered:
        return (
            f"the database is damaged ({reason}): restore it from a backup, or move it away and rebuild "
            "the index with `retriever index FOLDER --rebuild`"
        )
    return f"database error: {reason}"


def default_home() -> Path:
    """The index dir when neither --index-dir nor RETRIEVER_HOME is given."""
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "retriever"


def fail(message: str, code: int = 1) -> NoReturn:
    """Print an error without a traceback and exit."""
    typer.secho(f"error: {message}", fg=typer.colors.RED, err=True)
    if code == INTERRUPTED:
        said["interrupted"] = True
    raise typer.Exit(code)


@contextmanager
def errors_as_messages() -> Iterator[None]:
    """Map the library's typed errors to short messages and exit codes."""
    from sqlalchemy.exc import DatabaseError

    try:
        yield
    except (EmptyQueryError, ImageDecodeError) as exc:
        fail(str(exc), 2)
    except RetrieverError as exc:
        fail(str(exc), 1)
    except DatabaseError as exc:
        fail(database_error_message(exc), 1)
    except OSError as exc:
        fail(os_error_message(exc), 1)


def quiet_transformers() -> None:
    """Silence transformers' loading bars and notices, which are noise on a command line."""
    # The "no torchvision, using the PIL processor" notice says nothing a user can act on.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


class ModelContext:
    """Models built from the options, on demand, for commands that need no index (eval, train)."""

    def __init__(self, device: str) -> None:
        self._device_name = device

    @property
    def device(self) -> Any:
        """The torch device the options name (torch loads here, not for commands that need no model)."""
        from retriever.factory import resolve_device

        return resolve_device(self._device_name)

    def recorded_models(self) -> tuple[str, str] | None:
        """The models an index recorded, where there is one."""
        return None

    def model_ids(
        self, prefilter: str | None, reranker: str | None, model: str | None = None
    ) -> tuple[str, str]:
        """Explicit models first, then a --model preset, then the index's own models, then the defaults."""
        from retriever.presets import DEFAULT_PREFILTER, DEFAULT_RERANKER, preset

        if model is not None:
            pre, rer = preset(model)
            return prefilter or pre, reranker or rer
        recorded = self.recorded_models() or (DEFAULT_PREFILTER, DEFAULT_RERANKER)
        return prefilter or recorded[0], reranker or recorded[1]

    def load_prefilter(self, model_id: str) -> Any:
        from retriever.factory import load_prefilter

        quiet_transformers()
        return load_prefilter(model_id, self.device)

    def load_reranker(self, model_id: str, precision: str = "auto") -> Any:
        from retriever.factory import load_reranker

        quiet_transformers()
        return load_reranker(model_id, self.device, precision)


class Context(ModelContext):
    """What every command needs, built once from the options: the index and, on demand, the models."""

    def __init__(
        self,
        index_dir: Path | None,
        db_url: str | None,
        device: str,
        *,
        read_only: bool = False,
        rebind: bool = False,
    ) -> None:
        """``read_only`` for commands that must not write (no folder or database is created);
        ``rebind`` for a deliberate rebuild (see ``retriever.library.Library``)."""
        from retriever.library import Library

        super().__init__(device)
        home = (index_dir or default_home()).expanduser().resolve()
        self.created = not home.exists()
        try:
            self.library = Library(home, db_url, read_only=read_only, rebind=rebind)
        except BaseException:
            self.discard_if_unused(home)
            raise

    def discard_if_unused(self, home: Path | None = None) -> None:
        """Remove an index folder this command created and never wrote an image or caption to, so a failed
        first command (a model that does not exist, a bad URL) leaves nothing behind."""
        import shutil

        if not self.created:
            return
        library = getattr(self, "library", None)
        if library is not None:
            if library.models() is not None or library.store.count_images() or library.store.count_texts():
                return
            library.close()
            home = library.home
        if home is not None and home.is_dir():
            shutil.rmtree(home, ignore_errors=True)

    def recorded_models(self) -> tuple[str, str] | None:
        """The models the index recorded, or None for an index never written to."""
        info = self.library.models()
        return (info.prefilter, info.reranker) if info else None
