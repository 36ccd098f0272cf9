"""Thread pools of the numeric libraries, and question embeddings batched across requests.

The HTTP server already runs requests in parallel (plain FastAPI handlers run
in AnyIO's pool of 40 threads), so every library that brings its own pool
multiplies with it: 40 request threads, each running torch on one intra-op
thread per core and FAISS on one OpenMP thread per core, is several hundred
runnable threads on a 2-core machine.  ``configure_compute`` sets those pools
once when a ``Runtime`` opens (``ComputeSettings``, ``RAG_COMPUTE__*``):

    torch        per role: question batches on ``torch_threads``, ingestion
                 workers on ``ingest_torch_threads`` (``use_torch_threads``,
                 called by each before it embeds: torch keeps the count per
                 thread once set, and new threads start from the last value
                 set anywhere)
    FAISS        OpenMP keeps its thread count per thread: ``OMP_NUM_THREADS``
                 is set before FAISS is first imported (every thread then
                 starts from it), and the calling thread is set directly
    llama.cpp    ``LLMSettings.threads``, one generation at a time (its own gate)
    tokenizers   ``TOKENIZERS_PARALLELISM=false``, set by the embedder
    OpenMP waits ``OMP_WAIT_POLICY``/``GOMP_SPINCOUNT``, set when ``rag_service``
                 is imported, before libgomp loads (``rag_service/openmp.py``)
    malloc       glibc's arena count (``limit_malloc_arenas``): one arena per
                 request thread fragments and memory grows under load; and
                 freed heap handed back periodically (``start_malloc_trimmer``)

It also wraps the embedder in a ``BatchingEmbedder``: questions that arrive
together are embedded in one encode call, which costs far less than one call
each (bench/concurrency.py measures both).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from rag_service.config import ComputeSettings
from rag_service.embedding import Embedder, Vectors

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ThreadCounts:
    """The thread pools as the libraries report them in the calling thread."""

    torch: int | None
    torch_interop: int | None
    faiss: int | None


def thread_counts() -> ThreadCounts:
    """What torch and FAISS use now, None for a library not imported yet (nothing to report)."""
    torch: Any = sys.modules.get("torch")
    faiss: Any = sys.modules.get("faiss")
    return ThreadCounts(
        torch=torch.get_num_threads() if torch is not None else None,
        torch_interop=torch.get_num_interop_threads() if torch is not None else None,
        faiss=faiss.omp_get_max_threads() if faiss is not None else None,
    )


def question_threads(settings: ComputeSettings) -> int:
    return settings.torch_threads or os.cpu_count() or 1


def ingest_threads(settings: ComputeSettings) -> int:
    return settings.ingest_torch_threads or os.cpu_count() or 1


def use_torch_threads(count: int) -> None:
    """Run torch on ``count`` intra-op threads in the calling thread (0: leave it as it is).

    A no-op when torch is not loaded (the ONNX embedder) or already set so.
    """
    torch: Any = sys.modules.get("torch")
    if torch is None or count <= 0 or torch.get_num_threads() == count:
        return
    torch.set_num_threads(count)


def apply_thread_settings(settings: ComputeSettings) -> ThreadCounts:
    """Set torch's and FAISS's thread pools; returns what they report afterwards."""
    if settings.faiss_threads:
        if "faiss" in sys.modules:
            # Too late for the environment: only this thread (and OpenMP teams it
            # starts) can still be set.
            sys.modules["faiss"].omp_set_num_threads(settings.faiss_threads)
        else:
            os.environ["OMP_NUM_THREADS"] = str(settings.faiss_threads)
    torch: Any = sys.modules.get("torch")
    if torch is not None:  # else no model here runs on torch (the ONNX embedder)
        # OMP_NUM_THREADS above must not decide torch's count: set it either way.
        torch.set_num_threads(question_threads(settings))
    counts = thread_counts()
    log.info(
        "compute threads torch=%s torch_interop=%s faiss=%s query_batch=%d",
        counts.torch,
        counts.torch_interop,
        counts.faiss if counts.faiss is not None else os.environ.get("OMP_NUM_THREADS"),
        settings.query_batch,
    )
    return counts


_M_ARENA_MAX = -8  # glibc's mallopt parameter number


def limit_malloc_arenas(arenas: int) -> bool:
    """Cap glibc's malloc arenas for this process; False where that is not possible.

    glibc fixes the cap the first time a thread wants a new arena beyond its
    initial few, so this must run before a server's thread pool fills: a
    ``Runtime`` does it as it opens.  ``MALLOC_ARENA_MAX`` in the environment
    wins (glibc read it at start; the operator set it on purpose).
    """
    if arenas <= 0 or "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = _glibc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_ARENA_MAX, arenas))


def _glibc() -> Any | None:
    import ctypes
    import ctypes.util
    import platform

    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def start_malloc_trimmer(interval_s: float, stop: threading.Event) -> threading.Thread | None:
    """Call glibc's ``malloc_trim(0)`` every ``interval_s`` seconds until ``stop`` is set.

    glibc keeps freed memory in its arenas for reuse and returns only the top
    of each heap, so after a burst of concurrent requests resident memory
    stays at the burst's peak and creeps up with every higher one.  A trim
    releases the free pages inside the heaps too (a few milliseconds here).
    None when there is nothing to do (interval 0, not glibc).
    """
    libc = _glibc() if interval_s > 0 else None
    if libc is None or not hasattr(libc, "malloc_trim"):
        return None

    def trim() -> None:
        while not stop.wait(interval_s):
            libc.malloc_trim(0)

    thread = threading.Thread(target=trim, name="malloc-trim", daemon=True)
    thread.start()
    return thread


def freeze_startup_heap() -> None:
    """Keep every object alive now out of later garbage collections (``gc.freeze``).

    Loading torch, transformers, llama.cpp's bindings and the app leaves
    half a million long-lived objects, and a full collection walks them all
    with the GIL held: 297 ms, against 0.9 ms with them frozen; a server
    without the freeze ran one within its first 31 requests, and that
    request took 360 ms instead of 20-30 (``python bench/first_request.py
    --rounds 3``).  Frozen objects sit in a generation the collector skips;
    reference counting still frees them.  No collection first: it would
    cost those 300 ms at every start (the tests start hundreds of apps) to
    free a few dozen objects (88 in one measured server), which
    ``thaw_heap`` hands back to the collector when the server stops.
    """
    gc.freeze()
    log.info("startup heap frozen objects=%d", gc.get_freeze_count())


def thaw_heap() -> None:
    """Undo ``freeze_startup_heap``: frozen objects can be collected again."""
    gc.unfreeze()


def configure_compute(settings: ComputeSettings, embedder: Embedder) -> Embedder:
    """Apply the thread and allocator settings and return the embedder the services should use."""
    if limit_malloc_arenas(settings.malloc_arenas):
        log.info("malloc arenas limited to %d", settings.malloc_arenas)
    apply_thread_settings(settings)
    return BatchingEmbedder(
        embedder, max_batch=settings.query_batch, torch_threads=question_threads(settings)
    )


@dataclass(eq=False)
class _Question:
    text: str
    ready: threading.Event = field(default_factory=threading.Event)
    vector: Vectors | None = None
    error: BaseException | None = None


class BatchingEmbedder(Embedder):
    """Embeds questions asked at the same time in one call of the wrapped embedder.

    No question waits for company: one asked while no batch is running is
    embedded at once.  Questions asked while one runs queue up, and when it
    ends the next batch takes up to ``max_batch`` of them.  So at most one
    question batch runs at a time, and under load a batch costs little more
    than one question.  With ``max_batch`` 1 there is no queue: each question
    is embedded at once in its own thread.  Everything else (``embed`` of
    chunks, token counts) passes straight through.

    Batches run on one long-lived thread ("question-embedder", started with
    the first question, stopped by ``close``) on ``torch_threads`` (0: as
    the thread is).  When the asking threads took turns at leading a batch,
    each that ran torch on more than one thread got an OpenMP team and
    per-thread buffers of its own, and the server's pool stops idle threads
    and starts new ones all the time: with two torch threads the server's
    memory kept climbing under load (+8.7 MiB/min over the second half of a
    15-minute bench/load.py run), and with this one thread it levelled off
    (-1.9 MiB/min over the second half of 13 minutes).  So a batch can use
    every core and its buffers are made once.
    """

    def __init__(self, inner: Embedder, *, max_batch: int = 32, torch_threads: int = 0) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be at least 1")
        self.inner = inner
        self.model_id = inner.model_id
        self.dim = inner.dim
        self.max_seq_length = inner.max_seq_length
        self.batch_size = inner.batch_size
        self.max_batch = max_batch
        self.torch_threads = torch_threads
        self._wake = threading.Condition()
        self._queue: list[_Question] = []
        self._thread: threading.Thread | None = None
        self._closed = False
        #: Encode calls made for questions, and questions embedded (for benchmarks).
        self.batches = 0
        self.questions = 0

    def embed_batch(self, texts: Sequence[str]) -> Vectors:
        return self.inner.embed_batch(texts)

    def embed(self, texts: Sequence[str]) -> Vectors:
        return self.inner.embed(texts)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def tokenizer(self) -> Any:
        return self.inner.tokenizer()

    def close(self) -> None:
        """Embed what is queued, stop the batch thread, close the wrapped embedder."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join(60)
        self.inner.close()

    def embed_query(self, text: str) -> Vectors:
        if self.max_batch == 1:
            use_torch_threads(self.torch_threads)
            return self.inner.embed_query(text)
        mine = _Question(text)
        with self._wake:
            if self._closed:
                raise RuntimeError("the embedder is closed")
            self._queue.append(mine)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._serve, name="question-embedder", daemon=True
                )
                self._thread.start()
            self._wake.notify()
        mine.ready.wait()
        if mine.error is not None:
            raise mine.error
        assert mine.vector is not None
        return mine.vector

    def _serve(self) -> None:
        """The batch thread: embed queued questions, up to ``max_batch`` at a time."""
        use_torch_threads(self.torch_threads)  # torch keeps it for this thread
        while True:
            with self._wake:
                while not self._queue and not self._closed:
                    self._wake.wait()
                if not self._queue:
                    return
                batch = self._queue[: self.max_batch]
                del self._queue[: self.max_batch]
            # Errors are the questions' (set on each); the thread goes on.
            with contextlib.suppress(Exception):
                self._embed(batch)

    @property
    def waiting(self) -> int:
        """Questions queued for the next batch."""
        with self._wake:
            return len(self._queue)

    def _embed(self, batch: list[_Question]) -> None:
        try:
            self._embed_together(batch)
        except Exception:
            if len(batch) == 1:
                raise
            # One bad question must not fail the others asked at the same time.
            for question in batch:
                with contextlib.suppress(Exception):
                    self._embed_together([question])
        finally:
            for question in batch:
                question.ready.set()

    def _embed_together(self, batch: list[_Question]) -> None:
        try:
            vectors = self.inner.embed([q.text for q in batch])
        except BaseException as exc:
            for question in batch:
                question.error = exc
            raise
        for question, vector in zip(batch, vectors, strict=True):
            question.vector = np.array(vector, dtype=np.float32)
            question.error = None
        self.batches += 1
        self.questions += len(batch)
