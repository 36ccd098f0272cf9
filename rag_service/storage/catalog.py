"""The SQLite catalog: collections, documents, chunks and their vectors.

SQLite is the truth; FAISS indexes are derived from the ``chunks`` table.
Every write that changes a collection's chunks bumps its ``version`` in the
same transaction, which is how other processes notice they must catch up.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from rag_service.errors import CollectionNotFound, DocumentNotFound
from rag_service.services.validation import same_embedder
from rag_service.storage.blob_refs import BlobRefs
from rag_service.storage.chunk_queries import ChunkQueries
from rag_service.storage.index_specs import IndexSpecs
from rag_service.storage.records import (
    Collection,
    Document,
    NewChunk,
)
from rag_service.storage.schema import SCHEMA, migrate

log = logging.getLogger(__name__)

# The next acceptance number, evaluated inside the write transaction that uses it.
_NEXT_SEQ = "(SELECT coalesce(max(accepted_seq), 0) + 1 FROM documents)"


@dataclass(frozen=True)
class IncomingFile:
    """A file whose bytes are already in the blob store, to be registered."""

    source: str
    sha256: str
    size: int
    content_type: str | None
    metadata: dict[str, Any]


def new_id(prefix: str) -> str:
    """A random, sortable-enough public id such as ``doc_3f2a...``."""
    return f"{prefix}_{uuid.uuid4().hex}"


class Catalog(ChunkQueries, BlobRefs, IndexSpecs):
    """Thread-safe access to ``catalog.sqlite3``; one connection per thread."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        # every connection opened, with the thread it belongs to now
        self._connections: dict[sqlite3.Connection, threading.Thread] = {}
        self._lock = threading.Lock()
        conn = self._conn()
        conn.executescript(SCHEMA)
        migrate(conn)

    # -- connections ---------------------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._adopt() or self._connect()
            self._local.conn = conn
        return conn

    def _adopt(self) -> sqlite3.Connection | None:
        """A connection whose thread has ended, now the calling thread's.

        Server thread pools stop idle threads and start new ones under the
        next burst; keeping each ended thread's connection (its page and
        statement caches) would grow memory with every burst, and closing it
        would throw the warm caches away.
        """
        with self._lock:
            for conn, owner in self._connections.items():
                if not owner.is_alive():
                    self._connections[conn] = threading.current_thread()
                    break
            else:
                return None
        if conn.in_transaction:  # its thread died inside one
            conn.rollback()
        return conn

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        conn.row_factory = sqlite3.Row
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute("PRAGMA busy_timeout=30000")
        conn.execute("PRAGMA foreign_keys=ON")
        with self._lock:
            self._connections[conn] = threading.current_thread()
        return conn

    @property
    def open_connections(self) -> int:
        """How many SQLite connections this catalog holds open (one per thread that used it)."""
        with self._lock:
            return len(self._connections)

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that takes the database lock at once."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def read(self) -> sqlite3.Connection:
        """The calling thread's connection, for single reads."""
        return self._conn()

    @contextmanager
    def consistent_read(self) -> Iterator[sqlite3.Connection]:
        """A read transaction: every read of this thread inside sees one state.

        Outside one, each statement sees the latest commit, so two reads can
        straddle a commit (a document's old chunks from the first, its new
        ones gone missing in the second).  Nested uses join the outer
        transaction; inside one this thread must not write.
        """
        conn = self._conn()
        if conn.in_transaction:
            yield conn
            return
        conn.execute("BEGIN DEFERRED")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        if conn.in_transaction:
            conn.execute("COMMIT")

    def close(self) -> None:
        """Close every connection this catalog opened."""
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()

    # -- collections ---------------------------------------------------------

    def _collection_row(self, conn: sqlite3.Connection, name: str) -> sqlite3.Row:
        row: sqlite3.Row | None = conn.execute(
            "SELECT * FROM collections WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            raise CollectionNotFound(f"collection {name!r} does not exist")
        return row

    def get_collection(self, name: str, *, counts: bool = True) -> Collection:
        """The collection ``name``, with its document and chunk counts if asked."""
        conn = self.read()
        row = self._collection_row(conn, name)
        return self._collection(conn, row, counts=counts)

    def _collection(
        self, conn: sqlite3.Connection, row: sqlite3.Row, *, counts: bool = True
    ) -> Collection:
        docs = chunks = 0
        if counts:
            docs = conn.execute(
                "SELECT count(*) FROM documents WHERE collection_id = ?", (row["id"],)
            ).fetchone()[0]
            chunks = conn.execute(
                "SELECT count(*) FROM chunks WHERE collection_id = ?", (row["id"],)
            ).fetchone()[0]
        return Collection(
            id=row["id"],
            name=row["name"],
            embed_model=row["embed_model"],
            dim=row["dim"],
            created_at=row["created_at"],
            version=row["version"],
            document_count=docs,
            chunk_count=chunks,
            index_spec=row["index_spec"],
        )

    def list_collections(self) -> list[Collection]:
        """Every collection, by name."""
        conn = self.read()
        rows = conn.execute("SELECT * FROM collections ORDER BY name").fetchall()
        return [self._collection(conn, row) for row in rows]

    def collection_version(self, name: str) -> tuple[int, int]:
        """``(id, version)`` of a collection: the cheap change check."""
        row = (
            self.read()
            .execute("SELECT id, version FROM collections WHERE name = ?", (name,))
            .fetchone()
        )
        if row is None:
            raise CollectionNotFound(f"collection {name!r} does not exist")
        return int(row[0]), int(row[1])

    def _ensure_collection(
        self, conn: sqlite3.Connection, name: str, embed_model: str, dim: int
    ) -> int:
        row = conn.execute(
            "SELECT id, embed_model, dim FROM collections WHERE name = ?", (name,)
        ).fetchone()
        if row is None:
            cur = conn.execute(
                "INSERT INTO collections(name, embed_model, dim, created_at) VALUES (?, ?, ?, ?)",
                (name, embed_model, dim, time.time()),
            )
            return int(cur.lastrowid or 0)
        same_embedder(name, (row["embed_model"], row["dim"]), (embed_model, dim))
        return int(row["id"])

    def delete_collection(self, name: str) -> list[str]:
        """Remove a collection with its documents and chunks; returns freed blob hashes."""
        with self.write() as conn:
            row = self._collection_row(conn, name)
            shas = [
                r[0]
                for r in conn.execute(
                    "SELECT DISTINCT sha256 FROM documents WHERE collection_id = ?", (row["id"],)
                )
            ]
            conn.execute("DELETE FROM chunks WHERE collection_id = ?", (row["id"],))
            conn.execute("DELETE FROM documents WHERE collection_id = ?", (row["id"],))
            conn.execute("DELETE FROM collections WHERE id = ?", (row["id"],))
            now = time.time()
            conn.execute(
                "UPDATE jobs SET status = 'failed', stage = 'done', error = ?, finished_at = ?,"
                " lease_until = NULL WHERE collection = ? AND status IN ('queued', 'running')",
                (f"collection {name!r} was deleted", now, name),
            )
            return self._free_blobs(conn, shas)

    # -- documents -----------------------------------------------------------

    @staticmethod
    def _document(row: sqlite3.Row, collection: str) -> Document:
        return Document(
            id=row["id"],
            collection=collection,
            source=row["source"],
            sha256=row["sha256"],
            size=row["size"],
            content_type=row["content_type"],
            status=row["status"],
            pages=row["pages"],
            chunk_count=row["chunk_count"],
            error=row["error"],
            metadata=json.loads(row["metadata"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )

    def register_upload(
        self,
        collection: str,
        embed_model: str,
        dim: int,
        files: Sequence[IncomingFile],
    ) -> tuple[str, list[Document]]:
        """Record the documents of one upload and the job that ingests them.

        One transaction: either every row is written or none.  Bytes already
        in the collection map to the existing document and add no work; a
        document that failed before is queued again.
        """
        now = time.time()
        job_id = new_id("job")
        with self.write() as conn:
            coll_id = self._ensure_collection(conn, collection, embed_model, dim)
            documents: list[Document] = []
            queued: list[str] = []
            for incoming in files:
                conn.execute("DELETE FROM freed_blobs WHERE sha256 = ?", (incoming.sha256,))
                existing = conn.execute(
                    "SELECT * FROM documents WHERE collection_id = ? AND sha256 = ?"
                    " ORDER BY created_at DESC LIMIT 1",
                    (coll_id, incoming.sha256),
                ).fetchone()
                if existing is not None and existing["status"] != "failed":
                    documents.append(self._document(existing, collection))
                    continue
                if existing is not None:
                    doc_id = existing["id"]
                    conn.execute(
                        "UPDATE documents SET status = 'queued', error = NULL, source = ?,"
                        f" metadata = ?, updated_at = ?, accepted_seq = {_NEXT_SEQ} WHERE id = ?",
                        (incoming.source, json.dumps(incoming.metadata), now, doc_id),
                    )
                else:
                    doc_id = new_id("doc")
                    conn.execute(
                        "INSERT INTO documents(id, collection_id, source, sha256, size,"
                        " content_type, status, metadata, accepted_seq, created_at, updated_at)"
                        f" VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, {_NEXT_SEQ}, ?, ?)",
                        (
                            doc_id,
                            coll_id,
                            incoming.source,
                            incoming.sha256,
                            incoming.size,
                            incoming.content_type,
                            json.dumps(incoming.metadata),
                            now,
                            now,
                        ),
                    )
                if doc_id not in queued:
                    conn.execute(
                        "INSERT INTO job_documents(job_id, document_id, position) VALUES (?, ?, ?)",
                        (job_id, doc_id, len(queued)),
                    )
                    queued.append(doc_id)
                row = conn.execute("SELECT * FROM documents WHERE id = ?", (doc_id,)).fetchone()
                documents.append(self._document(row, collection))
            status, stage, finished = (
                ("queued", "queued", None)
                if queued
                else (
                    "succeeded",
                    "done",
                    now,
                )
            )
            conn.execute(
                "INSERT INTO jobs(id, collection, status, stage, docs_total, created_at,"
                " finished_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job_id, collection, status, stage, len(queued), now, finished),
            )
        return job_id, documents

    def get_document(self, collection: str, document_id: str) -> Document:
        """One document of a collection."""
        conn = self.read()
        coll = self._collection_row(conn, collection)
        row = conn.execute(
            "SELECT * FROM documents WHERE id = ? AND collection_id = ?",
            (document_id, coll["id"]),
        ).fetchone()
        if row is None:
            raise DocumentNotFound(
                f"document {document_id!r} does not exist in collection {collection!r}"
            )
        return self._document(row, collection)

    def document_by_id(self, document_id: str) -> Document | None:
        """A document by id alone, or None when it was deleted."""
        row = (
            self.read()
            .execute(
                "SELECT d.*, c.name AS collection_name FROM documents d"
                " JOIN collections c ON c.id = d.collection_id WHERE d.id = ?",
                (document_id,),
            )
            .fetchone()
        )
        return None if row is None else self._document(row, row["collection_name"])

    def list_documents(
        self, collection: str, *, limit: int = 100, offset: int = 0
    ) -> tuple[list[Document], int]:
        """A page of a collection's documents, oldest first, and the total count."""
        conn = self.read()
        coll = self._collection_row(conn, collection)
        rows = conn.execute(
            "SELECT * FROM documents WHERE collection_id = ? ORDER BY created_at, rowid"
            " LIMIT ? OFFSET ?",
            (coll["id"], limit, offset),
        ).fetchall()
        total = conn.execute(
            "SELECT count(*) FROM documents WHERE collection_id = ?", (coll["id"],)
        ).fetchone()[0]
        return [self._document(row, collection) for row in rows], int(total)

    def delete_document(self, collection: str, document_id: str) -> str | None:
        """Remove a document and its chunks; returns its blob hash if now unused."""
        with self.write() as conn:
            coll = self._collection_row(conn, collection)
            row = conn.execute(
                "SELECT sha256 FROM documents WHERE id = ? AND collection_id = ?",
                (document_id, coll["id"]),
            ).fetchone()
            if row is None:
                raise DocumentNotFound(
                    f"document {document_id!r} does not exist in collection {collection!r}"
                )
            self._delete_documents(conn, coll["id"], [document_id])
            sha: str = row["sha256"]
            freed = self._free_blobs(conn, [sha])
            return freed[0] if freed else None

    def _delete_documents(
        self, conn: sqlite3.Connection, collection_id: int, document_ids: Sequence[str]
    ) -> None:
        for doc_id in document_ids:
            conn.execute("DELETE FROM chunks WHERE document_id = ?", (doc_id,))
            conn.execute("DELETE FROM documents WHERE id = ?", (doc_id,))
        conn.execute("UPDATE collections SET version = version + 1 WHERE id = ?", (collection_id,))

    # -- ingestion -----------------------------------------------------------

    def set_document_status(
        self, document_id: str, status: str, *, error: str | None = None
    ) -> None:
        """Move a document to ``status`` (no-op if it was deleted meanwhile)."""
        with self.write() as conn:
            conn.execute(
                "UPDATE documents SET status = ?, error = ?, updated_at = ? WHERE id = ?",
                (status, error, time.time(), document_id),
            )

    def commit_document(
        self,
        document_id: str,
        chunks: Sequence[NewChunk],
        *,
        pages: int | None,
        content_type: str,
        title: str | None = None,
    ) -> list[str] | None:
        """Write a document's chunks and mark it indexed, in one transaction.

        Versions accepted earlier under the same source name in the collection
        are replaced in the same step.  If a version accepted later is already
        indexed (another worker was faster), this one is dropped instead.
        Returns the blob hashes freed, or None when the document was deleted
        meanwhile.
        """
        now = time.time()
        with self.write() as conn:
            doc = conn.execute(
                "SELECT collection_id, source, sha256, accepted_seq FROM documents WHERE id = ?",
                (document_id,),
            ).fetchone()
            if doc is None:
                return None
            coll_id = doc["collection_id"]
            newer = conn.execute(
                "SELECT id FROM documents WHERE collection_id = ? AND source = ? AND id != ?"
                " AND status = 'indexed' AND accepted_seq > ? LIMIT 1",
                (coll_id, doc["source"], document_id, doc["accepted_seq"]),
            ).fetchone()
            if newer is not None:
                log.info("document superseded id=%s by=%s", document_id, newer["id"])
                self._delete_documents(conn, coll_id, [document_id])
                return self._free_blobs(conn, [doc["sha256"]])
            conn.execute("DELETE FROM chunks WHERE document_id = ?", (document_id,))
            conn.executemany(
                "INSERT INTO chunks(collection_id, document_id, ordinal, page, headings,"
                " start_char, end_char, token_count, text, vector)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        coll_id,
                        document_id,
                        c.ordinal,
                        c.page,
                        json.dumps(list(c.headings)),
                        c.start_char,
                        c.end_char,
                        c.token_count,
                        c.text,
                        np.ascontiguousarray(c.vector, dtype=np.float32).tobytes(),
                    )
                    for c in chunks
                ],
            )
            old = [
                (r["id"], r["sha256"])
                for r in conn.execute(
                    "SELECT id, sha256 FROM documents WHERE collection_id = ? AND source = ?"
                    " AND id != ? AND status IN ('indexed', 'failed') AND accepted_seq < ?",
                    (coll_id, doc["source"], document_id, doc["accepted_seq"]),
                )
            ]
            if old:
                self._delete_documents(conn, coll_id, [doc_id for doc_id, _ in old])
            meta_update = ""
            params: list[Any] = [pages, len(chunks), content_type, now]
            if title:
                meta_update = ", metadata = json_set(metadata, '$.title', ?)"
                params.append(title)
            conn.execute(
                "UPDATE documents SET status = 'indexed', error = NULL, pages = ?,"
                f" chunk_count = ?, content_type = ?, updated_at = ?{meta_update} WHERE id = ?",
                (*params, document_id),
            )
            conn.execute("UPDATE collections SET version = version + 1 WHERE id = ?", (coll_id,))
            return self._free_blobs(conn, [sha for _, sha in old])
