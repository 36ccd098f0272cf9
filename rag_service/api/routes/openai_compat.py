"""OpenAI-compatible endpoints, so the `openai` SDK, LangChain and friends work unmodified.

- ``GET /v1/models``: one model per collection, ``rag:<collection>``.
- ``POST /v1/chat/completions``: the last user message is answered from the
  collection the model names, earlier turns as context; ``stream: true``
  sends ``chat.completion.chunk`` events ending in ``[DONE]``.  Sources ride
  in the extra ``sources`` field (of the response, and of the last chunk).
- ``POST /v1/embeddings``: vectors from the collection's embedding model.
"""

from __future__ import annotations

import base64
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import anyio
import numpy as np
from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from sse_starlette import EventSourceResponse, ServerSentEvent

from rag_service.api.deps import Accounting, AccountingDep, AuthDep, QueryDep
from rag_service.api.openai_schemas import (
    MODEL_PREFIX,
    AssistantMessage,
    ChatCompletionIn,
    ChatCompletionOut,
    Choice,
    EmbeddingItem,
    EmbeddingsIn,
    EmbeddingsOut,
    EmbeddingUsage,
    ModelCard,
    ModelList,
    RagExtras,
)
from rag_service.api.schemas import ErrorResponse, QueryOut
from rag_service.errors import InvalidRequest
from rag_service.llm.base import ChatMessage
from rag_service.services.answers import Answer
from rag_service.services.query import Prepared, QueryService
from rag_service.services.validation import same_embedder

router = APIRouter(prefix="/v1", tags=["openai"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 422, 429, 503)
}
#: Texts one embeddings request may carry, and the longest one.
MAX_EMBED_INPUTS = 256
MAX_EMBED_CHARS = 32_000


def collection_of(model: str) -> str:
    """The collection a ``rag:<collection>`` model name stands for."""
    return model[len(MODEL_PREFIX) :] if model.startswith(MODEL_PREFIX) else model


@router.get(
    "/models",
    response_model=ModelList,
    responses={code: {"model": ErrorResponse} for code in (401, 429, 503)},
)
def list_models(service: QueryDep, auth: AuthDep) -> ModelList:
    """One model per collection (that the API key reaches), `rag:<collection>`."""
    return ModelList(
        data=[
            ModelCard(id=f"{MODEL_PREFIX}{c.name}", created=int(c.created_at))
            for c in service.catalog.list_collections()
            if auth.can_see(c.name)
        ]
    )


def _conversation(body: ChatCompletionIn) -> tuple[str, list[ChatMessage]]:
    """The question (last user message) and the user and assistant turns before it."""
    turns = [m for m in body.messages if m.role in ("user", "assistant")]
    if not turns or turns[-1].role != "user" or not turns[-1].text().strip():
        raise InvalidRequest("messages must end with a user message holding the question")
    history = [ChatMessage(m.role, m.text()) for m in turns[:-1]]  # type: ignore[arg-type]
    return turns[-1].text(), history


@router.post(
    "/chat/completions",
    response_model=ChatCompletionOut,
    responses=ERRORS
    | {200: {"content": {"text/event-stream": {}}, "description": "With `stream: true`."}},
)
async def chat_completions(
    body: ChatCompletionIn, service: QueryDep, accounting: AccountingDep, auth: AuthDep
) -> Any:
    """Answer the last user message from the collection `model` names, OpenAI style.

    Earlier user and assistant turns are the conversation's context (a short
    follow-up is searched together with the previous question).  The answer
    cites sources as `[n]`; `sources` lists them and `rag` holds the citation
    numbers and whether the service could answer.  Extras `top_k`, `mode`,
    `strategy` and `filters` work as in `/v1/query`.
    """
    auth.require("read", collection_of(body.model))
    question, history = _conversation(body)
    prepared = await run_in_threadpool(
        service.prepare,
        collection_of(body.model),
        question,
        body.top_k,
        mode=body.mode,
        filters=body.filters.to_value() if body.filters else None,
        strategy=body.strategy,
        history=history,
        max_tokens=body.max_completion_tokens or body.max_tokens,
        temperature=body.temperature,
    )
    reply_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if body.stream:
        usage_chunk = bool((body.stream_options or {}).get("include_usage"))
        return EventSourceResponse(
            _chunks(service, prepared, accounting, body.model, reply_id, created, usage_chunk),
            ping=15,
        )
    answer = (
        prepared
        if isinstance(prepared, Answer)
        else await run_in_threadpool(service.answer, prepared)
    )
    accounting.record_answer(answer.usage, answer.degraded_reason)
    out = QueryOut.of(answer)
    return ChatCompletionOut(
        id=reply_id,
        created=created,
        model=body.model,
        choices=[Choice(message=AssistantMessage(content=out.answer))],
        usage=out.usage,
        sources=out.sources,
        rag=RagExtras.of(out),
    )


def _chunk(
    reply_id: str,
    created: int,
    model: str,
    delta: dict[str, Any] | None,
    finish_reason: str | None = None,
    **extra: Any,
) -> ServerSentEvent:
    """One chunk; ``delta=None`` makes the choice-less usage chunk."""
    choices = (
        [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
    )
    body = {
        "id": reply_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
        **extra,
    }
    return ServerSentEvent(json.dumps(body))


async def _chunks(
    service: QueryService,
    prepared: Prepared | Answer,
    accounting: Accounting,
    model: str,
    reply_id: str,
    created: int,
    usage_chunk: bool,
) -> AsyncIterator[ServerSentEvent]:
    """``chat.completion.chunk`` events, then ``[DONE]``; the model is always stopped."""
    pieces: Iterator[str | Answer] = (
        iter([prepared]) if isinstance(prepared, Answer) else service.stream(prepared)
    )
    streamed = False
    try:
        yield _chunk(reply_id, created, model, {"role": "assistant", "content": ""})
        while (piece := await run_in_threadpool(next, pieces, None)) is not None:
            if isinstance(piece, str):
                streamed = True
                yield _chunk(reply_id, created, model, {"content": piece})
                continue
            accounting.record_answer(piece.usage, piece.degraded_reason)
            out = QueryOut.of(piece)
            if not streamed or not piece.answerable or piece.degraded:
                # Nothing streamed (other strategies, abstaining) or the text changed.
                yield _chunk(reply_id, created, model, {"content": out.answer})
            yield _chunk(
                reply_id,
                created,
                model,
                {},
                finish_reason="stop",
                sources=[s.model_dump(mode="json") for s in out.sources],
                rag=RagExtras.of(out).model_dump(mode="json"),
            )
            if usage_chunk:
                yield _chunk(reply_id, created, model, None, usage=out.usage.model_dump())
        yield ServerSentEvent("[DONE]")
    finally:
        close = getattr(pieces, "close", None)
        if close is not None:
            with anyio.CancelScope(shield=True):
                await run_in_threadpool(close)


@router.post("/embeddings", response_model=EmbeddingsOut, responses=ERRORS)
def embeddings(body: EmbeddingsIn, service: QueryDep, auth: AuthDep) -> EmbeddingsOut:
    """Embed texts with the model a collection was embedded with, OpenAI style.

    `model` is `rag:<collection>` or the embedding model's id; vectors are
    unit length.  `encoding_format: base64` returns float32 little-endian bytes.
    """
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts or len(texts) > MAX_EMBED_INPUTS:
        raise InvalidRequest(f"input must hold 1 to {MAX_EMBED_INPUTS} texts; got {len(texts)}")
    too_long = [i for i, t in enumerate(texts) if len(t) > MAX_EMBED_CHARS]
    if too_long:
        raise InvalidRequest(f"input {too_long[0]} is over {MAX_EMBED_CHARS} characters")
    embedder = service.embedder
    auth.require("read")
    if body.model != embedder.model_id:
        auth.require("read", collection_of(body.model))
        collection = service.catalog.get_collection(collection_of(body.model), counts=False)
        same_embedder(
            collection.name,
            (collection.embed_model, collection.dim),
            (embedder.model_id, embedder.dim),
        )
    if body.dimensions is not None and body.dimensions != embedder.dim:
        raise InvalidRequest(f"dimensions must be {embedder.dim} for {embedder.model_id}")
    vectors = embedder.embed(texts)
    items = [
        EmbeddingItem(
            index=i,
            embedding=(
                base64.b64encode(np.asarray(v, dtype="<f4").tobytes()).decode()
                if body.encoding_format == "base64"
                else [float(x) for x in v]
            ),
        )
        for i, v in enumerate(vectors)
    ]
    tokens = sum(embedder.count_tokens(t) for t in texts)
    return EmbeddingsOut(
        data=items,
        model=body.model,
        usage=EmbeddingUsage(prompt_tokens=tokens, total_tokens=tokens),
    )
