"""Questions and retrieval.

The embedder, FAISS and the model block, so they run in the thread pool
(plain handlers by FastAPI, the streaming one by ``run_in_threadpool``) and
never block the event loop.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse, ServerSentEvent

from rag_service.api.deps import Accounting, AccountingDep, AuthDep, QueryDep
from rag_service.api.schemas import (
    ErrorResponse,
    QueryIn,
    QueryOut,
    RetrieveIn,
    RetrieveOut,
    SourceOut,
)
from rag_service.services.answers import Answer
from rag_service.services.query import Prepared, QueryService

router = APIRouter(prefix="/v1", tags=["query"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 422, 429, 503)
}


@router.post(
    "/query",
    response_model=QueryOut,
    responses=ERRORS
    | {
        200: {
            "content": {"text/event-stream": {}},
            "description": "The answer; with `stream: true`, Server-Sent Events.",
        }
    },
)
async def query(
    body: QueryIn, request: Request, service: QueryDep, accounting: AccountingDep, auth: AuthDep
) -> Any:
    """Answer a question from a collection, citing the sources `[n]` it used.

    The response holds every source the model was given, the numbers the
    answer cites (citations to sources never given are removed and counted),
    token usage and per-stage timings.  When the model fails the answer
    degrades to the sources with `degraded: true`.  `mode` and `filters`
    choose the sources as in `/v1/retrieve`.

    When the sources do not hold the answer, `answerable` is false and the
    answer says so instead of guessing.  `strategy` picks how the model is
    asked (direct, cot, self_consistency, reflect); `cost` reports the model
    calls, tokens and time it took.

    With `stream: true` (or `Accept: text/event-stream`) the answer comes as
    Server-Sent Events: `sources` (the numbered sources, at once), `token`
    (`{"text"}`, as the model writes; direct strategy only), then one `done`
    holding the same body as the plain response.  Closing the connection
    stops the generation.  Errors in the request still come as plain JSON
    with their status code, before any event.
    """
    auth.require("read", body.collection)
    prepared = await run_in_threadpool(
        service.prepare,
        body.collection,
        body.question,
        body.top_k,
        mode=body.mode,
        filters=body.filters.to_value() if body.filters else None,
        strategy=body.strategy,
        samples=body.samples,
        rerank=body.rerank,
    )
    streaming = body.stream or "text/event-stream" in request.headers.get("accept", "")
    if streaming:
        return EventSourceResponse(_events(service, prepared, accounting), ping=15)
    answer = (
        prepared
        if isinstance(prepared, Answer)
        else await run_in_threadpool(service.answer, prepared)
    )
    # Metrics and the client's model-token budget (api/deps.py Accounting).
    accounting.record_answer(answer.usage, answer.degraded_reason)
    return QueryOut.of(answer)


async def _events(
    service: QueryService, prepared: Prepared | Answer, accounting: Accounting
) -> AsyncIterator[ServerSentEvent]:
    """The SSE events of one streamed answer; the model's iterator is always closed."""
    pieces: Iterator[str | Answer] = (
        iter([prepared]) if isinstance(prepared, Answer) else service.stream(prepared)
    )
    base = prepared if isinstance(prepared, Answer) else prepared.base
    sources = [SourceOut.of(s).model_dump(mode="json") for s in base.sources]
    try:
        yield ServerSentEvent(json.dumps({"sources": sources}), event="sources")
        while (piece := await run_in_threadpool(next, pieces, None)) is not None:
            if isinstance(piece, str):
                yield ServerSentEvent(json.dumps({"text": piece}), event="token")
                continue
            accounting.record_answer(piece.usage, piece.degraded_reason)
            yield ServerSentEvent(QueryOut.of(piece).model_dump_json(), event="done")
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            # Stop the generation even while this task is being cancelled.
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(close)


@router.post("/retrieve", response_model=RetrieveOut, responses=ERRORS)
def retrieve(body: RetrieveIn, service: QueryDep, auth: AuthDep) -> RetrieveOut:
    """The best chunks for a query, best first, without calling the model.

    `mode` picks dense (embeddings), keyword (BM25) or hybrid (both, fused by
    reciprocal rank; the default).  Each result shows the score it was ranked
    by and both signals' scores and ranks, so you can see why it came up.
    `filters` restrict the search to documents, file names, file types, a page
    range or upload metadata, before `top_k` is cut.
    """
    auth.require("read", body.collection)
    filters = body.filters.to_value() if body.filters else None
    return RetrieveOut.of(
        service.retrieve(
            body.collection,
            body.query,
            body.top_k,
            mode=body.mode,
            filters=filters,
            rerank=body.rerank,
        )
    )
