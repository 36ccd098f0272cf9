"""Reads of chunks and their vectors, keyword search and filters.

A mixin of ``Catalog``: the queries FAISS catch-up and retrieval need, kept
apart from the writes that manage collections, documents and ingestion.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, Sequence

import numpy as np
import numpy.typing as npt

from rag_service.storage.filters import ChunkFilter, filter_sql
from rag_service.storage.records import StoredChunk


class ChunkQueries:
    """Read-only chunk queries over the calling thread's connection."""

    def read(self) -> sqlite3.Connection:
        raise NotImplementedError

    # -- chunks and vectors --------------------------------------------------

    def chunk_ids(self, collection_id: int) -> npt.NDArray[np.int64]:
        """Every chunk id of a collection, ascending."""
        rows = (
            self.read()
            .execute("SELECT id FROM chunks WHERE collection_id = ? ORDER BY id", (collection_id,))
            .fetchall()
        )
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    def chunk_count(self, collection_id: int) -> int:
        """How many chunks a collection holds."""
        return int(
            self.read()
            .execute("SELECT count(*) FROM chunks WHERE collection_id = ?", (collection_id,))
            .fetchone()[0]
        )

    def vectors_after(
        self, collection_id: int, after_id: int, dim: int, *, batch: int = 4096
    ) -> Iterator[tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]]:
        """Chunk ids and vectors above ``after_id``, in ascending batches."""
        last = after_id
        while True:
            rows = (
                self.read()
                .execute(
                    "SELECT id, vector FROM chunks WHERE collection_id = ? AND id > ?"
                    " ORDER BY id LIMIT ?",
                    (collection_id, last, batch),
                )
                .fetchall()
            )
            if not rows:
                return
            ids = np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))
            vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32)
            yield ids, vecs.reshape(len(rows), dim)
            last = int(ids[-1])

    def vectors_for(
        self, ids: Sequence[int], dim: int
    ) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.float32]]:
        """Vectors of the given chunk ids (those that still exist)."""
        found_ids: list[int] = []
        blobs: list[bytes] = []
        conn = self.read()
        for start in range(0, len(ids), 500):
            part = [int(i) for i in ids[start : start + 500]]
            marks = ",".join("?" * len(part))
            for row in conn.execute(
                f"SELECT id, vector FROM chunks WHERE id IN ({marks}) ORDER BY id", part
            ):
                found_ids.append(row[0])
                blobs.append(row[1])
        vecs = np.frombuffer(b"".join(blobs), dtype=np.float32).reshape(len(found_ids), dim)
        return np.asarray(found_ids, dtype=np.int64), vecs

    def replaced_vectors(
        self, document_id: str, embed_model: str, dim: int
    ) -> dict[str, npt.NDArray[np.float32]]:
        """Vectors of the indexed versions a new document will replace, by chunk text.

        Those are the other indexed documents under the same source name in
        the same collection, when the collection is embedded by
        ``embed_model``: a chunk whose text did not change keeps its vector
        instead of being embedded again.
        """
        rows = (
            self.read()
            .execute(
                "SELECT c.text, c.vector FROM documents n"
                " JOIN collections k ON k.id = n.collection_id"
                " JOIN documents d ON d.collection_id = n.collection_id AND d.source = n.source"
                " JOIN chunks c ON c.document_id = d.id"
                " WHERE n.id = ? AND d.id != n.id AND d.status = 'indexed'"
                " AND k.embed_model = ? AND k.dim = ?",
                (document_id, embed_model, dim),
            )
            .fetchall()
        )
        return {row[0]: np.frombuffer(row[1], dtype=np.float32) for row in rows}

    def get_chunks(self, ids: Sequence[int]) -> dict[int, StoredChunk]:
        """Chunks by id, joined with their documents; deleted ids are absent."""
        out: dict[int, StoredChunk] = {}
        conn = self.read()
        for start in range(0, len(ids), 500):
            part = [int(i) for i in ids[start : start + 500]]
            marks = ",".join("?" * len(part))
            for row in conn.execute(
                "SELECT c.id, c.document_id, c.ordinal, c.page, c.headings, c.start_char,"
                " c.end_char, c.text, d.source, d.content_type, d.metadata"
                " FROM chunks c JOIN documents d ON d.id = c.document_id"
                f" WHERE c.id IN ({marks})",
                part,
            ):
                out[row["id"]] = StoredChunk(
                    id=row["id"],
                    document_id=row["document_id"],
                    source=row["source"],
                    ordinal=row["ordinal"],
                    page=row["page"],
                    headings=tuple(json.loads(row["headings"])),
                    start_char=row["start_char"],
                    end_char=row["end_char"],
                    text=row["text"],
                    content_type=row["content_type"],
                    metadata=json.loads(row["metadata"]),
                )
        return out

    # -- keyword search and filters --------------------------------------------

    def keyword_search(
        self, collection_id: int, match: str, limit: int, flt: ChunkFilter | None = None
    ) -> list[tuple[int, float]]:
        """Chunk ids of a collection matching an FTS5 expression, best BM25 first.

        Scores are FTS5's ``bm25()`` negated, so higher is better.  ``match``
        must be a well-formed expression: build it with
        ``rag_service.retrieval.fts_query``, never from raw user text.
        """
        where, params = filter_sql(flt)
        join = " JOIN documents d ON d.id = c.document_id" if where else ""
        rows = (
            self.read()
            .execute(
                "SELECT c.id, bm25(chunks_fts) AS rank FROM chunks_fts"
                f" JOIN chunks c ON c.id = chunks_fts.rowid{join}"
                f" WHERE chunks_fts MATCH ? AND c.collection_id = ?{where}"
                " ORDER BY rank, c.id LIMIT ?",
                (match, collection_id, *params, limit),
            )
            .fetchall()
        )
        return [(int(r[0]), -float(r[1])) for r in rows]

    def keyword_scores(self, match: str, ids: Sequence[int]) -> dict[int, float]:
        """BM25 (higher is better) of the given chunks; chunks with no query term are absent."""
        out: dict[int, float] = {}
        conn = self.read()
        for start in range(0, len(ids), 500):
            part = [int(i) for i in ids[start : start + 500]]
            for row in conn.execute(
                "SELECT rowid, bm25(chunks_fts) FROM chunks_fts"
                f" WHERE chunks_fts MATCH ? AND rowid IN ({','.join('?' * len(part))})",
                (match, *part),
            ):
                out[int(row[0])] = -float(row[1])
        return out

    def count_filtered_chunks(self, collection_id: int, flt: ChunkFilter) -> int:
        """How many chunks of a collection pass ``flt``."""
        where, params = filter_sql(flt)
        row = (
            self.read()
            .execute(
                "SELECT count(*) FROM chunks c JOIN documents d ON d.id = c.document_id"
                f" WHERE c.collection_id = ?{where}",
                (collection_id, *params),
            )
            .fetchone()
        )
        return int(row[0])

    def filter_chunk_ids(
        self, collection_id: int, flt: ChunkFilter, ids: Sequence[int] | None = None
    ) -> list[int]:
        """Chunk ids of a collection that pass ``flt``, ascending; only among ``ids`` if given."""
        where, params = filter_sql(flt)
        base = (
            "SELECT c.id FROM chunks c JOIN documents d ON d.id = c.document_id"
            f" WHERE c.collection_id = ?{where}"
        )
        conn = self.read()
        if ids is None:
            rows = conn.execute(f"{base} ORDER BY c.id", (collection_id, *params))
            return [int(r[0]) for r in rows]
        found: list[int] = []
        for start in range(0, len(ids), 500):
            part = [int(i) for i in ids[start : start + 500]]
            found.extend(
                int(r[0])
                for r in conn.execute(
                    f"{base} AND c.id IN ({','.join('?' * len(part))})",
                    (collection_id, *params, *part),
                )
            )
        return sorted(found)
