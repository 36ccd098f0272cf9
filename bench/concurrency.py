"""Retrieval throughput at 1, 4, 16 and 64 concurrent clients, thread settings side by side.

    python bench/concurrency.py                          # the whole PDF, 15 s per level
    python bench/concurrency.py --max-pages 60 --seconds 10 --levels 1,4,16,64

One data directory is filled once (`rag ingest` of the Debian Reference PDF,
or its first ``--max-pages`` pages).  Then `rag serve` starts on it once per
configuration (environment variables only, so the runs differ in nothing
else) and, for each level, that many asyncio clients post /v1/retrieve
questions from eval/debian-reference.jsonl back to back for ``--seconds``:

    before     RAG_COMPUTE__TORCH_THREADS=0, __FAISS_THREADS=0, __QUERY_BATCH=1:
               the libraries' defaults, as the service ran before ComputeSettings
    torch1     one torch thread per request, no batching
    torch1-batched  one torch thread per question batch (session 4's defaults)
    batched    two torch threads, questions batched (the defaults on 2 cores)
    default    the shipped defaults (one torch thread per core for a question batch)

Printed per configuration and level: requests/s, p50/p95 latency, CPU of the
server process (200% = both cores of this machine busy) and its OS thread
count.  Then, per configuration, whether the event loop stays free: while 64
retrieve clients run and one /v1/query is being answered by the local
model, /healthz (answered on the event loop) and an unrouted path are
probed every 100 ms.  Writes bench/results/concurrency-<UTC time>.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.load import (  # noqa: E402 - after the path is set
    COLLECTION,
    PDF,
    RESULTS,
    ServeProcess,
    cpu_seconds,
    load_average,
    pdf_subset,
    percentile,
    questions,
)

CONFIGS: dict[str, dict[str, str]] = {
    "before": {
        "RAG_COMPUTE__TORCH_THREADS": "0",
        "RAG_COMPUTE__FAISS_THREADS": "0",
        "RAG_COMPUTE__QUERY_BATCH": "1",
    },
    "torch1": {"RAG_COMPUTE__TORCH_THREADS": "1", "RAG_COMPUTE__QUERY_BATCH": "1"},
    "torch1-batched": {"RAG_COMPUTE__TORCH_THREADS": "1", "RAG_COMPUTE__QUERY_BATCH": "32"},
    "batched": {"RAG_COMPUTE__TORCH_THREADS": "2", "RAG_COMPUTE__QUERY_BATCH": "32"},
    "default": {},
}


def os_threads(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return -1


async def retrieve_clients(
    url: str, clients: int, seconds: float, texts: list[str]
) -> tuple[list[float], int]:
    """``clients`` clients posting /v1/retrieve back to back; latencies, errors."""
    latencies: list[float] = []
    errors = 0
    limits = httpx.Limits(
        max_connections=clients + 8, max_keepalive_connections=clients + 8, keepalive_expiry=2.0
    )

    async def one(number: int, http: httpx.AsyncClient, until: float) -> None:
        nonlocal errors
        i = number * 7
        while time.monotonic() < until:
            body = {"collection": COLLECTION, "query": texts[i % len(texts)]}
            i += 1
            started = time.perf_counter()
            try:
                response = await http.post("/v1/retrieve", json=body)
            except httpx.HTTPError:
                errors += 1
                continue
            if response.status_code == 200:
                latencies.append(time.perf_counter() - started)
            else:
                errors += 1

    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=120) as http:
        until = time.monotonic() + seconds
        await asyncio.gather(*(one(n, http, until) for n in range(clients)))
    return latencies, errors


def level(server: ServeProcess, clients: int, seconds: float, texts: list[str]) -> dict[str, Any]:
    cpu_before, wall_before = cpu_seconds(server.pid), time.monotonic()
    latencies, errors = asyncio.run(retrieve_clients(server.url, clients, seconds, texts))
    wall = time.monotonic() - wall_before
    ms = [v * 1000 for v in latencies]
    return {
        "clients": clients,
        "requests": len(ms),
        "errors": errors,
        "req_per_s": round(len(ms) / wall, 1),
        "p50_ms": round(percentile(ms, 50), 1),
        "p95_ms": round(percentile(ms, 95), 1),
        "cpu_pct": round(100 * (cpu_seconds(server.pid) - cpu_before) / wall),
        "os_threads": os_threads(server.pid),
        "load_average": load_average(),
    }


async def event_loop_probe(url: str, seconds: float, texts: list[str]) -> dict[str, Any]:
    """Probe latencies while 64 retrieve clients and one model answer keep the server busy."""
    probes: dict[str, list[float]] = {"healthz": [], "unrouted": []}
    answered: dict[str, Any] = {}

    async def ask(http: httpx.AsyncClient) -> None:
        started = time.perf_counter()
        body = {"collection": COLLECTION, "question": texts[0], "mode": "dense"}
        response = await http.post("/v1/query", json=body)
        answered.update(status=response.status_code, seconds=time.perf_counter() - started)

    async def probe(http: httpx.AsyncClient, until: float) -> None:
        while time.monotonic() < until:
            for name, path in (("healthz", "/healthz"), ("unrouted", "/no-such-route")):
                started = time.perf_counter()
                await http.get(path)
                probes[name].append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.1)

    async with httpx.AsyncClient(base_url=url, timeout=300) as http:
        until = time.monotonic() + seconds
        load = asyncio.create_task(retrieve_clients(url, 64, seconds, texts))
        query = asyncio.create_task(ask(http))
        await asyncio.sleep(1.0)  # the pool fills and the model starts
        await probe(http, until)
        await load
        await query
    return {
        name: {
            "probes": len(ms),
            "p50_ms": round(percentile(ms, 50), 1),
            "max_ms": round(max(ms), 1),
        }
        for name, ms in probes.items()
    } | {"query": answered, "load_average": load_average()}


def ingest(data_dir: Path, pdf: Path) -> float:
    started = time.perf_counter()
    env = os.environ | {
        "HF_HUB_OFFLINE": "1",
        "RAG_DATA_DIR": str(data_dir),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
    }
    subprocess.run(
        [sys.executable, "-m", "rag_service.cli", "ingest", str(pdf), "-c", COLLECTION],
        env=env,
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pdf", type=Path, default=PDF)
    parser.add_argument("--max-pages", type=int, default=0, help="first N pages only (0: all)")
    parser.add_argument("--seconds", type=float, default=15.0, help="per level")
    parser.add_argument("--levels", default="1,4,16,64")
    parser.add_argument("--configs", default=",".join(CONFIGS), help="names from CONFIGS")
    parser.add_argument("--probe-seconds", type=float, default=15.0)
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="reuse this data directory (filled if empty)"
    )
    parser.add_argument("--out", type=Path, default=None)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    levels = [int(n) for n in args.levels.split(",")]
    texts = questions()
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="rag-concurrency-") as tmp:
        data = args.data_dir or Path(tmp) / "data"
        if not (data / "catalog.sqlite3").exists():
            pdf = pdf_subset(args.pdf, args.max_pages, Path(tmp))
            results["ingest_s"] = round(ingest(data, pdf), 1)
            print(f"ingested {pdf.name} in {results['ingest_s']} s; load average {load_average()}")
        for name in args.configs.split(","):
            with ServeProcess(data, CONFIGS[name]) as server:
                # Warm-up: the index, the embedder's first calls, the pool's threads.
                asyncio.run(retrieve_clients(server.url, 4, 3.0, texts))
                rows = [level(server, n, args.seconds, texts) for n in levels]
                probe = asyncio.run(event_loop_probe(server.url, args.probe_seconds, texts))
            results["runs"][name] = {"env": CONFIGS[name], "levels": rows, "event_loop": probe}
            print(f"\n{name} {CONFIGS[name] or '(defaults)'}")
            print(
                f"{'clients':>8}{'req/s':>8}{'p50 ms':>9}{'p95 ms':>9}{'cpu %':>7}"
                f"{'threads':>8}{'errors':>7}  load average"
            )
            for row in rows:
                print(
                    f"{row['clients']:>8}{row['req_per_s']:>8.1f}{row['p50_ms']:>9.1f}"
                    f"{row['p95_ms']:>9.1f}{row['cpu_pct']:>7}{row['os_threads']:>8}"
                    f"{row['errors']:>7}  {row['load_average']}"
                )
            print(
                f"  64 retrieve clients + a query ({probe['query']}): "
                f"/healthz p50 {probe['healthz']['p50_ms']} ms max {probe['healthz']['max_ms']} "
                f"ms; unrouted p50 {probe['unrouted']['p50_ms']} ms max "
                f"{probe['unrouted']['max_ms']} ms"
            )
    names = list(results["runs"])
    if len(names) > 1:
        print("\nreq/s relative to", names[0])
        base = {r["clients"]: r["req_per_s"] for r in results["runs"][names[0]]["levels"]}
        for name in names[1:]:
            ratios = [
                f"{r['clients']}: {r['req_per_s'] / base[r['clients']]:.2f}x"
                for r in results["runs"][name]["levels"]
                if base.get(r["clients"])
            ]
            print(f"  {name}: {', '.join(ratios)}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = args.out or RESULTS / f"concurrency-{stamp}.json"
    out.write_text(json.dumps(results, indent=2))
    print(f"wrote {out}")
    errors = sum(r["errors"] for run in results["runs"].values() for r in run["levels"])
    return 1 if errors else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
