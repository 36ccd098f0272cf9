"""The README's library example: build the services in-process, ingest and ask without HTTP."""

from __future__ import annotations

from pathlib import Path

from rag_service import Runtime, Settings
from rag_service.embedding import SentenceTransformerEmbedder
from tests.helpers import ScriptedChatModel, make_pdf


def test_ingest_and_ask_in_process(tmp_path: Path, embedder: SentenceTransformerEmbedder) -> None:
    manual = tmp_path / "manual.pdf"
    manual.write_bytes(make_pdf(["Welcome.", "Hold the power button for ten seconds to reset."]))
    model = ScriptedChatModel("Hold the power button for ten seconds [1].")

    settings = Settings(data_dir=tmp_path / "indexes")
    with Runtime.open(settings, embedder=embedder, chat_model=model, workers=1) as rag:
        receipt = rag.documents.add_paths("docs", [manual])
        job = rag.wait_for_job(receipt.job_id)
        assert job.status == "succeeded"
        answer = rag.query.ask("docs", "How do I reset the device?")
        hits = rag.query.retrieve("docs", "reset the device", top_k=1).results

    assert answer.citations == [1]
    assert (answer.sources[0].source, answer.sources[0].page) == ("manual.pdf", 2)
    assert (hits[0].source, hits[0].page) == ("manual.pdf", 2)
