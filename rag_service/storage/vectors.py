"""FAISS indexes derived from the catalog, one per collection.

An index is loaded from its snapshot (``<data>/<collection>/vectors.faiss``)
and caught up from SQLite: chunk ids above the highest id it holds are added
and, when the counts then disagree, ids the catalog no longer has are removed.
Chunk ids are never reused, so that is all it takes.  Before every search the
collection's change counter is compared with the one the index was synced
at, so chunks committed or deleted by another process are seen at once.

A catch-up reads the catalog in one read transaction and only ever moves
an index forward, so the version an index is marked with always describes
its contents exactly.  A caller that reads the catalog in a transaction of
its own (retrieval does) passes that transaction's version to ``search``:
the index is caught up to exactly that state, or ``IndexAhead`` says another
thread already moved it past it and the caller should read again.

Snapshots are written to a temporary file, fsynced and renamed; temporary
files abandoned by writers killed mid-write are removed by a later writer.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from rag_service.errors import CollectionNotFound
from rag_service.storage.catalog import Catalog

log = logging.getLogger(__name__)

SNAPSHOT_NAME = "vectors.faiss"


def _faiss() -> Any:
    import faiss

    return faiss


#: A temporary snapshot untouched for this long was left by a writer that died.
STALE_TMP_S = 600.0


def _has_duplicates(ids: npt.NDArray[np.int64]) -> bool:
    return len(np.unique(ids)) != len(ids)


def _remove_abandoned_tmp_files(folder: Path) -> None:
    """Delete temporary snapshots left by processes killed while writing them.

    Each is as large as the index, so a process that keeps crashing would
    fill the disk.  Age decides, not the pid in the name: a writer in another
    container has a pid this process cannot see, and a live writer keeps
    touching its file.
    """
    cutoff = time.time() - STALE_TMP_S
    for tmp in folder.glob(f".{SNAPSHOT_NAME}.*.tmp"):
        try:
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink()
                log.info("removed abandoned snapshot temp file path=%s", tmp)
        except FileNotFoundError:  # another process cleaned it first
            continue


class IndexAhead(Exception):
    """The index already holds a newer state than the caller's read transaction."""


@dataclass
class _Loaded:
    collection_id: int
    dim: int
    index: Any
    version: int
    max_id: int
    lock: threading.RLock
    dirty: bool = False
    snapshot_at: float = 0.0


class VectorStore:
    """In-memory FAISS indexes for every collection, kept in step with the catalog."""

    def __init__(self, catalog: Catalog, root: Path, *, snapshot_every_s: float = 30.0) -> None:
        self.catalog = catalog
        self.root = root
        self.snapshot_every_s = snapshot_every_s
        self._indexes: dict[str, _Loaded] = {}
        self._lock = threading.Lock()

    def snapshot_path(self, collection: str) -> Path:
        return self.root / collection / SNAPSHOT_NAME

    # -- loading and catching up ---------------------------------------------

    def _new_index(self, dim: int) -> Any:
        faiss = _faiss()
        return faiss.IndexIDMap2(faiss.IndexFlatIP(dim))

    def _load(self, collection: str) -> _Loaded:
        coll = self.catalog.get_collection(collection, counts=False)
        index = None
        path = self.snapshot_path(collection)
        if path.is_file():
            try:
                index = _faiss().read_index(str(path))
                if index.d != coll.dim:
                    log.warning("snapshot dim mismatch collection=%s; rebuilding", collection)
                    index = None
            except RuntimeError:
                log.warning("unreadable snapshot collection=%s; rebuilding", collection)
                index = None
            if index is not None and _has_duplicates(self._index_ids(index)):
                log.warning("snapshot holds duplicate ids collection=%s; rebuilding", collection)
                index = None
        if index is None:
            index = self._new_index(coll.dim)
        ids = self._index_ids(index)
        loaded = _Loaded(
            collection_id=coll.id,
            dim=coll.dim,
            index=index,
            version=-1,
            max_id=int(ids.max()) if len(ids) else 0,
            lock=threading.RLock(),
            snapshot_at=time.monotonic(),
        )
        return loaded

    @staticmethod
    def _index_ids(index: Any) -> npt.NDArray[np.int64]:
        faiss = _faiss()
        if index.ntotal == 0:
            return np.empty(0, dtype=np.int64)
        return np.asarray(faiss.vector_to_array(index.id_map), dtype=np.int64)

    def _get(self, collection: str) -> _Loaded:
        with self._lock:
            loaded = self._indexes.get(collection)
            if loaded is not None:
                return loaded
        fresh = self._load(collection)
        with self._lock:
            return self._indexes.setdefault(collection, fresh)

    def sync(self, collection: str) -> _Loaded:
        """Bring a collection's index up to the catalog's current state.

        Inside a caller's ``Catalog.consistent_read`` that is the state the
        caller sees, unless the index is already past it (never moved back).
        """
        with self.catalog.consistent_read():
            try:
                coll_id, version = self.catalog.collection_version(collection)
            except CollectionNotFound:
                self.forget(collection)
                raise
            loaded = self._get(collection)
            if loaded.collection_id != coll_id:  # deleted and re-created under the same name
                self.forget(collection)
                loaded = self._get(collection)
            if loaded.version < version:
                with loaded.lock:
                    self._catch_up(collection, loaded, coll_id, version)
        if loaded.dirty and time.monotonic() - loaded.snapshot_at > self.snapshot_every_s:
            self.snapshot(collection)
        return loaded

    def _catch_up(self, collection: str, loaded: _Loaded, coll_id: int, version: int) -> None:
        """Apply the catalog's adds and removes; the caller holds the lock and a read txn."""
        if loaded.version >= version:
            return
        added = removed = 0
        for ids, vecs in self.catalog.vectors_after(coll_id, loaded.max_id, loaded.dim):
            loaded.index.add_with_ids(vecs, ids)
            loaded.max_id = int(ids[-1])
            added += len(ids)
        if loaded.index.ntotal != self.catalog.chunk_count(coll_id):
            current = self.catalog.chunk_ids(coll_id)
            stale = np.setdiff1d(self._index_ids(loaded.index), current, assume_unique=True)
            if len(stale):
                removed = int(loaded.index.remove_ids(stale))
            missing = np.setdiff1d(current, self._index_ids(loaded.index), assume_unique=True)
            if len(missing):  # a snapshot from before a rebuild: fill the holes
                ids, vecs = self.catalog.vectors_for(missing.tolist(), loaded.dim)
                loaded.index.add_with_ids(vecs, ids)
                added += len(ids)
                if len(ids):
                    # a chunk above max_id among the holes would otherwise be
                    # added a second time by the next catch-up
                    loaded.max_id = max(loaded.max_id, int(ids.max()))
        loaded.version = version
        if added or removed:
            loaded.dirty = True
            log.info(
                "index synced collection=%s added=%d removed=%d total=%d",
                collection,
                added,
                removed,
                loaded.index.ntotal,
            )

    @contextmanager
    def hold(self, collection: str) -> Iterator[None]:
        """Keep every other thread from moving the collection's index meanwhile.

        A read transaction begun inside sees the index's state or a newer one,
        so ``search`` at its version cannot raise ``IndexAhead``.
        """
        loaded = self._get(collection)
        with loaded.lock:
            yield

    # -- searching -----------------------------------------------------------

    def search(
        self,
        collection: str,
        query: npt.NDArray[np.float32],
        k: int,
        *,
        version: int | None = None,
    ) -> list[tuple[int, float]]:
        """The ``k`` nearest chunk ids by inner product, best first.

        With ``version`` (read in the caller's ``consistent_read``), the
        search runs on exactly that state of the collection, or raises
        ``IndexAhead``.
        """
        loaded = self.sync(collection)
        with loaded.lock:
            if version is not None and loaded.version != version:
                raise IndexAhead(f"index of {collection!r} is past version {version}")
            if loaded.index.ntotal == 0:
                return []
            scores, ids = loaded.index.search(
                np.ascontiguousarray(query.reshape(1, -1), dtype=np.float32),
                min(k, loaded.index.ntotal),
            )
        return [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]

    def size(self, collection: str) -> int:
        """Vectors the collection's index holds after catching up."""
        loaded = self.sync(collection)
        return int(loaded.index.ntotal)

    def ids(self, collection: str) -> npt.NDArray[np.int64]:
        """Chunk ids the collection's index holds after catching up (for checks)."""
        loaded = self.sync(collection)
        with loaded.lock:
            return np.sort(self._index_ids(loaded.index))

    # -- snapshots -----------------------------------------------------------

    def snapshot(self, collection: str) -> bool:
        """Write the collection's index to disk if it changed; True if written."""
        with self._lock:
            loaded = self._indexes.get(collection)
        if loaded is None:
            return False
        with loaded.lock:
            if not loaded.dirty:
                return False
            path = self.snapshot_path(collection)
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_abandoned_tmp_files(path.parent)
            tmp = path.with_name(f".{SNAPSHOT_NAME}.{os.getpid()}.{threading.get_ident()}.tmp")
            try:
                _faiss().write_index(loaded.index, str(tmp))
                fd = os.open(tmp, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(tmp, path)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
            loaded.dirty = False
            loaded.snapshot_at = time.monotonic()
        log.info("snapshot written collection=%s vectors=%d", collection, loaded.index.ntotal)
        return True

    def snapshot_all(self) -> None:
        """Write every changed index (at shutdown)."""
        with self._lock:
            names = list(self._indexes)
        for name in names:
            try:
                self.snapshot(name)
            except OSError:
                log.exception("snapshot failed collection=%s", name)

    def forget(self, collection: str) -> None:
        """Drop a collection's in-memory index."""
        with self._lock:
            self._indexes.pop(collection, None)

    def drop(self, collection: str) -> None:
        """Drop a deleted collection's index and its snapshot folder."""
        self.forget(collection)
        shutil.rmtree(self.root / collection, ignore_errors=True)
