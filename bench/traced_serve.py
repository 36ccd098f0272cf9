"""`rag serve` with tracemalloc on: SIGUSR1 writes a snapshot of the Python heap.

    python -X tracemalloc=25 bench/traced_serve.py      # RAG_TRACE_DIR=/some/dir

Used by ``bench/load.py --tracemalloc N`` to see which Python allocations, if
any, are still growing after warm-up.  Each signal writes
``$RAG_TRACE_DIR/snapshot-<n>.pickle`` (``tracemalloc.Snapshot.dump``); the
file appears under its final name only once complete.  A diagnostic for a
benchmark, not part of the service.
"""

from __future__ import annotations

import itertools
import os
import signal
import tracemalloc
from pathlib import Path
from types import FrameType

from rag_service.cli import main

_numbers = itertools.count()


def _dump(signum: int, frame: FrameType | None) -> None:
    folder = Path(os.environ["RAG_TRACE_DIR"])
    target = folder / f"snapshot-{next(_numbers)}.pickle"
    partial = target.with_suffix(".partial")
    tracemalloc.take_snapshot().dump(str(partial))
    partial.rename(target)


if __name__ == "__main__":
    if not tracemalloc.is_tracing():
        raise SystemExit("run with python -X tracemalloc=N")
    signal.signal(signal.SIGUSR1, _dump)
    main()
