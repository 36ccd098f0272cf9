"""Dependencies that hand the lifespan's long-lived parts to handlers."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from rag_service.api.auth import Principal, presented_key, principal_for
from rag_service.api.metrics import ServiceMetrics
from rag_service.api.ratelimit import RateLimiter
from rag_service.errors import IndexNotReady, TooManyRequests
from rag_service.llm.base import Usage
from rag_service.runtime import Runtime
from rag_service.services.documents import DocumentService
from rag_service.services.query import QueryService
from rag_service.storage.keys import KeyStore


def get_runtime(request: Request) -> Runtime:
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        raise IndexNotReady("the service is still starting; retry in a moment")
    return runtime


def get_documents(runtime: Annotated[Runtime, Depends(get_runtime)]) -> DocumentService:
    return runtime.documents


def get_query(runtime: Annotated[Runtime, Depends(get_runtime)]) -> QueryService:
    return runtime.query


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]
DocumentsDep = Annotated[DocumentService, Depends(get_documents)]
QueryDep = Annotated[QueryService, Depends(get_query)]


# -- clients, limits and accounting -------------------------------------------
# These are async so FastAPI runs them on the event loop: they only take a
# short lock, and a hop to the thread pool would cost more than they do.


def authenticate(request: Request) -> Principal:
    """The request's API key (``Unauthorized`` if it is wrong or required and missing).

    A plain function, so FastAPI runs it in the thread pool: it reads the
    catalog, which may wait on SQLite's write lock.
    """
    runtime = get_runtime(request)
    return principal_for(
        presented_key(request),
        required=runtime.settings.auth.required,
        keys=KeyStore(runtime.catalog),
    )


AuthDep = Annotated[Principal, Depends(authenticate)]


async def client_id(request: Request, principal: AuthDep) -> str:
    """Who a request counts against: its API key, else the client address."""
    if principal.key is not None:
        return f"key:{principal.key.id}"
    return request.client.host if request.client is not None else "unknown"


ClientDep = Annotated[str, Depends(client_id)]


def _limiter(request: Request) -> RateLimiter:
    limiter: RateLimiter = request.app.state.limiter
    return limiter


def _metrics(request: Request) -> ServiceMetrics:
    metrics: ServiceMetrics = request.app.state.metrics
    return metrics


async def limit_requests(request: Request, client: ClientDep) -> None:
    """Refuse a client over its requests-per-minute budget with 429 and Retry-After."""
    limiter = _limiter(request)
    wait = limiter.take_request(client)
    if wait > 0:
        _metrics(request).record_rate_limited("requests")
        raise TooManyRequests(
            f"over the limit of {limiter.requests_per_minute} requests a minute; "
            f"retry in {math.ceil(wait)} s",
            retry_after=wait,
        )


@dataclass(frozen=True)
class Accounting:
    """Where a handler that called the model reports what the answer cost."""

    client: str
    limiter: RateLimiter
    metrics: ServiceMetrics

    def record_answer(self, usage: Usage, degraded_reason: str | None) -> None:
        """Count the answer's tokens in the metrics and against the client's token budget."""
        self.metrics.record_answer(usage, degraded_reason)
        self.limiter.spend_tokens(self.client, usage.total_tokens)


async def get_accounting(request: Request, client: ClientDep) -> Accounting:
    """For routes that call the model: refuse a client over its token budget, else account."""
    limiter, metrics = _limiter(request), _metrics(request)
    wait = limiter.tokens_wait(client)
    if wait > 0:
        metrics.record_rate_limited("tokens")
        raise TooManyRequests(
            f"over the limit of {limiter.tokens_per_minute} model tokens a minute; "
            f"retry in {math.ceil(wait)} s",
            retry_after=wait,
        )
    return Accounting(client=client, limiter=limiter, metrics=metrics)


AccountingDep = Annotated[Accounting, Depends(get_accounting)]
