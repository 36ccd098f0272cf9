"""A durable job queue in the catalog, claimed with leases.

A worker claims the oldest queued job in one transaction that sets it
``running`` with ``lease_until``; it renews the lease as it reports progress.
A running job whose lease has expired belongs to a worker that died, and is
claimed again.  Any number of threads or processes can share the queue.
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

        Jobs that have already been claimed ``max_attempts`` times (their
        workers died each time) are failed instead of claimed again, so one
        poisonous document cannot crash workers forever.
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
