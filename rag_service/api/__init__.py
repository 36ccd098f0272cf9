"""The HTTP API: FastAPI app, routes and error mapping."""

from rag_service.api.app import create_app

__all__ = ["create_app"]
