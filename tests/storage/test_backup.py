"""Backups of a data directory in use, and their restore (``rag backup`` / ``rag restore``)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import faiss
import httpx
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from rag_service.backup_cli import backup_command, restore_command
from rag_service.config import IngestSettings, Settings
from rag_service.embedding import Embedder
from rag_service.errors import BackupInvalid, ConflictError, InvalidRequest
from rag_service.runtime import Runtime
from rag_service.storage.backup import Manifest, backup, restore
from rag_service.storage.schema import SCHEMA_VERSION
from tests.helpers import HashEmbedder, ScriptedChatModel, make_pdf

PDF = make_pdf(["Opening hours of the harbour office.", "High tide comes twice a day."])


def settings_at(data: Path) -> Settings:
    return Settings(data_dir=data, ingest=IngestSettings(worker_threads=0, poll_interval_s=0.05))


@contextmanager
def runtime_at(
    data: Path, embedder: Embedder | None = None, *, workers: int = 0
) -> Iterator[Runtime]:
    with Runtime.open(
        settings_at(data),
        embedder=embedder or HashEmbedder(),
        chat_model=ScriptedChatModel(),
        workers=workers,
    ) as rt:
        yield rt


def ingest(rt: Runtime, collection: str, files: list[tuple[str, bytes]]) -> list[str]:
    """Accept files and index them in this thread; returns the document ids."""
    receipt = rt.documents.add_bytes(collection, files)
    while rt.make_worker().run_once():
        pass
    assert rt.jobs.get(receipt.job_id).status == "succeeded"
    return [d.id for d in receipt.documents]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def catalog_chunks(catalog: Path) -> dict[str, dict[int, bytes]]:
    """Chunk id -> vector bytes, per collection, read straight from a catalog file."""
    conn = sqlite3.connect(catalog)
    try:
        found: dict[str, dict[int, bytes]] = {
            name: {} for (name,) in conn.execute("SELECT name FROM collections")
        }
        for name, chunk_id, vector in conn.execute(
            "SELECT c.name, k.id, k.vector FROM chunks k"
            " JOIN collections c ON c.id = k.collection_id"
        ):
            found[name][chunk_id] = vector
        return found
    finally:
        conn.close()


def snapshot_vectors(path: Path) -> dict[int, bytes]:
    """Chunk id -> vector bytes held by a FAISS snapshot file."""
    index = faiss.read_index(str(path))
    ids = faiss.vector_to_array(index.id_map) if index.ntotal else np.empty(0, np.int64)
    assert len(set(ids.tolist())) == len(ids)
    return {int(i): index.reconstruct(int(i)).astype(np.float32).tobytes() for i in ids}


def assert_backup_consistent(dest: Path, manifest: Manifest) -> None:
    """Counts, blobs and snapshots of a backup agree with its own catalog."""
    assert json.loads((dest / "manifest.json").read_text())["chunks"] == manifest.chunks
    conn = sqlite3.connect(dest / "catalog.sqlite3")
    try:
        counts = [
            conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
            for t in ("collections", "documents", "chunks")
        ]
        referenced = {r[0] for r in conn.execute("SELECT sha256 FROM documents")}
        per_document = conn.execute(
            "SELECT count(*) FROM documents d WHERE d.status = 'indexed'"
            " AND d.chunk_count != (SELECT count(*) FROM chunks WHERE document_id = d.id)"
        ).fetchone()[0]
    finally:
        conn.close()
    assert counts == [manifest.collections, manifest.documents, manifest.chunks]
    assert per_document == 0
    assert manifest.missing_blobs == ()
    stored = {p.name for p in (dest / "blobs").iterdir() if p.is_file()}
    assert stored == referenced
    for sha in stored:
        assert sha256(dest / "blobs" / sha) == sha
    chunks = catalog_chunks(dest / "catalog.sqlite3")
    for name in manifest.snapshots:
        held = snapshot_vectors(dest / "snapshots" / name / "vectors.faiss")
        assert held.items() <= chunks[name].items()  # no vector without its chunk


def assert_indexes_match_catalog(data: Path) -> None:
    """Every collection's snapshot holds exactly the catalog's chunks, with their vectors."""
    for name, chunks in catalog_chunks(data / "catalog.sqlite3").items():
        path = data / name / "vectors.faiss"
        assert snapshot_vectors(path) == chunks if chunks else not path.exists()


def results(rt: Runtime, queries: list[tuple[str, str]]) -> list[list[tuple[Any, ...]]]:
    found = []
    for collection, query in queries:
        for mode in ("dense", "keyword", "hybrid"):
            hits = rt.query.retrieve(collection, query, 4, mode=mode).results
            found.append(
                [(h.document_id, h.source, h.page, h.text, round(h.score, 5)) for h in hits]
            )
    return found


@pytest.fixture
def small_backup(tmp_path: Path) -> tuple[Path, Manifest, dict[str, str]]:
    """A backup of a quiet data directory with a text and a PDF; and source -> document id."""
    with runtime_at(tmp_path / "source") as rt:
        ids = ingest(rt, "kb", [("bees.txt", b"Bees make honey from nectar."), ("tides.pdf", PDF)])
        manifest = backup(rt.settings.data_dir, tmp_path / "backup")
    return tmp_path / "backup", manifest, dict(zip(("bees.txt", "tides.pdf"), ids, strict=True))


# -- what a backup holds -------------------------------------------------------


def test_a_restored_copy_retrieves_exactly_what_the_source_did(
    tmp_path: Path, embedder: Embedder
) -> None:
    texts = {
        "bees.txt": "Bees make honey from the nectar of flowers and store it in wax combs.",
        "ferry.md": "# Ferry\n\nThe ferry to the island leaves every hour on the hour.",
        "trains.txt": "Night trains to the north leave from platform nine after midnight.",
    }
    with runtime_at(tmp_path / "source", embedder) as rt:
        ids = ingest(rt, "kb", [(k, v.encode()) for k, v in texts.items()])
        ingest(rt, "kb", [("tides.pdf", PDF)])
        ingest(rt, "notes", [("tea.txt", b"Green tea wants water at eighty degrees.")])
        rt.vectors.sync("kb")
        rt.vectors.snapshot("kb")
        # After the snapshot: it still holds the deleted document's vectors.
        rt.documents.delete_document("kb", ids[2])
        queries = [("kb", "When does the ferry leave?"), ("kb", "high tide"), ("notes", "tea")]
        before = results(rt, queries)

        manifest = backup(rt.settings.data_dir, tmp_path / "backup")

        assert (manifest.collections, manifest.documents, manifest.blobs) == (2, 4, 4)
        assert manifest.schema_version == SCHEMA_VERSION
        assert manifest.snapshots == ("kb",)
        assert_backup_consistent(tmp_path / "backup", manifest)

    assert restore(tmp_path / "backup", tmp_path / "restored") == manifest

    assert_indexes_match_catalog(tmp_path / "restored")
    assert sorted(p.name for p in (tmp_path / "restored").iterdir()) == [
        "blobs",
        "catalog.sqlite3",
        "kb",
        "notes",
    ]
    with runtime_at(tmp_path / "restored", embedder) as rt:
        assert results(rt, queries) == before
        assert rt.documents.get_document("kb", ids[0]).status == "indexed"


def test_a_backup_is_one_moment_even_when_documents_change_during_it(tmp_path: Path) -> None:
    with runtime_at(tmp_path / "source") as rt:
        gone, kept = ingest(rt, "kb", [("gone.txt", b"soon deleted"), ("kept.txt", b"stays")])
        late: list[str] = []
        catalog_copies = 0

        def meddle(stage: str, done: int, total: int | None) -> None:
            nonlocal catalog_copies
            if (stage, done) != ("catalog", 1):
                return
            catalog_copies += 1
            if catalog_copies == 1:
                # unlinks gone.txt's blob after the catalog copy that refers to it
                rt.documents.delete_document("kb", gone)
            elif catalog_copies == 2:
                # committed, indexed and snapshotted after the last catalog copy
                late.extend(ingest(rt, "kb", [("late.txt", b"arrived during the backup")]))
                rt.vectors.snapshot("kb")

        manifest = backup(rt.settings.data_dir, tmp_path / "backup", progress=meddle)
        live_snapshot = snapshot_vectors(rt.vectors.snapshot_path("kb"))

    assert catalog_copies == 2  # the vanished blob made it copy the catalog again
    assert_backup_consistent(tmp_path / "backup", manifest)
    assert _documents(tmp_path / "backup") == {kept}
    backed_up = catalog_chunks(tmp_path / "backup" / "catalog.sqlite3")["kb"]
    assert set(live_snapshot) - set(backed_up)  # the live snapshot had late.txt's vectors...
    assert snapshot_vectors(tmp_path / "backup/snapshots/kb/vectors.faiss") == backed_up  # ...cut

    restore(tmp_path / "backup", tmp_path / "restored")
    assert_indexes_match_catalog(tmp_path / "restored")
    with runtime_at(tmp_path / "restored") as rt:
        assert [h.document_id for h in rt.query.retrieve("kb", "arrived", 5).results] == [kept]
        assert rt.catalog.document_by_id(late[0]) is None


def _documents(dest: Path) -> set[str]:
    conn = sqlite3.connect(f"file:{dest / 'catalog.sqlite3'}?mode=ro", uri=True)
    try:
        return {r[0] for r in conn.execute("SELECT id FROM documents")}
    finally:
        conn.close()


def test_backups_taken_while_writers_ingest_and_delete_are_consistent(tmp_path: Path) -> None:
    errors: list[BaseException] = []
    stop = threading.Event()
    with runtime_at(tmp_path / "source", workers=2) as rt:

        def writer() -> None:
            try:
                accepted: list[tuple[str, str]] = []
                for i in range(400):
                    if stop.is_set():
                        return
                    collection = ("a", "b")[i % 2]
                    text = f"Document {i} talks about topic {i * 7 % 13}. " * (1 + i % 5)
                    receipt = rt.documents.add_text(collection, text, source=f"doc{i}.txt")
                    accepted.append((collection, receipt.documents[0].id))
                    if i % 3 == 2:
                        rt.documents.delete_document(*accepted.pop(0))
                    if i % 4 < 2:
                        rt.vectors.sync(collection)
                        rt.vectors.snapshot(collection)
                    time.sleep(0.005)
            except BaseException as exc:
                errors.append(exc)

        thread = threading.Thread(target=writer)
        thread.start()
        try:
            backups = []
            for n in range(3):
                time.sleep(0.3)
                dest = tmp_path / f"backup{n}"
                backups.append((dest, backup(rt.settings.data_dir, dest)))
        finally:
            stop.set()
            thread.join()
    assert not errors, errors

    assert 0 < backups[0][1].chunks < backups[-1][1].chunks  # taken while the data grew
    assert {"a", "b"} <= {name for _, m in backups for name in m.snapshots}
    for n, (dest, manifest) in enumerate(backups):
        assert_backup_consistent(dest, manifest)
        restore(dest, tmp_path / f"restored{n}")
        assert_indexes_match_catalog(tmp_path / f"restored{n}")


def test_restore_does_not_trust_a_snapshot_that_disagrees_with_the_catalog(
    tmp_path: Path, small_backup: tuple[Path, Manifest, dict[str, str]]
) -> None:
    src, manifest, _ = small_backup
    # As many vectors as the catalog has chunks, under ids it never gave out: a
    # loader that compared counts only would keep them and miss the real ones.
    top = max(catalog_chunks(src / "catalog.sqlite3")["kb"])
    index = faiss.IndexIDMap2(faiss.IndexFlatIP(HashEmbedder.dim))
    vectors = np.ones((manifest.chunks, HashEmbedder.dim), dtype=np.float32)
    index.add_with_ids(vectors, np.arange(top + 1, top + 1 + manifest.chunks, dtype=np.int64))
    (src / "snapshots" / "kb").mkdir(parents=True)
    faiss.write_index(index, str(src / "snapshots" / "kb" / "vectors.faiss"))

    restore(src, tmp_path / "restored")

    assert_indexes_match_catalog(tmp_path / "restored")


def test_jobs_running_at_backup_time_are_queued_again(tmp_path: Path) -> None:
    with runtime_at(tmp_path / "source") as rt:
        receipt = rt.documents.add_text("kb", "Owls hunt at night.", source="owls.txt")
        claimed = rt.jobs.claim("worker-that-will-never-come-back")
        assert claimed is not None and claimed.status == "running"
        rt.catalog.set_document_status(receipt.documents[0].id, "processing")
        backup(rt.settings.data_dir, tmp_path / "backup")

    notes: list[str] = []
    restore(tmp_path / "backup", tmp_path / "restored", notify=notes.append)

    assert notes == ["1 job(s) that were running at backup time are queued again"]
    with runtime_at(tmp_path / "restored") as rt:
        job = rt.jobs.get(receipt.job_id)
        assert (job.status, job.attempts) == ("queued", 0)
        assert rt.catalog.document_by_id(receipt.documents[0].id).status == "queued"  # type: ignore[union-attr]
        rt.start_workers(1)
        assert rt.wait_for_job(receipt.job_id, timeout_s=60).status == "succeeded"
        assert rt.query.retrieve("kb", "owls", 1).results[0].source == "owls.txt"


# -- refusals ------------------------------------------------------------------


def test_backup_refuses_a_destination_that_is_not_empty(tmp_path: Path) -> None:
    with runtime_at(tmp_path / "data"):
        pass
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "keep.txt").write_text("mine")
    with pytest.raises(ConflictError, match="is not empty"):
        backup(tmp_path / "data", tmp_path / "dest")
    with pytest.raises(InvalidRequest, match="inside the data directory"):
        backup(tmp_path / "data", tmp_path / "data" / "backup")
    with pytest.raises(InvalidRequest, match="nothing to back up"):
        backup(tmp_path / "nothing", tmp_path / "elsewhere")
    assert [p.name for p in (tmp_path / "dest").iterdir()] == ["keep.txt"]


def test_restore_replaces_a_data_directory_only_with_force(
    tmp_path: Path, small_backup: tuple[Path, Manifest, dict[str, str]]
) -> None:
    src, manifest, ids = small_backup
    target = tmp_path / "target"
    with runtime_at(target) as rt:
        old = ingest(rt, "old", [("old.txt", b"the previous contents")])

    with pytest.raises(ConflictError, match=r"already holds a catalog.*--force"):
        restore(src, target)
    with runtime_at(target) as rt:  # untouched
        assert rt.catalog.document_by_id(old[0]) is not None

    restore(src, target, force=True)

    assert sorted(p.name for p in target.iterdir()) == ["blobs", "catalog.sqlite3", "kb"]
    with runtime_at(target) as rt:
        assert rt.catalog.document_by_id(old[0]) is None
        assert [c.name for c in rt.catalog.list_collections()] == ["kb"]
        assert rt.query.retrieve("kb", "honey", 1).results[0].document_id == ids["bees.txt"]

    stray = tmp_path / "stray"
    stray.mkdir()
    (stray / "notes.txt").write_text("not a data directory")
    with pytest.raises(ConflictError, match="is not empty"):
        restore(src, stray)
    (tmp_path / "empty").mkdir()
    assert restore(src, tmp_path / "empty") == manifest


def test_restore_refuses_an_incomplete_or_newer_backup(
    tmp_path: Path, small_backup: tuple[Path, Manifest, dict[str, str]]
) -> None:
    src, _, _ = small_backup
    target = tmp_path / "target"
    text = (src / "manifest.json").read_text()

    (src / "manifest.json").write_text(
        text.replace(f'"schema_version": {SCHEMA_VERSION}', '"schema_version": 99')
    )
    with pytest.raises(BackupInvalid, match="newer version"):
        restore(src, target)

    (src / "manifest.json").unlink()
    with pytest.raises(BackupInvalid, match=r"no manifest\.json.*interrupted"):
        restore(src, target)

    (src / "manifest.json").write_text(text)
    catalog = bytearray((src / "catalog.sqlite3").read_bytes())
    catalog[5000] ^= 0xFF
    (src / "catalog.sqlite3").write_bytes(bytes(catalog))
    with pytest.raises(BackupInvalid, match="does not match its manifest"):
        restore(src, target)
    assert not target.exists() or not any(target.iterdir())


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_damaged_blob_fails_the_restore_naming_its_document(
    tmp_path: Path, small_backup: tuple[Path, Manifest, dict[str, str]], damage: str
) -> None:
    src, _, ids = small_backup
    with runtime_at(tmp_path / "scratch") as rt:
        sha = rt.blobs.put(PDF, limit=10**7, name="tides.pdf")[0]
    blob = src / "blobs" / sha
    if damage == "corrupt":
        data = bytearray(blob.read_bytes())
        data[100] ^= 0x01
        blob.write_bytes(bytes(data))
    else:
        blob.unlink()
    target = tmp_path / "target"

    with pytest.raises(BackupInvalid) as refused:
        restore(src, target)

    message = refused.value.message
    assert f"blob {sha} is {damage}" in message
    assert f"kb/tides.pdf ({ids['tides.pdf']})" in message
    assert "--allow-missing-blobs" in message
    assert not (target / "catalog.sqlite3").exists()
    assert list(target.iterdir()) == []  # no half-built restore left behind

    notes: list[str] = []
    restore(src, target, allow_missing_blobs=True, notify=notes.append)
    assert len(notes) == 1 and "kb/tides.pdf" in notes[0]
    assert not (target / "blobs" / sha).exists()
    with runtime_at(target) as rt:  # its chunks are still searchable
        assert rt.query.retrieve("kb", "high tide", 1).results[0].source == "tides.pdf"


# -- the command line ----------------------------------------------------------

cli = typer.Typer()
cli.command("backup")(backup_command)
cli.command("restore")(restore_command)
runner = CliRunner()


def test_cli_errors_are_one_clean_line(
    tmp_path: Path, small_backup: tuple[Path, Manifest, dict[str, str]]
) -> None:
    src, _, _ = small_backup
    env = {"RAG_DATA_DIR": str(tmp_path / "source")}
    result = runner.invoke(cli, ["backup", str(src)], env=env)
    assert result.exit_code == 1
    assert f"error: backup destination {src} is not empty" in result.output
    assert "Traceback" not in result.output

    (src / "manifest.json").unlink()
    result = runner.invoke(cli, ["restore", str(src)], env={"RAG_DATA_DIR": str(tmp_path / "t")})
    assert result.exit_code == 1
    assert "has no manifest.json" in result.output
    assert "Traceback" not in result.output


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def _serve(data: Path, log: Path, port: int) -> Iterator[subprocess.Popen[bytes]]:
    env = {**os.environ, "RAG_DATA_DIR": str(data), "HF_HUB_OFFLINE": "1"}
    args = ["serve", "--host", "127.0.0.1", "--port", str(port)]
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "rag_service.cli", *args], env=env, stdout=out, stderr=out
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            try:
                if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.3)
        yield proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@pytest.mark.slow
def test_cli_backup_of_a_running_server_restores_and_answers(
    tmp_path: Path, embedder: Embedder
) -> None:
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    ferry = make_pdf(["Timetable notes.", "The ferry to the island leaves every hour on the hour."])
    query = {"collection": "travel", "query": "when does the ferry leave?", "top_k": 1}
    with _serve(tmp_path / "data", tmp_path / "serve.log", port):
        upload = httpx.post(
            f"{base}/v1/collections/travel/documents",
            files=[("files", ("ferry.pdf", ferry))],
            timeout=30,
        )
        assert upload.status_code == 202, upload.text
        deadline = time.monotonic() + 120
        while (
            httpx.get(f"{base}/v1/jobs/{upload.json()['job_id']}").json()["status"] != "succeeded"
        ):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        served = httpx.post(f"{base}/v1/retrieve", json=query, timeout=30).json()["results"]
        # the server keeps taking uploads while the backup runs
        more = httpx.post(
            f"{base}/v1/collections/travel/documents",
            json={"documents": [{"text": "Buses run every ten minutes.", "source": "bus.txt"}]},
            timeout=30,
        )
        assert more.status_code == 202, more.text

        made = runner.invoke(
            cli, ["backup", str(tmp_path / "backup")], env={"RAG_DATA_DIR": str(tmp_path / "data")}
        )
        assert made.exit_code == 0, made.output
        assert "backup of" in made.output and "written to" in made.output

    restored = runner.invoke(
        cli, ["restore", str(tmp_path / "backup")], env={"RAG_DATA_DIR": str(tmp_path / "copy")}
    )
    assert restored.exit_code == 0, restored.output
    assert "restored the backup of" in restored.output
    assert_indexes_match_catalog(tmp_path / "copy")
    with runtime_at(tmp_path / "copy", embedder) as rt:
        hit = rt.query.retrieve("travel", query["query"], 1).results[0]
    assert (hit.source, hit.page, hit.text) == (
        served[0]["source"],
        served[0]["page"],
        served[0]["text"],
    )
