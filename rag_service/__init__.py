"""A retrieval-augmented generation service: documents in, cited answers out."""

__version__ = "0.1.0"

from rag_service.openmp import set_openmp_wait_defaults

# Before anything imports torch, FAISS or llama.cpp: libgomp reads it once, when it loads.
set_openmp_wait_defaults()

from rag_service.config import Settings  # noqa: E402 (after the OpenMP defaults)
from rag_service.runtime import Runtime  # noqa: E402

__all__ = ["Runtime", "Settings", "__version__"]
