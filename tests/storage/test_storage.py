"""The catalog, the job queue and the FAISS indexes derived from them."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from rag_service.errors import CollectionNotFound, EmbeddingMismatch
from rag_service.storage.blobs import BlobStore
from rag_service.storage.catalog import Catalog, IncomingFile
from rag_service.storage.jobs import JobQueue
from rag_service.storage.records import NewChunk
from rag_service.storage.schema import SCHEMA_VERSION
from rag_service.storage.vectors import STALE_TMP_S, VectorStore

DIM = 8


def unit(seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal(DIM).astype(np.float32)
    return v / np.linalg.norm(v)


def chunk(i: int, seed: int) -> NewChunk:
    return NewChunk(i, f"text {seed}", None, (), 0, 10, 3, unit(seed))


def add_document(catalog: Catalog, source: str, seeds: list[int], collection: str = "c") -> str:
    sha = f"{abs(hash((source, tuple(seeds)))):064x}"[-64:]
    _, docs = catalog.register_upload(
        collection, "model", DIM, [IncomingFile(source, sha, 10, "text/plain", {})]
    )
    assert (
        catalog.commit_document(
            docs[0].id, [chunk(i, s) for i, s in enumerate(seeds)], pages=None, content_type="t"
        )
        is not None
    )
    return docs[0].id


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    c = Catalog(tmp_path / "catalog.sqlite3")
    yield c
    c.close()


def test_search_finds_the_nearest_chunk_by_id(catalog: Catalog, tmp_path: Path) -> None:
    add_document(catalog, "a.txt", [1, 2, 3])
    store = VectorStore(catalog, tmp_path)
    hits = store.search("c", unit(2), 3)
    assert hits[0][1] == pytest.approx(1.0, abs=1e-5)
    assert catalog.get_chunks([hits[0][0]])[hits[0][0]].text == "text 2"


def test_a_second_process_sees_commits_and_deletes_at_once(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite3"
    writer, reader = Catalog(path), Catalog(path)  # two connections, as two processes have
    try:
        store = VectorStore(reader, tmp_path)
        add_document(writer, "a.txt", [1, 2])
        assert store.size("c") == 2
        doc = add_document(writer, "b.txt", [3])
        assert store.size("c") == 3
        writer.delete_document("c", doc)
        assert store.size("c") == 2
        assert set(store.ids("c")) == set(reader.chunk_ids(reader.collection_version("c")[0]))
    finally:
        writer.close()
        reader.close()


def test_snapshot_is_loaded_and_caught_up_after_changes_made_while_down(
    catalog: Catalog, tmp_path: Path
) -> None:
    keep = add_document(catalog, "a.txt", [1, 2, 3])
    gone = add_document(catalog, "b.txt", [4, 5])
    store = VectorStore(catalog, tmp_path)
    store.size("c")
    store.snapshot_all()
    snapshot = tmp_path / "c" / "vectors.faiss"
    assert snapshot.is_file()
    # while no index is loaded: one document deleted, one added
    catalog.delete_document("c", gone)
    add_document(catalog, "d.txt", [6])

    fresh = VectorStore(catalog, tmp_path)
    ids = fresh.ids("c")
    assert list(ids) == list(catalog.chunk_ids(catalog.collection_version("c")[0]))
    assert len(ids) == 4
    assert catalog.get_document("c", keep).chunk_count == 3


def test_corrupt_snapshot_is_rebuilt_from_the_catalog(catalog: Catalog, tmp_path: Path) -> None:
    add_document(catalog, "a.txt", [1, 2])
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "vectors.faiss").write_bytes(b"garbage")
    assert VectorStore(catalog, tmp_path).size("c") == 2


def test_new_version_replaces_old_chunks_in_one_step(catalog: Catalog, tmp_path: Path) -> None:
    old = add_document(catalog, "a.txt", [1, 2])
    store = VectorStore(catalog, tmp_path)
    assert store.size("c") == 2
    new = add_document(catalog, "a.txt", [3, 4, 5])
    assert store.size("c") == 3
    with pytest.raises(Exception, match="does not exist"):
        catalog.get_document("c", old)
    assert catalog.get_document("c", new).chunk_count == 3


def test_commit_for_a_deleted_document_writes_nothing(catalog: Catalog) -> None:
    _, docs = catalog.register_upload(
        "c", "model", DIM, [IncomingFile("a.txt", "a" * 64, 1, None, {})]
    )
    catalog.delete_document("c", docs[0].id)
    assert catalog.commit_document(docs[0].id, [chunk(0, 1)], pages=None, content_type="t") is None
    assert catalog.chunk_count(catalog.collection_version("c")[0]) == 0


def test_collection_remembers_its_embedding_model(catalog: Catalog) -> None:
    add_document(catalog, "a.txt", [1])
    with pytest.raises(EmbeddingMismatch):
        catalog.register_upload("c", "other-model", DIM, [IncomingFile("b", "b" * 64, 1, None, {})])


def test_deleted_collection_is_gone_everywhere(catalog: Catalog, tmp_path: Path) -> None:
    add_document(catalog, "a.txt", [1])
    store = VectorStore(catalog, tmp_path)
    store.size("c")
    store.snapshot_all()
    catalog.delete_collection("c")
    store.drop("c")
    assert not (tmp_path / "c").exists()
    with pytest.raises(CollectionNotFound):
        store.search("c", unit(1), 1)


def test_keyword_index_follows_inserts_and_deletes(catalog: Catalog) -> None:
    doc = add_document(catalog, "a.txt", [1, 2])
    conn = catalog.read()
    count = "SELECT count(*) FROM chunks_fts WHERE chunks_fts MATCH 'text'"
    assert conn.execute(count).fetchone()[0] == 2
    catalog.delete_document("c", doc)
    assert conn.execute(count).fetchone()[0] == 0


def test_expired_lease_is_claimed_again(catalog: Catalog) -> None:
    queue = JobQueue(catalog, lease_s=0.2, max_attempts=3)
    job_id, _ = catalog.register_upload(
        "c", "model", DIM, [IncomingFile("a.txt", "a" * 64, 1, None, {})]
    )
    first = queue.claim("w1")
    assert first is not None and first.id == job_id and first.status == "running"
    assert queue.claim("w2") is None  # leased
    time.sleep(0.3)
    second = queue.claim("w2")
    assert second is not None and second.id == job_id and second.attempts == 2
    queue.finish(job_id, "w1", error=None)  # the dead worker's late word does not count
    assert queue.get(job_id).status == "running"
    queue.finish(job_id, "w2", error=None)
    assert queue.get(job_id).status == "succeeded"


def test_a_job_that_kills_its_workers_is_failed_after_max_attempts(catalog: Catalog) -> None:
    queue = JobQueue(catalog, lease_s=0.01, max_attempts=2)
    job_id, docs = catalog.register_upload(
        "c", "model", DIM, [IncomingFile("a.txt", "a" * 64, 1, None, {})]
    )
    for _ in range(2):
        assert queue.claim("w") is not None
        time.sleep(0.03)
    assert queue.claim("w") is None
    job = queue.get(job_id)
    assert job.status == "failed" and "gave up after 2 attempts" in (job.error or "")
    assert catalog.get_document("c", docs[0].id).status == "failed"


def test_blob_store_garbage_collection_spares_young_and_referenced_files(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    used, _ = blobs.put(b"used", limit=100, name="u")
    orphan, _ = blobs.put(b"orphan", limit=100, name="o")
    assert blobs.collect_garbage({used}) == 0  # too young: may be an upload in flight
    assert blobs.collect_garbage({used}, min_age_s=0) == 1
    assert blobs.path(used).exists() and not blobs.path(orphan).exists()


def test_an_older_version_committed_late_never_replaces_a_newer_one(catalog: Catalog) -> None:
    # two workers: the newer upload of a.txt is indexed first, the older one after it
    _, (old,) = catalog.register_upload(
        "c", "model", DIM, [IncomingFile("a.txt", "1" * 64, 1, None, {})]
    )
    _, (new,) = catalog.register_upload(
        "c", "model", DIM, [IncomingFile("a.txt", "2" * 64, 1, None, {})]
    )
    catalog.commit_document(new.id, [chunk(0, 2)], pages=None, content_type="t")
    catalog.commit_document(old.id, [chunk(0, 1)], pages=None, content_type="t")

    docs, _ = catalog.list_documents("c")
    assert [d.id for d in docs] == [new.id]
    assert catalog.get_document("c", new.id).status == "indexed"
    assert catalog.chunk_count(catalog.collection_version("c")[0]) == 1


def test_a_commit_racing_a_catch_up_is_not_added_twice(tmp_path: Path) -> None:
    path = tmp_path / "catalog.sqlite3"
    writer, reader = Catalog(path), Catalog(path)  # another process commits mid-sync
    try:
        add_document(writer, "a.txt", [1, 2])
        store = VectorStore(reader, tmp_path)
        store.size("c")
        add_document(writer, "b.txt", [3])
        count = reader.chunk_count
        racing = [lambda: add_document(writer, "x.txt", [4, 5])]

        def commit_first(collection_id: int) -> int:
            while racing:  # lands after the new ids were read, before the count
                racing.pop()()
            return count(collection_id)

        reader.chunk_count = commit_first  # type: ignore[method-assign]
        # the catch-up reads one state of the catalog: the racing commit is the next one's
        assert len(store.ids("c")) == 3
        add_document(writer, "y.txt", [6])
        ids = store.ids("c")
        assert list(ids) == list(reader.chunk_ids(reader.collection_version("c")[0]))
    finally:
        writer.close()
        reader.close()


def test_snapshot_temp_files_of_killed_writers_are_ignored_then_removed(
    catalog: Catalog, tmp_path: Path
) -> None:
    add_document(catalog, "a.txt", [1, 2])
    folder = tmp_path / "c"
    folder.mkdir()
    abandoned = folder / ".vectors.faiss.4242.1.tmp"
    abandoned.write_bytes(b"half a snapshot")
    old = time.time() - STALE_TMP_S - 60
    os.utime(abandoned, (old, old))
    recent = folder / ".vectors.faiss.4343.1.tmp"  # may be a writer at work right now
    recent.write_bytes(b"being written")

    store = VectorStore(catalog, tmp_path)
    assert store.size("c") == 2  # the loader never reads temp files
    assert store.snapshot("c")
    assert not abandoned.exists() and recent.exists()
    assert VectorStore(catalog, tmp_path).size("c") == 2


def test_a_catalog_from_before_accepted_seq_is_migrated(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "catalog.sqlite3"
    Catalog(path).close()
    conn = sqlite3.connect(path)
    conn.execute("ALTER TABLE documents DROP COLUMN accepted_seq")  # as version 1 wrote it
    conn.execute(
        "INSERT INTO collections(name, embed_model, dim, created_at) VALUES ('c', 'model', 8, 0)"
    )
    conn.execute(
        "INSERT INTO documents(id, collection_id, source, sha256, size, status, created_at,"
        " updated_at) VALUES ('doc_old', 1, 'a.txt', ?, 1, 'indexed', 0, 0)",
        ("1" * 64,),
    )
    conn.commit()
    conn.close()

    catalog = Catalog(path)
    try:
        version = (
            catalog.read()
            .execute("SELECT value FROM meta WHERE key = 'schema_version'")
            .fetchone()[0]
        )
        assert version == str(SCHEMA_VERSION)
        # later versions' tables exist too
        catalog.read().execute("SELECT count(*) FROM api_keys").fetchone()
        # a new version of a.txt still replaces the migrated one
        new = add_document(catalog, "a.txt", [3])
        docs, _ = catalog.list_documents("c")
        assert [d.id for d in docs] == [new]
    finally:
        catalog.close()


def test_threads_that_come_and_go_reuse_connections(catalog: Catalog) -> None:
    """Server thread pools stop idle threads and start new ones: connections must not pile up."""
    add_document(catalog, "a.txt", [1, 2])
    opened = catalog.open_connections
    seen: set[int] = set()

    def read() -> None:
        seen.add(id(catalog.read()))
        assert catalog.get_collection("c").name == "c"

    for _ in range(30):
        thread = threading.Thread(target=read)
        thread.start()
        thread.join()
    assert catalog.open_connections == opened + 1
    assert len(seen) == 1


def test_a_connection_left_inside_a_transaction_is_rolled_back_when_reused(
    catalog: Catalog,
) -> None:
    def die_writing() -> None:
        conn = catalog.read()
        conn.execute("BEGIN IMMEDIATE")  # the database's write lock, never released
        conn.execute("UPDATE collections SET name = 'gone'")

    add_document(catalog, "a.txt", [1])
    thread = threading.Thread(target=die_writing)
    thread.start()
    thread.join()
    done: list[str] = []

    def write() -> None:
        add_document(catalog, "b.txt", [2])  # would wait on the dead thread's lock
        done.append("b.txt")

    thread = threading.Thread(target=write)
    thread.start()
    thread.join(timeout=60)
    assert done == ["b.txt"]
    assert catalog.get_collection("c").name == "c"
