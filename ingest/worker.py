"""The job loop: claim a job, ingest its documents, report, repeat.

A bad document fails itself with a message and the loop goes on; nothing a
document does stops the worker.  While one document of a job embeds, the
next one is read and chunked on a background thread (a prefetch of one), so
the encoder does not wait for the parser between documents.

A worker asked to stop gives its job back between two documents; one that
dies leaves the document in flight marked ``processing``, which is how the
queue's poison guard knows what killed it (see ``rag_service.storage.jobs``).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from types import TracebackType

from ingest.pipeline import IngestPipeline, PreparedDocument
from rag_service.errors import DocumentError, EmbeddingMismatch
from rag_service.storage.jobs import JobQueue
from rag_service.storage.records import Document, Job

log = logging.getLogger(__name__)


class Worker:
    """One ingestion worker; run it in a thread or as the main loop of a process."""

    def __init__(
        self,
        *,
        queue: JobQueue,
        pipeline: IngestPipeline,
        poll_interval_s: float = 1.0,
        on_indexed: Callable[[str], None] | None = None,
        name: str | None = None,
    ) -> None:
        self.queue = queue
        self.pipeline = pipeline
        self.catalog = pipeline.catalog
        self.poll_interval_s = poll_interval_s
        self.on_indexed = on_indexed
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._wake = threading.Event()
        self._stop: threading.Event | None = None

    def wake(self) -> None:
        """Look for work now instead of at the next poll."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Process jobs until ``stop`` is set; a job in progress is given back."""
        self._stop = stop
        log.info("worker started name=%s", self.name)
        while not stop.is_set():
            try:
                worked = self.run_once()
            except Exception:  # keep the loop alive whatever a job did
                log.exception("worker loop error name=%s", self.name)
                worked = False
            if not worked:
                self._wake.wait(self.poll_interval_s)
                self._wake.clear()
        log.info("worker stopped name=%s", self.name)

    def run_once(self) -> bool:
        """Claim and process one job; False when the queue was empty."""
        job = self.queue.claim(self.name)
        if job is None:
            return False
        self.process(job)
        return True

    def process(self, job: Job) -> None:
        """Ingest every document of a claimed job and close it."""
        log.info(
            "job claimed id=%s documents=%d worker=%s", job.id, len(job.document_ids), self.name
        )
        tally = _Tally()
        ids = job.document_ids
        with _Prefetch(self.pipeline, self.name) as prefetch:
            for i, doc_id in enumerate(ids):
                if self._stop is not None and self._stop.is_set():
                    self.queue.progress(
                        job.id,
                        self.name,
                        docs_done=tally.done,
                        docs_failed=tally.failed,
                        chunks_done=tally.chunks,
                    )
                    self.queue.release(job.id, self.name)
                    log.info("job released id=%s worker=%s done=%d", job.id, self.name, i)
                    return
                self._process_document(job, doc_id, tally, prefetch, ids[i + 1 : i + 2])
        self.queue.progress(
            job.id,
            self.name,
            docs_done=tally.done,
            docs_failed=tally.failed,
            chunks_done=tally.chunks,
        )
        error = None
        if tally.failures:
            error = f"{tally.failed} of {len(job.document_ids)} documents failed: " + "; ".join(
                tally.failures
            )
        self.queue.finish(job.id, self.name, error=error)
        log.info("job finished id=%s done=%d failed=%d", job.id, tally.done, tally.failed)

    def _process_document(
        self,
        job: Job,
        doc_id: str,
        tally: _Tally,
        prefetch: _Prefetch,
        following: tuple[str, ...],
    ) -> None:
        prefetched = prefetch.take(doc_id)
        document = self.catalog.document_by_id(doc_id)
        if document is None or document.status == "indexed":
            # deleted meanwhile, or indexed before a predecessor of this worker died
            if prefetched is not None:
                prefetched.cancel()
            self._prefetch(following, prefetch)
            tally.done += 1
            tally.chunks += document.chunk_count if document else 0
            return
        if document.status == "failed":
            # failed earlier in this job, by a predecessor or by the poison guard
            if prefetched is not None:
                prefetched.cancel()
            self._prefetch(following, prefetch)
            tally.failed += 1
            tally.failures.append(f"{document.source}: {document.error}")
            return
        self.catalog.set_document_status(doc_id, "processing")

        def report(stage: str, chunks_done: int, chunks_total: int) -> None:
            self.queue.progress(
                job.id,
                self.name,
                stage=stage,
                chunks_done=tally.chunks + chunks_done,
                chunks_total=tally.chunks + chunks_total,
                docs_done=tally.done,
                docs_failed=tally.failed,
            )

        try:
            if prefetched is None:
                prepared = self.pipeline.prepare(document, report)
            else:
                # the row read now wins over the one read when the prefetch began
                prepared = replace(prefetched.result(), document=document)
            self._prefetch(following, prefetch)
            result = self.pipeline.index(prepared, report)
        except (DocumentError, EmbeddingMismatch) as exc:
            message = exc.message
            log.info("document failed id=%s source=%s error=%s", doc_id, document.source, exc)
        except Exception as exc:  # a bug or a broken model fails the document, not the worker
            if self.catalog.document_by_id(doc_id) is None:  # deleted while being ingested
                tally.done += 1
                self.queue.document_finished(job.id, self.name)
                return
            message = f"internal error while ingesting: {exc}"
            log.exception("document crashed id=%s source=%s", doc_id, document.source)
        else:
            tally.done += 1
            tally.chunks += result.chunks
            self.queue.document_finished(job.id, self.name)
            if result.committed and self.on_indexed is not None:
                self.on_indexed(job.collection)
            return
        tally.failed += 1
        tally.failures.append(f"{document.source}: {message}")
        self.catalog.set_document_status(doc_id, "failed", error=message)
        self.queue.document_finished(job.id, self.name)

    def _prefetch(self, following: tuple[str, ...], prefetch: _Prefetch) -> None:
        """Start preparing the next document, read now so a deleted one is not."""
        for next_id in following:
            upcoming = self.catalog.document_by_id(next_id)
            if upcoming is not None and upcoming.status != "indexed":
                prefetch.start(upcoming)


class _Prefetch:
    """Reads and chunks at most one upcoming document on a background thread.

    The thread is started by the first ``start`` and joined on exit, so a
    job leaves no thread behind; a document is prepared at most once, and a
    result nobody takes (the document was deleted meanwhile) is dropped.
    """

    def __init__(self, pipeline: IngestPipeline, worker: str) -> None:
        self._pipeline = pipeline
        self._worker = worker
        self._executor: ThreadPoolExecutor | None = None
        self._pending: tuple[str, Future[PreparedDocument]] | None = None

    def start(self, document: Document) -> None:
        """Begin preparing ``document`` unless a document is already pending."""
        if self._pending is not None:
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ingest-prefetch")
        log.debug("prefetch started document=%s worker=%s", document.id, self._worker)
        self._pending = (document.id, self._executor.submit(self._pipeline.prepare, document))

    def take(self, document_id: str) -> Future[PreparedDocument] | None:
        """The pending preparation of ``document_id``, if it is the one pending."""
        if self._pending is None or self._pending[0] != document_id:
            return None
        future = self._pending[1]
        self._pending = None
        return future

    def __enter__(self) -> _Prefetch:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._pending is not None:
            self._pending[1].cancel()
            self._pending = None
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None


@dataclass
class _Tally:
    """Running counts of one job."""

    done: int = 0
    failed: int = 0
    chunks: int = 0
    failures: list[str] = field(default_factory=list)


def start_worker_threads(workers: list[Worker], stop: threading.Event) -> list[threading.Thread]:
    """Run each worker in a daemon thread."""
    threads = []
    for i, worker in enumerate(workers):
        thread = threading.Thread(
            target=worker.run, args=(stop,), name=f"ingest-worker-{i}", daemon=True
        )
        thread.start()
        threads.append(thread)
    return threads
