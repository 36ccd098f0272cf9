"""Content-addressed store of original uploads: ``blobs/<sha256>``."""

from __future__ import annotations

import hashlib
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from rag_service.errors import DocumentTooLarge, NotFound

if TYPE_CHECKING:
    from rag_service.storage.catalog import Catalog

log = logging.getLogger(__name__)

_SHA = re.compile(r"^[0-9a-f]{64}$")


#: Bytes of each upload kept in memory so its type can be checked before it is accepted.
HEAD_BYTES = 64 * 1024


class BlobWriter:
    """Streams one upload to a temporary file while hashing and counting it."""

    def __init__(self, store: BlobStore, limit: int, name: str) -> None:
        self._store = store
        self._limit = limit
        self._name = name
        self._hash = hashlib.sha256()
        self.size = 0
        self.head = b""
        self.tmp_path = store.tmp_dir / f"{uuid.uuid4().hex}.part"
        self._file: BinaryIO | None = open(self.tmp_path, "wb")  # noqa: SIM115 - closed in commit/abort

    def write(self, data: bytes) -> None:
        """Append bytes; over the limit the upload is refused at once."""
        self.size += len(data)
        if self.size > self._limit:
            self.abort()
            raise DocumentTooLarge(
                f"{self._name!r} is larger than the {self._limit} byte limit "
                "(setting RAG_INGEST__MAX_FILE_BYTES)"
            )
        self._hash.update(data)
        if len(self.head) < HEAD_BYTES:
            self.head += data[: HEAD_BYTES - len(self.head)]
        assert self._file is not None
        self._file.write(data)

    def commit(self) -> tuple[str, int]:
        """Make the bytes durable under their hash; returns ``(sha256, size)``."""
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        sha = self._hash.hexdigest()
        target = self._store.path(sha)
        if target.exists():
            # Same bytes already stored: keep that file, but mark it young so the
            # start-up sweep of old unreferenced blobs spares it until registered.
            os.utime(target)
            self.tmp_path.unlink(missing_ok=True)
        else:
            os.replace(self.tmp_path, target)
            self._store.fsync_dir()
        return sha, self.size

    def abort(self) -> None:
        """Drop the partial upload."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp_path.unlink(missing_ok=True)


class BlobStore:
    """Original bytes by SHA-256, written by temp file, fsync and rename."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp_dir = root / "tmp"
        self.tmp_dir.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not _SHA.match(sha256):
            raise NotFound(f"no blob {sha256!r}")
        return self.root / sha256

    def writer(self, limit: int, name: str) -> BlobWriter:
        """Start streaming an upload of at most ``limit`` bytes."""
        return BlobWriter(self, limit, name)

    def put(self, data: bytes, *, limit: int, name: str) -> tuple[str, int]:
        """Store bytes already in memory."""
        writer = self.writer(limit, name)
        try:
            writer.write(data)
        except BaseException:
            writer.abort()
            raise
        return writer.commit()

    def put_file(self, path: Path, *, limit: int) -> tuple[str, int]:
        """Store a file from disk, streaming it."""
        writer = self.writer(limit, path.name)
        try:
            with open(path, "rb") as fh:
                while chunk := fh.read(1 << 20):
                    writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        return writer.commit()

    def read(self, sha256: str) -> bytes:
        """The bytes of a blob."""
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"the original file {sha256} is missing from the blob store") from exc

    def delete(self, sha256s: Iterable[str]) -> list[str]:
        """Remove blobs no document refers to any more; returns the hashes removed."""
        removed = []
        for sha in sha256s:
            self.path(sha).unlink(missing_ok=True)
            removed.append(sha)
        if removed:
            self.fsync_dir()
        return removed

    def fsync_dir(self) -> None:
        fd = os.open(self.root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def collect_garbage(self, referenced: set[str], *, min_age_s: float = 3600.0) -> int:
        """Remove stale partial uploads and unreferenced blobs; returns the count.

        Only files older than ``min_age_s`` go: a younger one may belong to an
        upload another process is registering right now.
        """
        removed = 0
        cutoff = time.time() - min_age_s
        for tmp in self.tmp_dir.glob("*.part"):
            if tmp.stat().st_mtime < cutoff:
                tmp.unlink(missing_ok=True)
                removed += 1
        for blob in self.root.iterdir():
            if (
                blob.is_file()
                and _SHA.match(blob.name)
                and blob.name not in referenced
                and blob.stat().st_mtime < cutoff
            ):
                blob.unlink(missing_ok=True)
                removed += 1
        if removed:
            log.info("blob gc removed=%d", removed)
        return removed


def release_blobs(blobs: BlobStore, catalog: Catalog, shas: Sequence[str]) -> None:
    """Unlink blobs a committed transaction freed, then clear their journal entries."""
    if shas:
        catalog.blobs_removed(blobs.delete(shas))
