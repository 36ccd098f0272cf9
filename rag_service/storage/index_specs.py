"""Collections' FAISS index specs in the catalog.

A mixin of ``Catalog``.  The spec is part of a collection's row, and changing
it bumps the collection's ``version`` like any change of its chunks, so a
process that holds the collection's index notices at its next cheap check
and loads the new index instead of searching the old one.
"""

from __future__ import annotations

import sqlite3
import time
from contextlib import AbstractContextManager

from rag_service.errors import CollectionNotFound, ConflictError


class IndexSpecs:
    """Create collections with a spec, read and change the spec."""

    def read(self) -> sqlite3.Connection:
        raise NotImplementedError

    def write(self) -> AbstractContextManager[sqlite3.Connection]:
        raise NotImplementedError

    def create_collection(self, name: str, embed_model: str, dim: int, index_spec: str) -> int:
        """Create an empty collection with the given index spec; its id.

        ``ConflictError`` if the name is taken: an existing collection changes
        its index type by a reindex, never by a second create.
        """
        with self.write() as conn:
            if conn.execute("SELECT 1 FROM collections WHERE name = ?", (name,)).fetchone():
                raise ConflictError(
                    f"collection {name!r} already exists; change its index with a reindex"
                )
            cur = conn.execute(
                "INSERT INTO collections(name, embed_model, dim, created_at, index_spec)"
                " VALUES (?, ?, ?, ?, ?)",
                (name, embed_model, dim, time.time(), index_spec),
            )
            return int(cur.lastrowid or 0)

    def collection_state(self, name: str) -> tuple[int, int, str]:
        """``(id, version, index_spec)`` of a collection in one cheap read."""
        row = (
            self.read()
            .execute("SELECT id, version, index_spec FROM collections WHERE name = ?", (name,))
            .fetchone()
        )
        if row is None:
            raise CollectionNotFound(f"collection {name!r} does not exist")
        return int(row[0]), int(row[1]), str(row[2])

    def set_index_spec(self, collection_id: int, index_spec: str) -> int:
        """Record a collection's new index spec and bump its version; the new version."""
        with self.write() as conn:
            row = conn.execute(
                "UPDATE collections SET index_spec = ?, version = version + 1"
                " WHERE id = ? RETURNING version",
                (index_spec, collection_id),
            ).fetchone()
            if row is None:
                raise CollectionNotFound(f"collection id {collection_id} does not exist")
            return int(row[0])
