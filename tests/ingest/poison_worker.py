"""A worker process whose embedder kills it on a poisonous text.

Run as ``python -m tests.ingest.poison_worker DATA_DIR`` from the repository
root: it claims one job, ingests it, and exits 0; on a chunk containing
``POISON`` the whole process dies by SIGKILL, as a native crash or the
out-of-memory killer would take it.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from rag_service.config import IngestSettings, Settings
from rag_service.embedding import Vectors
from rag_service.runtime import Runtime
from tests.helpers import HashEmbedder

#: Lease of the jobs, short so the next run can take over a dead run's job.
LEASE_S = 0.5
MAX_ATTEMPTS = 2


class KillingEmbedder(HashEmbedder):
    def embed_batch(self, texts: Sequence[str]) -> Vectors:
        if any("POISON" in t for t in texts):
            os.kill(os.getpid(), signal.SIGKILL)
        return super().embed_batch(texts)


def settings(data: Path) -> Settings:
    return Settings(
        data_dir=data, ingest=IngestSettings(lease_s=LEASE_S, max_attempts=MAX_ATTEMPTS)
    )


def main() -> None:
    with Runtime.open(settings(Path(sys.argv[1])), embedder=KillingEmbedder()) as runtime:
        print("claimed" if runtime.make_worker().run_once() else "idle", flush=True)


if __name__ == "__main__":
    main()
