"""Questions and retrieval.

Handlers are plain functions: FastAPI runs them in its thread pool, so the
embedder, FAISS and the model never block the event loop.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from rag_service.api.deps import QueryDep
from rag_service.api.schemas import ErrorResponse, QueryIn, QueryOut, RetrieveIn, RetrieveOut

router = APIRouter(prefix="/v1", tags=["query"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (404, 409, 422, 503)
}


@router.post("/query", response_model=QueryOut, responses=ERRORS)
def query(body: QueryIn, service: QueryDep) -> QueryOut:
    """Answer a question from a collection, citing the sources `[n]` it used.

    The response holds every source the model was given, the numbers the
    answer cites (citations to sources never given are removed and counted),
    token usage and per-stage timings.  When the model fails the answer
    degrades to the sources with `degraded: true`.
    """
    return QueryOut.of(service.ask(body.collection, body.question, body.top_k))


@router.post("/retrieve", response_model=RetrieveOut, responses=ERRORS)
def retrieve(body: RetrieveIn, service: QueryDep) -> RetrieveOut:
    """The chunks nearest to a query, best first, without calling the model."""
    return RetrieveOut.of(service.retrieve(body.collection, body.query, body.top_k))
