"""The job loop: claim a job, ingest its documents, report, repeat.

A bad document fails itself with a message and the loop goes on; nothing a
document does stops the worker.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from ingest.pipeline import IngestPipeline
from rag_service.errors import DocumentError
from rag_service.storage.jobs import JobQueue
from rag_service.storage.records import Job

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

    def wake(self) -> None:
        """Look for work now instead of at the next poll."""
        self._wake.set()

    def run(self, stop: threading.Event) -> None:
        """Process jobs until ``stop`` is set."""
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
        for doc_id in job.document_ids:
            self._process_document(job, doc_id, tally)
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

    def _process_document(self, job: Job, doc_id: str, tally: _Tally) -> None:
        document = self.catalog.document_by_id(doc_id)
        if document is None or document.status == "indexed":
            # deleted meanwhile, or indexed before a predecessor of this worker died
            tally.done += 1
            tally.chunks += document.chunk_count if document else 0
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
            result = self.pipeline.process(document, report)
        except DocumentError as exc:
            message = exc.message
            log.info("document failed id=%s source=%s error=%s", doc_id, document.source, exc)
        except Exception as exc:  # a bug or a broken model fails the document, not the worker
            if self.catalog.document_by_id(doc_id) is None:  # deleted while being ingested
                tally.done += 1
                return
            message = f"internal error while ingesting: {exc}"
            log.exception("document crashed id=%s source=%s", doc_id, document.source)
        else:
            tally.done += 1
            tally.chunks += result.chunks
            if result.committed and self.on_indexed is not None:
                self.on_indexed(job.collection)
            return
        tally.failed += 1
        tally.failures.append(f"{document.source}: {message}")
        self.catalog.set_document_status(doc_id, "failed", error=message)


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
