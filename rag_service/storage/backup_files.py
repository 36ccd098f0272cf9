"""File-level pieces of backup and restore: verified copies, fsync, fitted FAISS snapshots."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from rag_service.errors import BackupInvalid

log = logging.getLogger(__name__)

T = TypeVar("T")

SHA256 = re.compile(r"^[0-9a-f]{64}$")
_BLOCK = 1 << 20


def _faiss() -> Any:
    import faiss

    return faiss


def read_catalog(catalog: Path, query: Callable[[sqlite3.Connection], T]) -> T:
    """Run ``query`` on a connection of its own to a catalog copy."""
    conn = sqlite3.connect(catalog)
    try:
        return query(conn)
    finally:
        conn.close()


def blob_users(conn: sqlite3.Connection) -> dict[str, list[str]]:
    """Every blob hash the catalog refers to, with the documents using it."""
    users: dict[str, list[str]] = {}
    for sha, collection, source, doc_id in conn.execute(
        "SELECT d.sha256, c.name, d.source, d.id FROM documents d"
        " LEFT JOIN collections c ON c.id = d.collection_id ORDER BY d.sha256, d.created_at"
    ):
        users.setdefault(sha, []).append(f"{collection}/{source} ({doc_id})")
    return users


def users_of(users: dict[str, list[str]], sha: str) -> str:
    """The documents using a blob, for messages."""
    return ", ".join(users.get(sha, []))


def chunk_ids(conn: sqlite3.Connection, collection_id: int) -> np.ndarray[Any, Any]:
    """Every chunk id of a collection, ascending."""
    rows = conn.execute(
        "SELECT id FROM chunks WHERE collection_id = ? ORDER BY id", (collection_id,)
    ).fetchall()
    return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))


def fitted_snapshot(path: Path, keep: np.ndarray[Any, Any], dim: int) -> Any | None:
    """The snapshot at ``path`` without the vectors of chunk ids not in ``keep``, or None.

    None when it is unreadable, of another dimension, holds an id twice, or
    keeps nothing.
    """
    faiss = _faiss()
    try:
        index = faiss.read_index(str(path))
        ids = (
            np.asarray(faiss.vector_to_array(index.id_map), dtype=np.int64)
            if index.ntotal
            else np.empty(0, dtype=np.int64)
        )
        if index.d != dim or len(np.unique(ids)) != len(ids):
            log.warning("snapshot does not fit the catalog path=%s; not used", path)
            return None
        stale = np.setdiff1d(ids, keep)
        if len(stale):
            index.remove_ids(stale)
    except (RuntimeError, AttributeError):
        log.warning("unusable snapshot path=%s; not used", path)
        return None
    return index if index.ntotal else None


def write_index(index: Any, path: Path) -> None:
    """Write a FAISS index by temporary file, fsync and rename, as ``VectorStore`` does."""
    faiss = _faiss()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        faiss.write_index(index, str(tmp))
        fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def copy_verified(source: Path, target: Path, sha256: str) -> int | None:
    """Copy a file while hashing it; its size, or None when the hash is not ``sha256``.

    Raises ``FileNotFoundError`` when ``source`` does not exist.
    """
    tmp = target.with_name(f".{target.name}.part")
    digest = hashlib.sha256()
    size = 0
    try:
        with open(source, "rb") as fin, open(tmp, "wb") as fout:
            while block := fin.read(_BLOCK):
                digest.update(block)
                fout.write(block)
                size += len(block)
            fout.flush()
            os.fsync(fout.fileno())
        if digest.hexdigest() != sha256:
            tmp.unlink()
            return None
        os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return size


def check_integrity(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a catalog copy that fails SQLite's quick check."""
    try:
        rows = [r[0] for r in conn.execute("PRAGMA quick_check").fetchall()]
    except sqlite3.DatabaseError as exc:
        raise BackupInvalid(f"{path} is not a readable SQLite catalog: {exc}") from exc
    if rows != ["ok"]:
        raise BackupInvalid(f"{path} fails SQLite's integrity check: {'; '.join(rows[:3])}")


def file_sha256(path: Path) -> str:
    """The SHA-256 of a file's bytes, in hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    """Write a text file whole or not at all (temporary file, fsync, rename, fsync the folder)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


def fsync(path: Path) -> None:
    """Flush a file or a folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def within(path: Path, folder: Path) -> bool:
    """Whether ``path`` is ``folder`` or inside it, symlinks resolved."""
    inner, outer = path.resolve(), folder.resolve()
    return inner == outer or inner.is_relative_to(outer)


def safe_name(name: str) -> bool:
    """A collection name usable as a folder of the data directory (a damaged catalog aside)."""
    return bool(name) and Path(name).name == name and not name.startswith(".")
