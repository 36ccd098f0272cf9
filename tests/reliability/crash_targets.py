"""Processes the crash test kills at random: a FAISS snapshot writer and a deleter.

Run as ``python -m tests.reliability.crash_targets {snapshot,delete} ...`` from
the repository root.  Each loops until it is killed and keeps a journal (one
line per event, written before and after the step it describes) so the test
can tell afterwards what was acknowledged and what was cut short.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import random
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from rag_service.config import IngestSettings
from rag_service.errors import DocumentNotFound
from rag_service.services.documents import DocumentService
from rag_service.storage.blobs import BlobStore
from rag_service.storage.catalog import Catalog
from rag_service.storage.jobs import JobQueue
from rag_service.storage.vectors import SNAPSHOT_NAME, VectorStore

#: Source names of the documents the deleter adds and removes on its own.
CHURN_PREFIX = "churn-"
#: Churn documents kept per collection, at most.
CHURN_MAX = 5


#: Words per journal line, by its first word.
_ARITY = {
    "start": 3,
    "load-ok": 3,
    "load-failed": 2,
    "duplicate-ids": 3,
    "add-begin": 4,
    "add": 5,
    "del-begin": 4,
    "del-done": 3,
}


def read_journal(path: Path) -> list[list[str]]:
    """The whole lines of a journal, split into words.

    Every process starts its part with a newline, so a line a kill cut short
    ends up alone on its line, where its word count gives it away.
    """
    if not path.exists():
        return []
    *complete, _torn = path.read_text(encoding="utf-8").split("\n")
    return [
        words
        for words in (line.split() for line in complete)
        if words and _ARITY.get(words[0]) == len(words)
    ]


def churn_marker(rng: random.Random) -> str:
    """A token no generated batch document contains (those use ``mk``)."""
    return f"ck{rng.getrandbits(48):012x}"


def _note(journal: TextIO, *words: object) -> None:
    # The OS has the line once write() returns: a SIGKILL cannot lose it.
    journal.write(" ".join(str(w) for w in words) + "\n")
    journal.flush()


def snapshot_loop(data: Path, collections: Sequence[str], journal_path: Path) -> None:
    """Load every snapshot, then catch up and rewrite the snapshots until killed.

    Each start first reads the snapshot files as they are on disk (a kill
    during the previous write must not have left a torn file under the real
    name), then loops: catch up with the catalog, check the ids are unique,
    force a snapshot write.  The write is nearly all the loop does, so a
    random kill usually lands inside it.
    """
    import faiss

    catalog = Catalog(data / "catalog.sqlite3")
    with open(journal_path, "a", encoding="utf-8") as journal:
        journal.write("\n")
        _note(journal, "start", os.getpid(), "snapshot")
        for name in collections:
            path = data / name / SNAPSHOT_NAME
            if path.exists():
                try:
                    index = faiss.read_index(str(path))
                except RuntimeError:
                    _note(journal, "load-failed", name)
                else:
                    _note(journal, "load-ok", name, index.ntotal)
        store = VectorStore(catalog, data, snapshot_every_s=float("inf"))
        rounds = 0
        while True:
            rounds += 1
            if rounds % 10 == 0:  # a fresh store reads back what was just written
                store = VectorStore(catalog, data, snapshot_every_s=float("inf"))
            for name in collections:
                ids = store.ids(name)  # caught up with the catalog
                if len(np.unique(ids)) != len(ids):
                    _note(journal, "duplicate-ids", name, len(ids) - len(np.unique(ids)))
                # a snapshot is only written when something changed; force one
                store.sync(name).dirty = True
            store.snapshot_all()
            time.sleep(0.005)  # a breath for the other processes; writes stay most of the time


def delete_loop(
    data: Path,
    collections: Sequence[str],
    journal_path: Path,
    *,
    doomed: Sequence[tuple[str, str]],
    embed_model: str,
    embed_dim: int,
    seed: str,
    finish: bool,
) -> None:
    """Delete the doomed documents, then add and delete small documents until killed.

    With ``finish`` it only completes the deletes a kill cut short and exits.
    """
    catalog = Catalog(data / "catalog.sqlite3")
    service = DocumentService(
        catalog=catalog,
        blobs=BlobStore(data / "blobs"),
        vectors=VectorStore(catalog, data),
        jobs=JobQueue(catalog, lease_s=2.0, max_attempts=1000),
        settings=IngestSettings(),
        embed_model=embed_model,
        embed_dim=embed_dim,
    )
    lines = read_journal(journal_path)
    incarnation = sum(line[0] == "start" for line in lines)
    done = {line[2] for line in lines if line[0] == "del-done"}
    begun = [
        (line[1], line[2], line[3])
        for line in lines
        if line[0] == "del-begin" and line[2] not in done
    ]
    with open(journal_path, "a", encoding="utf-8") as journal:
        journal.write("\n")
        _note(journal, "start", os.getpid(), "finish" if finish else "loop")

        def delete(collection: str, doc_id: str, sha: str) -> None:
            _note(journal, "del-begin", collection, doc_id, sha)
            # not found: the catalog part was done by the incarnation this one replaces
            with contextlib.suppress(DocumentNotFound):
                service.delete_document(collection, doc_id)
            _note(journal, "del-done", collection, doc_id)

        if finish:
            for collection, doc_id, sha in begun:
                delete(collection, doc_id, sha)
            return
        for collection, doc_id in doomed:
            if doc_id not in done:
                document = catalog.document_by_id(doc_id)
                delete(collection, doc_id, document.sha256 if document else "-")
        rng = random.Random(f"{seed}:{incarnation}")
        added = 0
        while True:
            collection = rng.choice(list(collections))
            docs, _ = service.list_documents(collection, limit=1000)
            churn = [d for d in docs if d.source.startswith(CHURN_PREFIX)]
            if len(churn) < 2 or (len(churn) < CHURN_MAX and rng.random() < 0.5):
                added += 1
                marker = churn_marker(rng)
                source = f"{CHURN_PREFIX}{incarnation}-{added}.txt"
                text = f"Churn note {added} of run {incarnation} carries {marker}.\n"
                data_ = text.encode()
                _note(journal, "add-begin", collection, hashlib.sha256(data_).hexdigest(), source)
                receipt = service.add_bytes(collection, [(source, data_)])
                doc = receipt.documents[0]
                _note(journal, "add", collection, doc.id, doc.sha256, marker)
            else:
                victim = rng.choice(churn)
                delete(collection, victim.id, victim.sha256)
            time.sleep(rng.uniform(0.1, 0.5))


def main(argv: Sequence[str] | None = None) -> None:
    """Command line of the two loops."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("mode", choices=["snapshot", "delete", "finish-deletes"])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--journal", type=Path, required=True)
    parser.add_argument("--collection", action="append", required=True)
    parser.add_argument("--doomed", action="append", default=[], help="COLLECTION:DOC_ID")
    parser.add_argument("--embed-model", default="")
    parser.add_argument("--embed-dim", type=int, default=0)
    parser.add_argument("--seed", default="0")
    args = parser.parse_args(argv)
    if args.mode == "snapshot":
        snapshot_loop(args.data, args.collection, args.journal)
        return
    delete_loop(
        args.data,
        args.collection,
        args.journal,
        doomed=[(c, d) for c, d in (item.split(":", 1) for item in args.doomed)],
        embed_model=args.embed_model,
        embed_dim=args.embed_dim,
        seed=args.seed,
        finish=args.mode == "finish-deletes",
    )


if __name__ == "__main__":
    main()
