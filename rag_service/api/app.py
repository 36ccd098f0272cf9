"""The FastAPI application: ``create_app(settings)``."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from rag_service import __version__
from rag_service.api.errors import install_error_handlers
from rag_service.api.routes import documents, health, jobs, query
from rag_service.config import Settings
from rag_service.embedding import Embedder
from rag_service.llm.base import ChatModel
from rag_service.runtime import Runtime

log = logging.getLogger(__name__)


def create_app(
    settings: Settings,
    *,
    embedder: Embedder | None = None,
    chat_model: ChatModel | None = None,
) -> FastAPI:
    """The HTTP service over one data directory.

    The lifespan opens the catalog, indexes, embedder and language model and
    starts ``settings.ingest.worker_threads`` ingestion threads; a prebuilt
    ``embedder`` or ``chat_model`` is used instead of loading one (tests, or a
    host application that already holds them).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await run_in_threadpool(
            lambda: Runtime.open(
                settings,
                embedder=embedder,
                chat_model=chat_model,
                workers=settings.ingest.worker_threads,
                load_chat_model=True,
                warm_indexes=True,
            )
        )
        app.state.runtime = runtime
        log.info("service ready data_dir=%s", settings.data_dir)
        try:
            yield
        finally:
            app.state.runtime = None
            await run_in_threadpool(runtime.close)

    app = FastAPI(
        title="RAG service",
        version=__version__,
        description="Upload documents, ask questions, get answers with citations.",
        lifespan=lifespan,
    )
    app.state.runtime = None
    install_error_handlers(app)
    for router in (health.router, documents.router, jobs.router, query.router):
        app.include_router(router)
    return app
