"""Which stored files documents still use, and the journal of files being removed.

A mixin of ``Catalog``: a delete or replace that frees a blob records it in
``freed_blobs`` in the same transaction, so a crash between that commit and
the file's removal is finished at the next start.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager


class BlobRefs:
    """Blob references and the freed-blob journal, over the catalog's connections."""

    def read(self) -> sqlite3.Connection:
        raise NotImplementedError

    def write(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def _free_blobs(self, conn: sqlite3.Connection, shas: Sequence[str]) -> list[str]:
        """The hashes no document uses any more, journalled in the same transaction.

        The journal survives a crash between this commit and the unlink, so
        the blob is removed at the next start instead of lingering.
        """
        freed = [sha for sha in dict.fromkeys(shas) if not self._blob_used(conn, sha)]
        conn.executemany(
            "INSERT OR IGNORE INTO freed_blobs(sha256) VALUES (?)", [(sha,) for sha in freed]
        )
        return freed

    def remove_freed_blobs(
        self, shas: Sequence[str], remove: Callable[[list[str]], list[str]]
    ) -> list[str]:
        """Remove the files of freed blobs that no document uses, in one write transaction.

        ``remove`` gets the unused hashes and returns those it removed (it
        spares a blob an upload has pinned).  Holding the write lock across
        the check and the unlink means no upload registers the same bytes in
        between.  Journal entries of removed blobs, and of blobs in use
        again, are cleared; a spared blob keeps its entry for a later release.
        """
        with self.write() as conn:
            unused = [sha for sha in dict.fromkeys(shas) if not self._blob_used(conn, sha)]
            removed = remove(unused) if unused else []
            settled = [sha for sha in dict.fromkeys(shas) if sha not in unused or sha in removed]
            conn.executemany("DELETE FROM freed_blobs WHERE sha256 = ?", [(s,) for s in settled])
        return removed

    def blobs_removed(self, shas: Sequence[str]) -> None:
        """Clear the journal entries of blobs whose files are gone."""
        with self.write() as conn:
            conn.executemany("DELETE FROM freed_blobs WHERE sha256 = ?", [(s,) for s in shas])

    def pending_freed_blobs(self) -> list[str]:
        """Freed blobs whose removal a crash may have interrupted, still unreferenced."""
        conn = self.read()
        return [
            r[0]
            for r in conn.execute(
                "SELECT f.sha256 FROM freed_blobs f WHERE NOT EXISTS"
                " (SELECT 1 FROM documents d WHERE d.sha256 = f.sha256)"
            )
        ]

    @staticmethod
    def _blob_used(conn: sqlite3.Connection, sha256: str) -> bool:
        return (
            conn.execute("SELECT 1 FROM documents WHERE sha256 = ? LIMIT 1", (sha256,)).fetchone()
            is not None
        )

    def referenced_blobs(self) -> set[str]:
        """Every blob hash some document still points to."""
        return {r[0] for r in self.read().execute("SELECT DISTINCT sha256 FROM documents")}
