"""Liveness, readiness and metrics: never rate limited, so probes always get through.

Liveness and readiness need no API key; metrics need an admin key when keys are on.
"""

from __future__ import annotations

import sqlite3
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from rag_service.api.auth import presented_key, principal_for
from rag_service.api.deps import get_runtime
from rag_service.api.metrics import ServiceMetrics
from rag_service.api.schemas import ErrorResponse, Health, Readiness
from rag_service.config import Settings
from rag_service.errors import RagError
from rag_service.runtime import Runtime
from rag_service.storage.keys import KeyStore

router = APIRouter(tags=["health"])

LOADING = "loading"


def _error(exc: BaseException) -> str:
    if isinstance(exc, RagError):
        return f"error: {exc.code}: {exc.message}"
    return f"error: {type(exc).__name__}: {exc}"


def _index_state(runtime: Runtime) -> str:
    try:
        runtime.catalog.read().execute("SELECT 1").fetchone()
    except sqlite3.Error as exc:
        return _error(exc)
    return "open"


def _model_state(request: Request, runtime: Runtime) -> str:
    loader = getattr(request.app.state, "model_loader", None)
    if runtime.chat_model_loaded and (loader is None or loader.finished):
        return "loaded"
    error: Exception | None = getattr(loader, "error", None)
    return LOADING if error is None else _error(error)


@router.get("/healthz", response_model=Health)
async def healthz() -> Health:
    """The process is up.

    Answered on the event loop, not in the thread pool, so a liveness probe
    never queues behind busy request threads.
    """
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
def readyz(request: Request) -> JSONResponse:
    """`200` once the embedder, the index and the model are all usable, else `503`.

    Each part is reported on its own: ready (`embedder` names the loaded
    model, `index` is `open`, `model` is `loaded`), `loading`, or
    `error: <code>: <why>`.
    """
    runtime: Runtime | None = getattr(request.app.state, "runtime", None)
    if runtime is None:
        body = Readiness(status=LOADING, embedder=LOADING, index=LOADING, model=LOADING, workers=0)
        return JSONResponse(body.model_dump(), status_code=503)
    parts = (runtime.embedder.model_id, _index_state(runtime), _model_state(request, runtime))
    embedder, index, model = parts
    ready = index == "open" and model == "loaded"
    if ready:
        status = "ready"
    elif any(part.startswith("error: ") for part in parts):
        status = "error"
    else:
        status = LOADING
    body = Readiness(
        status=status,
        embedder=embedder,
        index=index,
        model=model,
        workers=runtime.workers_alive,
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)


#: Metrics are text; refused (no admin key, or not started yet) they are an error body.
METRICS_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/plain": {}, "application/openmetrics-text": {}}},
    **{code: {"model": ErrorResponse} for code in (401, 403, 503)},
}


@router.get("/metrics", response_class=Response, responses=METRICS_RESPONSES)
def metrics(request: Request) -> Response:
    """Prometheus metrics: requests and latency by route, jobs, chunks, model tokens and errors.

    They name every collection, so when API keys are required they need an
    admin key (Prometheus sends one with `authorization: {credentials: ...}`).

    Text exposition format, or OpenMetrics when the `Accept` header asks for it.
    """
    settings: Settings = request.app.state.settings
    token = presented_key(request)
    if settings.auth.required or token:
        # Keys are checked against the catalog, so not before the service has started.
        keys = KeyStore(get_runtime(request).catalog)
        principal_for(token, required=settings.auth.required, keys=keys).require("admin")
    service_metrics: ServiceMetrics = request.app.state.metrics
    body, content_type = service_metrics.render(request.headers.get("accept"))
    return Response(body, media_type=content_type)
