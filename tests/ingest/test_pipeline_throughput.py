"""What the throughput work in the pipeline must not change, with the real embedder.

Chunks are embedded longest first across the document, identical texts
once, unchanged texts of a replaced version not at all, and the next
document of a job is prepared on a background thread.  None of it may change
a stored vector, a chunk's order or metadata, the progress a job reports or
the time budget of a document.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ingest.loaders import load_document
from ingest.pipeline import PreparedDocument
from rag_service.config import IngestSettings, Settings
from rag_service.embedding import Embedder, SentenceTransformerEmbedder, Vectors
from rag_service.errors import DocumentTooLarge
from rag_service.runtime import Runtime
from rag_service.storage.records import StoredChunk
from tests.helpers import ScriptedChatModel


class CountingEmbedder(Embedder):
    """The real embedder behind a wrapper that records every text it embeds.

    A small batch size makes the pipeline embed a document in several groups,
    so sorting across groups is exercised on a short document.
    """

    def __init__(self, inner: SentenceTransformerEmbedder, batch_size: int = 4) -> None:
        self.inner = inner
        self.model_id = inner.model_id
        self.dim = inner.dim
        self.max_seq_length = inner.max_seq_length
        self.batch_size = batch_size
        self.texts: list[str] = []

    def embed_batch(self, texts: Sequence[str]) -> Vectors:
        self.texts.extend(texts)
        return self.inner.embed_batch(texts)

    def count_tokens(self, text: str) -> int:
        return self.inner.count_tokens(text)

    def tokenizer(self) -> Any:
        return self.inner.tokenizer()


def _section(i: int, words: int) -> str:
    body = " ".join(f"term{i}x{j}" if j % 7 else "the" for j in range(words))
    return f"## Part {i}\n\nPart {i} explains topic {i}. {body}\n"


def _manual(edited: int | None = None) -> bytes:
    """A Markdown manual of sections of very different lengths, two of them identical."""
    parts = ["# Manual\n"]
    for i in range(24):
        parts.append(_section(i, 3 + (i * 37) % 170))
        if i == edited:
            parts[-1] = parts[-1].replace("explains", "now describes")
    parts.append("## Part 3\n\nPart 3 explains topic 3. the\n")  # also under Part 24's parent
    parts.append("# Appendix\n\n## Part 3\n\nPart 3 explains topic 3. the\n")
    return "\n".join(parts).encode()


def _stored(rt: Runtime, document_id: str) -> list[tuple[StoredChunk, Vectors]]:
    """A document's stored chunks with their stored vectors, by ordinal."""
    coll = rt.catalog.get_collection("c")
    ids = [int(i) for i in rt.catalog.chunk_ids(coll.id)]
    chunks = rt.catalog.get_chunks(ids)
    found, vectors = rt.catalog.vectors_for(ids, coll.dim)
    by_id = dict(zip(found.tolist(), vectors, strict=True))
    mine = sorted(
        (c for c in chunks.values() if c.document_id == document_id), key=lambda c: c.ordinal
    )
    return [(c, by_id[c.id]) for c in mine]


def _open(tmp_path: Path, embedder: Embedder, **ingest: Any) -> Runtime:
    settings = Settings(data_dir=tmp_path / "data", ingest=IngestSettings(**ingest))
    return Runtime.open(settings, embedder=embedder, chat_model=ScriptedChatModel())


@pytest.mark.parametrize(
    "overlap_sections", [0, 4], ids=["whole", "tail-chunked-while-head-embeds"]
)
def test_sorted_and_deduplicated_embedding_stores_each_chunks_own_vector(
    tmp_path: Path, embedder: SentenceTransformerEmbedder, overlap_sections: int
) -> None:
    counting = CountingEmbedder(embedder)
    data = _manual()
    with _open(tmp_path, counting) as rt:
        receipt = rt.documents.add_bytes("c", [("manual.md", data)])
        worker = rt.make_worker()
        worker.pipeline.overlap_sections = overlap_sections
        expected = worker.pipeline.chunker.chunk(
            load_document(data, "manual.md", rt.settings.ingest, None)
        )
        assert worker.run_once()
        assert rt.jobs.get(receipt.job_id).status == "succeeded"
        stored = _stored(rt, receipt.documents[0].id)

    texts = [c.text for c in expected]
    assert len(set(texts)) < len(texts), "the manual must repeat a chunk for this test"
    lengths = [c.token_count for c in expected]
    assert max(lengths) > 5 * min(lengths) and len(texts) > 4 * counting.batch_size
    # every distinct text embedded exactly once, none twice
    assert sorted(counting.texts) == sorted(set(texts))
    # order and metadata as the chunker made them
    assert [
        (c.ordinal, c.text, c.page, c.headings, c.start_char, c.end_char) for c, _ in stored
    ] == [(c.ordinal, c.text, c.page, c.headings, c.start_char, c.end_char) for c in expected]
    # each vector is that chunk's own, as if it had been embedded alone
    direct = np.vstack([embedder.embed_batch([t]) for t in texts])
    assert np.allclose(np.vstack([v for _, v in stored]), direct, atol=1e-5)


def test_an_edited_upload_embeds_only_the_chunks_that_changed(
    tmp_path: Path, embedder: SentenceTransformerEmbedder
) -> None:
    counting = CountingEmbedder(embedder)
    first, second = _manual(), _manual(edited=11)
    with _open(tmp_path, counting) as rt:
        old = rt.documents.add_bytes("c", [("manual.md", first)]).documents[0]
        assert rt.make_worker().run_once()
        old_texts = {c.text for c, _ in _stored(rt, old.id)}
        counting.texts.clear()

        new = rt.documents.add_bytes("c", [("manual.md", second)])
        progress = _record_progress(rt)
        worker = rt.make_worker()
        worker.pipeline.overlap_sections = (
            4  # the edit falls in the tail, cut while the head embeds
        )
        assert worker.run_once()
        assert rt.jobs.get(new.job_id).status == "succeeded"
        stored = _stored(rt, new.documents[0].id)
        assert _stored(rt, old.id) == []  # the old version is gone
        assert rt.vectors.size("c") == len(stored)
        embedded = list(counting.texts)
        edited = next(c.text for c, _ in stored if "now describes" in c.text)
        hits = rt.query.retrieve("c", edited, top_k=1, mode="dense")

    changed = [c.text for c, _ in stored if c.text not in old_texts]
    assert len(changed) == 1 and "now describes" in changed[0]
    assert embedded == changed
    direct = np.vstack([embedder.embed_batch([c.text]) for c, _ in stored])
    assert np.allclose(np.vstack([v for _, v in stored]), direct, atol=1e-5)
    top = hits.results[0]
    assert (top.document_id, top.text) == (new.documents[0].id, edited)
    assert top.score == pytest.approx(1.0, abs=1e-4)
    # progress still runs to every chunk, reused ones included
    embedding = [p for p in progress if p.get("stage") == "embedding"]
    assert embedding[-1]["chunks_done"] == embedding[-1]["chunks_total"] == len(stored)
    done = [p["chunks_done"] for p in embedding]
    assert done == sorted(done)


def _record_progress(rt: Runtime) -> list[dict[str, Any]]:
    """Every progress report of the job queue, as keyword arguments."""
    calls: list[dict[str, Any]] = []
    original = rt.jobs.progress

    def progress(job_id: str, worker: str, **fields: Any) -> None:
        calls.append(fields)
        original(job_id, worker, **fields)

    rt.jobs.progress = progress  # type: ignore[method-assign]
    return calls


def test_the_next_document_is_prepared_once_in_the_background_and_the_thread_stops(
    tmp_path: Path, embedder: SentenceTransformerEmbedder
) -> None:
    files = [(f"doc{i}.md", _manual(edited=i)) for i in range(4)]
    with _open(tmp_path, CountingEmbedder(embedder, batch_size=32)) as rt:
        receipt = rt.documents.add_bytes("c", files)
        ids = [d.id for d in receipt.documents]
        worker = rt.make_worker()
        pipeline = worker.pipeline
        prepared: list[tuple[str, str]] = []
        indexed: list[str] = []
        prepare, index = pipeline.prepare, pipeline.index

        def counted_prepare(document: Any, report: Any = None) -> PreparedDocument:
            prepared.append((document.id, threading.current_thread().name))
            return prepare(document, report)

        def counted_index(ready: PreparedDocument, report: Any) -> Any:
            indexed.append(ready.document.id)
            if ready.document.id == ids[1]:  # doc2 is being prefetched meanwhile
                rt.documents.delete_document("c", ids[2])
            return index(ready, report)

        pipeline.prepare = counted_prepare  # type: ignore[method-assign]
        pipeline.index = counted_index  # type: ignore[method-assign,assignment]
        progress = _record_progress(rt)
        assert worker.run_once()
        job = rt.jobs.get(receipt.job_id)
        alive = [t.name for t in threading.enumerate() if t.name.startswith("ingest-prefetch")]
        statuses = [rt.catalog.document_by_id(i) for i in ids]

    assert alive == []
    assert job.status == "succeeded" and job.progress.documents_done == 4
    assert indexed == [ids[0], ids[1], ids[3]]
    names = [doc for doc, _ in prepared]
    assert sorted(set(names)) == sorted(names), "a document was prepared twice"
    assert names[0] == ids[0] and prepared[0][1] == threading.current_thread().name
    assert ids[1] in names and ids[3] in names
    assert all(t.startswith("ingest-prefetch") for doc, t in prepared if doc != ids[0])
    assert statuses[2] is None
    assert [s.status for s in statuses if s is not None] == ["indexed"] * 3
    chunks = sum(s.chunk_count for s in statuses if s is not None)
    assert job.progress.chunks_done == chunks
    assert progress[-1]["chunks_done"] == chunks


def test_time_spent_preparing_in_the_background_counts_against_the_budget(
    tmp_path: Path, embedder: SentenceTransformerEmbedder
) -> None:
    counting = CountingEmbedder(embedder)
    with _open(tmp_path, counting, max_seconds_per_document=30.0) as rt:
        document = rt.documents.add_bytes("c", [("manual.md", _manual())]).documents[0]
        pipeline = rt.make_worker().pipeline
        ready = pipeline.prepare(document)
        assert ready.chunks and ready.seconds < 30.0
        late = PreparedDocument(ready.document, ready.loaded, ready.chunks, seconds=30.5)
        with pytest.raises(DocumentTooLarge, match=r"before embedding .*MAX_SECONDS_PER_DOCUMENT"):
            pipeline.index(late, lambda stage, done, total: None)
        assert counting.texts == []
        result = pipeline.index(ready, lambda stage, done, total: None)
    assert result.chunks == len(ready.chunks) and result.embedded + result.reused == result.chunks
