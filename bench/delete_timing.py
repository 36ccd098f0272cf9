"""How long deleting a large document takes, over HTTP.

    python bench/delete_timing.py [--runs N] [--chunks N] [--other-chunks N]

The real app (``create_app``) on a fresh temporary data directory, driven
in-process through Starlette's TestClient, so the figure is the route, the
service, the SQLite transaction (chunks, FTS5 rows, document row), the FAISS
catch-up (``remove_ids``) and the blob unlink, without network noise.

Each run uploads a synthetic text document of ``--chunks`` paragraphs, each
one chunk (the chunker is set to 16 tokens a chunk, counted as four
characters a token without a tokenizer, and two paragraphs are longer),
waits for it to be indexed, then times
``DELETE /v1/collections/{c}/documents/{id}``.  Another document of
``--other-chunks`` chunks stays in the collection throughout, so the delete
is not simply of the whole index.  Vectors come from a deterministic hash
embedder with 384 dimensions (those of the default all-MiniLM-L6-v2): the
delete never embeds anything, so only the vector size matters to it, and the
ingest before each run takes seconds instead of minutes.

Prints each run and the median.  A measurement, not a test.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastapi.testclient import TestClient  # noqa: E402

from rag_service.api import create_app  # noqa: E402
from rag_service.config import ChunkingSettings, IngestSettings, Settings  # noqa: E402
from rag_service.embedding import Embedder, Vectors  # noqa: E402
from tests.helpers import ScriptedChatModel  # noqa: E402

COLLECTION = "bench"


class HashEmbedder(Embedder):
    """Deterministic unit vectors from text hashes; one word is one token."""

    model_id = "bench-hash-embedder"
    dim = 384
    max_seq_length = 256

    def embed_batch(self, texts: Sequence[str]) -> Vectors:
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            rows.append(v / np.linalg.norm(v))
        return np.vstack(rows)

    def count_tokens(self, text: str) -> int:
        return len(text.split())


def document(marker: str, paragraphs: int) -> bytes:
    return "\n\n".join(
        f"Entry {i} of the {marker} ledger: crates on pier {i % 7}." for i in range(paragraphs)
    ).encode()


def ingest(client: TestClient, name: str, data: bytes) -> dict[str, object]:
    response = client.put(f"/v1/collections/{COLLECTION}/documents/{name}", content=data)
    response.raise_for_status()
    body = response.json()
    deadline = time.monotonic() + 600
    while True:
        job = client.get(f"/v1/jobs/{body['job_id']}").json()
        if job["status"] == "succeeded":
            break
        if job["status"] == "failed" or time.monotonic() > deadline:
            raise SystemExit(f"ingest did not succeed: {job}")
        time.sleep(0.05)
    doc_id = body["documents"][0]["id"]
    doc: dict[str, object] = client.get(f"/v1/collections/{COLLECTION}/documents/{doc_id}").json()
    return doc


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7, help="deletes to time (default 7)")
    parser.add_argument("--chunks", type=int, default=1000, help="chunks of the deleted document")
    parser.add_argument(
        "--other-chunks", type=int, default=1000, help="chunks of the document that stays"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    with tempfile.TemporaryDirectory(prefix="rag-delete-bench-") as tmp:
        settings = Settings(
            data_dir=Path(tmp) / "data",
            ingest=IngestSettings(worker_threads=1, poll_interval_s=0.02),
            chunking=ChunkingSettings(max_tokens=16, overlap_tokens=0),
        )
        app = create_app(settings, embedder=HashEmbedder(), chat_model=ScriptedChatModel())
        with TestClient(app) as client:
            if args.other_chunks:
                ingest(client, "stays.txt", document("steady", args.other_chunks))
            timings: list[float] = []
            for run in range(args.runs):
                doc = ingest(client, f"big-{run}.txt", document(f"run{run}", args.chunks))
                start = time.perf_counter()
                response = client.delete(f"/v1/collections/{COLLECTION}/documents/{doc['id']}")
                elapsed = (time.perf_counter() - start) * 1000.0
                if response.status_code != 204:
                    raise SystemExit(f"delete answered {response.status_code}: {response.text}")
                timings.append(elapsed)
                left = client.get(f"/v1/collections/{COLLECTION}").json()["chunk_count"]
                print(
                    f"run {run + 1}: deleted {doc['chunk_count']} chunks in {elapsed:.1f} ms "
                    f"({left} chunks left)"
                )
            print(
                f"median DELETE of a {args.chunks}-chunk document: "
                f"{statistics.median(timings):.1f} ms over {len(timings)} runs "
                f"(min {min(timings):.1f}, max {max(timings):.1f}; hash embedder, 384 dims)"
            )


if __name__ == "__main__":
    main()
