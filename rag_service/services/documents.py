"""Accept, list and remove documents; read jobs.

Accepting a document means: its bytes are durable in the blob store, and its
document row and job row are committed in one transaction.  The work itself
is done later by an ingestion worker.
"""

from __future__ import annotations

import logging
import mimetypes
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rag_service.config import IngestSettings
from rag_service.errors import (
    DocumentError,
    EmptyDocument,
    IndexNotReady,
    InvalidRequest,
    RagError,
)
from rag_service.services.validation import collection_name, source_name
from rag_service.storage.blobs import BlobStore, BlobWriter, release_blobs
from rag_service.storage.catalog import Catalog, IncomingFile
from rag_service.storage.jobs import JobQueue
from rag_service.storage.records import Collection, Document, Job
from rag_service.storage.vectors import VectorStore

log = logging.getLogger(__name__)

#: File name endings ``add_paths`` picks up when given a folder.
INGESTIBLE_SUFFIXES = frozenset(
    {".pdf", ".txt", ".text", ".md", ".markdown", ".html", ".htm", ".rst"}
)


#: ``inspect(head, name, content_type)`` raises a ``DocumentError`` for a file
#: that can be refused at once (unsupported type, empty); ``head`` is the
#: file's first bytes, or all of it when it is small.
Inspector = Callable[[bytes, str, str | None], object]


@dataclass(frozen=True)
class Receipt:
    """What an accepted upload returns at once."""

    job_id: str
    documents: list[Document]
    #: ``(file name, reason)`` of files refused when invalid ones are skipped.
    rejected: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class PendingUpload:
    """A file being streamed into the blob store, before it is registered."""

    source: str
    writer: BlobWriter
    content_type: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def expand_paths(paths: Iterable[Path]) -> list[Path]:
    """Files named directly, plus every ingestible file under named folders."""
    found: list[Path] = []
    for path in paths:
        if path.is_dir():
            found.extend(
                p
                for p in sorted(path.rglob("*"))
                if p.is_file() and p.suffix.lower() in INGESTIBLE_SUFFIXES
            )
        elif path.is_file():
            found.append(path)
        else:
            raise InvalidRequest(f"no such file or folder: {path}")
    return found


class DocumentService:
    """Documents, collections and jobs of one catalog."""

    def __init__(
        self,
        *,
        catalog: Catalog,
        blobs: BlobStore,
        vectors: VectorStore | None,
        jobs: JobQueue,
        settings: IngestSettings,
        embed_model: str,
        embed_dim: int,
        on_enqueued: Callable[[], None] | None = None,
        inspect: Inspector | None = None,
    ) -> None:
        self.catalog = catalog
        self.blobs = blobs
        self.vectors = vectors
        self.jobs = jobs
        self.settings = settings
        self.embed_model = embed_model
        self.embed_dim = embed_dim
        self.on_enqueued = on_enqueued
        self.inspect = inspect

    # -- accepting -----------------------------------------------------------

    def start_upload(
        self,
        filename: str | None,
        *,
        content_type: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> PendingUpload:
        """Open a streaming upload; write to ``.writer``, then ``register`` it."""
        source = source_name(filename)
        return PendingUpload(
            source=source,
            writer=self.blobs.writer(self.settings.max_file_bytes, source),
            content_type=content_type,
            metadata=dict(metadata or {}),
        )

    def check(self, upload: PendingUpload) -> None:
        """Refuse a file that cannot be ingested, before it is accepted."""
        writer = upload.writer
        if writer.size == 0:
            raise EmptyDocument(f"{upload.source} is empty (0 bytes)")
        if self.inspect is None:
            return
        try:
            self.inspect(writer.head, upload.source, upload.content_type)
        except EmptyDocument:
            if writer.size <= len(writer.head):  # only the whole file can be judged empty
                raise

    def register(
        self,
        collection: str,
        uploads: Sequence[PendingUpload],
        *,
        skip_invalid: bool = False,
    ) -> Receipt:
        """Make streamed uploads durable and queue them for ingestion.

        A file of an unsupported type or an empty one refuses the whole
        upload, unless ``skip_invalid``: then it is left out and reported.
        """
        collection_name(collection)
        if not uploads:
            raise InvalidRequest("no files in the upload: send one or more 'files' parts")
        if len(uploads) > self.settings.max_files_per_request:
            raise InvalidRequest(
                f"{len(uploads)} files in one upload; the limit is "
                f"{self.settings.max_files_per_request} (RAG_INGEST__MAX_FILES_PER_REQUEST)"
            )
        accepted: list[PendingUpload] = []
        rejected: list[tuple[str, str]] = []
        for upload in uploads:
            try:
                self.check(upload)
            except DocumentError as exc:
                if not skip_invalid:
                    raise
                upload.writer.abort()
                rejected.append((upload.source, exc.message))
            else:
                accepted.append(upload)
        if not accepted:
            reasons = "; ".join(f"{name}: {why}" for name, why in rejected)
            raise InvalidRequest(f"no file could be accepted: {reasons}")
        for upload in accepted:
            upload.writer.seal()
        incoming = []
        # Under the write lock no delete can free the same bytes while they are
        # pinned and put in place (see rag_service.storage.blobs).
        with self.catalog.write():
            for upload in accepted:
                sha, size = upload.writer.commit()
                incoming.append(
                    IncomingFile(upload.source, sha, size, upload.content_type, upload.metadata)
                )
        try:
            job_id, documents = self.catalog.register_upload(
                collection, self.embed_model, self.embed_dim, incoming
            )
        finally:
            # a refused upload (another model, say) must not leave pins that keep
            # deletes of the same bytes from freeing them for an hour
            for upload in accepted:
                upload.writer.settle()
        log.info("upload accepted collection=%s job=%s files=%d", collection, job_id, len(incoming))
        if self.on_enqueued is not None:
            self.on_enqueued()
        return Receipt(job_id, documents, rejected)

    def abort(self, uploads: Iterable[PendingUpload]) -> None:
        """Throw away uploads that will not be registered."""
        for upload in uploads:
            upload.writer.abort()

    def add_bytes(
        self,
        collection: str,
        files: Sequence[tuple[str, bytes]],
        *,
        metadata: dict[str, Any] | None = None,
    ) -> Receipt:
        """Accept in-memory files ``(name, data)``."""
        collection_name(collection)
        uploads: list[PendingUpload] = []
        try:
            for name, data in files:
                upload = self.start_upload(name, metadata=metadata)
                uploads.append(upload)
                upload.writer.write(data)
            return self.register(collection, uploads)
        except BaseException:
            self.abort(uploads)
            raise

    def add_text(
        self,
        collection: str,
        text: str,
        *,
        source: str = "text.txt",
        metadata: dict[str, Any] | None = None,
    ) -> Receipt:
        """Accept a text given inline."""
        if Path(source).suffix.lower() not in INGESTIBLE_SUFFIXES:
            source += ".txt"
        return self.add_bytes(collection, [(source, text.encode("utf-8"))], metadata=metadata)

    def add_paths(
        self,
        collection: str,
        paths: Sequence[Path],
        *,
        metadata: dict[str, Any] | None = None,
    ) -> Receipt:
        """Accept files from disk; folders are walked for ingestible files."""
        collection_name(collection)
        files = expand_paths(paths)
        if not files:
            raise InvalidRequest("no ingestible files found (pdf, txt, md, html)")
        uploads: list[PendingUpload] = []
        try:
            for path in files:
                upload = self.start_upload(
                    path.name,
                    content_type=mimetypes.guess_type(path.name)[0],
                    metadata={**(metadata or {}), "path": str(path)},
                )
                uploads.append(upload)
                with open(path, "rb") as fh:
                    while block := fh.read(1 << 20):
                        upload.writer.write(block)
            return self.register(collection, uploads, skip_invalid=True)
        except BaseException:
            self.abort(uploads)
            raise

    # -- reading and removing ------------------------------------------------

    def get_job(self, job_id: str) -> Job:
        return self.jobs.get(job_id)

    def list_collections(self) -> list[Collection]:
        return self.catalog.list_collections()

    def get_collection(self, name: str) -> Collection:
        return self.catalog.get_collection(collection_name(name))

    def _indexes(self) -> VectorStore:
        if self.vectors is None:
            raise IndexNotReady("this service holds no vector indexes")
        return self.vectors

    def create_collection(self, name: str, index: str) -> Collection:
        """An empty collection searched through a FAISS index of type ``index``."""
        self._indexes().create_collection(
            collection_name(name), self.embed_model, self.embed_dim, index
        )
        return self.get_collection(name)

    def start_reindex(self, collection: str, index: str) -> str:
        """Rebuild the collection's index as ``index`` in the background; the spec used."""
        name = collection_name(collection)
        self.catalog.get_collection(name, counts=False)  # 404 before anything starts
        return str(self._indexes().start_reindex(name, index))

    def reindexing(self, collection: str) -> bool:
        """True while a reindex of the collection is building."""
        return self.vectors is not None and self.vectors.reindexing(collection_name(collection))

    def list_documents(
        self, collection: str, *, limit: int = 100, offset: int = 0
    ) -> tuple[list[Document], int]:
        if not 1 <= limit <= 1000 or offset < 0:
            raise InvalidRequest("limit must be 1-1000 and offset 0 or more")
        return self.catalog.list_documents(collection_name(collection), limit=limit, offset=offset)

    def get_document(self, collection: str, document_id: str) -> Document:
        return self.catalog.get_document(collection_name(collection), document_id)

    def delete_document(self, collection: str, document_id: str) -> None:
        """Remove a document: its chunks, vectors, keyword rows and blob."""
        freed = self.catalog.delete_document(collection_name(collection), document_id)
        if freed:
            release_blobs(self.blobs, self.catalog, [freed])
        if self.vectors is not None:
            try:
                self.vectors.sync(collection)
            except RagError:
                log.exception("index catch-up after delete failed collection=%s", collection)

    def delete_collection(self, collection: str) -> None:
        """Remove a collection with everything in it."""
        freed = self.catalog.delete_collection(collection_name(collection))
        release_blobs(self.blobs, self.catalog, freed)
        if self.vectors is not None:
            self.vectors.drop(collection)
