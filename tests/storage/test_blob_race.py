"""A delete that frees a blob, racing an upload of the same bytes: either order keeps the file.

Blobs are shared by every document with the same bytes, so a delete that
frees one (commits, then unlinks the file) can meet an upload of the same
bytes (writes the file, then commits its document row).  Each test forces
one interleaving with a hook that parks one side at the dangerous point
while the other runs to the end, then checks that the uploaded document's
original is on disk and is ingested.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import rag_service.services.documents as documents_module
from rag_service.config import Settings
from rag_service.runtime import Runtime
from rag_service.storage.blobs import BlobStore, release_blobs
from tests.helpers import HashEmbedder

DATA = b"The lighthouse keeper logs every ship that passes the cape."
WAIT_S = 30.0


@pytest.fixture
def runtime(tmp_path: Path) -> Iterator[Runtime]:
    with Runtime.open(Settings(data_dir=tmp_path / "data"), embedder=HashEmbedder()) as rt:
        yield rt


def indexed_copy(runtime: Runtime, collection: str) -> str:
    """Upload ``DATA`` to ``collection`` and ingest it; returns the document id."""
    receipt = runtime.documents.add_bytes(collection, [("log.txt", DATA)])
    assert runtime.make_worker().run_once()
    assert runtime.jobs.get(receipt.job_id).status == "succeeded"
    return receipt.documents[0].id


def in_thread(work: Callable[[], Any]) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, errors


def assert_uploaded_copy_is_whole(runtime: Runtime, doc_id: str) -> None:
    document = runtime.catalog.document_by_id(doc_id)
    assert document is not None
    assert runtime.blobs.read(document.sha256) == DATA
    assert runtime.make_worker().run_once()
    document = runtime.catalog.document_by_id(doc_id)
    assert document is not None and document.status == "indexed", document
    assert list(runtime.blobs.tmp_dir.iterdir()) == []  # no pin or partial file left behind


def test_an_upload_committed_between_a_delete_and_its_unlink_keeps_its_blob(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """delete commits -> upload writes the blob and commits -> delete unlinks."""
    old = indexed_copy(runtime, "first")
    freed = threading.Event()
    uploaded = threading.Event()

    def parked_release(blobs: BlobStore, catalog: Any, shas: list[str]) -> None:
        freed.set()  # the delete is committed and its blob journalled as freed
        assert uploaded.wait(WAIT_S)
        release_blobs(blobs, catalog, shas)

    monkeypatch.setattr(documents_module, "release_blobs", parked_release)
    thread, errors = in_thread(lambda: runtime.documents.delete_document("first", old))
    assert freed.wait(WAIT_S)
    receipt = runtime.documents.add_bytes("second", [("copy.txt", DATA)])
    uploaded.set()
    thread.join(WAIT_S)
    assert not thread.is_alive() and errors == []

    assert runtime.catalog.document_by_id(old) is None
    assert_uploaded_copy_is_whole(runtime, receipt.documents[0].id)


def test_a_delete_that_unlinks_between_an_upload_and_its_commit_leaves_the_blob(
    runtime: Runtime, monkeypatch: pytest.MonkeyPatch
) -> None:
    """upload writes the blob -> delete commits and unlinks -> upload commits."""
    old = indexed_copy(runtime, "first")
    written = threading.Event()
    deleted = threading.Event()
    real_register = runtime.catalog.register_upload

    def parked_register(*args: Any, **kwargs: Any) -> Any:
        written.set()  # the bytes are in the blob store, the document row is not yet
        assert deleted.wait(WAIT_S)
        return real_register(*args, **kwargs)

    monkeypatch.setattr(runtime.catalog, "register_upload", parked_register)
    receipts: list[Any] = []
    thread, errors = in_thread(
        lambda: receipts.append(runtime.documents.add_bytes("second", [("copy.txt", DATA)]))
    )
    assert written.wait(WAIT_S)
    runtime.documents.delete_document("first", old)
    deleted.set()
    thread.join(WAIT_S)
    assert not thread.is_alive() and errors == []

    assert_uploaded_copy_is_whole(runtime, receipts[0].documents[0].id)
    # the deferred release did not leak: deleting the new copy removes the file
    sha = runtime.catalog.document_by_id(receipts[0].documents[0].id)
    assert sha is not None
    runtime.documents.delete_document("second", sha.id)
    assert not runtime.blobs.path(sha.sha256).exists()
    assert runtime.catalog.pending_freed_blobs() == []


def test_a_blob_spared_for_an_upload_that_is_then_abandoned_goes_at_the_next_start(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    with Runtime.open(settings, embedder=HashEmbedder()) as rt:
        old = indexed_copy(rt, "first")
        sha = rt.catalog.document_by_id(old)
        assert sha is not None
        upload = rt.documents.start_upload("copy.txt")
        upload.writer.write(DATA)
        upload.writer.seal()
        with rt.catalog.write():
            upload.writer.commit()  # pinned, as register does before its commit
        rt.documents.delete_document("first", old)
        assert rt.blobs.path(sha.sha256).exists()  # spared for the upload
        rt.documents.abort([upload])  # which never registers
        assert rt.catalog.pending_freed_blobs() == [sha.sha256]
    with Runtime.open(settings, embedder=HashEmbedder()) as again:
        assert not again.blobs.path(sha.sha256).exists()
        assert again.catalog.pending_freed_blobs() == []
