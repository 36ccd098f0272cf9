"""What was acknowledged survives SIGKILL: ingestion, snapshot writes and deletes.

One seeded run (``RAG_CRASH_SEED``, default below; the schedule of kills is
drawn from it, the moments the processes reach are the machine's;
``RAG_CRASH_THREADS`` gives the worker more ingestion threads):

1. A batch of generated text, Markdown and PDF documents is accepted into two
   collections in-process: every paragraph carries a marker token, so the
   chunks of each version can be checked for exactly its own text.  Two
   sources get new versions (one in the same upload, one in a later upload),
   two files repeat bytes already accepted, and one text is in both
   collections.
2. Three processes run on the data directory and are SIGKILLed and restarted:
   ``rag worker`` (``WORKER_KILLS`` times; each kill is drawn to land either
   while the model loads or a few seconds after the worker is ready), a loop
   that catches the FAISS indexes up and rewrites their snapshots, and a loop
   that deletes two batch documents, then keeps adding and deleting small
   documents of its own.  The two loops keep journals of what they started
   and what returned.
3. A last worker drains the queue; then every invariant is checked and any
   violation is listed: documents, chunks, FTS rows, FAISS ids against the
   catalog, snapshots on disk, blobs, jobs.

Why ``RAG_INGEST__MAX_ATTEMPTS=1000``: the kills are external and fall on
whatever job is running, so one long job can be hit several times in a row;
with the default of 3 the poison-job guard would rightly give up on it and
fail healthy documents.  That guard has its own test; here it is turned off,
and the run reports the most attempts a job needed.  ``LEASE_S=2`` lets a
killed worker's job be claimed again as soon as the next worker is up.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from rag_service.config import Settings
from rag_service.embedding import SentenceTransformerEmbedder
from rag_service.runtime import Runtime
from rag_service.storage.blobs import BlobStore
from rag_service.storage.catalog import Catalog
from rag_service.storage.vectors import SNAPSHOT_NAME, STALE_TMP_S, VectorStore
from tests.helpers import make_pdf
from tests.reliability.crash_targets import CHURN_PREFIX, read_journal

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
SEED = os.environ.get("RAG_CRASH_SEED", "20261126")
#: Ingestion threads of each ``rag worker`` process.
THREADS = os.environ.get("RAG_CRASH_THREADS", "1")
COLLECTIONS = ("alpha", "beta")
#: Batch documents the deleter removes: one shares its blob with the other collection.
DOOMED = {("alpha", "shared.txt"), ("beta", "doomed.txt")}
WORKER_KILLS = 20
#: What ``rag worker`` logs once its model is loaded and it takes jobs.
WORKER_READY = "worker started"
#: Share of worker kills aimed at model loading rather than at work.
KILL_DURING_LOAD = 0.4
MARKER = re.compile(r"\b(?:mk|ck)[0-9a-f]{12}\b")
SHA = re.compile(r"^[0-9a-f]{64}$")
WORDS = (
    "harbour",
    "ferry",
    "lantern",
    "granite",
    "orchard",
    "meadow",
    "copper",
    "signal",
    "valley",
    "engine",
    "river",
    "timber",
    "ledger",
    "summit",
    "canvas",
    "beacon",
    "quarry",
    "thistle",
    "anchor",
    "compass",
    "glacier",
    "prairie",
    "furnace",
    "kettle",
    "saddle",
    "willow",
    "marble",
    "pigeon",
    "cobalt",
    "tunnel",
    "basket",
    "walnut",
    "harvest",
    "falcon",
    "mosaic",
    "parcel",
    "rudder",
    "spindle",
    "tavern",
    "violet",
)


# -- the batch ---------------------------------------------------------------


@dataclass
class Version:
    """One accepted file: what was sent and what must become of it."""

    collection: str
    source: str
    data: bytes
    markers: frozenset[str]
    #: Same bytes, same collection: must map to that document, not make one.
    same_as: Version | None = None
    doc_id: str = ""
    fate: str = "indexed"  # or "replaced", "deleted"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


class Writer:
    """Seeded text with a unique marker token in every paragraph."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.used: set[str] = set()

    def marker(self) -> str:
        while (m := f"mk{self.rng.getrandbits(48):012x}") in self.used:
            pass
        self.used.add(m)
        return m

    def paragraph(self, marker: str) -> str:
        words = [self.rng.choice(WORDS) for _ in range(self.rng.randint(40, 70))]
        words.insert(self.rng.randrange(1, len(words)), marker)  # not first: never capitalised
        for i in range(9, len(words) - 1, self.rng.randint(8, 14)):
            words[i] += "."
        return words[0].title() + " " + " ".join(words[1:]) + "."

    def paragraphs(self, count: int) -> tuple[list[str], frozenset[str]]:
        markers = [self.marker() for _ in range(count)]
        return [self.paragraph(m) for m in markers], frozenset(markers)

    def text(self, collection: str, source: str, count: int) -> Version:
        paras, markers = self.paragraphs(count)
        return Version(collection, source, "\n\n".join(paras).encode(), markers)

    def markdown(self, collection: str, source: str, sections: int) -> Version:
        paras, markers = self.paragraphs(sections * 2)
        parts = [f"# {source}"]
        for i in range(sections):
            parts += [f"## Part {i + 1}", paras[2 * i], paras[2 * i + 1]]
        return Version(collection, source, "\n\n".join(parts).encode(), markers)

    def pdf(self, collection: str, source: str, pages: int) -> Version:
        paras, markers = self.paragraphs(pages * 2)
        texts = [f"{paras[2 * i]}\n\n{paras[2 * i + 1]}" for i in range(pages)]
        return Version(collection, source, make_pdf(texts), markers)


def plan_uploads(rng: random.Random) -> list[tuple[str, list[Version]]]:
    """The batch, one upload (so one job) per entry, in the order accepted.

    About 600 chunks: enough that the worker is busy through most of the
    kills, not only during the first few.
    """
    w = Writer(rng)
    shared = w.text("beta", "shared.txt", 60)
    faq = w.text("alpha", "faq.txt", 120)
    extra = w.text("alpha", "extra.txt", 15)

    def again(version: Version, source: str) -> Version:
        return Version(version.collection, source, version.data, version.markers, version)

    return [
        ("alpha", [w.markdown("alpha", "guide.md", 65), faq, w.pdf("alpha", "manual.pdf", 35)]),
        ("alpha", [w.markdown("alpha", "notes.md", 20), w.markdown("alpha", "notes.md", 30)]),
        ("beta", [w.markdown("beta", "handbook.md", 75), shared]),
        ("alpha", [Version("alpha", "shared.txt", shared.data, shared.markers)]),
        ("alpha", [again(faq, "faq-copy.txt"), extra, again(extra, "x.txt")]),
        ("beta", [w.pdf("beta", "report.pdf", 20)]),
        ("beta", [w.text("beta", "log.txt", 130), w.markdown("beta", "recipes.md", 60)]),
        ("beta", [w.pdf("beta", "report.pdf", 35), w.text("beta", "doomed.txt", 30)]),
        ("alpha", [w.markdown("alpha", "notes.md", 40)]),
        ("beta", [w.markdown("beta", "long.md", 90)]),
        ("alpha", [w.text("alpha", "tail.txt", 130)]),
    ]


def accept(data: Path, embedder: SentenceTransformerEmbedder) -> list[Version]:
    """Accept the batch in-process; returns one Version per distinct document."""
    uploads = plan_uploads(random.Random(f"{SEED}:corpus"))
    documents: dict[str, Version] = {}
    with Runtime.open(Settings(data_dir=data), embedder=embedder) as runtime:
        for collection, files in uploads:
            receipt = runtime.documents.add_bytes(collection, [(v.source, v.data) for v in files])
            assert len(receipt.documents) == len(files)
            for version, doc in zip(files, receipt.documents, strict=True):
                assert doc.sha256 == version.sha256
                if version.same_as is not None:
                    assert doc.id == version.same_as.doc_id, "same bytes made a second document"
                    continue
                assert doc.id not in documents
                version.doc_id = doc.id
                documents[doc.id] = version
    versions = list(documents.values())
    latest: dict[tuple[str, str], Version] = {}
    for version in versions:
        older = latest.get((version.collection, version.source))
        if older is not None:
            older.fate = "replaced"
        latest[(version.collection, version.source)] = version
    for version in versions:
        if (version.collection, version.source) in DOOMED:
            version.fate = "deleted"
    return versions


# -- processes ---------------------------------------------------------------


@dataclass
class Child:
    """A child process that is killed and started again, with one log per start.

    ``plan()`` draws when to kill the next start: ``(after_ready, delay)``,
    the delay counted from the start, or from the moment ``ready_line``
    appeared in its log when ``after_ready``.
    """

    name: str
    argv: list[str]
    env: dict[str, str]
    logs: Path
    plan: Callable[[], tuple[bool, float]] = lambda: (True, float("inf"))
    ready_line: str | None = None
    popen: subprocess.Popen[bytes] | None = None
    starts: int = 0
    kills: int = 0
    started_at: float = 0.0
    ready: bool = False
    log_path: Path = field(default_factory=Path)
    _after_ready: bool = False
    _delay: float = 0.0
    _kill_at: float | None = None

    def start(self) -> None:
        self.starts += 1
        self.log_path = self.logs / f"{self.name}-{self.starts:02d}.log"
        with open(self.log_path, "wb") as out:
            self.popen = subprocess.Popen(
                self.argv, env=self.env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT
            )
        self.started_at = time.monotonic()
        self.ready = False
        self._after_ready, self._delay = self.plan()
        self._kill_at = None if self._after_ready else self.started_at + self._delay

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def assert_alive(self) -> None:
        assert self.popen is not None
        code = self.popen.poll()
        assert code is None, f"{self.name} exited by itself ({code}):\n{self.log()[-4000:]}"

    def due(self, now: float) -> bool:
        """Whether the drawn moment to kill this start has come."""
        if self.ready_line is not None and not self.ready:
            self.ready = self.ready_line in self.log()
            assert self.ready or now - self.started_at < 120, f"{self.name} not up:\n{self.log()}"
            if self.ready and self._after_ready:
                self._kill_at = now + self._delay
        return self._kill_at is not None and now >= self._kill_at

    def kill(self) -> int:
        """SIGKILL the running process; returns its pid."""
        self.assert_alive()
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait()
        self.kills += 1
        return self.popen.pid

    def stop(self) -> None:
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


@dataclass
class Tally:
    """Where the kills landed."""

    worker_load: int = 0
    worker_mid_job: int = 0
    worker_idle: int = 0
    stages: Counter[str] = field(default_factory=Counter)
    snapshot_mid_write: int = 0
    delete_mid_delete: int = 0
    delete_mid_add: int = 0


@dataclass
class Journal:
    """The deleter's journal, read after the run."""

    added: dict[str, tuple[str, str, str]]  # doc id -> (collection, sha, marker)
    add_started: set[str]  # shas of uploads that were started
    deleted: dict[str, str]  # doc id -> sha, of deletes that returned
    doomed_deleted: set[str]


def read_deletes(path: Path, doomed: set[str]) -> Journal:
    lines = read_journal(path)
    begun = {line[2]: line[3] for line in lines if line[0] == "del-begin"}
    done = {line[2] for line in lines if line[0] == "del-done"}
    return Journal(
        added={line[2]: (line[1], line[3], line[4]) for line in lines if line[0] == "add"},
        add_started={line[2] for line in lines if line[0] == "add-begin"},
        deleted={doc: begun[doc] for doc in done},
        doomed_deleted=doomed & done,
    )


def open_tail_is(path: Path, pid: int, event: str) -> bool:
    """Whether the journal part of process ``pid`` ends with an unanswered ``event``."""
    mine: list[list[str]] = []
    for line in read_journal(path):
        if line[0] == "start":
            mine = [line] if line[1] == str(pid) else []
        elif mine:
            mine.append(line)
    return bool(mine) and mine[-1][0] == event


class CrashRun:
    """The three killable processes on one data directory, and what their kills hit."""

    def __init__(self, data: Path, logs: Path, versions: list[Version], embed: tuple[str, int]):
        self.data, self.logs = data, logs
        self.snap_journal = logs / "snapshots.journal"
        self.del_journal = logs / "deletes.journal"
        self.env = {
            **os.environ,
            "PYTHONPATH": str(ROOT),
            "RAG_DATA_DIR": str(data),
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
            "RAG_LOG_LEVEL": "INFO",
            "RAG_INGEST__LEASE_S": "2",
            "RAG_INGEST__MAX_ATTEMPTS": "1000",
            "RAG_INGEST__POLL_INTERVAL_S": "0.2",
        }
        self.targets = [sys.executable, "-m", "tests.reliability.crash_targets"]
        common = [arg for c in COLLECTIONS for arg in ("--collection", c)]
        doomed = [f"{v.collection}:{v.doc_id}" for v in versions if v.fate == "deleted"]
        self.delete_args = [
            *("--data", str(data), "--journal", str(self.del_journal), *common),
            *(arg for item in doomed for arg in ("--doomed", item)),
            *("--embed-model", embed[0], "--embed-dim", str(embed[1]), "--seed", SEED),
        ]
        snapshot_args = ["--data", str(data), "--journal", str(self.snap_journal), *common]
        rng = {name: random.Random(f"{SEED}:{name}") for name in ("worker", "snapshot", "delete")}

        def worker_plan() -> tuple[bool, float]:
            if rng["worker"].random() < KILL_DURING_LOAD:
                return False, rng["worker"].uniform(0.2, 6.0)
            return True, rng["worker"].uniform(0.2, 5.0)

        self.worker = Child(
            "worker",
            [sys.executable, "-m", "rag_service.cli", "worker", "--threads", THREADS],
            self.env,
            logs,
            plan=worker_plan,
            ready_line=WORKER_READY,
        )
        self.snapshotter = Child(
            "snapshot",
            [*self.targets, "snapshot", *snapshot_args],
            self.env,
            logs,
            plan=lambda: (False, rng["snapshot"].uniform(0.5, 4.0)),
        )
        self.deleter = Child(
            "delete",
            [*self.targets, "delete", *self.delete_args],
            self.env,
            logs,
            plan=lambda: (False, rng["delete"].uniform(0.5, 5.0)),
        )
        self.children = [self.worker, self.snapshotter, self.deleter]
        self.tally = Tally()

    def kill_phase(self, catalog: sqlite3.Connection) -> None:
        """Kill and restart until the worker has been killed ``WORKER_KILLS`` times."""
        for child in self.children:
            child.start()
        deadline = time.monotonic() + 600
        while self.worker.kills < WORKER_KILLS:
            assert time.monotonic() < deadline, "the kill phase did not end in 10 minutes"
            now = time.monotonic()
            for child in self.children:
                child.assert_alive()
                if child.due(now):
                    ready, pid = child.ready, child.kill()
                    self._record(child, pid, ready, catalog)
                    if child is not self.worker or child.kills < WORKER_KILLS:
                        child.start()
            time.sleep(0.02)
        self.snapshotter.kill()
        self.deleter.kill()

    def _record(self, child: Child, pid: int, ready: bool, catalog: sqlite3.Connection) -> None:
        tally = self.tally
        if child is self.worker:
            running = catalog.execute(
                "SELECT stage FROM jobs WHERE status = 'running' AND worker LIKE ?",
                (f"%:{pid}:%",),
            ).fetchone()
            if not ready:
                tally.worker_load += 1
            elif running is None:
                tally.worker_idle += 1
            else:
                tally.worker_mid_job += 1
                tally.stages[running[0]] += 1
        elif child is self.snapshotter:
            tally.snapshot_mid_write += any(self.data.glob(f"*/.{SNAPSHOT_NAME}.{pid}.*.tmp"))
        else:
            tally.delete_mid_delete += open_tail_is(self.del_journal, pid, "del-begin")
            tally.delete_mid_add += open_tail_is(self.del_journal, pid, "add-begin")

    def finish(self, catalog: sqlite3.Connection) -> None:
        """Complete the deletes a kill cut short, then let one worker drain the queue."""
        argv = [*self.targets, "finish-deletes", *self.delete_args]
        with open(self.logs / "finish-deletes.log", "wb") as out:
            subprocess.run(argv, env=self.env, cwd=ROOT, stdout=out, stderr=out, check=True)
        final = Child(
            "worker-final", self.worker.argv, self.env, self.logs, ready_line=WORKER_READY
        )
        self.children.append(final)
        final.start()
        began = time.monotonic()
        busy = "SELECT count(*) FROM jobs WHERE status IN ('queued', 'running')"
        while not final.ready or catalog.execute(busy).fetchone()[0]:
            final.due(time.monotonic())  # notes when it is up: SIGTERM must not come first
            final.assert_alive()
            assert time.monotonic() - began < 300, "the queue did not drain in 5 minutes"
            time.sleep(0.25)
        assert final.popen is not None
        final.popen.send_signal(signal.SIGTERM)  # a clean stop writes its snapshots
        assert final.popen.wait(timeout=60) == 0, final.log()[-4000:]

    def stop(self) -> None:
        for child in self.children:
            child.stop()


# -- the test ----------------------------------------------------------------


def test_acknowledged_documents_survive_sigkill(
    tmp_path: Path, embedder: SentenceTransformerEmbedder, capsys: pytest.CaptureFixture[str]
) -> None:
    began = time.monotonic()
    data, logs = tmp_path / "data", tmp_path / "logs"
    logs.mkdir()
    versions = accept(data, embedder)
    run = CrashRun(data, logs, versions, (embedder.model_id, embedder.dim))
    try:
        with closing(sqlite3.connect(data / "catalog.sqlite3", timeout=30)) as catalog:
            run.kill_phase(catalog)
            killed = time.monotonic()
            run.finish(catalog)
    finally:
        run.stop()
    drained = time.monotonic()

    doomed = {v.doc_id for v in versions if v.fate == "deleted"}
    journal = read_deletes(run.del_journal, doomed)
    problems, figures = check_everything(data, versions, journal, run.snap_journal, logs)
    t = run.tally
    with capsys.disabled():  # the figures belong in every run's output, not only failures
        print(
            f"\ncrash test seed={SEED} threads={THREADS}: {time.monotonic() - began:.0f} s"
            f" (kill phase {killed - began:.0f} s, drain {drained - killed:.0f} s)\n"
            f"  worker kills {run.worker.kills}: during model load {t.worker_load},"
            f" mid-job {t.worker_mid_job} {dict(t.stages)}, idle {t.worker_idle}\n"
            f"  snapshot-writer kills {run.snapshotter.kills}: mid-write {t.snapshot_mid_write}\n"
            f"  deleter kills {run.deleter.kills}: mid-delete {t.delete_mid_delete},"
            f" mid-upload {t.delete_mid_add}\n"
            f"  checked: {figures}"
        )
    assert journal.doomed_deleted == doomed
    assert not problems, "\n".join(problems)


# -- the checks --------------------------------------------------------------


def check_everything(
    data: Path, versions: list[Version], journal: Journal, snap_journal: Path, logs: Path
) -> tuple[list[str], str]:
    """Every invariant of the data directory; returns the violations and the figures."""
    problems: list[str] = []
    catalog = Catalog(data / "catalog.sqlite3")
    conn = catalog.read()
    try:
        jobs = conn.execute("SELECT id, status, attempts, error FROM jobs").fetchall()
        for job in jobs:
            if job["status"] != "succeeded":
                problems.append(f"job {job['id']} is {job['status']}: {job['error']}")
        max_attempts = max(job["attempts"] for job in jobs)

        docs = conn.execute(
            "SELECT d.*, c.name AS collection FROM documents d"
            " JOIN collections c ON c.id = d.collection_id"
        ).fetchall()
        texts: dict[str, str] = {}
        for doc in docs:
            problems += check_document(conn, data, doc)
            texts[doc["id"]] = " ".join(
                r[0]
                for r in conn.execute("SELECT text FROM chunks WHERE document_id = ?", (doc["id"],))
            )
        orphans = conn.execute(
            "SELECT count(*) FROM chunks WHERE document_id NOT IN (SELECT id FROM documents)"
        ).fetchone()[0]
        if orphans:
            problems.append(f"{orphans} chunk rows belong to no document")

        present = {doc["id"]: doc for doc in docs}
        for v in versions:
            problems += check_version(v, present.get(v.doc_id), texts.get(v.doc_id, ""))
        batch_ids = {v.doc_id for v in versions}
        churn_now = {d for d in present if present[d]["source"].startswith(CHURN_PREFIX)}
        stray = set(present) - batch_ids - churn_now
        if stray:
            problems.append(f"documents nobody accepted: {sorted(stray)}")
        for doc_id, (collection, sha, marker) in journal.added.items():
            if doc_id in journal.deleted:
                continue
            if doc_id not in present:
                problems.append(f"acknowledged churn document {doc_id} ({collection}) is missing")
            elif set(MARKER.findall(texts[doc_id])) != {marker}:
                problems.append(f"churn document {doc_id} does not hold exactly {marker}")
            elif present[doc_id]["sha256"] != sha:
                problems.append(f"churn document {doc_id} has another sha256")
        for doc_id in journal.deleted:
            if doc_id in present:
                problems.append(f"document {doc_id} is back after its delete returned")
            left = conn.execute(
                "SELECT count(*) FROM chunks WHERE document_id = ?", (doc_id,)
            ).fetchone()[0]
            if left:
                problems.append(f"deleted document {doc_id} left {left} chunks")

        markers = {m for v in versions for m in v.markers} | {
            marker for _, _, marker in journal.added.values()
        }
        problems += check_keyword_index(conn, markers)
        problems += check_snapshot_journal(snap_journal)
        problems += check_logs(logs)
        faiss_problems, faiss_figures = check_vectors(catalog, data)
        problems += faiss_problems
        blob_problems, blob_figures = check_blobs(catalog, data, journal)
        problems += blob_problems
    finally:
        catalog.close()

    fates = Counter(v.fate for v in versions)
    churn_deleted = len(journal.deleted) - len(journal.doomed_deleted)
    figures = (
        f"{len(versions)} accepted documents ({dict(fates)}), {len(churn_now)} churn documents"
        f" left of {len(journal.added)} acknowledged adds, {churn_deleted} acknowledged churn"
        f" deletes; {len(jobs)} jobs, most attempts {max_attempts}; {faiss_figures};"
        f" {blob_figures}"
    )
    return problems, figures


def check_document(conn: sqlite3.Connection, data: Path, doc: sqlite3.Row) -> list[str]:
    """One document row against its chunks and its blob."""
    problems = []
    name = f"{doc['collection']}/{doc['source']} ({doc['id']})"
    if doc["status"] != "indexed" or doc["error"] is not None:
        problems.append(f"{name} is {doc['status']}: {doc['error']}")
    chunks = conn.execute(
        "SELECT ordinal, collection_id FROM chunks WHERE document_id = ? ORDER BY ordinal",
        (doc["id"],),
    ).fetchall()
    if len(chunks) != doc["chunk_count"] or not chunks:
        problems.append(f"{name}: chunk_count {doc['chunk_count']} but {len(chunks)} chunk rows")
    if [c[0] for c in chunks] != list(range(len(chunks))):
        problems.append(f"{name}: chunk ordinals {[c[0] for c in chunks]} (duplicates or gaps)")
    if any(c[1] != doc["collection_id"] for c in chunks):
        problems.append(f"{name}: chunks filed under another collection")
    blob = data / "blobs" / doc["sha256"]
    if not blob.is_file():
        problems.append(f"{name}: blob {doc['sha256']} is missing")
    elif hashlib.sha256(blob.read_bytes()).hexdigest() != doc["sha256"]:
        problems.append(f"{name}: blob {doc['sha256']} holds other bytes")
    return problems


def check_version(v: Version, doc: sqlite3.Row | None, text: str) -> list[str]:
    """An accepted file: indexed with exactly its own text, or gone if replaced or deleted."""
    name = f"{v.collection}/{v.source} ({v.doc_id}, {v.fate})"
    if v.fate != "indexed":
        return [f"{name} is still there"] if doc is not None else []
    if doc is None:
        return [f"{name} is missing"]
    if (doc["collection"], doc["source"], doc["sha256"]) != (v.collection, v.source, v.sha256):
        return [f"{name} changed identity: {doc['collection']}/{doc['source']}"]
    found = set(MARKER.findall(text))
    if found != v.markers:
        missing, foreign = sorted(v.markers - found), sorted(found - v.markers)
        return [f"{name}: markers missing {missing}, foreign {foreign}"]
    return []


def check_keyword_index(conn: sqlite3.Connection, markers: set[str]) -> list[str]:
    """FTS5 agrees with the chunk rows, in general and for every marker."""
    problems = []
    try:
        conn.execute("INSERT INTO chunks_fts(chunks_fts, rank) VALUES ('integrity-check', 1)")
    except sqlite3.DatabaseError as exc:
        problems.append(f"FTS index does not match the chunk rows: {exc}")
    for marker in sorted(markers):
        hits = {
            r[0]
            for r in conn.execute(
                "SELECT rowid FROM chunks_fts WHERE chunks_fts MATCH ?", (f'"{marker}"',)
            )
        }
        rows = {
            r[0] for r in conn.execute("SELECT id FROM chunks WHERE instr(text, ?) > 0", (marker,))
        }
        if hits != rows:
            problems.append(f"FTS finds {marker} in chunks {sorted(hits)}, rows {sorted(rows)}")
    return problems


def check_snapshot_journal(path: Path) -> list[str]:
    """Every snapshot the writer found at its starts was readable and had unique ids."""
    lines = read_journal(path)
    bad = [" ".join(line) for line in lines if line[0] in ("load-failed", "duplicate-ids")]
    starts = sum(line[0] == "start" for line in lines)
    loads = sum(line[0] == "load-ok" for line in lines)
    problems = [f"snapshot writer saw: {line}" for line in bad]
    if starts and not loads:
        problems.append("the snapshot writer never found a snapshot to load")
    return problems


def check_logs(logs: Path) -> list[str]:
    """No process logged an error or rebuilt an index (a killed process logs nothing)."""
    problems = []
    for log in sorted(logs.glob("*.log")):
        lines = log.read_text(errors="replace").splitlines()
        for at, line in enumerate(lines):
            if any(word in line for word in (" ERROR ", "Traceback", "rebuilding")):
                # the lines after it say what went wrong (a traceback ends with the exception)
                problems.append(f"{log.name}: " + "\n  ".join(lines[at : at + 40]))
    return problems


def snapshot_ids(path: Path) -> npt.NDArray[np.int64]:
    """The chunk ids a snapshot file holds, as written (a torn file fails to read)."""
    import faiss

    index: Any = faiss.read_index(str(path))
    if index.ntotal == 0:
        return np.empty(0, dtype=np.int64)
    return np.asarray(faiss.vector_to_array(index.id_map), dtype=np.int64)


def check_vectors(catalog: Catalog, data: Path) -> tuple[list[str], str]:
    """FAISS ids equal chunk ids, fresh and from the snapshot; torn temp files are harmless."""
    problems = []
    torn = sorted(data.glob(f"*/.{SNAPSHOT_NAME}.*.tmp"))  # from kills mid-write
    total = lag = 0
    store = VectorStore(catalog, data)
    for name in COLLECTIONS:
        coll_id, _ = catalog.collection_version(name)
        truth = catalog.chunk_ids(coll_id)
        total += len(truth)
        path = data / name / SNAPSHOT_NAME
        if not path.is_file():
            problems.append(f"{name}: no snapshot on disk")
        else:
            snap_ids = snapshot_ids(path)
            if len(np.unique(snap_ids)) != len(snap_ids):
                problems.append(f"{name}: the snapshot holds duplicate ids")
            lag += len(np.setxor1d(snap_ids, truth))
        ids = store.ids(name)  # the snapshot caught up from the catalog, temp files present
        if not np.array_equal(ids, truth):
            problems.append(
                f"{name}: FAISS has {len(ids)} ids, the catalog {len(truth)} chunks;"
                f" extra {np.setdiff1d(ids, truth)[:10]}, missing {np.setdiff1d(truth, ids)[:10]}"
            )
    # ten minutes on, the next snapshot writer removes what the killed ones left
    old = time.time() - STALE_TMP_S - 1
    for tmp in torn:
        os.utime(tmp, (old, old))
    for name in COLLECTIONS:
        store.sync(name).dirty = True
        store.snapshot(name)
        again = np.sort(snapshot_ids(data / name / SNAPSHOT_NAME))
        if not np.array_equal(again, catalog.chunk_ids(catalog.collection_version(name)[0])):
            problems.append(f"{name}: a fresh snapshot does not hold the catalog's ids")
    remaining = list(data.glob(f"*/.{SNAPSHOT_NAME}.*.tmp"))
    if remaining:
        problems.append(f"{len(remaining)} abandoned snapshot temp files were not removed")
    figures = (
        f"{total} chunks = FAISS ids in {len(COLLECTIONS)} collections, snapshots"
        f" {lag} ids behind before catch-up, {len(torn)} torn snapshot temp files ignored"
    )
    return problems, figures


def check_blobs(catalog: Catalog, data: Path, journal: Journal) -> tuple[list[str], str]:
    """Blobs on disk are exactly the referenced ones, bar uploads a kill interrupted."""
    problems = []
    root = data / "blobs"
    on_disk = {p.name for p in root.iterdir() if p.is_file() and SHA.match(p.name)}
    referenced = catalog.referenced_blobs()
    if referenced - on_disk:
        problems.append(f"referenced blobs missing: {sorted(referenced - on_disk)}")
    unreferenced = on_disk - referenced
    acknowledged = {sha for _, sha, _ in journal.added.values()}
    # a churn upload a kill cut short may leave its blob; one deleted later may not
    interrupted = journal.add_started - acknowledged - set(journal.deleted.values())
    unexpected = unreferenced - interrupted
    if unexpected:
        problems.append(f"unreferenced blobs (deleted or replaced documents): {sorted(unexpected)}")
    parts = len(list((root / "tmp").glob("*.part")))
    # what garbage collection will do at a start an hour later
    BlobStore(root).collect_garbage(referenced, min_age_s=0)
    after = {p.name for p in root.iterdir() if p.is_file() and SHA.match(p.name)}
    if after != referenced:
        problems.append("blob garbage collection left unreferenced blobs")
    figures = (
        f"{len(referenced)} blobs referenced and present, {len(unreferenced & interrupted)}"
        f" from interrupted uploads and {parts} partial uploads left for GC"
    )
    return problems, figures
