"""The job loop around the pipeline, with a hand-written embedder that can be made to fail."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rag_service.config import Settings
from rag_service.embedding import Embedder, Vectors
from rag_service.runtime import Runtime
from tests.helpers import ScriptedChatModel


class HashEmbedder(Embedder):
    """Deterministic vectors from text hashes; raises on texts containing BOOM."""

    model_id = "hash-embedder"
    dim = 16
    max_seq_length = 256

    def embed_batch(self, texts: Sequence[str]) -> Vectors:
        if any("BOOM" in t for t in texts):
            raise RuntimeError("the embedder blew up")
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            rows.append(v / np.linalg.norm(v))
        return np.vstack(rows)

    def count_tokens(self, text: str) -> int:
        return len(text.split())


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
