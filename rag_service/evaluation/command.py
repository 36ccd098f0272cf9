"""``rag eval DATASET.jsonl -c COLLECTION``: the evaluation harness at the terminal.

Exit status: 0 when every ``--gate`` passed (or none was given), 1 when a
gate failed or the service failed, 2 when the options, the gates or the
dataset are bad (nothing is run then).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from rag_service.config import Settings
from rag_service.embedding import Embedder
from rag_service.errors import RagError
from rag_service.evaluation.backends import Backend, HttpBackend, InProcessBackend
from rag_service.evaluation.dataset import DatasetError, Question, load_dataset, load_ids, select
from rag_service.evaluation.gates import Gate, GateError, check_gates, parse_gate
from rag_service.evaluation.report import render, render_gates, to_json, write_json
from rag_service.evaluation.runner import EvalOptions, EvalResult, evaluate, ingest, planned_calls
from rag_service.llm.base import ChatModel


def _names(raw: str) -> tuple[str, ...]:
    return tuple(dict.fromkeys(part.strip() for part in raw.split(",") if part.strip()))


def _questions(dataset: Path, ids: Path | None, limit: int | None) -> list[Question]:
    try:
        questions = load_dataset(dataset)
        if ids is not None:
            questions = select(questions, load_ids(ids))
    except DatasetError as exc:
        raise typer.BadParameter(exc.message, param_hint="'--ids'" if ids else "'DATASET'") from exc
    return questions[:limit] if limit is not None else questions


def _gates(raw: list[str], options: EvalOptions) -> list[Gate]:
    known = options.metric_names()
    try:
        return [parse_gate(text, known) for text in raw]
    except GateError as exc:
        raise typer.BadParameter(exc.message, param_hint="'--gate'") from exc


def _with_progress(
    backend: Backend, questions: list[Question], options: EvalOptions, console: Console
) -> EvalResult:
    columns = (
        TextColumn("{task.description:<24}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task("evaluating", total=planned_calls(questions, options))
        return evaluate(
            backend,
            questions,
            options,
            on_step=lambda what: bar.update(task, advance=1, description=what[:24]),
        )


def make_eval_command(
    *,
    embedder: Embedder | None = None,
    chat_model: ChatModel | None = None,
    backend: Backend | None = None,
) -> Callable[..., None]:
    """The ``eval`` command; tests pass the models (or a whole backend) it would build."""

    def eval_command(
        dataset: Annotated[
            Path, typer.Argument(help="JSONL evaluation set, one question per line.")
        ],
        collection: Annotated[
            str, typer.Option("--collection", "-c", help="Collection to evaluate.")
        ],
        url: Annotated[
            str | None,
            typer.Option(
                help="A running service, e.g. http://127.0.0.1:8000 (default: in process)."
            ),
        ] = None,
        api_key: Annotated[
            str | None, typer.Option(help="Sent as Authorization: Bearer (with --url).")
        ] = None,
        ingest_paths: Annotated[
            list[Path] | None,
            typer.Option("--ingest", help="Upload this file or folder first (repeatable)."),
        ] = None,
        modes: Annotated[
            str, typer.Option(help="Retrieval modes to score, comma-separated.")
        ] = "dense,keyword,hybrid",
        strategies: Annotated[
            str, typer.Option(help="Prompting strategies to score, comma-separated.")
        ] = "direct",
        k: Annotated[int, typer.Option("--k", min=1, help="Cut-off of hit@k and recall@k.")] = 5,
        top_k: Annotated[
            int | None,
            typer.Option("--top-k", min=1, help="Sources per answer (default: the service's)."),
        ] = None,
        answer_mode: Annotated[
            str | None,
            typer.Option(help="Retrieval mode for answers (default: the service's)."),
        ] = None,
        samples: Annotated[
            int | None, typer.Option(min=2, help="Samples of self_consistency.")
        ] = None,
        skip_answers: Annotated[
            bool, typer.Option("--skip-answers", help="Score retrieval only (no model calls).")
        ] = False,
        limit: Annotated[
            int | None, typer.Option(min=1, help="Only the first N questions.")
        ] = None,
        ids: Annotated[
            Path | None, typer.Option(help="Only the question ids listed in this file.")
        ] = None,
        out_path: Annotated[
            Path | None, typer.Option("--out", help="Write every figure to this JSON file.")
        ] = None,
        gate: Annotated[
            list[str] | None,
            typer.Option(
                help="METRIC>=VALUE or METRIC<=VALUE, e.g. hybrid.ndcg@10>=0.6 (repeatable); "
                "exit 1 when one fails."
            ),
        ] = None,
    ) -> None:
        """Score retrieval and answers on a labelled question set."""
        out = Console()
        err = Console(stderr=True)
        try:
            options = EvalOptions(
                collection=collection,
                modes=_names(modes),
                strategies=_names(strategies),
                k=k,
                top_k=top_k,
                answer_mode=answer_mode,
                samples=samples,
                skip_answers=skip_answers,
            )
        except RagError as exc:
            raise typer.BadParameter(exc.message) from exc
        gates = _gates(gate or [], options)
        questions = _questions(dataset, ids, limit)
        # Model loading chatter is noise at the terminal (as in ``rag ask``).
        logging.basicConfig(
            level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s %(message)s"
        )
        try:
            with _open(url, api_key, bool(ingest_paths)) as chosen:
                ingested = []
                if ingest_paths:
                    with err.status(f"ingesting {len(ingest_paths)} path(s)"):
                        ingested = ingest(chosen, collection, ingest_paths)
                result = _with_progress(chosen, questions, options, err)
                result.ingested = ingested
        except RagError as exc:
            err.print(f"[red]error:[/red] {escape(exc.message)}", highlight=False)
            raise typer.Exit(code=1) from exc
        render(result, out)
        outcome = check_gates(gates, result.metrics())
        render_gates(outcome, out)
        if out_path is not None:
            try:
                write_json(to_json(result, dataset=str(dataset), gates=outcome), out_path)
            except RagError as exc:
                err.print(f"[red]error:[/red] {escape(exc.message)}", highlight=False)
                raise typer.Exit(code=1) from exc
            out.print(f"results written to {out_path}", highlight=False, markup=False)
        if not all(r.passed for r in outcome):
            raise typer.Exit(code=1)

    def _open(url: str | None, api_key: str | None, ingesting: bool) -> Backend:
        if backend is not None:
            return backend
        if url is not None:
            return HttpBackend(url, api_key=api_key)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        return InProcessBackend(
            Settings(), embedder=embedder, chat_model=chat_model, ingesting=ingesting
        )

    return eval_command


eval_command = make_eval_command()
