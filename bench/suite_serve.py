"""Serving phases of the benchmark suite: the app under uvicorn, retrieval and answers."""

from __future__ import annotations

import socket
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from suite_measure import COLLECTION, median, percentile

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
        timings = body["timings"]
        for key, value in timings.items():
            server[key].append(value)
        if "fuse_ms" not in timings and "search_ms" in timings:
            # fusion and score completion: the search time the two searches leave
            server["fuse_ms"].append(
                timings["search_ms"] - timings.get("dense_ms", 0.0) - timings.get("keyword_ms", 0.0)
            )
        top_pages.append(body["results"][0]["page"] if body["results"] else None)
    total_p50 = median(server["total_ms"])
    return {
        "requests": n,
        "top_k": top_k,
        "first_request_ms": round(first_ms, 2),
        "client_ms": {
            "p50": round(median(latencies), 2),
            "p95": round(percentile(latencies, 95), 2),
            "min": round(min(latencies), 2),
            "max": round(max(latencies), 2),
        },
        "server_ms_median": {k: round(median(v), 2) for k, v in server.items()},
        "http_overhead_ms_median": round(median(latencies) - total_p50, 2),
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
        return round(median(values), 3)

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
