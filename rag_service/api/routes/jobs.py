"""Ingestion jobs."""

from __future__ import annotations

from fastapi import APIRouter

from rag_service.api.deps import AuthDep, DocumentsDep
from rag_service.api.schemas import ErrorResponse, JobOut
from rag_service.errors import JobNotFound

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get(
    "/{job_id}",
    response_model=JobOut,
    responses={code: {"model": ErrorResponse} for code in (401, 404, 429, 503)},
)
def get_job(job_id: str, documents: DocumentsDep, auth: AuthDep) -> JobOut:
    """Where a job is: status, stage, progress counts, and why it failed."""
    job = documents.get_job(job_id)
    if not auth.can_see(job.collection):
        # Not even its existence shows outside the key's collections.
        raise JobNotFound(f"no job with id {job_id!r}")
    return JobOut.of(job)
