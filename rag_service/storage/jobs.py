"""A durable job queue in the catalog, claimed with leases.

A worker claims the oldest queued job in one transaction that sets it
``running`` with ``lease_until``; it renews the lease as it reports progress.
A running job whose lease has expired belongs to a worker that died, and is
claimed again.  Any number of threads or processes can share the queue.

The poison guard counts what a document costs, not how often a job was
restarted.  ``attempts`` is the number of claims since a document of the
job last finished: finishing one sets it back to 1 (the current claim), and
a worker that stops cleanly gives its claim back (``release``).  A claim
that finds ``attempts`` at ``max_attempts`` fails only the document that was
in flight (``processing``) every time a worker died, with a message naming
it, and the job goes on with the others; a job whose workers die before any
document starts is failed whole.
"""

from __future__ import annotations

import sqlite3
import time

from rag_service.errors import JobNotFound
from rag_service.storage.catalog import Catalog
from rag_service.storage.records import Job, JobProgress


class JobQueue:
    """Claim, renew, progress and finish ingestion jobs."""

    def __init__(self, catalog: Catalog, *, lease_s: float, max_attempts: int) -> None:
        self.catalog = catalog
        self.lease_s = lease_s
        self.max_attempts = max_attempts

    @staticmethod
    def _job(row: sqlite3.Row, document_ids: tuple[str, ...]) -> Job:
        return Job(
            id=row["id"],
            collection=row["collection"],
            status=row["status"],
            stage=row["stage"],
            progress=JobProgress(
                documents_total=row["docs_total"],
                documents_done=row["docs_done"],
                documents_failed=row["docs_failed"],
                chunks_total=row["chunks_total"],
                chunks_done=row["chunks_done"],
            ),
            error=row["error"],
            attempts=row["attempts"],
            created_at=row["created_at"],
            started_at=row["started_at"],
            finished_at=row["finished_at"],
            document_ids=document_ids,
        )

    def _document_ids(self, conn: sqlite3.Connection, job_id: str) -> tuple[str, ...]:
        return tuple(
            r[0]
            for r in conn.execute(
                "SELECT document_id FROM job_documents WHERE job_id = ? ORDER BY position",
                (job_id,),
            )
        )

    def get(self, job_id: str) -> Job:
        """A job by id."""
        conn = self.catalog.read()
        row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise JobNotFound(f"job {job_id!r} does not exist")
        return self._job(row, self._document_ids(conn, job_id))

    def claim(self, worker: str) -> Job | None:
        """Take the oldest claimable job, or None when there is none.

        When the workers of a job died ``max_attempts`` times in a row while
        the same document was in flight, that document is failed and skipped
        instead, so one poisonous document cannot crash workers forever nor
        cost the rest of its job.
        """
        now = time.time()
        with self.catalog.write() as conn:
            while True:
                row = conn.execute(
                    "SELECT * FROM jobs WHERE status = 'queued'"
                    " OR (status = 'running' AND lease_until < ?) ORDER BY seq LIMIT 1",
                    (now,),
                ).fetchone()
                if row is None:
                    return None
                if row["attempts"] >= self.max_attempts and self._fail_in_flight(conn, row, now):
                    row = conn.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
                if row["attempts"] >= self.max_attempts:
                    conn.execute(
                        "UPDATE jobs SET status = 'failed', stage = 'done', lease_until = NULL,"
                        " finished_at = ?, error = ? WHERE id = ?",
                        (
                            now,
                            f"gave up after {row['attempts']} attempts: the worker stopped "
                            f"while the job was at stage {row['stage']!r}",
                            row["id"],
                        ),
                    )
                    conn.execute(
                        "UPDATE documents SET status = 'failed', error = ?, updated_at = ?"
                        " WHERE id IN (SELECT document_id FROM job_documents WHERE job_id = ?)"
                        " AND status IN ('queued', 'processing')",
                        ("ingestion was interrupted repeatedly; upload it again", now, row["id"]),
                    )
                    continue
                conn.execute(
                    "UPDATE jobs SET status = 'running', worker = ?, lease_until = ?,"
                    " attempts = attempts + 1, started_at = coalesce(started_at, ?)"
                    " WHERE id = ?",
                    (worker, now + self.lease_s, now, row["id"]),
                )
                claimed = conn.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
                return self._job(claimed, self._document_ids(conn, row["id"]))

    def _fail_in_flight(self, conn: sqlite3.Connection, row: sqlite3.Row, now: float) -> bool:
        """Fail the documents a dying worker left ``processing``; False when there were none."""
        in_flight = conn.execute(
            "SELECT d.id, d.source FROM documents d JOIN job_documents j"
            " ON j.document_id = d.id WHERE j.job_id = ? AND d.status = 'processing'",
            (row["id"],),
        ).fetchall()
        if not in_flight:
            return False
        attempts = row["attempts"]
        conn.executemany(
            "UPDATE documents SET status = 'failed', error = ?, updated_at = ? WHERE id = ?",
            [
                (
                    f"the ingestion worker stopped {attempts} times while ingesting {source} "
                    "(it crashed or was killed); it was skipped. Upload it again to retry",
                    now,
                    doc_id,
                )
                for doc_id, source in in_flight
            ],
        )
        conn.execute("UPDATE jobs SET attempts = 0 WHERE id = ?", (row["id"],))
        return True

    def document_finished(self, job_id: str, worker: str) -> None:
        """A document of the job is done: the claim it ran under is the next one's first try."""
        with self.catalog.write() as conn:
            conn.execute(
                "UPDATE jobs SET attempts = 1 WHERE id = ? AND worker = ? AND status = 'running'",
                (job_id, worker),
            )

    def release(self, job_id: str, worker: str) -> None:
        """Give a job back between documents (the worker is stopping); the claim does not count."""
        with self.catalog.write() as conn:
            conn.execute(
                "UPDATE jobs SET status = 'queued', stage = 'queued', worker = NULL,"
                " lease_until = NULL,"
                " attempts = max(attempts - 1, 0) WHERE id = ? AND worker = ?"
                " AND status = 'running'",
                (job_id, worker),
            )

    def progress(
        self,
        job_id: str,
        worker: str,
        *,
        stage: str | None = None,
        chunks_done: int | None = None,
        chunks_total: int | None = None,
        docs_done: int | None = None,
        docs_failed: int | None = None,
    ) -> None:
        """Report progress and renew the lease of a job this worker holds."""
        sets = ["lease_until = ?"]
        params: list[object] = [time.time() + self.lease_s]
        for column, value in (
            ("stage", stage),
            ("chunks_done", chunks_done),
            ("chunks_total", chunks_total),
            ("docs_done", docs_done),
            ("docs_failed", docs_failed),
        ):
            if value is not None:
                sets.append(f"{column} = ?")
                params.append(value)
        with self.catalog.write() as conn:
            conn.execute(
                f"UPDATE jobs SET {', '.join(sets)} WHERE id = ? AND worker = ?"
                " AND status = 'running'",
                (*params, job_id, worker),
            )

    def finish(self, job_id: str, worker: str, *, error: str | None) -> None:
        """Close a job: ``succeeded`` without error, ``failed`` with one."""
        with self.catalog.write() as conn:
            conn.execute(
                "UPDATE jobs SET status = ?, stage = 'done', error = ?, finished_at = ?,"
                " lease_until = NULL WHERE id = ? AND worker = ? AND status = 'running'",
                ("failed" if error else "succeeded", error, time.time(), job_id, worker),
            )
