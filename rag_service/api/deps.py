"""Dependencies that hand the lifespan's long-lived parts to handlers."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from rag_service.errors import IndexNotReady
from rag_service.runtime import Runtime
from rag_service.services.documents import DocumentService
from rag_service.services.query import QueryService


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
