"""FAISS index types per collection: flat, HNSW, IVF, IVF-PQ, and reindexing between them.

One contract runs over every type: the same top results as exact search,
never a deleted chunk, catch-up after a restart from a snapshot.  Then the
reindex with searches running, another process following the spec, the v3
catalog migration, the start-up id check and the API's answers.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import faiss
import numpy as np
import numpy.typing as npt
import pytest
from fastapi.testclient import TestClient

from rag_service.config import QuerySettings
from rag_service.embedding import Embedder
from rag_service.errors import ConflictError, InvalidRequest
from rag_service.retrieval import Retriever
from rag_service.storage.catalog import Catalog, IncomingFile
from rag_service.storage.faiss_index import FaissIndex, IndexSpec
from rag_service.storage.filters import ChunkFilter
from rag_service.storage.records import NewChunk
from rag_service.storage.vectors import VectorStore
from tests.helpers import wait_for_job

DIM = 384
N = 1500
#: Small enough parameters that 1,500 vectors train every IVF type.
SPECS = {
    "flat": "flat",
    "hnsw": "hnsw:m=16,ef_search=64",
    "ivf": "ivf:nlist=16,nprobe=4",
    "ivfpq": "ivfpq:nlist=16,nprobe=4,m=48,nbits=5,rerank=8",
}
KINDS = list(SPECS)


def clustered(n: int, seed: int) -> npt.NDArray[np.float32]:
    """Normalised draws from a fixed mixture of 30 topics, like sentence embeddings."""
    centres = np.random.default_rng(0).standard_normal((30, DIM)).astype(np.float32)
    rng = np.random.default_rng(seed)
    vecs = centres[rng.integers(0, 30, n)] + 0.08 * rng.standard_normal((n, DIM))
    vecs = vecs.astype(np.float32)
    return vecs / np.linalg.norm(vecs, axis=1, keepdims=True)


def add_document(
    catalog: Catalog, source: str, vecs: npt.NDArray[np.float32], tag: str = "", c: str = "c"
) -> str:
    """Commit one document with a chunk per vector (a new version if ``source`` exists)."""
    sha = f"{abs(hash((source, tag, vecs.tobytes()))):064x}"[-64:]
    _, docs = catalog.register_upload(
        c, "model", DIM, [IncomingFile(source, sha, 10, "text/plain", {})]
    )
    chunks = [NewChunk(i, f"{source} {tag} {i}", None, (), 0, 1, 1, v) for i, v in enumerate(vecs)]
    assert catalog.commit_document(docs[0].id, chunks, pages=None, content_type="t") is not None
    return docs[0].id


def all_vectors(catalog: Catalog, c: str = "c") -> tuple[npt.NDArray[np.int64], np.ndarray]:
    coll = catalog.get_collection(c, counts=False)
    return catalog.vectors_for(catalog.chunk_ids(coll.id).tolist(), DIM)


def exact_top(catalog: Catalog, query: np.ndarray, k: int) -> list[int]:
    ids, vecs = all_vectors(catalog)
    return [int(i) for i in ids[np.argsort(-(vecs @ query), kind="stable")[:k]]]


@pytest.fixture
def catalog(tmp_path: Path) -> Iterator[Catalog]:
    c = Catalog(tmp_path / "catalog.sqlite3")
    yield c
    c.close()


def filled(catalog: Catalog, tmp_path: Path, kind: str) -> VectorStore:
    store = VectorStore(catalog, tmp_path)
    store.create_collection("c", "model", DIM, SPECS[kind])
    vecs = clustered(N, 1)
    for part in range(3):
        add_document(catalog, f"d{part}.txt", vecs[part * 500 : (part + 1) * 500])
    return store


# -- the contract, over every type ----------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_each_type_finds_what_exact_search_finds(
    catalog: Catalog, tmp_path: Path, kind: str
) -> None:
    store = filled(catalog, tmp_path, kind)
    assert store.index_info("c") == (str(IndexSpec.parse(SPECS[kind])), kind)
    hits = 0
    for query in clustered(50, 2):
        found = store.search("c", query, 10)
        assert [s for _, s in found] == sorted((s for _, s in found), reverse=True)
        hits += len({cid for cid, _ in found} & set(exact_top(catalog, query, 10)))
    assert hits / 500 >= 0.95
    # Scores are true cosines, even where the index compresses the vectors.
    query = clustered(1, 3)[0]
    best_id, best_score = store.search("c", query, 1)[0]
    _, vec = catalog.vectors_for([best_id], DIM)
    assert best_score == pytest.approx(float(vec[0] @ query), abs=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_deleted_and_replaced_chunks_are_never_returned(
    catalog: Catalog, tmp_path: Path, kind: str
) -> None:
    store = filled(catalog, tmp_path, kind)
    doc = catalog.list_documents("c", limit=10, offset=0)[0][0]
    gone = set(catalog.chunk_ids(catalog.get_collection("c").id).tolist())
    _, gone_vecs = all_vectors(catalog)
    catalog.delete_document("c", doc.id)
    add_document(catalog, "d1.txt", clustered(500, 9), tag="v2")  # replaces d1's chunks
    live = set(catalog.chunk_ids(catalog.get_collection("c").id).tolist())
    gone -= live
    assert len(gone) == 1000
    for query in gone_vecs[::50]:
        for exhaustive in (False, True):
            found = {cid for cid, _ in store.search("c", query, 20, exhaustive=exhaustive)}
            assert found and found <= live
    assert set(store.ids("c").tolist()) == live
    everything = {cid for cid, _ in store.search("c", gone_vecs[0], 10_000, exhaustive=True)}
    assert everything == live


@pytest.mark.parametrize("kind", KINDS)
def test_a_snapshot_is_reloaded_and_caught_up_after_a_restart(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "catalog.sqlite3"
    first = Catalog(path)
    store = filled(first, tmp_path, kind)
    query = clustered(1, 5)[0]
    assert store.size("c") == N
    store.snapshot("c")  # unless the catch-up, slow on a busy machine, already wrote it
    assert store.snapshot_path("c").is_file()
    first.close()
    # The round trip: the file holds the type and every id.
    index = FaissIndex.read(store.snapshot_path("c"), IndexSpec.parse(SPECS[kind]), DIM)
    assert index is not None and index.active_kind == kind and index.ntotal == N
    later = Catalog(path)  # changes made while no process held the index
    try:
        docs, _ = later.list_documents("c", limit=10, offset=0)
        later.delete_document("c", next(d.id for d in docs if d.source == "d2.txt"))
        add_document(later, "d3.txt", clustered(100, 7))
        restarted = VectorStore(later, tmp_path)
        assert restarted.index_info("c")[1] == kind
        current = later.chunk_ids(later.get_collection("c").id)
        assert np.array_equal(restarted.ids("c"), current)
        after = restarted.search("c", query, 10)
        assert {cid for cid, _ in after} <= set(current.tolist())
        hits = 0
        for q in clustered(20, 6):
            found = {cid for cid, _ in restarted.search("c", q, 10)}
            hits += len(found & set(exact_top(later, q, 10)))
        assert hits / 200 >= 0.9
    finally:
        later.close()


class VectorQueries(Embedder):
    """A query text embeds to the vector registered for it."""

    model_id = "model"
    dim = DIM
    max_seq_length = 128

    def __init__(self, queries: dict[str, npt.NDArray[np.float32]]) -> None:
        self.queries = queries

    def embed_batch(self, texts: Sequence[str]) -> npt.NDArray[np.float32]:
        return np.vstack([self.queries[t] for t in texts]).astype(np.float32)

    def count_tokens(self, text: str) -> int:
        return len(text.split())


@pytest.mark.parametrize("kind", ["hnsw", "ivf", "ivfpq"])
def test_filtered_dense_search_on_an_approximate_index_misses_nothing(
    catalog: Catalog, tmp_path: Path, kind: str
) -> None:
    store = filled(catalog, tmp_path, kind)
    doc = catalog.list_documents("c", limit=10, offset=0)[0][0]
    catalog.delete_document("c", doc.id)  # tombstones in HNSW
    # A rare source: over-fetching (no exact shortcut) must page through everything.
    add_document(catalog, "rare.txt", clustered(5, 11))
    query = clustered(1, 12)[0]
    retriever = Retriever(
        catalog=catalog,
        vectors=store,
        embedder=VectorQueries({"q": query}),
        settings=QuerySettings(filter_exact_max=0),
    )
    ranked = retriever.retrieve(
        catalog.get_collection("c", counts=False),
        "q",
        top_k=5,
        mode="dense",
        flt=ChunkFilter(sources=("rare.txt",)),
        timings={},
        rerank=False,
    )
    rare = [r.chunk for r in ranked]
    assert len(rare) == 5 and {c.source for c in rare} == {"rare.txt"}
    ids, vecs = catalog.vectors_for([c.id for c in rare], DIM)
    assert [c.id for c in rare] == [int(i) for i in ids[np.argsort(-(vecs @ query))]]


# -- reindexing -------------------------------------------------------------------


def test_reindex_through_every_type_while_searches_and_commits_run(
    catalog: Catalog, tmp_path: Path
) -> None:
    store = filled(catalog, tmp_path, "flat")
    anchor_id, anchor = int(all_vectors(catalog)[0][0]), all_vectors(catalog)[1][0]
    stop = threading.Event()
    errors: list[BaseException] = []
    searches = [0]

    def search_forever() -> None:
        while not stop.is_set():
            try:
                found = store.search("c", anchor, 5)
                assert found, "empty result"
                assert found[0][0] == anchor_id and found[0][1] == pytest.approx(1.0, abs=1e-4)
                searches[0] += 1
            except BaseException as exc:
                errors.append(exc)
                return

    def commit_forever() -> None:
        round_ = 0
        while not stop.is_set():
            add_document(catalog, f"new{round_}.txt", clustered(20, 100 + round_))
            round_ += 1
            time.sleep(0.02)

    threads = [threading.Thread(target=search_forever), threading.Thread(target=commit_forever)]
    for t in threads:
        t.start()
    try:
        for kind in ("hnsw", "ivfpq", "ivf", "flat"):
            spec = store.reindex("c", SPECS[kind])
            assert store.index_info("c") == (str(spec), kind)
            assert catalog.get_collection("c").index_spec == str(spec)
            coll_id = catalog.get_collection("c").id
            # Commits go on: the index holds what was there before and nothing not yet there.
            before = set(catalog.chunk_ids(coll_id).tolist())
            held = set(store.ids("c").tolist())
            assert before <= held <= set(catalog.chunk_ids(coll_id).tolist())
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not errors, errors[0]
    assert searches[0] > 0
    assert np.array_equal(store.ids("c"), catalog.chunk_ids(catalog.get_collection("c").id))


def test_hnsw_tombstones_are_compacted_away_in_the_background(
    catalog: Catalog, tmp_path: Path
) -> None:
    store = filled(catalog, tmp_path, "hnsw")
    add_document(catalog, "d3.txt", clustered(500, 8))
    docs, _ = catalog.list_documents("c", limit=10, offset=0)
    for doc in docs[:3]:
        catalog.delete_document("c", doc.id)
    assert store.size("c") == 500  # the sync that sees 1,500 tombstones starts the rebuild
    deadline = time.monotonic() + 60
    while store.reindexing("c"):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    loaded = store.sync("c")
    assert len(loaded.faiss.tombstones) == 0 and loaded.faiss.index.ntotal == 500
    assert np.array_equal(store.ids("c"), catalog.chunk_ids(catalog.get_collection("c").id))
    assert store.index_info("c")[1] == "hnsw"


def test_a_second_reindex_of_the_same_collection_is_refused_while_one_runs(
    catalog: Catalog, tmp_path: Path
) -> None:
    store = filled(catalog, tmp_path, "flat")
    store.start_reindex("c", "hnsw:m=16")
    with pytest.raises(ConflictError, match="already being reindexed"):
        store.start_reindex("c", "flat")
    deadline = time.monotonic() + 60
    while store.reindexing("c") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert store.index_info("c")[1] == "hnsw"


def test_another_process_follows_a_reindex_made_by_the_cli(tmp_path: Path) -> None:
    data = tmp_path / "data"
    catalog = Catalog(data / "catalog.sqlite3")
    try:
        serving = filled(catalog, data, "flat")
        query = clustered(1, 4)[0]
        assert serving.index_info("c") == ("flat", "flat")
        env = {**os.environ, "RAG_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1"}
        done = subprocess.run(
            [sys.executable, "-m", "rag_service.cli", "reindex", "c", "--index", SPECS["hnsw"]],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert done.returncode == 0, done.stderr
        assert "1500 chunks now in hnsw:m=16" in done.stdout
        assert serving.index_info("c") == (str(IndexSpec.parse(SPECS["hnsw"])), "hnsw")
        found = serving.search("c", query, 10)
        assert len({cid for cid, _ in found} & set(exact_top(catalog, query, 10))) >= 9
        bad = subprocess.run(
            [sys.executable, "-m", "rag_service.cli", "reindex", "c", "--index", "hnsw:m=1"],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert bad.returncode == 1
        assert "index parameter m=1 is outside 4..128" in bad.stderr
    finally:
        catalog.close()


# -- catalog and start-up -----------------------------------------------------------


def test_a_v3_catalog_is_migrated_to_flat_collections(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite3"
    old = Catalog(path)
    add_document(old, "a.txt", clustered(10, 1))
    old.close()
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE collections DROP COLUMN index_spec")
    conn.execute("UPDATE meta SET value = '3' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    migrated = Catalog(path)
    try:
        assert migrated.get_collection("c").index_spec == "flat"
        version = migrated.read().execute("SELECT value FROM meta WHERE key = 'schema_version'")
        assert version.fetchone()[0] == "4"
        assert VectorStore(migrated, tmp_path).size("c") == 10
    finally:
        migrated.close()


def test_a_snapshot_with_as_many_but_other_ids_is_repaired_at_start(
    catalog: Catalog, tmp_path: Path
) -> None:
    vecs = clustered(6, 1)
    add_document(catalog, "a.txt", vecs)
    store = VectorStore(catalog, tmp_path)
    store.size("c")
    assert store.snapshot("c")
    real = catalog.chunk_ids(catalog.get_collection("c").id)
    # Same count, ids shifted: the count check alone would trust it.
    tampered = faiss.IndexIDMap2(faiss.IndexFlatIP(DIM))
    tampered.add_with_ids(vecs[::-1].copy(), real + 1000)
    faiss.write_index(tampered, str(store.snapshot_path("c")))
    restarted = VectorStore(catalog, tmp_path)
    assert np.array_equal(restarted.ids("c"), real)
    best = restarted.search("c", vecs[2], 1)[0]
    assert best[0] == real[2] and best[1] == pytest.approx(1.0, abs=1e-5)


def test_spec_text_is_parsed_with_defaults_and_checked() -> None:
    assert str(IndexSpec.parse("HNSW")) == "hnsw:m=32,ef_construction=80,ef_search=128"
    assert IndexSpec.parse(str(IndexSpec.parse("ivf:nprobe=8"))) == IndexSpec.parse("ivf:nprobe=8")
    for bad, message in [
        ("annoy", "unknown index type 'annoy'"),
        ("hnsw:efsearch=5", "has no parameter 'efsearch'"),
        ("ivf:nlist=x", "needs an integer"),
        ("ivf:nlist=8,nprobe=9", "nprobe=9 exceeds nlist=8"),
        ("flat:m=3", "has no parameter 'm'"),
    ]:
        with pytest.raises(InvalidRequest, match=message):
            IndexSpec.parse(bad)
    with pytest.raises(InvalidRequest, match="must divide the vector dimension 384"):
        IndexSpec.parse("ivfpq:m=7").check(DIM)


# -- the API, with the real embedder ------------------------------------------------


def test_api_creates_reindexes_and_rejects_bad_specs(client: TestClient) -> None:
    made = client.post("/v1/collections", json={"name": "manual", "index": "hnsw:m=16"})
    assert made.status_code == 201, made.text
    assert made.json()["index"] == "hnsw:m=16,ef_construction=80,ef_search=128"
    assert client.post("/v1/collections", json={"name": "manual"}).status_code == 409
    texts = [f"Paragraph {i} explains how apt installs package number {i}." for i in range(40)]
    texts.append("The kernel boots from GRUB, which reads its menu from /boot/grub.")
    up = client.post(
        "/v1/collections/manual/documents",
        json={"documents": [{"text": t, "source": f"t{i}.txt"} for i, t in enumerate(texts)]},
    )
    assert up.status_code == 202, up.text
    assert wait_for_job(client, up.json()["job_id"])["status"] == "succeeded"

    def top_source() -> str:
        got = client.post(
            "/v1/retrieve",
            json={"collection": "manual", "query": "which boot loader menu", "mode": "dense"},
        )
        assert got.status_code == 200, got.text
        return str(got.json()["results"][0]["source"])

    assert top_source() == "t40.txt"
    started = client.post("/v1/collections/manual/reindex", json={"index": "flat"})
    assert started.status_code == 202, started.text
    assert started.json() == {"collection": "manual", "index": "flat", "status": "started"}
    deadline = time.monotonic() + 60
    while client.get("/v1/collections/manual").json()["reindexing"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert client.get("/v1/collections/manual").json()["index"] == "flat"
    assert top_source() == "t40.txt"
    for body, message in [
        ({"name": "x", "index": "hnsw:m=2"}, "index parameter m=2 is outside 4..128"),
        ({"name": "x", "index": "bogus"}, "index: String should match pattern '^(flat|hnsw"),
        ({"name": "x", "index": "ivfpq:m=7"}, "must divide the vector dimension 384"),
    ]:
        bad = client.post("/v1/collections", json=body)
        assert bad.status_code == 422
        assert message in bad.json()["error"]["message"]
    bad = client.post("/v1/collections/manual/reindex", json={"index": "ivf:nprobe=0"})
    assert bad.status_code == 422 and "nprobe=0 is outside" in bad.json()["error"]["message"]
    missing = client.post("/v1/collections/nope/reindex", json={"index": "flat"})
    assert missing.status_code == 404
