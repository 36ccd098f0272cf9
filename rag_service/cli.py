"""The ``rag`` command: serve, worker, ingest, reindex, ask, eval, keys, backup, restore, config."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rag_service.backup_cli import backup_command, restore_command
from rag_service.config import Settings
from rag_service.errors import RagError
from rag_service.evaluation.command import eval_command
from rag_service.runtime import Runtime
from rag_service.services.validation import collection_name
from rag_service.storage.catalog import Catalog
from rag_service.storage.filters import ChunkFilter, MetadataCondition, MetadataScalar
from rag_service.storage.keys import KeyStore
from rag_service.storage.records import Job
from rag_service.storage.vectors import VectorStore

app = typer.Typer(
    help="Retrieval-augmented generation service: upload documents, ask cited questions.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)


def _settings() -> Settings:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return Settings()


def _logging(level: str) -> None:
    logging.basicConfig(
        level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s"
    )
    # Model loading chatter is noise at the terminal.
    for noisy in ("sentence_transformers", "transformers", "httpx", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _fail(exc: RagError) -> typer.Exit:
    err.print(f"[red]error:[/red] {exc.message}", highlight=False)
    return typer.Exit(code=1)


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Interface (default RAG_SERVER__HOST).")] = None,
    port: Annotated[int | None, typer.Option(help="Port (default RAG_SERVER__PORT).")] = None,
) -> None:
    """Run the HTTP service with in-process ingestion workers."""
    import uvicorn

    from rag_service.api import create_app

    settings = _settings()
    _logging(settings.log_level)
    uvicorn.run(
        create_app(settings),
        host=host or settings.server.host,
        port=port or settings.server.port,
        log_level=settings.log_level.lower(),
    )


@app.command()
def worker(
    threads: Annotated[int, typer.Option(min=1, help="Worker threads in this process.")] = 1,
) -> None:
    """Run ingestion workers against the data directory until stopped."""
    settings = _settings()
    _logging(settings.log_level)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        with Runtime.open(settings) as runtime:
            runtime.start_workers(threads)
            stop.wait()
    except RagError as exc:
        raise _fail(exc) from exc


@app.command()
def ingest(
    paths: Annotated[list[Path], typer.Argument(help="Files and folders to ingest.")],
    collection: Annotated[str, typer.Option("--collection", "-c", help="Target collection.")],
    wait: Annotated[bool, typer.Option(help="Ingest now and wait, with a progress bar.")] = True,
) -> None:
    """Add files (folders are walked) to a collection."""
    settings = _settings()
    _logging("WARNING")
    try:
        with Runtime.open(settings) as runtime:
            receipt = runtime.documents.add_paths(collection, paths)
            out.print(f"job {receipt.job_id}: {len(receipt.documents)} document(s) accepted")
            for name, reason in receipt.rejected:
                err.print(f"  skipped   {name}: {reason}", highlight=False, markup=False)
            if not wait:
                return
            job = _run_with_progress(runtime, receipt.job_id)
            for doc in receipt.documents:
                current = runtime.catalog.document_by_id(doc.id)
                status = current.status if current else "deleted"
                note = f" ({current.error})" if current and current.error else ""
                chunks = current.chunk_count if current else 0
                out.print(f"  {status:<9} {doc.source}  {chunks} chunks{note}", highlight=False)
            if job.status == "failed":
                raise typer.Exit(code=1)
    except RagError as exc:
        raise _fail(exc) from exc


@app.command()
def reindex(
    collection: Annotated[str, typer.Argument(help="The collection to rebuild.")],
    index: Annotated[
        str,
        typer.Option(
            "--index",
            help="Index spec: flat, hnsw[:m=32,ef_construction=80,ef_search=128],"
            " ivf[:nlist=1024,nprobe=16] or ivfpq[:nlist=1024,nprobe=16,m=48,nbits=8,rerank=8].",
        ),
    ],
    create: Annotated[
        bool, typer.Option(help="Create the collection (empty, with this index) if missing.")
    ] = False,
) -> None:
    """Rebuild a collection's FAISS index as another type, without stopping searches.

    A running ``rag serve`` on the same data directory keeps answering from
    the old index and loads the new one once it is recorded.
    """
    settings = _settings()
    _logging("INFO")
    try:
        if create:
            with Runtime.open(settings) as runtime:
                if collection not in {c.name for c in runtime.catalog.list_collections()}:
                    spec = runtime.vectors.create_collection(
                        collection_name(collection),
                        runtime.embedder.model_id,
                        runtime.embedder.dim,
                        index,
                    )
                    out.print(f"created {collection} with index {spec}", highlight=False)
                    return
        catalog = Catalog(settings.data_dir / "catalog.sqlite3")
        try:
            vectors = VectorStore(catalog, settings.data_dir)
            spec = vectors.reindex(collection_name(collection), index)
            kind = vectors.index_info(collection)[1]
            chunks = vectors.size(collection)
        finally:
            catalog.close()
        out.print(
            f"{collection}: {chunks} chunks now in {spec} (searching {kind})", highlight=False
        )
    except RagError as exc:
        raise _fail(exc) from exc


def _run_with_progress(runtime: Runtime, job_id: str) -> Job:
    """Work the queue in this process while drawing the job's progress.

    Another process (``rag serve``, ``rag worker``) may take the job instead;
    the bar follows the job wherever it runs.
    """
    worker_ = runtime.make_worker(sync_index=False)
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            if not worker_.run_once():
                stop.wait(0.5)

    thread = threading.Thread(target=drain, name="ingest-cli", daemon=True)
    thread.start()
    columns = (
        TextColumn("{task.description:<10}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("chunks"),
        TimeElapsedColumn(),
    )
    try:
        with Progress(*columns, console=out) as bar:
            task = bar.add_task("queued", total=None)
            while True:
                job = runtime.jobs.get(job_id)
                p = job.progress
                bar.update(
                    task,
                    description=job.stage or job.status,
                    completed=p.chunks_done,
                    total=p.chunks_total or None,
                )
                if job.status in ("succeeded", "failed"):
                    return job
                stop.wait(0.2)
    finally:
        stop.set()
        thread.join()


def _meta_value(raw: str) -> MetadataScalar:
    """A ``--meta`` value: JSON scalars (``3``, ``true``, ``null``) as such, else the text."""
    try:
        value = json.loads(raw)
    except ValueError:
        return raw
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return raw


def _filters(
    documents: list[str] | None,
    sources: list[str] | None,
    file_types: list[str] | None,
    page_from: int | None,
    page_to: int | None,
    meta: list[str] | None,
) -> ChunkFilter | None:
    """The ``ask`` options as a filter; a key given twice in ``--meta`` matches either value."""
    values: dict[str, list[MetadataScalar]] = {}
    for item in meta or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {item!r}", param_hint="--meta")
        values.setdefault(key, []).append(_meta_value(raw))
    metadata: dict[str, MetadataCondition] = {
        key: found[0] if len(found) == 1 else found for key, found in values.items()
    }
    flt = ChunkFilter(
        document_ids=tuple(documents) if documents else None,
        sources=tuple(sources) if sources else None,
        file_types=tuple(file_types) if file_types else None,
        page_from=page_from,
        page_to=page_to,
        metadata=metadata or None,
    )
    return None if flt.is_empty else flt


@app.command()
def ask(
    question: Annotated[str, typer.Argument(help="The question.")],
    collection: Annotated[str, typer.Option("--collection", "-c", help="Collection to ask.")],
    top_k: Annotated[int | None, typer.Option("--top-k", "-k", help="Sources to use.")] = None,
    mode: Annotated[
        str | None,
        typer.Option(help="dense, keyword or hybrid (default RAG_QUERY__DEFAULT_MODE)."),
    ] = None,
    document: Annotated[
        list[str] | None, typer.Option("--document", help="Only this document id (repeatable).")
    ] = None,
    source: Annotated[
        list[str] | None, typer.Option("--source", help="Only this file name (repeatable).")
    ] = None,
    file_type: Annotated[
        list[str] | None,
        typer.Option("--type", help='Only this file type, e.g. "pdf" or "text/html" (repeatable).'),
    ] = None,
    page_from: Annotated[int | None, typer.Option(help="First page (inclusive).")] = None,
    page_to: Annotated[int | None, typer.Option(help="Last page (inclusive).")] = None,
    meta: Annotated[
        list[str] | None,
        typer.Option("--meta", help="Upload metadata KEY=VALUE that must match (repeatable)."),
    ] = None,
    strategy: Annotated[
        str | None,
        typer.Option(
            help="direct, cot, self_consistency or reflect (default RAG_QUERY__DEFAULT_STRATEGY)."
        ),
    ] = None,
    samples: Annotated[
        int | None, typer.Option(help="Answers self_consistency votes over.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the full response.")] = False,
) -> None:
    """Answer a question from a collection, then list the numbered sources."""
    filters = _filters(document, source, file_type, page_from, page_to, meta)
    settings = _settings()
    _logging("WARNING")
    try:
        with Runtime.open(settings) as runtime:
            answer = runtime.query.ask(
                collection,
                question,
                top_k,
                mode=mode,
                filters=filters,
                strategy=strategy,
                samples=samples,
            )
    except RagError as exc:
        raise _fail(exc) from exc
    if as_json:
        from rag_service.api.schemas import QueryOut

        out.print_json(QueryOut.of(answer).model_dump_json())
        return
    if answer.reasoning:
        err.print(f"Reasoning: {answer.reasoning}\n", style="dim", highlight=False, markup=False)
    out.print(answer.answer, highlight=False, markup=False)
    if answer.degraded:
        err.print(f"[yellow]degraded:[/yellow] {answer.degraded_reason}", highlight=False)
    for removed in answer.unsupported:
        err.print(f"removed as unsupported: {removed}", style="dim", highlight=False, markup=False)
    cost = answer.cost
    agreement = "" if answer.agreement is None else f", agreement {answer.agreement:.0%}"
    err.print(
        f"{answer.strategy}: {cost.calls} model call(s), {cost.prompt_tokens}+"
        f"{cost.completion_tokens} tokens, {cost.ms / 1000:.1f} s{agreement}",
        style="dim",
        highlight=False,
        markup=False,
    )
    if answer.sources:
        out.print("\nSources:")
    for source_ in answer.sources:
        mark = "*" if source_.n in answer.citations else " "
        page = f", page {source_.page}" if source_.page is not None else ""
        why = "".join(
            f"; {name} {value:.3f}"
            for name, value in (("dense", source_.dense_score), ("bm25", source_.keyword_score))
            if value is not None and answer.mode == "hybrid"
        )
        out.print(
            f"{mark}[{source_.n}] {source_.source}{page}  ({answer.mode} score "
            f"{source_.score:.3f}{why})",
            highlight=False,
            markup=False,
        )


app.command("eval")(eval_command)
app.command("backup")(backup_command)
app.command("restore")(restore_command)

keys_app = typer.Typer(help="API keys: create, list, revoke.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")


@contextlib.contextmanager
def _key_store() -> Iterator[KeyStore]:
    catalog = Catalog(_settings().data_dir / "catalog.sqlite3")
    try:
        yield KeyStore(catalog)
    finally:
        catalog.close()


@keys_app.command("create")
def keys_create(
    collections: Annotated[
        str, typer.Option(help='Comma-separated collections the key reaches, or "*" for all.')
    ],
    scope: Annotated[
        str, typer.Option(help="read (ask, retrieve), write (also upload, delete) or admin.")
    ] = "read",
    name: Annotated[str, typer.Option(help="A label to recognise the key by.")] = "",
) -> None:
    """Create a key and print it once: only its hash is kept."""
    try:
        with _key_store() as store:
            key, secret = store.create(name, scope, collections.split(","))
    except RagError as exc:
        raise _fail(exc) from exc
    err.print(
        f"key {key.id} ({key.scope}; collections {', '.join(key.collections)}) - "
        "store it now, it cannot be shown again:",
        highlight=False,
    )
    out.print(secret, highlight=False, markup=False)


@keys_app.command("list")
def keys_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Every key with its scope, collections and state (never the secret)."""
    with _key_store() as store:
        keys = store.list()
    if as_json:
        out.print_json(json.dumps([dataclasses.asdict(k) for k in keys]))
        return
    for key in keys:
        state = "revoked" if key.revoked_at is not None else "active"
        out.print(
            f"{key.id}  {state:7}  {key.scope:5}  {','.join(key.collections)}  {key.name}",
            highlight=False,
            markup=False,
        )


@keys_app.command("revoke")
def keys_revoke(key_id: Annotated[str, typer.Argument(help="The key's id.")]) -> None:
    """Stop a key from working, at once."""
    try:
        with _key_store() as store:
            key = store.revoke(key_id)
    except RagError as exc:
        raise _fail(exc) from exc
    err.print(f"revoked {key.id}", highlight=False)


@app.command()
def config() -> None:
    """Print the effective settings (secrets masked)."""
    out.print_json(json.dumps(_settings().masked(), default=str))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
