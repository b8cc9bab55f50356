"""Indexing over the API: jobs that index a folder inside the configured roots, and their progress."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Path, Response, status

from .. import service
from ..deps import RuntimeDep, WriterDep
from ..errors import error_responses
from ..schemas import IndexRequest, JobPublic

router = APIRouter(tags=["index"])


@router.post(
    "/index",
    response_model=JobPublic,
    status_code=status.HTTP_202_ACCEPTED,
    dependencies=[WriterDep],
    responses=error_responses(400, 401, 403, 404, 422),
)
def start_index(runtime: RuntimeDep, body: IndexRequest, response: Response) -> JobPublic:
    """Queue a job that indexes a folder (or one image); jobs run one after another.

    The path must resolve (symbolic links and ``..`` included) inside one of the server's roots.
    """
    path = service.resolve_index_path(runtime.settings.roots, body.path)
    job = runtime.jobs.submit(str(path))
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return service.job_public(job)


@router.get("/jobs/{job_id}", response_model=JobPublic, responses=error_responses(404, 422))
def get_job(runtime: RuntimeDep, job_id: Annotated[str, Path(min_length=1, max_length=64)]) -> JobPublic:
    """An index job's state and progress; its report once done, its error once failed."""
    return service.job_public(runtime.jobs.get(job_id))
