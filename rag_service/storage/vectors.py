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

The first catch-up after loading compares the index's ids with the
catalog's (not just the counts), so a snapshot holding other chunks than the
catalog, even as many, is repaired before it answers.

Each collection has an index spec in the catalog (``faiss_index.IndexSpec``:
flat, HNSW, IVF, IVF-PQ).  ``reindex`` builds an index of a new spec from the
catalog while searches keep using the old one, catches it up, records the
spec (bumping the version) and swaps it in; other processes see the spec
change at their next check and load the new snapshot.

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

import numpy as np
import numpy.typing as npt

from rag_service.errors import CollectionNotFound, ConflictError, InvalidRequest
from rag_service.storage.catalog import Catalog
from rag_service.storage.faiss_index import FLAT, FaissIndex, IndexSpec

log = logging.getLogger(__name__)

SNAPSHOT_NAME = "vectors.faiss"


#: A temporary snapshot untouched for this long was left by a writer that died.
STALE_TMP_S = 600.0


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


def _spec_of(text: str, collection: str) -> IndexSpec:
    """The catalog's spec text parsed; exact search if it is unreadable (hand-edited)."""
    try:
        return IndexSpec.parse(text)
    except InvalidRequest:
        log.warning("unreadable index spec collection=%s spec=%r; using flat", collection, text)
        return FLAT


@dataclass
class _Loaded:
    collection_id: int
    dim: int
    faiss: FaissIndex
    version: int
    max_id: int
    lock: threading.RLock
    #: The catalog version at which ``faiss.spec`` was current (set or loaded).
    spec_version: int = 0
    #: Ids compared with the catalog's since loading (not just counts).
    verified: bool = False
    dirty: bool = False
    snapshot_at: float = 0.0
    #: A reindex is building the replacement: snapshots of this one would be wasted.
    replacing: bool = False


class VectorStore:
    """In-memory FAISS indexes for every collection, kept in step with the catalog."""

    def __init__(self, catalog: Catalog, root: Path, *, snapshot_every_s: float = 30.0) -> None:
        self.catalog = catalog
        self.root = root
        self.snapshot_every_s = snapshot_every_s
        self._indexes: dict[str, _Loaded] = {}
        self._lock = threading.Lock()
        self._reindexing: set[str] = set()

    def snapshot_path(self, collection: str) -> Path:
        return self.root / collection / SNAPSHOT_NAME

    # -- loading and catching up ---------------------------------------------

    def _load(self, collection: str, version: int) -> _Loaded:
        """The snapshot if it fits the catalog's spec and dimension, else an empty index."""
        coll = self.catalog.get_collection(collection, counts=False)
        spec = _spec_of(coll.index_spec, collection)
        path = self.snapshot_path(collection)
        index = FaissIndex.read(path, spec, coll.dim) if path.is_file() else None
        if index is None:
            index = FaissIndex(spec, coll.dim)
        ids = index.ids()
        return _Loaded(
            collection_id=coll.id,
            dim=coll.dim,
            faiss=index,
            version=-1,
            max_id=int(ids.max()) if len(ids) else 0,
            lock=threading.RLock(),
            spec_version=version,
            snapshot_at=time.monotonic(),
        )

    def _get(self, collection: str, version: int = 0) -> _Loaded:
        with self._lock:
            loaded = self._indexes.get(collection)
            if loaded is not None:
                return loaded
        fresh = self._load(collection, version)
        with self._lock:
            return self._indexes.setdefault(collection, fresh)

    def sync(self, collection: str) -> _Loaded:
        """Bring a collection's index up to the catalog's current state.

        Inside a caller's ``Catalog.consistent_read`` that is the state the
        caller sees, unless the index is already past it (never moved back).
        """
        with self.catalog.consistent_read():
            try:
                coll_id, version, spec_text = self.catalog.collection_state(collection)
            except CollectionNotFound:
                self.forget(collection)
                raise
            loaded = self._get(collection, version)
            if loaded.collection_id != coll_id:  # deleted and re-created under the same name
                self.forget(collection)
                loaded = self._get(collection, version)
            if spec_text != str(loaded.faiss.spec) and version > loaded.spec_version:
                loaded = self._respec(collection, loaded, spec_text, version)
            if loaded.version < version:
                with loaded.lock:
                    self._catch_up(collection, loaded, coll_id, version)
        if loaded.faiss.needs_compaction and not loaded.replacing:
            self.start_reindex(collection, str(loaded.faiss.spec), quiet=True)
        if loaded.dirty and time.monotonic() - loaded.snapshot_at > self.snapshot_every_s:
            self.snapshot(collection)
        return loaded

    def _respec(self, collection: str, loaded: _Loaded, spec_text: str, version: int) -> _Loaded:
        """Follow a spec another process (or a reindex) recorded in the catalog."""
        spec = _spec_of(spec_text, collection)
        with loaded.lock:
            if spec.same_structure(loaded.faiss.spec):  # only search-time parameters
                loaded.faiss.spec = spec
                loaded.spec_version = version
                return loaded
        log.info("index spec changed collection=%s spec=%s; reloading", collection, spec)
        self.forget(collection)
        return self._get(collection, version)

    def _catch_up(self, collection: str, loaded: _Loaded, coll_id: int, version: int) -> None:
        """Apply the catalog's adds and removes; the caller holds the lock and a read txn.

        Right after loading, the ids are compared with the catalog's: a
        snapshot holding as many chunks as the catalog, but other ones, is
        repaired rather than trusted.
        """
        if loaded.version >= version:
            return
        index = loaded.faiss
        added = removed = 0
        for ids, vecs in self.catalog.vectors_after(coll_id, loaded.max_id, loaded.dim):
            index.add(ids, vecs)
            loaded.max_id = int(ids[-1])
            added += len(ids)
        if not loaded.verified or index.ntotal != self.catalog.chunk_count(coll_id):
            current = self.catalog.chunk_ids(coll_id)
            if not np.array_equal(index.ids(), current):
                removed = index.remove(np.setdiff1d(index.ids(), current, assume_unique=True))
                missing = np.setdiff1d(current, index.ids(), assume_unique=True)
                if len(missing):  # a snapshot from before a rebuild: fill the holes
                    ids, vecs = self.catalog.vectors_for(missing.tolist(), loaded.dim)
                    index.add(ids, vecs)
                    added += len(ids)
                    if len(ids):
                        # a chunk above max_id among the holes would otherwise be
                        # added a second time by the next catch-up
                        loaded.max_id = max(loaded.max_id, int(ids.max()))
                if not loaded.verified:
                    log.warning(
                        "snapshot ids differ from the catalog collection=%s stale=%d missing=%d",
                        collection,
                        removed,
                        len(missing),
                    )
            loaded.verified = True
        if index.needs_training:
            started = time.perf_counter()
            index.train()
            added += 1  # the structure changed: the snapshot is stale
            log.info(
                "index trained collection=%s spec=%s vectors=%d seconds=%.1f",
                collection,
                index.spec,
                index.ntotal,
                time.perf_counter() - started,
            )
        loaded.version = version
        if added or removed:
            loaded.dirty = True
            log.info(
                "index synced collection=%s added=%d removed=%d total=%d",
                collection,
                added,
                removed,
                index.ntotal,
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
        exhaustive: bool = False,
    ) -> list[tuple[int, float]]:
        """The ``k`` nearest chunk ids by inner product, best first.

        With ``version`` (read in the caller's ``consistent_read``), the
        search runs on exactly that state of the collection, or raises
        ``IndexAhead``.  ``exhaustive``, or a ``k`` as large as the index
        (a filter's last over-fetch), makes an approximate index cover every
        vector, so no chunk is missed for want of a probe.
        An IVF-PQ index's candidates are rescored with the catalog's exact
        vectors, so scores are always true cosines.
        """
        loaded = self.sync(collection)
        with loaded.lock:
            if version is not None and loaded.version != version:
                raise IndexAhead(f"index of {collection!r} is past version {version}")
            index = loaded.faiss
            rerank = index.spec.rerank if index.active_kind == "ivfpq" else 0
            ids, scores = index.search(
                query,
                # Small k gets the candidates of k=10, where recall was measured.
                max(k, 10) * rerank if rerank else k,
                exhaustive=exhaustive or k >= index.ntotal,
            )
        if rerank and len(ids):
            found, vecs = self.catalog.vectors_for(ids.tolist(), loaded.dim)
            exact = vecs @ np.asarray(query, dtype=np.float32).reshape(-1)
            order = np.argsort(-exact, kind="stable")[:k]
            ids, scores = found[order], exact[order]
        return [(int(i), float(s)) for i, s in zip(ids, scores, strict=True)]

    def size(self, collection: str) -> int:
        """Vectors the collection's index holds after catching up."""
        loaded = self.sync(collection)
        return loaded.faiss.ntotal

    def ids(self, collection: str) -> npt.NDArray[np.int64]:
        """Chunk ids the collection's index holds after catching up (for checks)."""
        loaded = self.sync(collection)
        with loaded.lock:
            return loaded.faiss.ids().copy()

    def index_info(self, collection: str) -> tuple[str, str]:
        """The collection's spec and the type searched now (``flat`` until an IVF trains)."""
        loaded = self.sync(collection)
        with loaded.lock:
            return str(loaded.faiss.spec), loaded.faiss.active_kind

    # -- index types -----------------------------------------------------------

    def create_collection(self, name: str, embed_model: str, dim: int, spec_text: str) -> IndexSpec:
        """Create an empty collection whose index is of ``spec_text``.

        ``InvalidRequest`` for a bad spec, ``ConflictError`` if the name is taken.
        """
        spec = IndexSpec.parse(spec_text).check(dim)
        self.catalog.create_collection(name, embed_model, dim, str(spec))
        return spec

    # -- reindexing ------------------------------------------------------------

    def reindexing(self, collection: str) -> bool:
        """True while a reindex of the collection is building."""
        with self._lock:
            return collection in self._reindexing

    def _claim_reindex(self, collection: str, spec_text: str) -> IndexSpec:
        coll = self.catalog.get_collection(collection, counts=False)
        spec = IndexSpec.parse(spec_text).check(coll.dim)
        with self._lock:
            if collection in self._reindexing:
                raise ConflictError(f"collection {collection!r} is already being reindexed")
            self._reindexing.add(collection)
        return spec

    def reindex(self, collection: str, spec_text: str) -> IndexSpec:
        """Rebuild the collection's index as ``spec_text``, with no pause for searches.

        ``InvalidRequest`` for a bad spec, ``ConflictError`` if a reindex of
        the collection is already running.
        """
        spec = self._claim_reindex(collection, spec_text)
        self._reindex(collection, spec)
        return spec

    def start_reindex(self, collection: str, spec_text: str, *, quiet: bool = False) -> IndexSpec:
        """``reindex`` in a background thread; checks the spec before it returns."""
        try:
            spec = self._claim_reindex(collection, spec_text)
        except ConflictError:
            if quiet:
                return IndexSpec.parse(spec_text)
            raise
        thread = threading.Thread(
            target=self._reindex_logged,
            args=(collection, spec),
            name=f"reindex-{collection}",
            daemon=True,
        )
        thread.start()
        return spec

    def _reindex_logged(self, collection: str, spec: IndexSpec) -> None:
        try:
            self._reindex(collection, spec)
        except Exception:
            log.exception("reindex failed collection=%s spec=%s", collection, spec)

    def _reindex(self, collection: str, spec: IndexSpec) -> None:
        """Build, snapshot, catch up, record and swap; the caller claimed the collection."""
        started = time.perf_counter()
        try:
            old = self.sync(collection)
            old.replacing = True
            with self.catalog.consistent_read():
                coll_id, version, _ = self.catalog.collection_state(collection)
                batches = list(self.catalog.vectors_after(coll_id, 0, old.dim))
            ids = np.concatenate([b[0] for b in batches]) if batches else np.empty(0, np.int64)
            vecs = (
                np.concatenate([b[1] for b in batches])
                if batches
                else np.empty((0, old.dim), np.float32)
            )
            del batches
            fresh = _Loaded(
                collection_id=coll_id,
                dim=old.dim,
                faiss=FaissIndex.build(spec, old.dim, ids, vecs),
                version=version,
                max_id=int(ids.max()) if len(ids) else 0,
                lock=old.lock,
                verified=True,
            )
            del ids, vecs
            # Written before the swap and outside the lock: searches go on, and
            # a process that sees the new spec finds its snapshot ready.
            self._write_snapshot(collection, fresh.faiss)
            with old.lock:
                with self.catalog.consistent_read():
                    now_id, now, _ = self.catalog.collection_state(collection)
                    if now_id != coll_id:
                        raise CollectionNotFound(f"collection {collection!r} was re-created")
                    self._catch_up(collection, fresh, coll_id, now)
                fresh.spec_version = self.catalog.set_index_spec(coll_id, str(spec))
                fresh.snapshot_at = time.monotonic()
                with self._lock:
                    if self._indexes.get(collection) is old:
                        self._indexes[collection] = fresh
        finally:
            with self._lock:
                self._reindexing.discard(collection)
                current = self._indexes.get(collection)
            if current is not None:
                current.replacing = False
        log.info(
            "reindexed collection=%s spec=%s vectors=%d seconds=%.1f",
            collection,
            spec,
            fresh.faiss.ntotal,
            time.perf_counter() - started,
        )

    # -- snapshots -----------------------------------------------------------

    def snapshot(self, collection: str) -> bool:
        """Write the collection's index to disk if it changed; True if written."""
        with self._lock:
            loaded = self._indexes.get(collection)
        if loaded is None:
            return False
        with loaded.lock:
            if not loaded.dirty or loaded.replacing:
                return False
            self._write_snapshot(collection, loaded.faiss)
            loaded.dirty = False
            loaded.snapshot_at = time.monotonic()
        log.info("snapshot written collection=%s vectors=%d", collection, loaded.faiss.ntotal)
        return True

    def _write_snapshot(self, collection: str, index: FaissIndex) -> None:
        """Temporary file, fsync, rename, fsync of the folder."""
        path = self.snapshot_path(collection)
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned_tmp_files(path.parent)
        tmp = path.with_name(f".{SNAPSHOT_NAME}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            index.write(tmp)
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
