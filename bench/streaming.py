"""Time to the first streamed token against time to the whole answer, with the local model.

    python bench/streaming.py [--questions N]

One app (the real embedder, SmolLM2 in llama.cpp) under uvicorn on
127.0.0.1 serves the shared-mime-info spec from tests/data.  Questions
alternate between streamed (``"stream": true``; the time to the ``sources``
event, to the first ``token`` event and to ``done``) and plain (the time to
the JSON answer).  Every question is asked once: llama.cpp keeps the last
prompt's KV cache, so asking one twice would time a cache hit.  Medians are
printed; this is a measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WARMUP = "What is this specification about?"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--questions", type=int, default=8, help="questions, half streamed, half plain"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(ROOT))

    import httpx
    from httpx_sse import connect_sse

    from bench.middleware_overhead import COLLECTION, CORPUS, QUERIES, Server
    from rag_service.api import create_app
    from rag_service.config import IngestSettings, Settings
    from rag_service.embedding import SentenceTransformerEmbedder
    from rag_service.runtime import Runtime

    with tempfile.TemporaryDirectory(prefix="rag-bench-") as tmp:
        settings = Settings(data_dir=Path(tmp), ingest=IngestSettings(worker_threads=0))
        embedder = SentenceTransformerEmbedder(settings.embedding)
        with Runtime.open(settings, embedder=embedder, workers=1) as runtime:
            runtime.wait_for_job(runtime.documents.add_paths(COLLECTION, list(CORPUS)).job_id)
        first_event: list[float] = []
        first_token: list[float] = []
        streamed_total: list[float] = []
        plain_total: list[float] = []
        tokens: list[int] = []
        with (
            Server(create_app(settings, embedder=embedder)) as server,
            httpx.Client(base_url=server.url, timeout=600) as http,
        ):
            # One untimed question, unlike the others, loads the model's weights.
            http.post("/v1/query", json={"collection": COLLECTION, "question": WARMUP})
            for i in range(min(args.questions, len(QUERIES))):
                body = {"collection": COLLECTION, "question": QUERIES[i]}
                started = time.perf_counter()
                if i % 2:
                    http.post("/v1/query", json=body).raise_for_status()
                    plain_total.append(time.perf_counter() - started)
                    continue
                got_token = None
                with connect_sse(http, "POST", "/v1/query", json=body | {"stream": True}) as source:
                    for event in source.iter_sse():
                        now = time.perf_counter() - started
                        if event.event == "sources":
                            first_event.append(now)
                        elif event.event == "token" and got_token is None:
                            got_token = now
                        elif event.event == "done":
                            done = json.loads(event.data)
                            tokens.append(done["usage"]["completion_tokens"])
                            streamed_total.append(now)
                if got_token is not None:
                    first_token.append(got_token)

    def med(xs: list[float]) -> str:
        return f"{statistics.median(xs):6.2f} s" if xs else "   n/a"

    print(f"{len(streamed_total)} questions streamed, {len(plain_total)} plain, alternating")
    print(
        f"streamed: sources after {med(first_event)}, first token after {med(first_token)}, "
        f"done after {med(streamed_total)}"
    )
    print(f"plain:    whole answer after {med(plain_total)}")
    if first_token and streamed_total:
        ratio = statistics.median(first_token) / statistics.median(streamed_total)
        print(
            f"first token / whole answer: {ratio:.2f}; median completion "
            f"{statistics.median(tokens):.0f} tokens"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
