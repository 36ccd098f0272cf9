"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from rag_service.api.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health)
def healthz() -> Health:
    """The process is up."""
    return Health(status="ok")


@router.get("/readyz", response_model=Readiness, responses={503: {"model": Readiness}})
def readyz(request: Request) -> JSONResponse:
    """`200` once the embedder, the indexes and the model are loaded, else `503`."""
    runtime = getattr(request.app.state, "runtime", None)
    if runtime is None:
        body = Readiness(
            status="loading", embedder="loading", index="loading", model="loading", workers=0
        )
        return JSONResponse(body.model_dump(), status_code=503)
    model = "loaded" if runtime.chat_model_loaded else "not loaded"
    try:
        runtime.catalog.read().execute("SELECT 1").fetchone()
        index = "open"
    except Exception:  # any database failure means not ready
        index = "unavailable"
    ready = index == "open" and runtime.chat_model_loaded
    body = Readiness(
        status="ready" if ready else "loading",
        embedder=runtime.embedder.model_id,
        index=index,
        model=model,
        workers=runtime.workers_alive,
    )
    return JSONResponse(body.model_dump(), status_code=200 if ready else 503)
