"""Index jobs: queued by the API, run one at a time by a background worker thread."""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Literal

from retriever.errors import NotFoundError, RetrieverError
from retriever.indexing import IndexReport, Progress

log = logging.getLogger(__name__)

JobState = Literal["queued", "running", "done", "failed"]


@dataclass
class Job:
    """One index job and its progress. The queue hands out copies; only the worker changes the original."""

    id: str
    path: str
    state: JobState = "queued"
    done: int = 0
    total: int = 0
    report: IndexReport | None = None
    error: str | None = None
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))
    finished_at: datetime | None = None


#: Runs one job: indexes ``job.path``, calling the progress function as it goes.
JobRunner = Callable[[Job, Callable[[Progress], None]], IndexReport]


class JobQueue:
    """A FIFO of index jobs and the one worker thread that runs them, so jobs never write concurrently.

    Finished jobs are remembered, the oldest forgotten beyond ``keep``.
    """

    def __init__(self, runner: JobRunner, *, keep: int = 1000) -> None:
        self._runner = runner
        self._keep = keep
        self._jobs: OrderedDict[str, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._work, name="index-jobs", daemon=True)
        self._thread.start()

    def submit(self, path: str) -> Job:
        """Queue a job that indexes ``path``; returns a copy of it."""
        job = Job(id=uuid.uuid4().hex, path=path)
        with self._lock:
            self._jobs[job.id] = job
            self._forget_old()
            copy = replace(job)
        self._queue.put(job)
        return copy

    def get(self, job_id: str) -> Job:
        """A copy of the job with this id."""
        with self._lock:
            job = self._jobs.get(job_id)
            if job is None:
                raise NotFoundError(f"no job with id {job_id!r}")
            return replace(job)

    def close(self, timeout: float = 5.0) -> None:
        """Stop after the job that is running; queued jobs are dropped."""
        with self._lock:
            for job in self._jobs.values():
                if job.state == "queued":
                    self._finish(job, None, "the server shut down before the job started")
        self._queue.put(None)
        self._thread.join(timeout)

    def _forget_old(self) -> None:
        finished = [j.id for j in self._jobs.values() if j.state in ("done", "failed")]
        for job_id in finished[: max(0, len(self._jobs) - self._keep)]:
            del self._jobs[job_id]

    def _finish(self, job: Job, report: IndexReport | None, error: str | None) -> None:
        job.state = "done" if error is None else "failed"
        job.report, job.error = report, error
        job.finished_at = datetime.now(UTC)

    def _work(self) -> None:
        while (job := self._queue.get()) is not None:
            with self._lock:
                if job.state != "queued":
                    continue
                job.state = "running"

            def progress(p: Progress, job: Job = job) -> None:
                with self._lock:
                    job.done, job.total = p.done, p.total

            report: IndexReport | None = None
            error: str | None = None
            try:
                report = self._runner(job, progress)
            except RetrieverError as exc:
                error = str(exc)
            except OSError as exc:  # the folder vanished or cannot be listed
                error = f"cannot read {exc.filename or job.path}: {exc.strerror or exc}"
            except Exception as exc:
                log.exception("index job %s on %s failed", job.id, job.path)
                error = f"internal error: {type(exc).__name__}: {exc}"
            with self._lock:
                self._finish(job, report, error)
