"""Rows of the catalog as frozen values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

DocumentStatus = Literal["queued", "processing", "indexed", "failed"]
JobStatus = Literal["queued", "running", "succeeded", "failed"]
JobStage = Literal["queued", "parsing", "chunking", "embedding", "indexing", "done"]


@dataclass(frozen=True)
class Collection:
    """A named set of documents searched together."""

    id: int
    name: str
    embed_model: str
    dim: int
    created_at: float
    version: int
    document_count: int = 0
    chunk_count: int = 0
    #: FAISS index type and parameters, e.g. ``flat`` or ``hnsw:m=32,...``.
    index_spec: str = "flat"


@dataclass(frozen=True)
class Document:
    """One uploaded file and where it is in ingestion."""

    id: str
    collection: str
    source: str
    sha256: str
    size: int
    content_type: str | None
    status: DocumentStatus
    pages: int | None
    chunk_count: int
    error: str | None
    metadata: dict[str, Any]
    created_at: float
    updated_at: float


@dataclass(frozen=True)
class JobProgress:
    """How far a job has come, in documents and chunks."""

    documents_total: int
    documents_done: int
    documents_failed: int
    chunks_total: int
    chunks_done: int


@dataclass(frozen=True)
class Job:
    """An ingestion job: the documents of one upload."""

    id: str
    collection: str
    status: JobStatus
    stage: str | None
    progress: JobProgress
    error: str | None
    attempts: int
    created_at: float
    started_at: float | None
    finished_at: float | None
    document_ids: tuple[str, ...] = ()


@dataclass(frozen=True)
class NewChunk:
    """A chunk ready to be committed, with its vector."""

    ordinal: int
    text: str
    page: int | None
    headings: tuple[str, ...]
    start_char: int
    end_char: int
    token_count: int
    vector: npt.NDArray[np.float32] = field(repr=False)


@dataclass(frozen=True)
class StoredChunk:
    """A committed chunk joined with its document."""

    id: int
    document_id: str
    source: str
    ordinal: int
    page: int | None
    headings: tuple[str, ...]
    start_char: int
    end_char: int
    text: str
    content_type: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
