"""The poison-job guard counts what a document costs, not how often a job was restarted.

A document that kills its worker every time is failed after ``max_attempts``
deaths with a message that names it, and the rest of its job is indexed; a
job whose workers are restarted more often than that, while they make
progress or stop cleanly, still finishes.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from rag_service.config import IngestSettings, Settings
from rag_service.embedding import Vectors
from rag_service.runtime import Runtime
from tests.helpers import HashEmbedder
from tests.ingest import poison_worker

LEASE_S = 0.2
ROOT = Path(__file__).resolve().parents[2]


class WorkerDied(BaseException):
    """Stands for the death of the worker's process: nothing in the worker catches it."""


class DyingEmbedder(HashEmbedder):
    """Dies on texts with POISON every time, and on every text the first time if asked to."""

    def __init__(self, *, die_once_on_each: bool = False) -> None:
        self.die_once_on_each = die_once_on_each
        self.seen: set[str] = set()
        self.after_embed: threading.Event | None = None

    def embed_batch(self, texts: Sequence[str]) -> Vectors:
        if any("POISON" in t for t in texts):
            raise WorkerDied
        if self.die_once_on_each and not self.seen.issuperset(texts):
            self.seen.update(texts)
            raise WorkerDied
        if self.after_embed is not None:
            self.after_embed.set()
        return super().embed_batch(texts)


def runtime_for(tmp_path: Path, embedder: HashEmbedder, max_attempts: int) -> Runtime:
    ingest = IngestSettings(lease_s=LEASE_S, max_attempts=max_attempts)
    return Runtime.open(Settings(data_dir=tmp_path / "data", ingest=ingest), embedder=embedder)


def run_until_finished(runtime: Runtime, job_id: str, *, limit: int = 12) -> int:
    """Start worker after worker (each one a new 'process') until the job ends; returns deaths."""
    deaths = 0
    for _ in range(limit):
        if runtime.jobs.get(job_id).status in ("succeeded", "failed"):
            return deaths
        try:
            runtime.make_worker().run_once()
        except WorkerDied:
            deaths += 1
            time.sleep(LEASE_S * 1.5)  # the lease of the dead worker runs out
    raise AssertionError(f"job {job_id} still {runtime.jobs.get(job_id).status}")


def files(*texts: tuple[str, str]) -> list[tuple[str, bytes]]:
    return [(f"{name}.txt", f"{name} {text}".encode()) for name, text in texts]


def test_a_document_that_kills_every_worker_is_failed_by_name_and_the_rest_indexed(
    tmp_path: Path,
) -> None:
    with runtime_for(tmp_path, DyingEmbedder(), max_attempts=2) as runtime:
        receipt = runtime.documents.add_bytes(
            "docs",
            files(("alpha", "words"), ("poison", "POISON words"), ("beta", "more words")),
        )
        assert run_until_finished(runtime, receipt.job_id) == 2  # max_attempts deaths
        alpha, poison, beta = (runtime.catalog.document_by_id(d.id) for d in receipt.documents)
        assert alpha is not None and alpha.status == "indexed"
        assert beta is not None and beta.status == "indexed"
        message = (
            "the ingestion worker stopped 2 times while ingesting poison.txt (it crashed or "
            "was killed); it was skipped. Upload it again to retry"
        )
        assert poison is not None and (poison.status, poison.error) == ("failed", message)
        job = runtime.jobs.get(receipt.job_id)
        assert job.status == "failed"
        assert job.error == f"1 of 3 documents failed: poison.txt: {message}"
        assert job.progress.documents_done == 2 and job.progress.documents_failed == 1
        assert runtime.vectors.size("docs") == 2


def test_a_job_whose_workers_die_more_often_than_max_attempts_finishes_when_they_progress(
    tmp_path: Path,
) -> None:
    embedder = DyingEmbedder(die_once_on_each=True)
    with runtime_for(tmp_path, embedder, max_attempts=2) as runtime:
        names = [(f"doc{i}", f"text number {i}") for i in range(5)]
        receipt = runtime.documents.add_bytes("docs", files(*names))
        assert run_until_finished(runtime, receipt.job_id) == 5  # > max_attempts
        job = runtime.jobs.get(receipt.job_id)
        assert (job.status, job.error) == ("succeeded", None)
        documents = [runtime.catalog.document_by_id(d.id) for d in receipt.documents]
        assert [d.status for d in documents if d is not None] == ["indexed"] * 5


def test_clean_restarts_give_the_job_back_without_using_attempts(tmp_path: Path) -> None:
    embedder = DyingEmbedder()
    with runtime_for(tmp_path, embedder, max_attempts=1) as runtime:
        receipt = runtime.documents.add_bytes(
            "docs", files(*[(f"doc{i}", f"text number {i}") for i in range(4)])
        )
        for restart in range(4):  # each run is stopped during its first document
            stop = threading.Event()
            embedder.after_embed = stop
            worker = runtime.make_worker()
            thread = threading.Thread(target=worker.run, args=(stop,))
            thread.start()
            thread.join(60)
            assert not thread.is_alive()
            job = runtime.jobs.get(receipt.job_id)
            if restart < 3:
                assert (job.status, job.attempts) == ("queued", 0)  # given back at once
                assert job.progress.documents_done == restart + 1
        job = runtime.jobs.get(receipt.job_id)
        assert (job.status, job.error) == ("succeeded", None)
        assert runtime.vectors.size("docs") == 4


def test_a_real_worker_process_killed_by_one_document_every_time(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with Runtime.open(poison_worker.settings(data), embedder=HashEmbedder()) as runtime:
        receipt = runtime.documents.add_bytes(
            "docs", files(("alpha", "words"), ("poison", "POISON words"), ("beta", "more"))
        )
    kills = 0
    for _ in range(6):
        run = subprocess.run(
            [sys.executable, "-m", "tests.ingest.poison_worker", str(data)],
            cwd=ROOT,
            capture_output=True,
            timeout=300,
            check=False,
        )
        if run.returncode == -9:
            kills += 1
            time.sleep(poison_worker.LEASE_S * 1.5)
            continue
        assert run.returncode == 0, run.stderr.decode()[-2000:]
        if run.stdout.strip() == b"idle":
            break
    assert kills == poison_worker.MAX_ATTEMPTS
    with Runtime.open(poison_worker.settings(data), embedder=HashEmbedder()) as runtime:
        statuses = [runtime.catalog.document_by_id(d.id) for d in receipt.documents]
        assert [d.status for d in statuses if d is not None] == ["indexed", "failed", "indexed"]
        poison = statuses[1]
        assert poison is not None and "stopped 2 times while ingesting poison.txt" in (
            poison.error or ""
        )
        assert runtime.jobs.get(receipt.job_id).status == "failed"
