"""The local model's speed in a running service, with and without the OpenMP wait defaults.

    python bench/thread_wait.py [--rounds 3] [--tokens 1200] [--max-tokens 200]

torch and llama.cpp share one libgomp, which spins only briefly at a barrier
once the process holds more OpenMP threads than there are cores, as the
service does once it has embedded questions and documents (see
``rag_service/openmp.py``).  Each variant runs in a fresh process, the
variants taking turns round after round:

    service    ``rag_service`` imported first: ``OMP_WAIT_POLICY=ACTIVE``,
               ``GOMP_SPINCOUNT=300000`` (the shipped behaviour)
    libgomp    torch imported before ``rag_service``, so libgomp keeps its
               own defaults (the service before this change)

In each: the real app under uvicorn on 127.0.0.1 with its ingestion worker
thread, a RAG prompt of about ``--tokens`` tokens built from the Debian
Reference PDF streamed twice (KV cache cleared; time to the first piece and
generation tokens/s), then the documents of ``tests/data`` ingested through
the worker and 30 questions retrieved over HTTP (p50 latency), then the
prompt streamed twice again.  Medians per variant and their ratio are
printed; every figure goes to ``bench/results/thread_wait-<UTC time>.json``.
A measurement, not a test.
"""

from __future__ import annotations

import argparse
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
VARIANTS = ("service", "libgomp")
QUESTION = (
    "Explain in great detail, step by step and with many examples, everything the "
    "sources say about APT, packages and repositories."
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="fresh processes per variant")
    parser.add_argument("--tokens", type=int, default=1200, help="prompt size to aim at")
    parser.add_argument("--max-tokens", type=int, default=200, help="tokens generated per answer")
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def child(args: argparse.Namespace) -> dict[str, Any]:
    """One variant in this process; returns its figures."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    if args.child == "libgomp":
        import torch  # noqa: F401  (loads libgomp before rag_service sets its defaults)
    for path in (ROOT, BENCH):
        sys.path.insert(0, str(path))
    import httpx
    from local_model import DEFAULT_PDF, build_prompt, chunk_texts
    from suite_serve import QUESTIONS, Server

    from rag_service.api.app import create_app
    from rag_service.config import Settings

    with tempfile.TemporaryDirectory(prefix="rag-bench-") as tmp:
        app = create_app(Settings(data_dir=Path(tmp) / "data"))
        server = Server(app)
        server.start()
        try:
            runtime = app.state.runtime
            model = runtime.chat_model()
            messages = build_prompt(model, QUESTION, chunk_texts(DEFAULT_PDF), args.tokens, 0)

            def stream() -> dict[str, float]:
                model._llama.reset()  # the whole prompt evaluated, every time
                started = time.perf_counter()
                first: float | None = None
                pieces = 0
                for delta in model.stream(messages, max_tokens=args.max_tokens, temperature=0.1):
                    if delta.text:
                        pieces += 1
                        first = first or time.perf_counter()
                end = time.perf_counter()
                assert first is not None, "the model streamed no text"
                return {
                    "first_piece_s": first - started,
                    "pieces": pieces,
                    "generation_tok_s": (pieces - 1) / (end - first),
                }

            before = [stream() for _ in range(2)]
            documents = [p for p in sorted((ROOT / "tests" / "data").iterdir()) if p.is_file()]
            runtime.wait_for_job(runtime.documents.add_paths("bench", documents).job_id)
            latencies = []
            with httpx.Client(base_url=server.url, timeout=60) as client:
                for question in (QUESTIONS * 2)[:30]:
                    started = time.perf_counter()
                    client.post(
                        "/v1/retrieve", json={"collection": "bench", "query": question}
                    ).raise_for_status()
                    latencies.append((time.perf_counter() - started) * 1000)
            after = [stream() for _ in range(2)]
            prompt_tokens = model.prompt_tokens(messages)
        finally:
            server.stop()
    return {
        "variant": args.child,
        "prompt_tokens": prompt_tokens,
        "before": before,
        "after": after,
        "retrieve_p50_ms": statistics.median(latencies),
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        print("RESULT " + json.dumps(child(args)))
        return 0
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    environment = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")
    }
    for round_no in range(args.rounds):
        for variant in VARIANTS if round_no % 2 == 0 else VARIANTS[::-1]:
            command = [
                sys.executable,
                __file__,
                "--child",
                variant,
                "--tokens",
                str(args.tokens),
                "--max-tokens",
                str(args.max_tokens),
            ]
            done = subprocess.run(command, env=environment, capture_output=True, text=True)
            lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            result = json.loads(lines[-1][len("RESULT ") :])
            result["load_avg_1m"] = round(os.getloadavg()[0], 2)
            runs[variant].append(result)
            print(f"round {round_no + 1} {variant}: {summary(result)}", file=sys.stderr)
    table = {variant: medians(results) for variant, results in runs.items()}
    print_table(table)
    out = BENCH / "results" / f"thread_wait-{datetime.now(UTC):%Y%m%dT%H%M%SZ}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "medians": table, "runs": runs}, indent=1))
    print(f"\nwrote {out.relative_to(ROOT)}")
    return 0


def summary(result: dict[str, Any]) -> str:
    gen = [round(s["generation_tok_s"], 1) for s in result["before"] + result["after"]]
    p50 = result["retrieve_p50_ms"]
    return f"generation tok/s before/after ingest {gen}, retrieve p50 {p50:.1f} ms"


def medians(results: list[dict[str, Any]]) -> dict[str, float]:
    def med(phase: str, key: str) -> float:
        return round(statistics.median(s[key] for r in results for s in r[phase]), 3)

    return {
        "generation_tok_s_before": med("before", "generation_tok_s"),
        "generation_tok_s_after": med("after", "generation_tok_s"),
        "first_piece_s_before": med("before", "first_piece_s"),
        "first_piece_s_after": med("after", "first_piece_s"),
        "retrieve_p50_ms": round(statistics.median(r["retrieve_p50_ms"] for r in results), 2),
        "prompt_tokens": results[0]["prompt_tokens"],
    }


def print_table(table: dict[str, dict[str, float]]) -> None:
    rows = [
        ("generation tok/s, before any ingest", "generation_tok_s_before"),
        ("generation tok/s, after ingest + retrieval", "generation_tok_s_after"),
        ("time to first piece s, before", "first_piece_s_before"),
        ("time to first piece s, after", "first_piece_s_after"),
        ("/v1/retrieve p50 ms", "retrieve_p50_ms"),
    ]
    service, libgomp = table["service"], table["libgomp"]
    print(f"\nprompt {service['prompt_tokens']} tokens; medians over every stream of every round\n")
    print(f"| {'figure':<44} | service | libgomp defaults | service/libgomp |")
    print(f"|{'-' * 46}|---------|------------------|-----------------|")
    for label, key in rows:
        ratio = service[key] / libgomp[key] if libgomp[key] else float("nan")
        print(f"| {label:<44} | {service[key]:>7.2f} | {libgomp[key]:>16.2f} | {ratio:>14.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
