"""Helpers for the retrieval tests: chosen vectors, a fake embedder, direct commits."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from rag_service.embedding import Embedder
from rag_service.storage.catalog import Catalog, IncomingFile
from rag_service.storage.records import NewChunk

DIM = 4


def axis(i: int) -> npt.NDArray[np.float32]:
    v = np.zeros(DIM, dtype=np.float32)
    v[i] = 1.0
    return v


def toward(i: int, weight: float) -> npt.NDArray[np.float32]:
    """A unit vector whose cosine with ``axis(i)`` is ``weight``."""
    v = np.zeros(DIM, dtype=np.float32)
    v[i] = weight
    v[(i + 1) % DIM] = float(np.sqrt(1.0 - weight**2))
    return v


class FakeEmbedder(Embedder):
    """Queries embed to the vector registered for them (axis 0 otherwise)."""

    model_id = "fake"
    dim = DIM
    max_seq_length = 128

    def __init__(self) -> None:
        self.queries: dict[str, npt.NDArray[np.float32]] = {}

    def embed_batch(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        return np.vstack([self.queries.get(t, axis(0)) for t in texts]).astype(np.float32)

    def count_tokens(self, text: str) -> int:
        return len(text.split())


def add_document(
    catalog: Catalog,
    source: str,
    chunks: Sequence[tuple[str, npt.NDArray[np.float32], int | None]],
    *,
    content_type: str = "text/plain",
    metadata: dict[str, Any] | None = None,
    collection: str = "c",
) -> str:
    """Register and commit a document: ``chunks`` are (text, vector, page)."""
    sha = f"{abs(hash((collection, source, tuple(c[0] for c in chunks)))):064x}"[-64:]
    _, docs = catalog.register_upload(
        collection, "fake", DIM, [IncomingFile(source, sha, 10, None, metadata or {})]
    )
    new = [
        NewChunk(i, text, page, (), 0, len(text), 3, vec)
        for i, (text, vec, page) in enumerate(chunks)
    ]
    assert (
        catalog.commit_document(docs[0].id, new, pages=None, content_type=content_type) is not None
    )
    return docs[0].id


def fts_ok(catalog: Catalog) -> None:
    """FTS5's own check that the index matches the chunks table."""
    catalog.read().execute("INSERT INTO chunks_fts(chunks_fts) VALUES ('integrity-check')")
