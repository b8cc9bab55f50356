"""What every command shares: building the index and models from options, and mapping errors to exits."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import typer

from retriever.errors import BadQueryError, DatabaseFailureError, ImageDecodeError, RetrieverError

from . import INTERRUPTED, said

if TYPE_CHECKING:
    from retriever.hardware import HardwarePlan

#: What to do about each refused write, by errno. Every write keeps the index consistent (see
#: retriever.search_index), so the advice is always to fix the cause and run the same command again.
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


def database_error_message(exc: DatabaseFailureError) -> str:
    """One line for a database that failed mid-command (full, locked, damaged), from the driver's reason."""
    reason = exc.reason
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
    """Map the project's typed errors to short messages and exit codes."""
    try:
        yield
    except (BadQueryError, ImageDecodeError) as exc:
        fail(str(exc), 2)
    except DatabaseFailureError as exc:
        fail(database_error_message(exc), 1)
    except RetrieverError as exc:
        fail(str(exc), 1)
    except OSError as exc:
        fail(os_error_message(exc), 1)


def quiet_transformers() -> None:
    """Silence transformers' loading bars and notices, which are noise on a command line."""
    # The "no torchvision, using the PIL processor" notice says nothing a user can act on.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]


def keep_freed_setting() -> int:
    """Bytes of freed memory malloc may keep on a CPU, from ``RETRIEVER_KEEP_FREED_MB`` (default 256 MB, 0:
    off): the one place the variable is read, for every command that runs models and for the server."""
    from retriever.hardware import KEEP_FREED_ENV, parse_keep_freed_mb

    return parse_keep_freed_mb(os.environ.get(KEEP_FREED_ENV))


def setup_process(device: str, keep_freed: int) -> HardwarePlan:
    """The hardware plan for ``device`` (see ``retriever.hardware.plan_hardware``), applied to this process:
    torch's and FAISS's threads, malloc's tuning, the quantized engine. A program's one process set-up, made
    where it starts, before its models load; library code never changes these."""
    from retriever.hardware import configure_plan, plan_hardware

    plan = plan_hardware(device, keep_freed=keep_freed)
    configure_plan(plan)
    return plan


class ModelContext:
    """Models built from the options, on demand, for commands that need no index (eval, train)."""

    def __init__(self, device: str) -> None:
        self._device_name = device
        self._plan: HardwarePlan | None = None

    @property
    def plan(self) -> HardwarePlan:
        """The hardware plan for the options' device, applied to this process (``setup_process``) the first
        time it is asked for: just before the first model loads, so commands that load none never import
        torch."""
        if self._plan is None:
            self._plan = setup_process(self._device_name, keep_freed_setting())
        return self._plan

    @property
    def device(self) -> Any:
        """The torch device the options name."""
        return self.plan.device

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
        ``rebind`` for a deliberate rebuild (see ``retriever.search_index.SearchIndex``)."""
        from retriever.search_index import SearchIndex

        super().__init__(device)
        home = (index_dir or default_home()).expanduser().resolve()
        self.created = not home.exists()
        try:
            self.search_index = SearchIndex(home, db_url, read_only=read_only, rebind=rebind)
        except BaseException:
            self.discard_if_unused(home)
            raise

    def discard_if_unused(self, home: Path | None = None) -> None:
        """Remove an index folder this command created and never wrote an image or caption to, so a failed
        first command (a model that does not exist, a bad URL) leaves nothing behind."""
        import shutil

        if not self.created:
            return
        search_index = getattr(self, "search_index", None)
        if search_index is not None:
            if (
                search_index.models() is not None
                or search_index.store.count_images()
                or search_index.store.count_texts()
            ):
                return
            search_index.close()
            home = search_index.home
        if home is not None and home.is_dir():
            shutil.rmtree(home, ignore_errors=True)

    def recorded_models(self) -> tuple[str, str] | None:
        """The models the index recorded, or None for an index never written to."""
        info = self.search_index.models()
        return (info.prefilter, info.reranker) if info else None
