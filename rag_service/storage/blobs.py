"""Content-addressed store of original uploads: ``blobs/<sha256>``.

One file serves every document with the same bytes, so a delete that frees
it can race an upload of the same bytes.  Two rules make either order safe:

- An upload *pins* its bytes before it is registered: under the catalog's
  write lock its temporary file becomes ``tmp/<sha256>.<id>.pin`` and, if
  the blob is missing, is hard-linked into place.  The pin is removed only
  after the document row is committed.
- A freed blob is unlinked under the same lock, after checking that no
  document uses it and no live pin holds it (``release_blobs``); otherwise
  it stays, with its journal entry, for a later release.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
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
#: A pin older than this belongs to an upload that died; it no longer holds its blob.
PIN_TTL_S = 3600.0


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
        self.pin_path: Path | None = None
        self.sha256: str | None = None
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

    def seal(self) -> None:
        """Flush and fsync the bytes; slow for a large file, so done before ``commit``."""
        if self._file is None:
            return
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None

    def commit(self) -> tuple[str, int]:
        """Make the bytes durable under their hash and pin them; returns ``(sha256, size)``.

        Call it under the catalog's write lock (``catalog.write()``) so that no
        release of the same blob runs halfway through it, and call ``settle``
        once the document row is committed.
        """
        self.seal()
        sha = self._hash.hexdigest()
        target = self._store.path(sha)
        self.pin_path = self._store.tmp_dir / f"{sha}.{uuid.uuid4().hex}.pin"
        os.replace(self.tmp_path, self.pin_path)
        if target.exists():
            # Same bytes already stored: keep that file, but mark it young so the
            # start-up sweep of old unreferenced blobs spares it until registered.
            os.utime(target)
        else:
            self._store.restore(sha, self.pin_path)
        self.sha256 = sha
        return sha, self.size

    def settle(self) -> None:
        """Drop the pin once the document that uses the blob is committed.

        A blob found missing here (removed by a path that ignored the pin) is
        put back from the pin, which holds the same bytes.
        """
        if self.pin_path is None or self.sha256 is None:
            return
        if not self._store.path(self.sha256).exists():
            log.warning("blob missing after registration, restored sha256=%s", self.sha256)
            self._store.restore(self.sha256, self.pin_path)
        self.pin_path.unlink(missing_ok=True)
        self.pin_path = None

    def abort(self) -> None:
        """Drop the partial upload, or the pin of one that will not be registered."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.tmp_path.unlink(missing_ok=True)
        if self.pin_path is not None:
            self.pin_path.unlink(missing_ok=True)
            self.pin_path = None


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
        """Store bytes already in memory (unpinned: not for uploads being registered)."""
        writer = self.writer(limit, name)
        try:
            writer.write(data)
        except BaseException:
            writer.abort()
            raise
        return _commit_unpinned(writer)

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
        return _commit_unpinned(writer)

    def read(self, sha256: str) -> bytes:
        """The bytes of a blob."""
        try:
            return self.path(sha256).read_bytes()
        except FileNotFoundError as exc:
            raise NotFound(f"the original file {sha256} is missing from the blob store") from exc

    def restore(self, sha256: str, source: Path) -> None:
        """Put ``source`` (same bytes) in place as the blob, without copying when possible."""
        target = self.path(sha256)
        staging = self.tmp_dir / f"{uuid.uuid4().hex}.part"
        try:
            os.link(source, staging)
        except OSError:  # a file system without hard links
            shutil.copyfile(source, staging)
        os.replace(staging, target)
        self.fsync_dir()

    def pinned(self, sha256: str) -> bool:
        """Whether an upload being registered holds this blob (see ``BlobWriter.commit``)."""
        fresh = time.time() - PIN_TTL_S
        for pin in self.tmp_dir.glob(f"{sha256}.*.pin"):
            try:
                if pin.stat().st_mtime > fresh:
                    return True
            except FileNotFoundError:
                continue
        return False

    def delete(self, sha256s: Iterable[str]) -> list[str]:
        """Remove blobs no document refers to and no upload pins; returns the hashes removed.

        Call it under the catalog's write lock (``release_blobs`` does).
        """
        removed = []
        for sha in sha256s:
            if self.pinned(sha):
                log.info("blob release deferred, an upload holds it sha256=%s", sha)
                continue
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
        for tmp in [*self.tmp_dir.glob("*.part"), *self.tmp_dir.glob("*.pin")]:
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


def _commit_unpinned(writer: BlobWriter) -> tuple[str, int]:
    result = writer.commit()
    writer.settle()
    return result


def release_blobs(blobs: BlobStore, catalog: Catalog, shas: Sequence[str]) -> None:
    """Unlink blobs a committed transaction freed, unless meanwhile used again.

    The check and the unlink run under the catalog's write lock, which an
    upload also holds while it pins its blob, so an upload of the same bytes
    is either seen (the file stays) or comes after (and puts the file back).
    """
    if shas:
        catalog.remove_freed_blobs(shas, blobs.delete)
