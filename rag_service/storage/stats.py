"""Read-only counts over the catalog for monitoring: jobs by status, chunks per collection.

Each call runs a few ``count(*)`` queries that walk indexes, not tables, so a
Prometheus scrape every few seconds costs milliseconds even on large catalogs.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from rag_service.storage.catalog import Catalog

#: Every status a job can be in, so each appears in counts even at zero.
JOB_STATUSES = ("queued", "running", "succeeded", "failed")


@dataclass(frozen=True)
class CollectionCounts:
    """Documents and chunks of one collection."""

    documents: int
    chunks: int


@dataclass(frozen=True)
class CatalogStats:
    """What the catalog holds at one moment."""

    #: Jobs per status; every status in ``JOB_STATUSES`` is present.
    jobs: dict[str, int]
    #: Jobs a worker could claim now: queued, or running on an expired lease.
    queue_depth: int
    #: Counts per collection name.
    collections: dict[str, CollectionCounts]


def catalog_stats(catalog: Catalog, *, now: float | None = None) -> CatalogStats:
    """Job and collection counts, read in one snapshot of the catalog."""
    at = time.time() if now is None else now
    conn = catalog.read()
    conn.execute("BEGIN")
    try:
        jobs = dict.fromkeys(JOB_STATUSES, 0)
        for status, count in conn.execute("SELECT status, count(*) FROM jobs GROUP BY status"):
            jobs[status] = count
        depth: int = conn.execute(
            "SELECT count(*) FROM jobs WHERE status = 'queued'"
            " OR (status = 'running' AND lease_until < ?)",
            (at,),
        ).fetchone()[0]
        collections = {
            name: CollectionCounts(documents=docs, chunks=chunks)
            for name, docs, chunks in conn.execute(
                "SELECT c.name,"
                " (SELECT count(*) FROM documents d WHERE d.collection_id = c.id),"
                " (SELECT count(*) FROM chunks k WHERE k.collection_id = c.id)"
                " FROM collections c ORDER BY c.name"
            )
        }
    finally:
        conn.execute("COMMIT")
    return CatalogStats(jobs=jobs, queue_depth=depth, collections=collections)
