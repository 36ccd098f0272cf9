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
    degrades to the sources with `degraded: true`.  `mode` and `filters`
    choose the sources as in `/v1/retrieve`.
    """
    filters = body.filters.to_value() if body.filters else None
    return QueryOut.of(
        service.ask(body.collection, body.question, body.top_k, mode=body.mode, filters=filters)
    )


@router.post("/retrieve", response_model=RetrieveOut, responses=ERRORS)
def retrieve(body: RetrieveIn, service: QueryDep) -> RetrieveOut:
    """The best chunks for a query, best first, without calling the model.

    `mode` picks dense (embeddings), keyword (BM25) or hybrid (both, fused by
    reciprocal rank; the default).  Each result shows the score it was ranked
    by and both signals' scores and ranks, so you can see why it came up.
    `filters` restrict the search to documents, file names, file types, a page
    range or upload metadata, before `top_k` is cut.
    """
    filters = body.filters.to_value() if body.filters else None
    return RetrieveOut.of(
        service.retrieve(body.collection, body.query, body.top_k, mode=body.mode, filters=filters)
    )
