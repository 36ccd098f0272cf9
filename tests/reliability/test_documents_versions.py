"""Idempotent documents: duplicates, versions replaced in one step, deletes, retries.

The concurrency test runs below the API (catalog, FAISS and the retriever,
all real, with the hash embedder: vector quality does not matter there) so
that thousands of queries race hundreds of replacements in a few seconds.
The HTTP tests run the real app with the real embedder.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rag_service.api import create_app
from rag_service.config import ChunkingSettings, IngestSettings, QuerySettings, Settings
from rag_service.embedding import Vectors
from rag_service.retrieval import RetrievalMode, Retriever
from rag_service.runtime import Runtime
from rag_service.storage.catalog import Catalog, IncomingFile
from rag_service.storage.records import NewChunk
from rag_service.storage.vectors import VectorStore
from tests.helpers import HashEmbedder, ScriptedChatModel, wait_for_job

CHUNKS_PER_VERSION = 4
MARKERS = ("alphamarker", "bravomarker")


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    c = Catalog(tmp_path / "catalog.sqlite3")
    yield c
    c.close()


def _version_chunks(embedder: HashEmbedder, marker: str, round_: int) -> list[NewChunk]:
    texts = [
        f"lighthouse keeper {marker} part {i} round {round_}" for i in range(CHUNKS_PER_VERSION)
    ]
    vectors = embedder.embed_batch(texts)
    return [
        NewChunk(i, text, None, (), 0, len(text), len(text.split()), vectors[i])
        for i, text in enumerate(texts)
    ]


def _replace(catalog: Catalog, vectors: VectorStore, embedder: HashEmbedder, round_: int) -> None:
    """Upload and index one version of ``guide.txt``, as the worker would."""
    marker = MARKERS[round_ % 2]
    sha = hashlib.sha256(f"{marker} {round_}".encode()).hexdigest()
    _, docs = catalog.register_upload(
        "c", embedder.model_id, embedder.dim, [IncomingFile("guide.txt", sha, 10, "text/plain", {})]
    )
    freed = catalog.commit_document(
        docs[0].id, _version_chunks(embedder, marker, round_), pages=None, content_type="text/plain"
    )
    assert freed is not None
    vectors.sync("c")


def test_a_query_racing_replacements_sees_exactly_one_version(
    catalog: Catalog, tmp_path: Path
) -> None:
    embedder = HashEmbedder()
    vectors = VectorStore(catalog, tmp_path / "indexes", snapshot_every_s=3600)
    retriever = Retriever(
        catalog=catalog, vectors=vectors, embedder=embedder, settings=QuerySettings()
    )
    _replace(catalog, vectors, embedder, 0)
    stop = threading.Event()
    problems: list[str] = []
    queries: dict[str, int] = {}
    rounds = 0

    def replace_forever() -> None:
        nonlocal rounds
        try:
            while not stop.is_set():
                rounds += 1
                _replace(catalog, vectors, embedder, rounds)
        except BaseException as exc:  # surfaced by the assertions below
            problems.append(f"writer: {exc!r}")

    def query_forever(mode: RetrievalMode) -> None:
        count = 0
        try:
            while not stop.is_set():
                collection = catalog.get_collection("c", counts=False)
                hits = retriever.retrieve(
                    collection,
                    f"lighthouse keeper {MARKERS[0]} {MARKERS[1]}",
                    top_k=2 * CHUNKS_PER_VERSION + 2,
                    mode=mode,
                    flt=None,
                    timings={},
                    rerank=False,
                )
                documents = {h.chunk.document_id for h in hits}
                markers = {m for h in hits for m in MARKERS if m in h.chunk.text}
                rounds_seen = {h.chunk.text.rsplit(" ", 1)[1] for h in hits}
                if len(hits) != CHUNKS_PER_VERSION or len(documents) != 1 or len(markers) != 1:
                    problems.append(
                        f"{mode}: {len(hits)} hits from {len(documents)} documents, "
                        f"markers {sorted(markers)}, rounds {sorted(rounds_seen)}"
                    )
                count += 1
        except BaseException as exc:
            problems.append(f"{mode}: {exc!r}")
        queries[mode] = count

    readers = [
        threading.Thread(target=query_forever, args=(mode,))
        for mode in ("dense", "keyword", "hybrid", "dense", "hybrid")
    ]
    writer = threading.Thread(target=replace_forever)
    for thread in [writer, *readers]:
        thread.start()
    time.sleep(4.0)
    stop.set()
    for thread in [writer, *readers]:
        thread.join(timeout=60)

    assert not problems, f"{len(problems)} bad results, first: {problems[:5]}"
    assert rounds >= 20, f"only {rounds} replacements: the race was not exercised"
    assert set(queries) == {"dense", "keyword", "hybrid"}
    assert all(n >= 20 for n in queries.values()), queries
    # the loser of every round is gone from the catalog and from FAISS
    assert catalog.get_collection("c").chunk_count == CHUNKS_PER_VERSION
    assert len(vectors.ids("c")) == CHUNKS_PER_VERSION


# -- over HTTP ---------------------------------------------------------------------


class FlakyEmbedder(HashEmbedder):
    """The hash embedder, failing every batch while ``broken`` is set."""

    broken = False

    def embed_batch(self, texts: Sequence[str]) -> Vectors:
        if self.broken:
            raise RuntimeError("the embedder is down")
        return super().embed_batch(texts)


@pytest.fixture
def flaky() -> FlakyEmbedder:
    return FlakyEmbedder()


@pytest.fixture
def hash_client(tmp_path: Path, flaky: FlakyEmbedder) -> Iterator[TestClient]:
    """The real app with the hash embedder; one word is one token, 16 to a chunk."""
    settings = Settings(
        data_dir=tmp_path / "data",
        ingest=IngestSettings(worker_threads=1, poll_interval_s=0.02),
        chunking=ChunkingSettings(max_tokens=16, overlap_tokens=0),
    )
    with TestClient(create_app(settings, embedder=flaky, chat_model=ScriptedChatModel())) as c:
        yield c


def runtime_of(client: TestClient) -> Runtime:
    runtime: Runtime = client.app.state.runtime  # type: ignore[attr-defined]
    return runtime


def put(client: TestClient, source: str, data: bytes, collection: str = "docs") -> dict:
    response = client.put(f"/v1/collections/{collection}/documents/{source}", content=data)
    assert response.status_code == 202, response.text
    return response.json()


def texts_for(client: TestClient, query: str, mode: str = "keyword") -> list[str]:
    response = client.post(
        "/v1/retrieve", json={"collection": "docs", "query": query, "mode": mode, "top_k": 10}
    )
    assert response.status_code == 200, response.text
    return [hit["text"] for hit in response.json()["results"]]


def test_put_twice_with_the_same_bytes_gives_the_same_document_and_no_new_chunks(
    hash_client: TestClient,
) -> None:
    first = put(hash_client, "guide.txt", b"The ferry leaves at noon.")
    assert wait_for_job(hash_client, first["job_id"])["status"] == "succeeded"
    before = hash_client.get("/v1/collections/docs").json()

    second = put(hash_client, "guide.txt", b"The ferry leaves at noon.")
    again = hash_client.post(
        "/v1/collections/docs/documents",
        files=[("files", ("other-name.txt", b"The ferry leaves at noon."))],
    ).json()

    assert (
        second["documents"][0]["id"] == again["documents"][0]["id"] == first["documents"][0]["id"]
    )
    assert wait_for_job(hash_client, second["job_id"])["status"] == "succeeded"
    after = hash_client.get("/v1/collections/docs").json()
    assert (after["document_count"], after["chunk_count"]) == (1, before["chunk_count"])


def test_put_replaces_the_version_under_a_url_encoded_name(hash_client: TestClient) -> None:
    # "ferry timetable é.txt", URL-encoded in the path; sent raw, then as a multipart `file`
    path = "/v1/collections/docs/documents/ferry%20timetable%20%C3%A9.txt"
    old = hash_client.put(path, content=b"The oldmarker ferry leaves at noon.")
    assert old.status_code == 202, old.text
    assert old.json()["documents"][0]["source"] == "ferry timetable \u00e9.txt"
    wait_for_job(hash_client, old.json()["job_id"])
    assert texts_for(hash_client, "ferry") == ["The oldmarker ferry leaves at noon."]

    new = hash_client.put(
        path, files=[("file", ("ignored.txt", b"The newmarker ferry leaves at one."))]
    )
    assert new.status_code == 202, new.text
    assert wait_for_job(hash_client, new.json()["job_id"])["status"] == "succeeded"

    listing = hash_client.get("/v1/collections/docs/documents").json()["documents"]
    assert [(d["id"], d["source"]) for d in listing] == [
        (new.json()["documents"][0]["id"], "ferry timetable \u00e9.txt")
    ]
    assert texts_for(hash_client, "ferry") == ["The newmarker ferry leaves at one."]
    assert texts_for(hash_client, "oldmarker") == []


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("a%5Cb.txt", "must not contain"),
        ("bad%01name.txt", "control characters"),
        ("%2E%2E", "no usable name part"),
        ("%20", "no usable name part"),
        ("x" * 256 + ".txt", "longer than"),
    ],
)
def test_put_refuses_names_an_upload_could_not_have(
    hash_client: TestClient, source: str, why: str
) -> None:
    response = hash_client.put(f"/v1/collections/docs/documents/{source}", content=b"text")
    assert response.status_code == 422, response.text
    assert why in response.json()["error"]["message"]
    assert hash_client.get("/v1/collections/docs").status_code == 404


def test_put_takes_exactly_one_file(hash_client: TestClient) -> None:
    two = hash_client.put(
        "/v1/collections/docs/documents/a.txt",
        files=[("file", ("a.txt", b"one")), ("file", ("b.txt", b"two"))],
    )
    empty = hash_client.put("/v1/collections/docs/documents/a.txt", content=b"")
    bad_collection = hash_client.put("/v1/collections/-x/documents/a.txt", content=b"one")

    assert two.status_code == 422 and "exactly one" in two.json()["error"]["message"]
    assert empty.status_code == 422, empty.text
    assert bad_collection.status_code == 422
    assert hash_client.get("/v1/collections/docs").status_code == 404


def test_a_failed_document_is_queued_again_by_the_same_bytes_and_then_indexed(
    hash_client: TestClient, flaky: FlakyEmbedder
) -> None:
    flaky.broken = True
    first = put(hash_client, "notes.txt", b"Seals sleep on the beach at low tide.")
    assert wait_for_job(hash_client, first["job_id"])["status"] == "failed"
    doc_id = first["documents"][0]["id"]
    failed = hash_client.get(f"/v1/collections/docs/documents/{doc_id}").json()
    assert failed["status"] == "failed" and failed["error"]

    flaky.broken = False
    retry = hash_client.post(
        "/v1/collections/docs/documents",
        files=[("files", ("notes.txt", b"Seals sleep on the beach at low tide."))],
    ).json()

    assert retry["documents"][0]["id"] == doc_id
    assert retry["documents"][0]["status"] == "queued"
    assert retry["job_id"] != first["job_id"]
    assert wait_for_job(hash_client, retry["job_id"])["status"] == "succeeded"
    indexed = hash_client.get(f"/v1/collections/docs/documents/{doc_id}").json()
    assert (indexed["status"], indexed["error"]) == ("indexed", None)
    assert texts_for(hash_client, "seals") == ["Seals sleep on the beach at low tide."]


def test_a_failed_document_can_be_deleted_with_its_blob(
    hash_client: TestClient, flaky: FlakyEmbedder
) -> None:
    flaky.broken = True
    body = put(hash_client, "notes.txt", b"Puffins nest in burrows.")
    assert wait_for_job(hash_client, body["job_id"])["status"] == "failed"
    doc = body["documents"][0]
    blob = runtime_of(hash_client).blobs.path(doc["sha256"])
    assert blob.is_file()

    assert hash_client.delete(f"/v1/collections/docs/documents/{doc['id']}").status_code == 204

    assert hash_client.get(f"/v1/collections/docs/documents/{doc['id']}").status_code == 404
    assert not blob.exists()
    # and the same bytes are a fresh document afterwards
    flaky.broken = False
    again = put(hash_client, "notes.txt", b"Puffins nest in burrows.")
    assert again["documents"][0]["id"] != doc["id"]
    assert wait_for_job(hash_client, again["job_id"])["status"] == "succeeded"


def big_document(marker: str, paragraphs: int = 1000) -> bytes:
    """``paragraphs`` paragraphs, one chunk each: the hash embedder has no tokenizer, so
    the chunker counts four characters a token, and two paragraphs exceed 16 tokens."""
    return "\n\n".join(
        f"Entry {i} of the {marker} ledger: crates on pier {i % 7}." for i in range(paragraphs)
    ).encode()


def test_deleting_a_1000_chunk_document_leaves_nothing_of_it(hash_client: TestClient) -> None:
    runtime = runtime_of(hash_client)
    big = put(hash_client, "ledger.txt", big_document("zebramarker"))
    small = put(hash_client, "other.txt", b"The zebra crossing is painted white.")
    assert wait_for_job(hash_client, big["job_id"])["status"] == "succeeded"
    assert wait_for_job(hash_client, small["job_id"])["status"] == "succeeded"
    doc = hash_client.get(f"/v1/collections/docs/documents/{big['documents'][0]['id']}").json()
    assert doc["chunk_count"] == 1000
    conn = runtime.catalog.read()
    ids = [r[0] for r in conn.execute("SELECT id FROM chunks WHERE document_id = ?", (doc["id"],))]
    assert len(ids) == doc["chunk_count"]
    assert set(ids) <= set(runtime.vectors.ids("docs").tolist())
    blob = runtime.blobs.path(doc["sha256"])
    assert blob.is_file()

    assert hash_client.delete(f"/v1/collections/docs/documents/{doc['id']}").status_code == 204

    marks = ",".join("?" * len(ids))
    assert (
        conn.execute(f"SELECT count(*) FROM chunks WHERE id IN ({marks})", ids).fetchone()[0] == 0
    )
    assert (
        conn.execute(f"SELECT count(*) FROM chunks_fts WHERE rowid IN ({marks})", ids).fetchone()[0]
        == 0
    )
    assert (
        conn.execute(
            "SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH 'zebramarker'"
        ).fetchone()[0]
        == 0
    )
    assert not set(ids) & set(runtime.vectors.ids("docs").tolist())
    assert runtime.vectors.size("docs") == 1
    assert not blob.exists()
    assert texts_for(hash_client, "zebramarker ledger crates") == []
    assert texts_for(hash_client, "zebra", mode="hybrid") == [
        "The zebra crossing is painted white."
    ]
