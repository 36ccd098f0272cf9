"""How OpenMP threads wait, set before torch, FAISS or llama.cpp loads it.

torch, llama.cpp and FAISS all run their thread teams on GNU OpenMP, and
torch and llama.cpp share one copy of it (llama.cpp's ``libgomp.so.1`` is
the one torch loaded).  libgomp lets a thread that waits at a barrier spin a
while before it sleeps (``GOMP_SPINCOUNT``, 300,000 turns, about 3 ms), but
once the process holds more OpenMP threads than there are cores it spins
only 100 turns (under a microsecond), so nearly every barrier ends in a
futex sleep and wake-up.  The service always holds more: the question
batch thread's torch team, each ingestion worker's, llama.cpp's.  A
generated token runs hundreds of small steps with a barrier each: after an
ingest the local model generated 41.7 tokens/s instead of 66.8.
``OMP_WAIT_POLICY=ACTIVE`` raises that short spin to 1,000 turns (libgomp's
most) and generation stays at 63.0 tokens/s (``python bench/thread_wait.py
--rounds 3``); ``GOMP_SPINCOUNT`` is set with it so the ordinary spin keeps
its default length instead of ACTIVE's five minutes, and an idle thread
still sleeps after about 3 ms.  The longer spins cost about 9% of retrieval
and upload throughput when 50 clients saturate both cores (README, "Threads
and concurrency"); answers per second were the same.

libgomp reads these once, when it loads, so they must be in the environment
before the first of those libraries is imported: ``rag_service/__init__``
calls ``set_openmp_wait_defaults`` first thing.  A process that imported
torch before ``rag_service`` keeps libgomp's defaults.  Either variable
already in the environment leaves both as they are.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

#: What ``set_openmp_wait_defaults`` puts in the environment.
WAIT_DEFAULTS = {"OMP_WAIT_POLICY": "ACTIVE", "GOMP_SPINCOUNT": "300000"}


def set_openmp_wait_defaults(environ: MutableMapping[str, str] | None = None) -> bool:
    """Put ``WAIT_DEFAULTS`` in ``environ`` (the process's) unless either is set; True if set."""
    env = os.environ if environ is None else environ
    if any(name in env for name in WAIT_DEFAULTS):
        return False
    env.update(WAIT_DEFAULTS)
    return True
