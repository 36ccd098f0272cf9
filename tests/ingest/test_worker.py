"""The job loop around the pipeline, with a hand-written embedder that can be made to fail."""

from __future__ import annotations

from pathlib import Path

from rag_service.config import Settings
from rag_service.runtime import Runtime
from tests.helpers import HashEmbedder, ScriptedChatModel


def test_a_crash_inside_one_document_fails_it_and_the_worker_goes_on(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    with Runtime.open(settings, embedder=HashEmbedder(), chat_model=ScriptedChatModel()) as rt:
        receipt = rt.documents.add_bytes(
            "c", [("ok.txt", b"plain words"), ("bad.txt", b"this one goes BOOM")]
        )
        worker = rt.make_worker()
        assert worker.run_once() is True
        job = rt.jobs.get(receipt.job_id)
        assert job.status == "failed"
        assert "bad.txt: internal error while ingesting: the embedder blew up" in (job.error or "")
        ok, bad = (rt.catalog.document_by_id(d.id) for d in receipt.documents)
        assert ok is not None and ok.status == "indexed"
        assert bad is not None and bad.status == "failed"

        later = rt.documents.add_bytes("c", [("next.txt", b"more plain words")])
        assert worker.run_once() is True
        assert rt.jobs.get(later.job_id).status == "succeeded"
        assert worker.run_once() is False  # queue empty


def test_a_document_deleted_before_its_turn_is_skipped(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    with Runtime.open(settings, embedder=HashEmbedder(), chat_model=ScriptedChatModel()) as rt:
        receipt = rt.documents.add_bytes("c", [("a.txt", b"alpha"), ("b.txt", b"beta")])
        rt.documents.delete_document("c", receipt.documents[0].id)
        rt.make_worker().run_once()
        job = rt.jobs.get(receipt.job_id)
        assert job.status == "succeeded"
        assert job.progress.documents_done == 2
        assert rt.vectors.size("c") == 1


def test_a_blob_freed_by_a_delete_interrupted_by_a_crash_is_removed_at_start(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path)
    with Runtime.open(settings, embedder=HashEmbedder(), chat_model=ScriptedChatModel()) as rt:
        receipt = rt.documents.add_bytes("c", [("a.txt", b"alpha"), ("b.txt", b"beta")])
        rt.make_worker().run_once()
        gone = receipt.documents[0]
        # the delete commits, then the process dies before unlinking the file
        assert rt.catalog.delete_document("c", gone.id) == gone.sha256
        assert rt.blobs.path(gone.sha256).exists()

    with Runtime.open(settings, embedder=HashEmbedder(), chat_model=ScriptedChatModel()) as rt:
        assert not rt.blobs.path(gone.sha256).exists()
        assert rt.blobs.path(receipt.documents[1].sha256).exists()
        assert rt.catalog.pending_freed_blobs() == []


def test_bytes_uploaded_again_after_a_delete_are_not_removed_at_start(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    with Runtime.open(settings, embedder=HashEmbedder(), chat_model=ScriptedChatModel()) as rt:
        first = rt.documents.add_bytes("c", [("a.txt", b"alpha")]).documents[0]
        rt.catalog.delete_document("c", first.id)  # crash before the unlink
        again = rt.documents.add_bytes("c", [("a.txt", b"alpha")]).documents[0]
    with Runtime.open(settings, embedder=HashEmbedder(), chat_model=ScriptedChatModel()) as rt:
        assert rt.blobs.path(again.sha256).exists()


class OtherBackend(HashEmbedder):
    """Same dimension, another model id: as the ONNX backend is to the torch one."""

    model_id = "hash-embedder+other-backend"


def test_a_worker_running_another_embedder_fails_the_document_and_adds_no_vectors(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path)
    with Runtime.open(settings, embedder=HashEmbedder(), chat_model=ScriptedChatModel()) as rt:
        receipt = rt.documents.add_bytes("c", [("a.txt", b"alpha words")])
    # a worker process started with the other backend claims the queued job
    with Runtime.open(settings, embedder=OtherBackend(), chat_model=ScriptedChatModel()) as rt:
        assert rt.make_worker().run_once() is True
        doc = rt.catalog.document_by_id(receipt.documents[0].id)
        assert doc is not None and doc.status == "failed"
        assert "embedded with hash-embedder (16 dims)" in (doc.error or "")
        assert "RAG_EMBEDDING__BACKEND" in (doc.error or "")
        assert rt.catalog.get_collection("c").chunk_count == 0
    # the right worker can still index it after a retry
    with Runtime.open(settings, embedder=HashEmbedder(), chat_model=ScriptedChatModel()) as rt:
        again = rt.documents.add_bytes("c", [("a.txt", b"alpha words")])
        assert rt.make_worker().run_once() is True
        assert rt.jobs.get(again.job_id).status == "succeeded"
        assert rt.vectors.size("c") == 1
