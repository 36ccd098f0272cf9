"""A retrieval-augmented generation service: documents in, cited answers out."""

__version__ = "0.1.0"

from rag_service.config import Settings
from rag_service.runtime import Runtime

__all__ = ["Runtime", "Settings", "__version__"]
