"""Resident memory of the service under repeated retrieval, allocator settings side by side.

    python bench/memory.py                                  # 3 rounds of 3,200 retrievals
    python bench/memory.py --rounds 4 --requests 2000 --threads 16 --variants 0,2

Fills a data directory once (the first ``--max-pages`` pages of the Debian
Reference PDF, ingested in process), then for each variant starts a fresh
Python process that opens a ``Runtime`` on it with
``RAG_COMPUTE__MALLOC_ARENAS`` set to the variant (0: glibc's default; a
variant ``2:1`` also sets ``RAG_COMPUTE__TORCH_THREADS`` to 1) and
runs rounds of retrievals from a new pool of ``--threads`` threads each round
(a server's thread pool also stops idle threads and starts new ones).
Questions come from eval/debian-reference.jsonl with a varying tail, so the
encoder sees batches of many shapes.  RSS (/proc) is printed after opening,
after each round, and the growth per round; the last rounds' growth is what
a long-running server sees.  Writes bench/results/memory-<UTC time>.json.
This measures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PDF = Path("/usr/share/debian-reference/debian-reference.en.pdf")
QUESTIONS = ROOT / "eval" / "debian-reference.jsonl"
RESULTS = ROOT / "bench" / "results"
COLLECTION = "debref"


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
    return 0.0


def fill(data: Path, pdf: Path, max_pages: int) -> None:
    from pypdf import PdfReader, PdfWriter

    from rag_service import Runtime, Settings

    part = data.parent / "part.pdf"
    writer = PdfWriter()
    for page in PdfReader(pdf).pages[:max_pages]:
        writer.add_page(page)
    writer.write(part)
    with Runtime.open(Settings(data_dir=data), workers=1) as rag:
        receipt = rag.documents.add_paths(COLLECTION, [part])
        status = rag.wait_for_job(receipt.job_id).status
        if status != "succeeded":
            raise SystemExit(f"ingest of {part} {status}")


def measure(data: Path, rounds: int, requests: int, threads: int) -> dict[str, Any]:
    """One variant, in this process (its allocator settings came with the environment)."""
    from rag_service import Runtime, Settings

    questions = [json.loads(line)["question"] for line in QUESTIONS.open()]
    pick = random.Random(7)
    with Runtime.open(Settings(data_dir=data), workers=0) as rag:
        rag.query.retrieve(COLLECTION, questions[0], top_k=5)
        after: list[float] = [rss_mib()]
        seconds: list[float] = []

        def one(i: int) -> None:
            rag.query.retrieve(COLLECTION, pick.choice(questions) + " x" * (i % 7), top_k=5)

        for _ in range(rounds):
            began = time.perf_counter()
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(one, range(requests)))
            seconds.append(round(time.perf_counter() - began, 2))
            after.append(round(rss_mib(), 1))
        arenas = malloc_arenas(data.parent / "malloc_info.xml")
    return {"rss_mib": after, "round_s": seconds, "arenas": arenas}


def malloc_arenas(scratch: Path) -> int | None:
    """How many arenas glibc's malloc has now (``malloc_info``), None off glibc."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return None
    libc.fopen.restype = ctypes.c_void_p
    libc.fopen.argtypes = [ctypes.c_char_p, ctypes.c_char_p]
    libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
    libc.fclose.argtypes = [ctypes.c_void_p]
    stream = libc.fopen(str(scratch).encode(), b"w")
    libc.malloc_info(0, stream)
    libc.fclose(stream)
    return scratch.read_text().count("<heap nr=")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=3200, help="retrievals per round")
    parser.add_argument("--threads", type=int, default=16)
    parser.add_argument("--max-pages", type=int, default=60)
    parser.add_argument("--pdf", type=Path, default=PDF)
    parser.add_argument(
        "--variants",
        default="0,2",
        help="RAG_COMPUTE__MALLOC_ARENAS values, each optionally :RAG_COMPUTE__TORCH_THREADS",
    )
    parser.add_argument("--child", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.child is not None:
        print(json.dumps(measure(args.child, args.rounds, args.requests, args.threads)))
        return

    results: dict[str, Any] = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "load_avg_at_start": os.getloadavg()[0],
        "args": {k: str(v) for k, v in vars(args).items()},
        "variants": {},
    }
    with tempfile.TemporaryDirectory(prefix="rag-memory-") as tmp:
        data = Path(tmp) / "data"
        fill(data, args.pdf, args.max_pages)
        for variant in args.variants.split(","):
            arenas, _, torch_threads = variant.partition(":")
            env = dict(os.environ, RAG_COMPUTE__MALLOC_ARENAS=arenas)
            if torch_threads:
                env["RAG_COMPUTE__TORCH_THREADS"] = torch_threads
            env.pop("MALLOC_ARENA_MAX", None)
            sizes = ["--rounds", str(args.rounds), "--requests", str(args.requests)]
            sizes += ["--threads", str(args.threads)]
            child = subprocess.run(
                [sys.executable, __file__, "--child", str(data), *sizes],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            figures = json.loads(child.stdout.strip().splitlines()[-1])
            results["variants"][variant] = figures
            rss = figures["rss_mib"]
            growth = [round(b - a, 1) for a, b in itertools.pairwise(rss)]
            print(
                f"malloc_arenas={arenas} torch_threads={torch_threads or 'default'}: "
                f"RSS {rss[0]:.0f} MiB after opening, "
                f"{rss[-1]:.0f} after {args.rounds} x {args.requests} retrievals; "
                f"growth per round {growth} MiB; round seconds {figures['round_s']}; "
                f"{figures['arenas']} malloc arenas",
                flush=True,
            )
    results["load_avg_at_end"] = os.getloadavg()[0]
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"memory-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
