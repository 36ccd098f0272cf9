"""Ingest one document: load, chunk, embed, commit.

Embedding is nearly all of the time an ingest takes, so the pipeline spends
the encoder's time only on work that needs it: a document's chunks are
embedded longest first across the whole document (batches of similar
length pad least; sentence-transformers only sorts within one call), a text
that occurs twice is embedded once, and a chunk whose text is unchanged
from the version this document replaces keeps that version's vector.
Loading and chunking are split from embedding (``prepare`` and ``index``) so
the worker can prepare the next document while this one embeds; a long
document chunks its tail on a thread while its head embeds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import asdict, dataclass, replace

import numpy as np

from ingest.chunking import Chunk, Chunker
from ingest.loaders import load_document
from ingest.loaders.base import LoadedDocument
from rag_service.compute import use_torch_threads
from rag_service.config import IngestSettings
from rag_service.embedding import Embedder, Vectors
from rag_service.errors import DocumentTooLarge
from rag_service.services.validation import same_embedder
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
    #: Chunks whose vector was computed by the embedder for this document.
    embedded: int = 0
    #: Chunks that took the vector of an identical text (earlier in the document
    #: or in the version replaced) instead.
    reused: int = 0


@dataclass(frozen=True)
class PreparedDocument:
    """A document read and cut into chunks, ready to embed."""

    document: Document
    loaded: LoadedDocument
    #: Every chunk, or the head's when ``tail`` is still being cut.
    chunks: list[Chunk]
    #: Time spent reading and chunking, counted against the document's budget.
    seconds: float
    #: The rest of a long document's chunks, cut on a thread while the head embeds.
    tail: Future[list[Chunk]] | None = None


class _Deadline:
    """The time budget of one document, checked between stages and batches."""

    def __init__(self, source: str, seconds: float, *, spent: float = 0.0) -> None:
        self._source = source
        self._seconds = seconds
        self._at = time.monotonic() + seconds - spent

    def check(self, stage: str) -> None:
        if time.monotonic() > self._at:
            raise DocumentTooLarge(
                f"{self._source} took more than {self._seconds:g} s before {stage} "
                "(RAG_INGEST__MAX_SECONDS_PER_DOCUMENT); split it into smaller files"
            )


@dataclass
class _EmbedPlan:
    """Which distinct texts of a document still need the encoder."""

    texts: list[str]  # distinct chunk texts, in order of first use
    slot: list[int]  # chunk i's vector is vectors[slot[i]]
    uses: list[int]  # chunks per distinct text
    vectors: Vectors  # one row per distinct text, reused rows filled in
    todo: list[int]  # distinct texts to embed, longest first


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
        overlap_sections: int = 64,
        torch_threads: int = 0,
    ) -> None:
        self.catalog = catalog
        self.blobs = blobs
        self.embedder = embedder
        self.chunker = chunker
        self.settings = settings
        #: Documents with at least this many sections (pages, headings) chunk
        #: all but their first sixteenth on a thread while that part embeds; 0: never.
        self.overlap_sections = overlap_sections
        #: torch threads the embedding thread runs on (0: as that thread is).
        self.torch_threads = torch_threads

    def process(self, document: Document, report: ProgressFn) -> IngestResult:
        """Index ``document``; raises a ``DocumentError`` for bad input."""
        return self.index(self.prepare(document, report), report)

    def prepare(self, document: Document, report: ProgressFn | None = None) -> PreparedDocument:
        """Read and chunk ``document``; raises a ``DocumentError`` for bad input.

        Touches the blob store but not the catalog, so the worker can run it
        on a background thread while the previous document embeds.
        """
        started = time.perf_counter()
        deadline = _Deadline(document.source, self.settings.max_seconds_per_document)
        if report is not None:
            report("parsing", 0, 0)
        data = self.blobs.read(document.sha256)
        loaded = load_document(data, document.source, self.settings, document.content_type)
        del data
        deadline.check("chunking")
        if report is not None:
            report("chunking", 0, 0)
        sections = loaded.sections
        if not self.overlap_sections or len(sections) < self.overlap_sections:
            chunks = self.chunker.chunk(loaded)
            self._check_count(document, len(chunks))
            return PreparedDocument(document, loaded, chunks, time.perf_counter() - started)
        split = max(1, len(sections) // 16)
        chunks = self.chunker.chunk(replace(loaded, sections=sections[:split]))
        self._check_count(document, len(chunks))
        tail = self._chunk_in_background(replace(loaded, sections=sections[split:]), len(chunks))
        return PreparedDocument(document, loaded, chunks, time.perf_counter() - started, tail)

    def _chunk_in_background(self, part: LoadedDocument, first: int) -> Future[list[Chunk]]:
        """Chunk ``part`` on a new thread, numbering its chunks from ``first``."""
        future: Future[list[Chunk]] = Future()

        def run() -> None:
            try:
                chunks = self.chunker.chunk(part)
            except BaseException as exc:  # handed to whoever waits for the tail
                future.set_exception(exc)
            else:
                future.set_result([replace(c, ordinal=c.ordinal + first) for c in chunks])

        future.set_running_or_notify_cancel()
        threading.Thread(target=run, name="ingest-chunk-tail", daemon=True).start()
        return future

    def _check_count(self, document: Document, count: int) -> None:
        limit = self.settings.max_chunks_per_document
        if count > limit:
            raise DocumentTooLarge(
                f"{document.source} makes {count:,} chunks; the limit is {limit:,} "
                "(RAG_INGEST__MAX_CHUNKS_PER_DOCUMENT); split it into smaller files"
            )

    def index(self, prepared: PreparedDocument, report: ProgressFn) -> IngestResult:
        """Embed a prepared document's chunks and commit them with their vectors."""
        started = time.perf_counter()
        document, loaded, chunks = prepared.document, prepared.loaded, prepared.chunks
        deadline = _Deadline(
            document.source, self.settings.max_seconds_per_document, spent=prepared.seconds
        )
        coll = self.catalog.get_collection(document.collection, counts=False)
        # a worker started with another model or backend must not add its vectors
        same_embedder(
            coll.name, (coll.embed_model, coll.dim), (self.embedder.model_id, self.embedder.dim)
        )
        try:
            deadline.check("embedding")
            known = (
                self.catalog.replaced_vectors(
                    document.id, self.embedder.model_id, self.embedder.dim
                )
                if chunks
                else {}
            )
            embedded = 0
            if prepared.tail is not None:
                # the head embeds while the tail is cut; its vectors then count as known
                head = self._plan(chunks, known)
                self._embed(head, report, deadline)
                embedded += len(head.todo)
                known = {**known, **dict(zip(head.texts, head.vectors, strict=True))}
                chunks = chunks + prepared.tail.result()
                self._check_count(document, len(chunks))
            plan = self._plan(chunks, known)
            self._embed(plan, report, deadline)
            embedded += len(plan.todo)
        finally:
            if prepared.tail is not None:
                prepared.tail.exception()  # never leave the chunking thread behind
        total = len(chunks)
        vectors = plan.vectors[plan.slot] if total else plan.vectors
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
        seconds = prepared.seconds + time.perf_counter() - started
        log.info(
            "document indexed id=%s source=%s chunks=%d embedded=%d pages=%s seconds=%.2f",
            document.id,
            document.source,
            total,
            embedded,
            loaded.pages,
            seconds,
        )
        return IngestResult(
            document.id,
            total,
            loaded.pages,
            freed is not None,
            seconds,
            embedded=embedded,
            reused=total - embedded,
        )

    def _plan(self, chunks: Sequence[Chunk], known: dict[str, Vectors]) -> _EmbedPlan:
        """Distinct texts, the vectors already ``known`` for them, the rest sorted."""
        index: dict[str, int] = {}
        slot: list[int] = []
        uses: list[int] = []
        tokens: list[int] = []
        for chunk in chunks:
            j = index.setdefault(chunk.text, len(index))
            if j == len(uses):
                uses.append(0)
                tokens.append(chunk.token_count)
            uses[j] += 1
            slot.append(j)
        texts = list(index)
        vectors = np.empty((len(texts), self.embedder.dim), dtype=np.float32)
        todo: list[int] = []
        for j, text in enumerate(texts):
            vector = known.get(text)
            if vector is None:
                todo.append(j)
            else:
                vectors[j] = vector
        # Longest first, as sentence-transformers orders one call: the first
        # batch is the largest, and every batch pads to texts of its own length.
        todo.sort(key=lambda j: -tokens[j])
        return _EmbedPlan(texts, slot, uses, vectors, todo)

    def _embed(self, plan: _EmbedPlan, report: ProgressFn, deadline: _Deadline) -> None:
        """Fill the plan's missing vectors, a few batches at a time."""
        total = len(plan.slot)
        done = total - sum(plan.uses[j] for j in plan.todo)
        report("embedding", done, total)
        step = max(1, self.embedder.batch_size * 4)
        use_torch_threads(self.torch_threads)
        for start in range(0, len(plan.todo), step):
            deadline.check("embedding")
            group = plan.todo[start : start + step]
            plan.vectors[group] = self.embedder.embed([plan.texts[j] for j in group])
            done += sum(plan.uses[j] for j in group)
            report("embedding", done, total)
