"""Ingest one document: load, chunk, embed, commit."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from ingest.chunking import Chunker
from ingest.loaders import load_document
from rag_service.config import IngestSettings
from rag_service.embedding import Embedder
from rag_service.errors import DocumentTooLarge
from rag_service.storage.blobs import BlobStore, release_blobs
from rag_service.storage.catalog import Catalog
from rag_service.storage.records import Document, NewChunk

log = logging.getLogger(__name__)

#: ``report(stage, chunks_done, chunks_total)``; also renews the job's lease.
ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class IngestResult:
    """What ingesting one document produced."""

    document_id: str
    chunks: int
    pages: int | None
    committed: bool
    seconds: float


class _Deadline:
    """The time budget of one document, checked between stages and batches."""

    def __init__(self, source: str, seconds: float) -> None:
        self._source = source
        self._seconds = seconds
        self._at = time.monotonic() + seconds

    def check(self, stage: str) -> None:
        if time.monotonic() > self._at:
            raise DocumentTooLarge(
                f"{self._source} took more than {self._seconds:g} s before {stage} "
                "(RAG_INGEST__MAX_SECONDS_PER_DOCUMENT); split it into smaller files"
            )


class IngestPipeline:
    """The stages one document goes through; shared by every worker."""

    def __init__(
        self,
        *,
        catalog: Catalog,
        blobs: BlobStore,
        embedder: Embedder,
        chunker: Chunker,
        settings: IngestSettings,
    ) -> None:
        self.catalog = catalog
        self.blobs = blobs
        self.embedder = embedder
        self.chunker = chunker
        self.settings = settings

    def process(self, document: Document, report: ProgressFn) -> IngestResult:
        """Index ``document``; raises a ``DocumentError`` for bad input."""
        started = time.perf_counter()
        deadline = _Deadline(document.source, self.settings.max_seconds_per_document)
        report("parsing", 0, 0)
        data = self.blobs.read(document.sha256)
        loaded = load_document(data, document.source, self.settings, document.content_type)
        del data
        deadline.check("chunking")
        report("chunking", 0, 0)
        chunks = self.chunker.chunk(loaded)
        total = len(chunks)
        limit = self.settings.max_chunks_per_document
        if total > limit:
            raise DocumentTooLarge(
                f"{document.source} makes {total:,} chunks; the limit is {limit:,} "
                "(RAG_INGEST__MAX_CHUNKS_PER_DOCUMENT); split it into smaller files"
            )
        report("embedding", 0, total)
        step = max(1, self.embedder.batch_size * 4)
        parts = []
        for start in range(0, total, step):
            deadline.check("embedding")
            parts.append(self.embedder.embed([c.text for c in chunks[start : start + step]]))
            report("embedding", min(total, start + step), total)
        vectors = np.vstack(parts) if parts else np.empty((0, self.embedder.dim), np.float32)
        report("indexing", total, total)
        freed = self.catalog.commit_document(
            document.id,
            [NewChunk(**asdict(c), vector=vectors[i]) for i, c in enumerate(chunks)],
            pages=loaded.pages,
            content_type=loaded.content_type,
            title=loaded.title,
        )
        if freed:
            release_blobs(self.blobs, self.catalog, freed)
        seconds = time.perf_counter() - started
        log.info(
            "document indexed id=%s source=%s chunks=%d pages=%s seconds=%.2f",
            document.id,
            document.source,
            total,
            loaded.pages,
            seconds,
        )
        return IngestResult(document.id, total, loaded.pages, freed is not None, seconds)
