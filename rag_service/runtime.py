"""Builds the long-lived parts once and hands out the services.

The HTTP app, the CLI and a backend that embeds the library all start here:

    with Runtime.open(Settings()) as rag:
        receipt = rag.documents.add_paths("docs", [Path("manual.pdf")])
        rag.wait_for_job(receipt.job_id)
        print(rag.query.ask("docs", "How do I install it?").answer)

This is the one place ``rag_service`` imports ``ingest``: to start workers, and
to let uploads be checked by the loaders' type sniffing.
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType
from typing import TYPE_CHECKING, Self

from rag_service.compute import configure_compute, ingest_threads, start_malloc_trimmer
from rag_service.config import Settings
from rag_service.embedding import Embedder, make_embedder
from rag_service.errors import RagError
from rag_service.llm.base import ChatModel
from rag_service.llm.factory import create_chat_model
from rag_service.rerank import Reranker, load_reranker
from rag_service.services.documents import DocumentService, Inspector
from rag_service.services.query import QueryService
from rag_service.storage.blobs import BlobStore, release_blobs
from rag_service.storage.catalog import Catalog
from rag_service.storage.jobs import JobQueue
from rag_service.storage.records import Job
from rag_service.storage.vectors import VectorStore

if TYPE_CHECKING:
    from ingest.worker import Worker

log = logging.getLogger(__name__)


def _inspector() -> Inspector:
    """The loaders' type sniffing, so uploads of unreadable types are refused at once."""
    from ingest.loaders import detect_kind

    return detect_kind


class Runtime:
    """Catalog, blobs, indexes, models, services and worker threads of one data directory."""

    def __init__(
        self,
        settings: Settings,
        *,
        embedder: Embedder | None = None,
        chat_model: ChatModel | None = None,
    ) -> None:
        self.settings = settings
        # First, so that a wrong RAG_QUERY__RERANK_MODEL fails before anything is opened.
        self.reranker: Reranker | None = load_reranker(settings.query)
        data = settings.data_dir
        data.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(data / "catalog.sqlite3")
        self.blobs = BlobStore(data / "blobs")
        self.vectors = VectorStore(self.catalog, data)
        self.jobs = JobQueue(
            self.catalog,
            lease_s=settings.ingest.lease_s,
            max_attempts=settings.ingest.max_attempts,
        )
        self._owns_embedder = embedder is None
        self.embedder = configure_compute(
            settings.compute, embedder or make_embedder(settings.embedding)
        )
        self._owns_chat_model = chat_model is None
        self._chat_model = chat_model
        self._chat_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._workers: list[Worker] = []
        self.documents = DocumentService(
            catalog=self.catalog,
            blobs=self.blobs,
            vectors=self.vectors,
            jobs=self.jobs,
            settings=settings.ingest,
            embed_model=self.embedder.model_id,
            embed_dim=self.embedder.dim,
            on_enqueued=self._wake_workers,
            inspect=_inspector(),
        )
        self.query = QueryService(
            catalog=self.catalog,
            vectors=self.vectors,
            embedder=self.embedder,
            chat_model=self.chat_model,
            settings=settings.query,
            max_answer_tokens=settings.llm.max_tokens,
            temperature=settings.llm.temperature,
            reranker=self.reranker,
        )
        # Finish removals a crash interrupted, then sweep stale partial uploads.
        release_blobs(self.blobs, self.catalog, self.catalog.pending_freed_blobs())
        self.blobs.collect_garbage(self.catalog.referenced_blobs())
        # last: nothing after it can fail and leave it running
        self._trimmer = start_malloc_trimmer(settings.compute.malloc_trim_seconds, self._stop)

    @classmethod
    def open(
        cls,
        settings: Settings,
        *,
        embedder: Embedder | None = None,
        chat_model: ChatModel | None = None,
        workers: int = 0,
        load_chat_model: bool = False,
        warm_indexes: bool = False,
    ) -> Self:
        """Open a data directory.

        Optionally start ingestion threads, load the language model now rather
        than at the first question, and load every collection's FAISS index
        now rather than at its first search.
        """
        runtime = cls(settings, embedder=embedder, chat_model=chat_model)
        try:
            if load_chat_model:
                runtime.chat_model()
            if warm_indexes:
                runtime.warm_indexes()
            if workers:
                runtime.start_workers(workers)
        except BaseException:
            runtime.close()
            raise
        return runtime

    # -- models --------------------------------------------------------------

    def chat_model(self) -> ChatModel:
        """The language model, loaded on first use."""
        if self._chat_model is None:
            with self._chat_lock:
                if self._chat_model is None:
                    started = time.perf_counter()
                    model = create_chat_model(self.settings.llm)
                    try:
                        # Before it is published: readiness says loading until warm.
                        self._warm_chat_model(model)
                    except BaseException:
                        model.close()
                        raise
                    self._chat_model = model
                    log.info(
                        "chat model ready backend=%s seconds=%.1f",
                        self.settings.llm.backend,
                        time.perf_counter() - started,
                    )
        return self._chat_model

    def _warm_chat_model(self, model: ChatModel) -> None:
        """Evaluate the prompt prefix every question shares, once, in the local model."""
        from rag_service.llm.local import warm_local_models
        from rag_service.prompting import ContextSource, build_messages
        from rag_service.storage.records import StoredChunk

        # Two prompts as the query service builds them, differing in question
        # and sources: what they share is what every prompt starts with.
        chunk = StoredChunk(0, "", "probe.txt", 0, None, (), 0, 6, "Probe.")
        system = self.settings.query.system_prompt
        probes = [
            build_messages("What?", [], system_prompt=system),
            build_messages("Why?", [ContextSource(1, chunk, 1.0, "Probe.")], system_prompt=system),
        ]
        warm_local_models(model, probes)

    @property
    def chat_model_loaded(self) -> bool:
        return self._chat_model is not None

    def warm_indexes(self) -> None:
        """Load every collection's FAISS index and catch it up with the catalog."""
        for collection in self.catalog.list_collections():
            try:
                self.vectors.sync(collection.name)
            except RagError:
                log.exception("could not open index collection=%s", collection.name)

    # -- workers -------------------------------------------------------------

    def start_workers(self, count: int) -> None:
        """Run ``count`` ingestion workers in threads of this process."""
        from ingest.worker import start_worker_threads

        workers = [self.make_worker() for _ in range(count)]
        self._workers.extend(workers)
        self._threads.extend(start_worker_threads(workers, self._stop))

    def make_worker(self, *, sync_index: bool = True) -> Worker:
        """A worker on this runtime's catalog; ``sync_index`` catches FAISS up after commits."""
        from ingest.chunking import Chunker
        from ingest.pipeline import IngestPipeline
        from ingest.worker import Worker

        chunker = Chunker(
            self.settings.chunking,
            tokenizer=self.embedder.tokenizer(),
            count_tokens=self.embedder.count_tokens,
            max_seq_length=self.embedder.max_seq_length,
        )
        pipeline = IngestPipeline(
            catalog=self.catalog,
            blobs=self.blobs,
            embedder=self.embedder,
            chunker=chunker,
            settings=self.settings.ingest,
            torch_threads=ingest_threads(self.settings.compute),
        )
        return Worker(
            queue=self.jobs,
            pipeline=pipeline,
            poll_interval_s=self.settings.ingest.poll_interval_s,
            on_indexed=self._index_synced if sync_index else None,
        )

    def _index_synced(self, collection: str) -> None:
        try:
            self.vectors.sync(collection)
        except RagError:
            log.exception("index catch-up failed collection=%s", collection)

    def _wake_workers(self) -> None:
        for worker in self._workers:
            worker.wake()

    @property
    def workers_alive(self) -> int:
        return sum(t.is_alive() for t in self._threads)

    def wait_for_job(self, job_id: str, *, timeout_s: float = 600.0, poll_s: float = 0.2) -> Job:
        """Block until a job has finished (or ``timeout_s`` passes); returns it."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.jobs.get(job_id)
            if job.status in ("succeeded", "failed") or time.monotonic() >= deadline:
                return job
            time.sleep(poll_s)

    # -- closing -------------------------------------------------------------

    def close(self) -> None:
        """Stop workers, write snapshots, release models and the catalog."""
        self._stop.set()
        self._wake_workers()
        for thread in self._threads:
            thread.join(timeout=30)
        self._threads.clear()
        if self._trimmer is not None:
            self._trimmer.join(timeout=30)
        self.vectors.snapshot_all()
        if self._owns_chat_model and self._chat_model is not None:
            self._chat_model.close()
        if self._owns_embedder:
            self.embedder.close()
        if self.reranker is not None:
            self.reranker.close()
        self.catalog.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
