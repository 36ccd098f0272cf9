"""What API keys, the metrics middleware and the rate limits cost a request, side by side.

    python bench/middleware_overhead.py [--requests N] [--warmup N]

Two apps serve one small collection (the shared-mime-info spec in
tests/data, PDF and HTML, embedded by the real all-MiniLM-L6-v2) from one
data directory, each under uvicorn on 127.0.0.1:

- bare: the same routers and error handlers with no metrics middleware, no
  limit dependencies and keys off (no key sent, so no key lookup);
- full: ``create_app`` with API keys required (an admin key is sent and
  checked against the catalog on every request) and both request and token
  limits on (set so high they never refuse), so every layer runs.

Requests alternate between the two (the order flips every round, so drift in
machine load falls on both alike) and the client latency medians are
compared for ``POST /v1/retrieve`` (embedding, FAISS, BM25) and for a cheap
route, ``GET /v1/collections/{c}``, where a fixed overhead shows more.  This
is a measurement, not a test: it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CORPUS = (
    ROOT / "tests" / "data" / "shared-mime-info-spec.pdf",
    ROOT / "tests" / "data" / "shared-mime-info-spec-unified-system.html",
)
COLLECTION = "bench"
QUERIES = (
    "How are MIME types matched by glob patterns?",
    "What does the magic element describe?",
    "Where are the shared MIME database files installed?",
    "How is a subclass of another MIME type declared?",
    "What is the priority of a magic match?",
    "How do applications find the icon for a MIME type?",
    "What is the XML namespace of the package format?",
    "How are aliases of MIME types listed?",
)


class Server:
    """An app under uvicorn on 127.0.0.1 in a background thread."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        config = uvicorn.Config(
            app, host="127.0.0.1", port=port, log_level="warning", access_log=False
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def __enter__(self) -> Server:
        import httpx

        self._thread.start()
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise SystemExit(f"{self.url} never became ready")

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=60)


def bare_app(settings: Any, embedder: Any, chat_model: Any) -> Any:
    """The service's routers and error handlers without metrics or rate limits."""
    from fastapi import FastAPI
    from fastapi.concurrency import run_in_threadpool

    from rag_service.api.errors import install_error_handlers
    from rag_service.api.routes import documents, health, jobs, query
    from rag_service.runtime import Runtime

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime = await run_in_threadpool(
            lambda: Runtime.open(
                settings, embedder=embedder, chat_model=chat_model, warm_indexes=True
            )
        )
        app.state.runtime = runtime
        try:
            yield
        finally:
            app.state.runtime = None
            await run_in_threadpool(runtime.close)

    app = FastAPI(lifespan=lifespan)
    app.state.runtime = None
    install_error_handlers(app)
    for router in (health.router, documents.router, jobs.router, query.router):
        app.include_router(router)
    return app


def timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    response = call()
    elapsed = (time.perf_counter() - started) * 1000.0
    if response.status_code != 200:
        raise SystemExit(f"unexpected {response.status_code}: {response.text[:300]}")
    return elapsed


def compare(
    clients: dict[str, Any], call: Callable[[Any, int], Any], rounds: int, warmup: int
) -> dict[str, list[float]]:
    """Latencies in ms per app, calls alternating between them, order flipped each round."""
    order = list(clients)
    for i in range(warmup):
        for label in order:
            call(clients[label], i)
    times: dict[str, list[float]] = {label: [] for label in order}
    for i in range(rounds):
        for label in order if i % 2 == 0 else reversed(order):
            client = clients[label]
            times[label].append(timed(lambda c=client, n=i: call(c, n)))
    return times


def report(name: str, times: dict[str, list[float]]) -> None:
    bare, full = (statistics.median(times[k]) for k in ("bare", "full"))
    p95 = {k: statistics.quantiles(v, n=20)[-1] for k, v in times.items()}
    print(
        f"{name:<32} bare p50 {bare:7.3f} ms (p95 {p95['bare']:7.3f})   "
        f"full p50 {full:7.3f} ms (p95 {p95['full']:7.3f})   "
        f"ratio {full / bare:5.3f}   {(full - bare) * 1000:+6.0f} us"
    )


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=300, help="timed requests per app")
    parser.add_argument("--warmup", type=int, default=20, help="untimed requests per app")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(ROOT))

    import httpx

    from rag_service.api import create_app
    from rag_service.config import AuthSettings, IngestSettings, LimitsSettings, Settings
    from rag_service.embedding import SentenceTransformerEmbedder
    from rag_service.runtime import Runtime
    from rag_service.storage.keys import KeyStore
    from tests.helpers import ScriptedChatModel

    with tempfile.TemporaryDirectory(prefix="rag-bench-") as tmp:
        settings = Settings(data_dir=Path(tmp), ingest=IngestSettings(worker_threads=0))
        embedder = SentenceTransformerEmbedder(settings.embedding)
        with Runtime.open(settings, embedder=embedder, workers=1) as runtime:
            receipt = runtime.documents.add_paths(COLLECTION, list(CORPUS))
            job = runtime.wait_for_job(receipt.job_id)
            chunks = runtime.catalog.get_collection(COLLECTION).chunk_count
            _, secret = KeyStore(runtime.catalog).create("bench", "admin", ["*"])
        print(f"collection {COLLECTION!r}: {len(CORPUS)} documents, {chunks} chunks ({job.status})")

        limited = settings.model_copy(
            update={
                "limits": LimitsSettings(requests_per_minute=10**9, tokens_per_minute=10**9),
                "auth": AuthSettings(required=True),
            }
        )
        model = ScriptedChatModel()  # /v1/retrieve never calls it
        apps = {
            "bare": bare_app(settings, embedder, model),
            "full": create_app(limited, embedder=embedder, chat_model=model),
        }
        with Server(apps["bare"]) as bare, Server(apps["full"]) as full:
            clients = {
                "bare": httpx.Client(base_url=bare.url, timeout=60),
                "full": httpx.Client(
                    base_url=full.url,
                    timeout=60,
                    headers={"Authorization": f"Bearer {secret}"},
                ),
            }

            def retrieve(client: httpx.Client, n: int) -> httpx.Response:
                body = {"collection": COLLECTION, "query": QUERIES[n % len(QUERIES)], "top_k": 5}
                return client.post("/v1/retrieve", json=body)

            def collection(client: httpx.Client, n: int) -> httpx.Response:
                return client.get(f"/v1/collections/{COLLECTION}")

            print(f"{args.requests} timed requests per app, alternating, after {args.warmup}")
            report(
                "POST /v1/retrieve",
                compare(clients, retrieve, args.requests, args.warmup),
            )
            report(
                "GET /v1/collections/{c}",
                compare(clients, collection, args.requests, args.warmup),
            )
            scraped = clients["full"].get("/metrics").text
            for client in clients.values():
                client.close()
        lines = [
            line for line in scraped.splitlines() if line.startswith("rag_http_requests_total")
        ]
        print("full app's own count:", *lines, sep="\n  ")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
