"""Requests right after start, and the cost of a full garbage collection, heap frozen or not.

    python bench/first_request.py [--rounds 3] [--requests 30]

The server freezes its startup heap (``gc.freeze``, see
``freeze_startup_heap`` in ``rag_service/compute.py``) before ``/readyz``
says ready.  One data directory is filled once (``rag ingest`` of
``tests/data``); then each variant starts the real app under uvicorn on
127.0.0.1 in a fresh process, as a restart of ``rag serve`` would, the
variants taking turns round after round:

    frozen     the shipped behaviour
    unfrozen   ``freeze_startup_heap`` replaced by a no-op

Figures per variant (medians over rounds): the first ``/v1/retrieve``
after ready, the median of the next ``--requests`` and the slowest, the garbage
collections of the oldest generation that ran meanwhile (count and
longest), and the time of one ``gc.collect()`` at the end: what a request
stalls for whenever a full collection comes round.  Writes
``bench/results/first_request-<UTC time>.json``.  A measurement, not a test.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
VARIANTS = ("frozen", "unfrozen")
QUESTION = "Where are the MIME type definitions stored?"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per variant")
    parser.add_argument("--requests", type=int, default=30, help="retrievals after the first")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1 or args.requests < 1:
        parser.error("--rounds and --requests must be at least 1")
    return args


def child(args: argparse.Namespace) -> dict[str, Any]:
    sys.path.insert(0, str(BENCH))
    import httpx
    from suite_serve import Server

    from rag_service.api import app as app_module
    from rag_service.config import Settings

    if args.child == "unfrozen":
        app_module.freeze_startup_heap = lambda: None
    full: list[float] = []
    started: list[float] = []

    def timed(phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            started.append(time.perf_counter())
        else:
            full.append((time.perf_counter() - started.pop()) * 1000)

    server = Server(app_module.create_app(Settings(data_dir=args.data_dir)))
    server.start()
    gc.callbacks.append(timed)
    latencies = []
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            for _ in range(args.requests + 1):
                begun = time.perf_counter()
                client.post(
                    "/v1/retrieve", json={"collection": "bench", "query": QUESTION}
                ).raise_for_status()
                latencies.append((time.perf_counter() - begun) * 1000)
        during = list(full)
        begun = time.perf_counter()
        gc.collect()
        collect_ms = (time.perf_counter() - begun) * 1000
        frozen = gc.get_freeze_count()
    finally:
        gc.callbacks.remove(timed)
        server.stop()
    return {
        "variant": args.child,
        "first_ms": latencies[0],
        "next_p50_ms": statistics.median(latencies[1:]),
        "slowest_ms": max(latencies),
        "full_collections_during": len(during),
        "longest_full_collection_ms": max(during, default=0.0),
        "gc_collect_ms": collect_ms,
        "frozen_objects": frozen,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return 0
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="rag-bench-") as tmp:
        data_dir = Path(tmp) / "data"
        env = {**os.environ, "RAG_DATA_DIR": str(data_dir)}
        subprocess.run(
            [sys.executable, "-m", "rag_service.cli", "ingest", "-c", "bench", "tests/data"],
            cwd=ROOT,
            env=env,
            check=True,
            capture_output=True,
        )
        for round_no in range(args.rounds):
            for variant in VARIANTS if round_no % 2 == 0 else VARIANTS[::-1]:
                command = [sys.executable, __file__, "--child", variant]
                command += ["--data-dir", str(data_dir), "--requests", str(args.requests)]
                done = subprocess.run(command, capture_output=True, text=True)
                lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
                if done.returncode != 0 or not lines:
                    print(done.stderr[-3000:], file=sys.stderr)
                    return 1
                result = json.loads(lines[-1].removeprefix("RESULT "))
                runs[variant].append(result)
                print(f"round {round_no + 1} {variant}: {result}", file=sys.stderr)
    keys = [k for k in runs["frozen"][0] if k != "variant"]
    table = {v: {k: statistics.median(r[k] for r in rs) for k in keys} for v, rs in runs.items()}
    print(f"\n| figure (median of {args.rounds} starts) | frozen | unfrozen |")
    print("|---|---|---|")
    for key in keys:
        print(f"| {key} | {table['frozen'][key]:,.1f} | {table['unfrozen'][key]:,.1f} |")
    out = BENCH / "results" / f"first_request-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "medians": table, "runs": runs}, indent=1))
    print(f"\nwrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
