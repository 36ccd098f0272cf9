"""Ingestion jobs."""

from __future__ import annotations

from fastapi import APIRouter

from rag_service.api.deps import DocumentsDep
from rag_service.api.schemas import ErrorResponse, JobOut

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.get("/{job_id}", response_model=JobOut, responses={404: {"model": ErrorResponse}})
def get_job(job_id: str, documents: DocumentsDep) -> JobOut:
    """Where a job is: status, stage, progress counts, and why it failed."""
    return JobOut.of(documents.get_job(job_id))
