"""Load test: many asyncio clients against `rag serve` on 127.0.0.1, a mix of every user path.

    python bench/load.py                               # 50 clients, 120 s, the whole PDF
    python bench/load.py --clients 20 --duration 30 --max-pages 40

Starts `rag serve` (local SmolLM2, a temporary data directory, a free port on
127.0.0.1), uploads the Debian Reference PDF (or its first ``--max-pages``
pages) through the API and waits until it is indexed.  Then each client picks
its next request from a weighted mix: retrieve (POST /v1/retrieve), query
(POST /v1/query: 429 and 503 model_busy are deliberate, counted apart, and the
client sleeps for their Retry-After), upload (a small unique text, then its
job polled until it succeeded), reupload (the same bytes: must map to the same
document) and list (the collection and its documents).

The server's RSS is sampled every second (/proc): after warm-up, at the end,
and the slope.  At the end every unique upload must be indexed exactly once
(document and chunk counts through the API).  Prints per-route count, errors,
429/503, p50/p95/p99 and req/s; writes bench/results/load-<UTC time>.json;
exits 1 on any unexpected error or failed check (a check, not a test).

Memory is judged on the per-minute medians after warm-up as well as the slope:
the service trims freed heap every minute, so the samples are a saw tooth.
``--tracemalloc N`` runs the server under tracemalloc (N frames; slower, and
RSS then includes the tracer's own tables; a snapshot stops the server for
seconds, so that run's latencies and errors are not figures) and prints which
Python allocation sites grew between the end of warm-up and the end of the run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PDF = Path("/usr/share/debian-reference/debian-reference.en.pdf")
QUESTIONS = ROOT / "eval" / "debian-reference.jsonl"
RESULTS = ROOT / "bench" / "results"
COLLECTION = "debref"
MIX = "retrieve=55,query=10,upload=10,reupload=5,list=20"
DELIBERATE = (429, 503)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def rss_mb(pid: int) -> float:
    """Resident memory of a process, from /proc (psutil is not a dependency)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its threads so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServeProcess:
    """`rag serve` in a subprocess on a free port of 127.0.0.1, with extra environment."""

    def __init__(
        self, data_dir: Path, env: dict[str, str] | None = None, command: list[str] | None = None
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = data_dir.parent / f"serve-{self.port}.log"
        self.env = os.environ | {
            "HF_HUB_OFFLINE": "1",
            "RAG_DATA_DIR": str(data_dir),
            "RAG_SERVER__HOST": "127.0.0.1",
            "RAG_SERVER__PORT": str(self.port),
            "RAG_LOG_LEVEL": "WARNING",
            "RAG_INGEST__POLL_INTERVAL_S": "0.2",
            # This checkout, whatever the installed package points at.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        }
        self.env |= env or {}
        self.command = command or [sys.executable, "-m", "rag_service.cli", "serve"]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def __enter__(self) -> ServeProcess:
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(self.command, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"rag serve exited: see {self.log_path}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return self
            time.sleep(0.2)
        raise SystemExit(f"{self.url} never became ready; see {self.log_path}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def pdf_subset(pdf: Path, pages: int, folder: Path) -> Path:
    """The first ``pages`` pages of ``pdf`` as a new file (the whole file for 0)."""
    if pages <= 0:
        return pdf
    from pypdf import PdfReader, PdfWriter

    reader, writer = PdfReader(pdf), PdfWriter()
    for page in reader.pages[:pages]:
        writer.add_page(page)
    writer.write(out := folder / f"{pdf.stem}-{pages}p.pdf")
    return out


def wait_job(http: httpx.Client, job_id: str, timeout_s: float = 1800) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job: dict[str, Any] = http.get(f"/v1/jobs/{job_id}").raise_for_status().json()
        if job["status"] in ("succeeded", "failed"):
            return job
        time.sleep(0.5)
    raise SystemExit(f"job {job_id} did not finish in {timeout_s} s")


def ingest_corpus(url: str, pdf: Path) -> dict[str, Any]:
    """Upload the corpus through the API and wait until it is indexed."""
    started = time.perf_counter()
    with httpx.Client(base_url=url, timeout=600) as http, pdf.open("rb") as f:
        upload = http.post(
            f"/v1/collections/{COLLECTION}/documents",
            files=[("files", (pdf.name, f, "application/pdf"))],
        ).raise_for_status()
        job = wait_job(http, upload.json()["job_id"])
        if job["status"] != "succeeded":
            raise SystemExit(f"corpus ingest failed: {job['error']}")
        collection = http.get(f"/v1/collections/{COLLECTION}").raise_for_status().json()
    seconds = round(time.perf_counter() - started, 1)
    counts = {"documents": collection["document_count"], "chunks": collection["chunk_count"]}
    return {"file": pdf.name, "seconds": seconds} | counts


def questions() -> list[str]:
    with QUESTIONS.open() as f:
        return [json.loads(line)["question"] for line in f if line.strip()]


@dataclass
class Route:
    """What one route saw: latencies of answered requests, and the others by kind."""

    latencies: list[float] = field(default_factory=list)
    #: Answers that came before the deadline (the throughput counts those).
    in_time: int = 0
    deliberate: dict[int, int] = field(default_factory=lambda: defaultdict(int))
    errors: list[str] = field(default_factory=list)


@dataclass
class Upload:
    source: str
    text: str
    document_id: str
    job_id: str


class Load:
    """Shared state of the clients: the per-route records and the uploads made."""

    def __init__(self, mix: dict[str, float], seed: int) -> None:
        self.mix = mix
        self.routes: dict[str, Route] = defaultdict(Route)
        self.uploads: list[Upload] = []
        self.reuploads = 0
        self.indexed_s: list[float] = []
        self.questions = questions()
        self.random = random.Random(seed)
        self.until = float("inf")

    async def call(
        self, http: httpx.AsyncClient, route: str, method: str, path: str, **kw: Any
    ) -> httpx.Response | None:
        """One request; None for a deliberate 429/503 (after sleeping its Retry-After)."""
        record = self.routes[route]
        started = time.perf_counter()
        try:
            response = await http.request(method, path, **kw)
        except httpx.HTTPError as exc:
            record.errors.append(f"{type(exc).__name__}: {exc}")
            return None
        elapsed = time.perf_counter() - started
        if response.status_code in DELIBERATE:
            record.deliberate[response.status_code] += 1
            await asyncio.sleep(float(response.headers.get("retry-after", "1")))
            return None
        if response.is_error:
            record.errors.append(f"{response.status_code}: {response.text[:200]}")
            return None
        record.latencies.append(elapsed)
        record.in_time += time.monotonic() <= self.until
        return response

    async def client(self, http: httpx.AsyncClient, number: int, until: float) -> None:
        names, weights = list(self.mix), list(self.mix.values())
        mine: list[Upload] = []
        count = 0
        while time.monotonic() < until:
            kind = self.random.choices(names, weights)[0]
            if kind == "reupload" and not mine:
                kind = "upload"
            question = self.random.choice(self.questions)
            if kind == "retrieve":
                body = {"collection": COLLECTION, "query": question}
                await self.call(http, "retrieve", "POST", "/v1/retrieve", json=body)
            elif kind == "query":
                body = {"collection": COLLECTION, "question": question}
                await self.call(http, "query", "POST", "/v1/query", json=body)
            elif kind == "list":
                await self.call(http, "collection", "GET", f"/v1/collections/{COLLECTION}")
                await self.call(http, "documents", "GET", f"/v1/collections/{COLLECTION}/documents")
            elif kind == "upload":
                count += 1
                source = f"load-{number}-{count}.txt"
                text = unique_text(source, question, self.random)
                upload = await self.upload(http, source, text)
                if upload is not None:
                    mine.append(upload)
                    await self.wait_indexed(http, upload)
            else:
                previous = self.random.choice(mine)
                again = await self.upload(http, previous.source, previous.text, route="reupload")
                if again is not None:
                    self.reuploads += 1
                    if again.document_id != previous.document_id:
                        self.routes["reupload"].errors.append(
                            f"same bytes got a new document {again.document_id} "
                            f"(first {previous.document_id})"
                        )

    async def upload(
        self, http: httpx.AsyncClient, source: str, text: str, *, route: str = "upload"
    ) -> Upload | None:
        body = {"documents": [{"source": source, "text": text}]}
        path = f"/v1/collections/{COLLECTION}/documents"
        response = await self.call(http, route, "POST", path, json=body)
        if response is None:
            return None
        data = response.json()
        upload = Upload(source, text, data["documents"][0]["id"], data["job_id"])
        if route == "upload":
            self.uploads.append(upload)
        return upload

    async def wait_indexed(self, http: httpx.AsyncClient, upload: Upload) -> None:
        started = time.perf_counter()
        while True:
            response = await self.call(http, "job", "GET", f"/v1/jobs/{upload.job_id}")
            if response is not None:
                status = response.json()["status"]
                if status == "succeeded":
                    self.indexed_s.append(time.perf_counter() - started)
                    return
                if status == "failed":
                    self.routes["upload"].errors.append(f"job failed: {response.json()['error']}")
                    return
            await asyncio.sleep(0.5)


def unique_text(source: str, question: str, rng: random.Random) -> str:
    words = " ".join(f"w{rng.randrange(10**9)}" for _ in range(40))
    return (
        f"# {source}\n\nThis note was written by the load test. It answers: {question}\n\n"
        f"Tokens that make it unique: {words}.\n\nA second paragraph, so that the chunker "
        "has sentences and paragraphs to cut on. It says nothing else of interest.\n"
    )


async def sample_rss(
    pid: int, samples: list[tuple[float, float]], stop: asyncio.Event, snapshot_at: float | None
) -> None:
    """RSS every second; SIGUSR1 (a tracemalloc snapshot) once ``snapshot_at`` s have passed."""
    started = time.monotonic()
    while not stop.is_set():
        samples.append((elapsed := time.monotonic() - started, rss_mb(pid)))
        if snapshot_at is not None and elapsed >= snapshot_at:
            os.kill(pid, signal.SIGUSR1)
            snapshot_at = None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=1.0)


async def run_load(
    url: str,
    pid: int,
    clients: int,
    duration: float,
    mix: dict[str, float],
    seed: int,
    snapshot_at: float | None = None,
) -> tuple[Load, list[tuple[float, float]], float]:
    load = Load(mix, seed)
    samples: list[tuple[float, float]] = []
    stop = asyncio.Event()
    # Idle connections are dropped before uvicorn's 5 s keep-alive timeout closes them:
    # reusing one the server is closing at that moment fails with a ReadError.
    limits = httpx.Limits(
        max_connections=clients + 4, max_keepalive_connections=clients + 4, keepalive_expiry=2.0
    )
    timeout = httpx.Timeout(300.0, connect=30.0)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=timeout) as http:
        sampler = asyncio.create_task(sample_rss(pid, samples, stop, snapshot_at))
        started = time.monotonic()
        until = load.until = started + duration
        await asyncio.gather(*(load.client(http, n, until) for n in range(clients)))
        elapsed = time.monotonic() - started
        stop.set()
        await sampler
    return load, samples, elapsed


def verify(url: str, load: Load, corpus: dict[str, Any]) -> list[str]:
    """Every unique upload indexed exactly once, and the counts agree; problems found."""
    problems: list[str] = []
    with httpx.Client(base_url=url, timeout=120) as http:
        for upload in load.uploads:  # jobs the clients stopped polling at the deadline
            wait_job(http, upload.job_id, timeout_s=300)
        documents: list[dict[str, Any]] = []
        while True:
            page = http.get(
                f"/v1/collections/{COLLECTION}/documents",
                params={"limit": 1000, "offset": len(documents)},
            ).raise_for_status()
            documents += page.json()["documents"]
            if len(documents) >= page.json()["total"] or not page.json()["documents"]:
                break
        collection = http.get(f"/v1/collections/{COLLECTION}").raise_for_status().json()
    by_id = {d["id"]: d for d in documents}
    expected = corpus["documents"] + len(load.uploads)
    if collection["document_count"] != expected or len(documents) != expected:
        problems.append(
            f"documents: collection says {collection['document_count']}, list has "
            f"{len(documents)}, expected {expected} (corpus + unique uploads)"
        )
    for upload in load.uploads:
        doc = by_id.get(upload.document_id)
        if doc is None or doc["status"] != "indexed" or doc["chunk_count"] < 1:
            problems.append(f"upload {upload.source} not indexed: {doc}")
    sources = [d["source"] for d in documents]
    if len(set(sources)) != len(sources):
        problems.append("a source name appears on more than one document")
    total = sum(d["chunk_count"] for d in documents)
    if total != collection["chunk_count"]:
        problems.append(
            f"chunks: documents sum to {total}, collection says {collection['chunk_count']}"
        )
    return problems


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def slope_mb_per_min(samples: Sequence[tuple[float, float]]) -> float:
    if len(samples) < 2:
        return float("nan")
    return 60 * statistics.linear_regression([t for t, _ in samples], [r for _, r in samples])[0]


def minute_medians(samples: Sequence[tuple[float, float]], start: float) -> list[float]:
    """Median RSS of each whole minute from ``start`` (the saw tooth of the minute's trim)."""
    minutes: dict[int, list[float]] = defaultdict(list)
    for t, rss in samples:
        minutes[int((t - start) // 60)].append(rss)
    return [round(statistics.median(v), 1) for _, v in sorted(minutes.items()) if len(v) >= 50]


def python_heap_growth(pid: int, traces: Path, top: int = 15) -> dict[str, Any]:
    """The allocation sites that grew most between the warm-up and the end snapshots."""
    import tracemalloc

    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + 300
    while not (traces / "snapshot-1.pickle").exists():
        if time.monotonic() > deadline:
            raise SystemExit(f"no tracemalloc snapshot in {traces}")
        time.sleep(0.5)
    first, last = (tracemalloc.Snapshot.load(str(traces / f"snapshot-{n}.pickle")) for n in (0, 1))
    totals = [sum(s.size for s in snap.statistics("filename")) / 2**20 for snap in (first, last)]
    print(f"python heap traced: {totals[0]:.1f} MiB after warm-up, {totals[1]:.1f} MiB at the end")
    rows = [
        {
            "site": str(stat.traceback[0]),
            "size_diff_kib": round(stat.size_diff / 1024, 1),
            "count_diff": stat.count_diff,
            "size_kib": round(stat.size / 1024, 1),
        }
        for stat in last.compare_to(first, "lineno")[:top]
    ]
    return {"traced_mib": [round(t, 1) for t in totals], "sites": rows}


def summarise(load: Load, duration: float) -> dict[str, dict[str, Any]]:
    table: dict[str, dict[str, Any]] = {}
    for name, route in sorted(load.routes.items()):
        ms = [v * 1000 for v in route.latencies]
        table[name] = {
            "ok": len(ms),
            "errors": len(route.errors),
            "429": route.deliberate.get(429, 0),
            "503": route.deliberate.get(503, 0),
            "p50_ms": round(percentile(ms, 50), 1),
            "p95_ms": round(percentile(ms, 95), 1),
            "p99_ms": round(percentile(ms, 99), 1),
            "per_s": round(route.in_time / duration, 2),
            "first_errors": route.errors[:5],
        }
    return table


def print_table(table: dict[str, dict[str, Any]]) -> None:
    print(
        f"{'route':<11}{'ok':>7}{'errors':>7}{'429':>6}{'503':>6}"
        f"{'p50 ms':>9}{'p95 ms':>9}{'p99 ms':>9}{'req/s':>8}"
    )
    for name, row in table.items():
        print(
            f"{name:<11}{row['ok']:>7}{row['errors']:>7}{row['429']:>6}{row['503']:>6}"
            f"{row['p50_ms']:>9.1f}{row['p95_ms']:>9.1f}{row['p99_ms']:>9.1f}{row['per_s']:>8.2f}"
        )
        for error in row["first_errors"]:
            print(f"    error: {error}")


def parse_mix(text: str) -> dict[str, float]:
    mix = {name: float(weight) for name, weight in (p.split("=") for p in text.split(","))}
    unknown = set(mix) - {"retrieve", "query", "upload", "reupload", "list"}
    if unknown:
        raise SystemExit(f"unknown kinds in --mix: {sorted(unknown)}")
    return mix


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--duration", type=float, default=120.0, help="seconds of load")
    parser.add_argument("--warmup", type=float, default=30.0, help="seconds before RSS counts")
    parser.add_argument("--pdf", type=Path, default=PDF)
    parser.add_argument("--max-pages", type=int, default=0, help="first N pages only (0: all)")
    parser.add_argument("--mix", default=MIX, help=f"weights of the request kinds ({MIX})")
    parser.add_argument("--seed", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument(
        "--tracemalloc", type=int, default=0, help="frames to trace in the server (0: off)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    mix = parse_mix(args.mix)
    growth: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="rag-load-") as tmp:
        pdf = pdf_subset(args.pdf, args.max_pages, Path(tmp))
        env, command, traces = {}, None, Path(tmp) / "traces"
        if args.tracemalloc:
            traces.mkdir()
            env = {"RAG_TRACE_DIR": str(traces)}
            traced = [
                "-X",
                f"tracemalloc={args.tracemalloc}",
                str(ROOT / "bench" / "traced_serve.py"),
            ]
            command = [sys.executable, *traced, "serve"]
        with ServeProcess(Path(tmp) / "data", env, command) as server:
            corpus = ingest_corpus(server.url, pdf)
            print(f"corpus {corpus}; load average {load_average()}")
            load_before = load_average()
            load, samples, elapsed = asyncio.run(
                run_load(
                    server.url,
                    server.pid,
                    args.clients,
                    args.duration,
                    mix,
                    args.seed,
                    snapshot_at=args.warmup if args.tracemalloc else None,
                )
            )
            load_after = load_average()
            if args.tracemalloc:
                growth = python_heap_growth(server.pid, traces)
            problems = verify(server.url, load, corpus)
    table = summarise(load, args.duration)
    after_warmup = [(t, r) for t, r in samples if t >= args.warmup]
    memory = {
        "rss_start_mb": round(samples[0][1], 1) if samples else None,
        "rss_after_warmup_mb": round(after_warmup[0][1], 1) if after_warmup else None,
        "rss_end_mb": round(samples[-1][1], 1) if samples else None,
        "rss_max_mb": round(max(r for _, r in samples), 1) if samples else None,
        "slope_after_warmup_mb_per_min": round(slope_mb_per_min(after_warmup), 2),
        "median_per_minute_after_warmup_mb": minute_medians(after_warmup, args.warmup),
    }
    print(
        f"\n{args.clients} clients for {args.duration:.0f} s ({elapsed:.0f} s until the last "
        f"answer), mix {args.mix}; req/s counts answers before the deadline"
    )
    print_table(table)
    indexed = sorted(load.indexed_s)
    print(
        f"uploads {len(load.uploads)} unique + {load.reuploads} re-uploads; upload to indexed "
        f"p50 {percentile(indexed, 50):.2f} s p95 {percentile(indexed, 95):.2f} s"
    )
    print(f"memory {memory}")
    for row in growth.get("sites", []):
        diff, count = row["size_diff_kib"], row["count_diff"]
        print(f"    python heap {diff:+10.1f} KiB {count:+8d} blocks  {row['site']}")
    print(f"load average before {load_before} after {load_after}")
    errors = sum(row["errors"] for row in table.values())
    for problem in problems:
        print(f"CHECK FAILED: {problem}")
    print("result:", "PASS" if not errors and not problems else "FAIL")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = args.out or RESULTS / f"load-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    result = {
        "args": {k: str(v) for k, v in vars(args).items()},
        "corpus": corpus,
        "elapsed_s": round(elapsed, 1),
        "routes": table,
        "uploads": len(load.uploads),
        "reuploads": load.reuploads,
        "upload_to_indexed_s": {"p50": percentile(indexed, 50), "p95": percentile(indexed, 95)},
        "memory": memory,
        "python_heap_growth": growth,
        "rss_samples": samples,
        "load_average": {"before": load_before, "after": load_after},
        "problems": problems,
    }
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return 1 if errors or problems else 0


if __name__ == "__main__":
    sys.exit(main())
