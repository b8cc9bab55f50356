"""What a running server holds: the index (a reader and a writer view), the models, the batcher and jobs.

Models load once, on a background thread started with the server, so the server answers (``/health``,
metadata, thumbnails) at once and searches answer 503 until the models are in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import numpy as np
import torch
from PIL import Image

from retriever.encoders import DualEncoder
from retriever.errors import IndexLockedError, RetrieverError
from retriever.indexing import IndexReport, Progress, index_folder, model_info
from retriever.rerank import Reranker
from retriever.search_index import SearchIndex

from .batching import MicroBatcher
from .jobs import Job, JobQueue
from .settings import Settings
from .snapshots import IndexSnapshot

log = logging.getLogger(__name__)

ModelName = Literal["prefilter", "reranker"]

#: How long a delete or a caption upload waits for a running writer before answering 409.
WRITE_WAIT_S = 2.0


class ModelLoader(Protocol):
    """Loads the models by id (hub id or local folder) onto a device."""

    def load_prefilter(self, model_id: str, device: torch.device) -> DualEncoder:
        """The prefilter (dual encoder)."""
        ...

    def load_reranker(self, model_id: str, device: torch.device) -> Reranker:
        """The reranker."""
        ...


class FactoryLoader:
    """Loads models through ``retriever.factory``, the one place that wires concrete model classes."""

    def __init__(self) -> None:
        # Hub progress bars and notices are noise in a server log.
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # type: ignore[no-untyped-call]
        hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]

    def load_prefilter(self, model_id: str, device: torch.device) -> DualEncoder:
        """A CLIP checkpoint as the prefilter."""
        from retriever.factory import load_prefilter

        return load_prefilter(model_id, device)

    def load_reranker(self, model_id: str, device: torch.device) -> Reranker:
        """A ViLT ITM checkpoint as the reranker."""
        from retriever.factory import load_reranker

        return load_reranker(model_id, device)


class SerializedTexts:
    """A ``DualEncoder`` whose text encoding runs on one thread at a time.

    A Hugging Face fast tokenizer changes its own truncation and padding state when called, and raises
    "Already borrowed" if another thread is inside it meanwhile; a query's text encodes in milliseconds,
    so taking turns costs little.
    """

    def __init__(self, inner: DualEncoder) -> None:
        self.inner = inner
        self.name, self.fingerprint, self.dim = inner.name, inner.fingerprint, inner.dim
        self.logit_scale = inner.logit_scale
        self._lock = threading.Lock()

    def encode_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        """Embed images (concurrently with other calls)."""
        return self.inner.encode_images(images)

    def encode_texts(self, texts: Sequence[str]) -> np.ndarray:
        """Embed texts, one caller at a time."""
        with self._lock:
            return self.inner.encode_texts(texts)


@dataclass(frozen=True)
class Models:
    """Loaded models. ``reranker`` is the raw model, ``batcher`` the shared-batch front searches use."""

    prefilter: DualEncoder
    reranker: Reranker
    batcher: MicroBatcher
    device: torch.device
    default_candidates: int


class Runtime:
    """The state of one server, from start-up to shut-down."""

    def __init__(self, settings: Settings, loader: ModelLoader) -> None:
        self.settings = settings
        # The writer first: it creates a missing index, which the read-only snapshot then opens.
        self.writer = SearchIndex(settings.index_dir, settings.db_url)
        try:
            self.reader = IndexSnapshot(settings.index_dir, settings.db_url)
        except BaseException:
            self.writer.close()
            raise
        self.loading: list[ModelName] = ["prefilter", "reranker"]
        self.load_error: str | None = None
        self._loader = loader
        self._models: Models | None = None
        self._ready = threading.Event()
        self._write_lock = threading.Lock()
        self._closed = False
        self.jobs = JobQueue(self._run_index_job)
        self._load_thread = threading.Thread(target=self._load, name="load-models", daemon=True)
        self._load_thread.start()

    # -- models -----------------------------------------------------------------------------------

    @property
    def models(self) -> Models | None:
        """The models, or None while they load or when loading failed."""
        return self._models

    def wait_models(self, timeout: float | None = None) -> Models:
        """Block until the models are loaded; raises ``RetrieverError`` when loading failed or timed out."""
        if not self._ready.wait(timeout):
            raise RetrieverError("the models are still loading")
        if self._models is None:
            raise RetrieverError(f"the models could not be loaded: {self.load_error}")
        return self._models

    def _load(self) -> None:
        from retriever.factory import DEFAULT_PREFILTER, DEFAULT_RERANKER
        from retriever.hardware import MERGED_RERANK_PAIRS, plan_hardware

        try:
            # Only decisions here: the process-wide settings are the program's (``retriever serve``).
            plan = plan_hardware(self.settings.device)
            device = plan.device
            recorded = self.reader.models()
            # Explicit choices first, then the models the index was built with, then the defaults.
            pre_id = self.settings.prefilter or (recorded.prefilter if recorded else DEFAULT_PREFILTER)
            re_id = self.settings.reranker or (recorded.reranker if recorded else DEFAULT_RERANKER)
            prefilter = SerializedTexts(self._loader.load_prefilter(pre_id, device))
            self.loading.remove("prefilter")
            reranker = self._loader.load_reranker(re_id, device)
            self.loading.remove("reranker")
            self.reader.check_models(model_info(prefilter, reranker))
            batcher = MicroBatcher(
                reranker,
                max_pairs=self.settings.rerank_batch_pairs or MERGED_RERANK_PAIRS,
                max_wait_s=self.settings.rerank_batch_wait_s,
            )
            self._models = Models(prefilter, reranker, batcher, device, plan.candidates)
            if self._closed:  # shut down while loading
                batcher.close()
        except Exception as exc:
            self.load_error = str(exc) or type(exc).__name__
            self.loading = []
            if not isinstance(exc, RetrieverError):
                log.exception("loading the models failed")
            else:
                log.error("loading the models failed: %s", exc)
        finally:
            self._ready.set()

    # -- writing ----------------------------------------------------------------------------------

    @contextmanager
    def writing(self, wait_s: float = WRITE_WAIT_S) -> Iterator[SearchIndex]:
        """Hold the index for writing: no other writer in this server, nor in another process."""
        if not self._write_lock.acquire(timeout=wait_s):
            raise IndexLockedError("an index job is writing to the index; try again when it is done")
        try:
            with self.writer.writer():
                yield self.writer
        finally:
            self._write_lock.release()

    def _run_index_job(self, job: Job, progress: Callable[[Progress], None]) -> IndexReport:
        models = self.wait_models()
        with self._write_lock:
            return index_folder(
                self.writer,
                models.prefilter,
                models.reranker,
                Path(job.path),
                within=self.settings.roots,
                on_progress=progress,
            )

    # -- life cycle -------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the workers and release the databases (a running index job is left to the process exit)."""
        self._closed = True
        self.jobs.close()
        if self._models is not None:
            self._models.batcher.close()
        self.reader.close()
        self.writer.close()
