"""The FastAPI application: ``create_app(settings)``."""

from __future__ import annotations

import inspect
import logging
import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import Depends, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool

from rag_service import __version__
from rag_service.api.deps import limit_requests
from rag_service.api.errors import install_error_handlers
from rag_service.api.metrics import MetricsMiddleware, ServiceMetrics
from rag_service.api.ratelimit import RateLimiter
from rag_service.api.routes import documents, health, jobs, openai_compat, query, web
from rag_service.compute import freeze_startup_heap, thaw_heap
from rag_service.config import Settings
from rag_service.embedding import Embedder
from rag_service.errors import ModelError, RagError
from rag_service.llm.base import ChatModel
from rag_service.runtime import Runtime

log = logging.getLogger(__name__)


class ModelLoader:
    """Loads the language model in a thread, so the service is live while it loads.

    ``/readyz`` reports the model as loading until it is in memory and the
    startup heap is frozen (``freeze_startup_heap``), or the error that
    stopped it; a question asked meanwhile waits for the load.
    """

    def __init__(self, runtime: Runtime) -> None:
        self.error: Exception | None = None
        self._thread = threading.Thread(
            target=self._load, args=(runtime,), name="model-loader", daemon=True
        )
        self._thread.start()

    def _load(self, runtime: Runtime) -> None:
        try:
            runtime.chat_model()
        except Exception as exc:  # reported by /readyz; questions retry the load
            log.error("language model failed to load error=%s", exc)
            self.error = exc
        finally:
            freeze_startup_heap()

    @property
    def finished(self) -> bool:
        return not self._thread.is_alive()

    def join(self) -> None:
        self._thread.join()


def _count_model_errors(app: FastAPI, metrics: ServiceMetrics) -> None:
    """Count model errors that fail a request, then answer as the ``RagError`` handler does."""
    handle = app.exception_handlers[RagError]

    async def model_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, ModelError)
        metrics.record_model_error(exc.code)
        response = handle(request, exc)
        return await response if inspect.isawaitable(response) else response

    app.add_exception_handler(ModelError, model_error)


def create_app(
    settings: Settings,
    *,
    embedder: Embedder | None = None,
    chat_model: ChatModel | None = None,
) -> FastAPI:
    """The HTTP service over one data directory.

    The lifespan opens the catalog, indexes and embedder, starts
    ``settings.ingest.worker_threads`` ingestion threads and loads the
    language model in the background (``/readyz`` says when it is in); a
    prebuilt ``embedder`` or ``chat_model`` is used instead of loading one
    (tests, or a host application that already holds them).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await run_in_threadpool(
            lambda: Runtime.open(
                settings,
                embedder=embedder,
                chat_model=chat_model,
                workers=settings.ingest.worker_threads,
                warm_indexes=True,
            )
        )
        if runtime.chat_model_loaded:
            loader = None
            freeze_startup_heap()  # constant time: no reason to leave the event loop
        else:
            loader = ModelLoader(runtime)  # freezes the heap once the model is in
        app.state.model_loader = loader
        app.state.runtime = runtime
        log.info("service started data_dir=%s", settings.data_dir)
        try:
            yield
        finally:
            app.state.runtime = None
            try:
                if loader is not None:
                    await run_in_threadpool(loader.join)
                await run_in_threadpool(runtime.close)
            finally:
                thaw_heap()  # process-wide: another app in this process loses its freeze too

    app = FastAPI(
        title="RAG service",
        version=__version__,
        description="Upload documents, ask questions, get answers with citations.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.runtime = None
    app.state.model_loader = None
    app.state.metrics = metrics = ServiceMetrics(lambda: app.state.runtime)
    app.state.limiter = RateLimiter(
        requests_per_minute=settings.limits.requests_per_minute,
        tokens_per_minute=settings.limits.tokens_per_minute,
    )
    install_error_handlers(app)
    _count_model_errors(app, metrics)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    # Health, readiness and metrics stay outside the limits: probes must always get through.
    app.include_router(health.router)
    app.include_router(web.router)
    for router in (documents.router, jobs.router, query.router, openai_compat.router):
        app.include_router(router, dependencies=[Depends(limit_requests)])
    return app
