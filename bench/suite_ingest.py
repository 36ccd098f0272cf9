"""Ingest phases of the benchmark suite: parse, chunk, encode alone, ingest, re-upload."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from suite_measure import COLLECTION, StageClock, cpu_seconds, median, percentile

# -- phases ---------------------------------------------------------------------------


def bench_parse(
    pdf: Path, settings: Any, reps: int, *, pypdf: bool = True
) -> tuple[Any, dict[str, Any]]:
    """Time ``load_document`` with each PDF engine; returns the default engine's document."""
    from ingest.loaders import load_document

    data = pdf.read_bytes()
    out: dict[str, Any] = {"bytes": len(data), "default_engine": settings.ingest.pdf_engine}
    loaded: dict[str, Any] = {}
    engines = (("pypdfium2", reps), ("pypdf", 1)) if pypdf else (("pypdfium2", reps),)
    for engine, runs in engines:
        ingest_settings = settings.ingest.model_copy(update={"pdf_engine": engine})
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            doc = load_document(data, pdf.name, ingest_settings, "application/pdf")
            times.append(time.perf_counter() - start)
        loaded[engine] = doc
        seconds = median(times)
        out[engine] = {
            "runs": runs,
            "seconds_median": round(seconds, 3),
            "seconds_all": [round(t, 3) for t in times],
            "pages": doc.pages,
            "sections": len(doc.sections),
            "chars": doc.char_count,
            "pages_per_s": round((doc.pages or 0) / seconds, 1),
        }
    if pypdf:
        out["pypdfium2_speedup"] = round(
            out["pypdf"]["seconds_median"] / out["pypdfium2"]["seconds_median"], 1
        )
    if settings.ingest.pdf_engine not in loaded:
        return loaded["pypdfium2"], out
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
    seconds = median(times)
    return chunks, {
        "runs": reps,
        "seconds_median": round(seconds, 3),
        "chunks": len(chunks),
        "chunks_per_s": round(len(chunks) / seconds, 1),
        "max_tokens_setting": chunker.max_tokens,
        "tokens_total": sum(tokens),
        "tokens_per_chunk": {
            "min": min(tokens),
            "median": median(tokens),
            "mean": round(statistics.fmean(tokens), 1),
            "p95": round(percentile(tokens, 95), 1),
            "max": max(tokens),
        },
        "chars_per_chunk_median": median([len(c.text) for c in chunks]),
    }


def encoder_of(embedder: Any) -> tuple[str, Callable[[list[str]], Any]]:
    """The backend's own encode call, without the service around it.

    For sentence-transformers that is ``SentenceTransformer.encode`` of the
    embedder's own model object (the same weights, threads and settings);
    for another backend it is the backend's whole-list ``embed``.
    """
    inner = getattr(embedder, "inner", embedder)  # under a BatchingEmbedder
    model = getattr(inner, "_model", None)
    if model is not None and callable(getattr(model, "encode", None)):

        def encode(batch: list[str]) -> Any:
            return model.encode(
                batch,
                batch_size=inner.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            )

        return "SentenceTransformer.encode", encode
    return f"{type(inner).__name__}.embed", inner.embed


def bench_encode(embedder: Any, chunks: list[Any], group: int) -> dict[str, Any]:
    """Encode the chunk texts alone: in one call, and in pipeline-sized groups two ways."""
    from rag_service.compute import ingest_threads, use_torch_threads
    from rag_service.config import Settings

    use_torch_threads(ingest_threads(Settings().compute))  # as many threads as the worker's
    name, encode = encoder_of(embedder)
    texts = [c.text for c in chunks]
    # The order the pipeline now embeds in: longest (in tokens) first, whole document.
    by_length = [texts[i] for i in sorted(range(len(chunks)), key=lambda i: -chunks[i].token_count)]
    out: dict[str, Any] = {"encoder": name, "batch_size": embedder.batch_size, "group_size": group}
    runs = (
        ("one_call", [texts]),
        ("grouped", [texts[i : i + group] for i in range(0, len(texts), group)]),
        ("grouped_sorted", [by_length[i : i + group] for i in range(0, len(texts), group)]),
    )
    for label, batches in runs:
        start, cpu = time.perf_counter(), cpu_seconds()
        for batch in batches:
            encode(batch)
        seconds, cpu = time.perf_counter() - start, cpu_seconds() - cpu
        out[f"{label}_seconds"] = round(seconds, 3)
        out[f"{label}_cpu_seconds"] = round(cpu, 3)
        out[f"{label}_chunks_per_s"] = round(len(texts) / seconds, 1)
    return out


def bench_ingest(
    settings: Any, embedder: Any, pdf: Path, *, overlap_sections: int | None = None
) -> dict[str, Any]:
    """Accept the PDF into a fresh data directory and run its job to the end in this thread.

    ``overlap_sections`` overrides the pipeline's threshold for chunking a
    long document's tail while its head embeds (0: off).
    """
    import ingest.pipeline
    from rag_service.runtime import Runtime

    start = time.perf_counter()
    runtime = Runtime.open(settings, embedder=embedder)
    open_s = time.perf_counter() - start
    try:
        worker = runtime.make_worker()
        if overlap_sections is not None:
            worker.pipeline.overlap_sections = overlap_sections
        clock = StageClock()
        clock.wrap(runtime.blobs, "read", "blob_read")
        clock.wrap(ingest.pipeline, "load_document", "parse")
        clock.wrap(worker.pipeline.chunker, "chunk", "chunk")
        clock.wrap(embedder, "embed", "embed")
        clock.wrap(runtime.catalog, "replaced_vectors", "reuse_lookup")
        clock.wrap(runtime.catalog, "commit_document", "commit")
        clock.wrap(runtime.vectors, "sync", "faiss_sync")
        clock.wrap(runtime.jobs, "progress", "progress")
        try:
            start, cpu = time.perf_counter(), cpu_seconds()
            receipt = runtime.documents.add_paths(COLLECTION, [pdf])
            accepted = time.perf_counter()
            worked = worker.run_once()
            done, cpu = time.perf_counter(), cpu_seconds() - cpu
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


def bench_overlap_ab(settings: Any, embedder: Any, pdf: Path, pairs: int) -> dict[str, Any]:
    """End-to-end ingest with and without the tail chunked during embedding, alternated."""
    runs: dict[str, list[float]] = {"on": [], "off": []}
    cpu: dict[str, list[float]] = {"on": [], "off": []}
    for n in range(pairs):
        for label in ("off", "on") if n % 2 else ("on", "off"):
            data_dir = Path(settings.data_dir).parent / f"ab-{n}-{label}"
            run = bench_ingest(
                settings.model_copy(update={"data_dir": data_dir}),
                embedder,
                pdf,
                overlap_sections=None if label == "on" else 0,
            )
            runs[label].append(run["seconds"])
            cpu[label].append(run["cpu_seconds"])
    on, off = median(runs["on"]), median(runs["off"])
    return {
        "pairs": pairs,
        "seconds_on": runs["on"],
        "seconds_off": runs["off"],
        "cpu_seconds_on": cpu["on"],
        "cpu_seconds_off": cpu["off"],
        "median_on_s": round(on, 3),
        "median_off_s": round(off, 3),
        "speedup_on_vs_off": round(off / on, 3),
    }


def bench_reupload(settings: Any, embedder: Any, document: Any, pages: int) -> dict[str, Any]:
    """Ingest the first ``pages`` pages as Markdown, then again with one sentence added.

    The second upload replaces the first under the same name, so only the
    chunks whose text changed need the encoder; the rest keep their vectors.
    """
    from rag_service.runtime import Runtime

    sections = [s for s in document.sections if s.page is not None and s.page <= pages]
    edit_page = sections[len(sections) // 2].page

    def markdown(edit: bool) -> bytes:
        parts = []
        for section in sections:
            text = section.text
            if edit and section.page == edit_page:
                text += " This sentence was added by the edit."
            parts.append(f"## Page {section.page}\n\n{text}")
        return "\n\n".join(parts).encode()

    first, second = markdown(False), markdown(True)
    data_dir = Path(settings.data_dir).parent / "reupload"
    out: dict[str, Any] = {"pages": pages, "edited_page": edit_page}
    with Runtime.open(settings.model_copy(update={"data_dir": data_dir}), embedder=embedder) as rt:
        worker = rt.make_worker()
        results: list[Any] = []
        index = worker.pipeline.index

        def counted(prepared: Any, report: Any) -> Any:
            result = index(prepared, report)
            results.append(result)
            return result

        worker.pipeline.index = counted  # type: ignore[method-assign]
        for label, data in (("first", first), ("edited", second)):
            start = time.perf_counter()
            receipt = rt.documents.add_bytes(COLLECTION, [("manual.md", data)])
            worker.run_once()
            seconds = time.perf_counter() - start
            job = rt.jobs.get(receipt.job_id)
            if job.status != "succeeded" or not results:
                raise SystemExit(f"re-upload job did not succeed: {job.status} {job.error}")
            result = results.pop()
            out[label] = {
                "seconds": round(seconds, 3),
                "chunks": result.chunks,
                "embedded": getattr(result, "embedded", result.chunks),
            }
    out["seconds_ratio_edited_vs_first"] = round(
        out["edited"]["seconds"] / out["first"]["seconds"], 3
    )
    return out
