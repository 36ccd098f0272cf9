"""A run as tables for the terminal and as JSON for comparing runs."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from rag_service.errors import InvalidRequest
from rag_service.evaluation.gates import GateResult
from rag_service.evaluation.metrics import retrieval_metrics
from rag_service.evaluation.runner import EvalResult, QuestionResult

#: Bumped when the JSON's shape changes in a way that breaks comparisons.
FORMAT_VERSION = 1


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


def _number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def retrieval_table(result: EvalResult) -> Table:
    k = result.options.k
    names = retrieval_metrics(k)
    table = Table(
        title=f"Retrieval ({result.options.retrieval_top_k} retrieved per question)",
        box=box.SIMPLE_HEAD,
    )
    table.add_column("mode")
    table.add_column("questions", justify="right")
    for header in (f"hit@{k}", f"recall@{k}", "MRR", "nDCG@10"):
        table.add_column(header, justify="right")
    for mode, values in result.retrieval.items():
        table.add_row(mode, _number(values["questions"]), *(_ratio(values[name]) for name in names))
    return table


def answer_table(result: EvalResult) -> Table:
    # Narrow enough for 80 columns: short headers that wrap, counts in the caption.
    table = Table(
        title="Answers",
        box=box.SIMPLE_HEAD,
        caption=_answer_caption(result),
        collapse_padding=True,
        pad_edge=False,
    )
    table.add_column("strategy", no_wrap=True)
    for header in (
        "contains",
        "cites\nvalid",
        "cited",
        "abst.\nP",
        "abst.\nR",
        "p50\nms",
        "p95\nms",
        "tokens\nin/out",
        "calls",
    ):
        table.add_column(header, justify="right", no_wrap=True)
    for strategy, v in result.answers.items():
        table.add_row(
            strategy,
            _ratio(v["contains"]),
            _ratio(v["citation_validity"]),
            _ratio(v["cited_share"]),
            _ratio(v["abstain_precision"]),
            _ratio(v["abstain_recall"]),
            _number(v["latency_p50_ms"]),
            _number(v["latency_p95_ms"]),
            f"{_number(v['prompt_tokens'])}/{_number(v['completion_tokens'])}",
            _number(v["calls"], 2),
        )
    return table


def _answer_caption(result: EvalResult) -> str:
    return "; ".join(
        f"{strategy}: {_number(v['questions'])} questions, {_number(v['degraded'])} degraded, "
        f"{_number(v['errors'])} failed"
        for strategy, v in result.answers.items()
    )


def render(result: EvalResult, console: Console) -> None:
    """Print the tables of a run."""
    shown = len(result.questions)
    console.print(
        f"{shown} question(s) on collection {result.options.collection!r} via "
        f"{result.backend} in {result.seconds:.1f} s",
        highlight=False,
        markup=False,
    )
    if result.retrieval:
        console.print(retrieval_table(result))
    if result.answers:
        console.print(answer_table(result))


def render_gates(results: Sequence[GateResult], console: Console) -> None:
    for r in results:
        mark = "[green]pass[/green]" if r.passed else "[red]FAIL[/red]"
        value = "no value" if r.value is None else f"{r.value:g}"
        console.print(f"{mark} {r.gate}  (got {value})", highlight=False)


def _question_row(row: QuestionResult) -> dict[str, Any]:
    q = row.question
    return {
        "id": q.id,
        "line": q.line,
        "kind": q.kind,
        "question": q.question,
        "expected": list(q.answers),
        "relevant": [asdict(label) for label in q.relevant],
        "meta": dict(q.meta),
        "retrieval": {
            mode: {
                "label_ranks": list(r.label_ranks),
                "first_rank": r.first_rank,
                "hit": r.hit,
                "recall": r.recall,
                "reciprocal_rank": r.reciprocal_rank,
                "ndcg": r.ndcg,
                "top": [list(pair) for pair in r.top],
            }
            for mode, r in row.retrieval.items()
        },
        "answers": {
            strategy: {
                "answer": a.answer,
                "abstained": a.abstained,
                "contains": a.contains,
                "citations": list(a.citations),
                "valid_citations": a.valid_citations,
                "invalid_citations": a.invalid_citations,
                "degraded": a.degraded,
                "latency_ms": a.latency_ms,
                "calls": a.calls,
                "prompt_tokens": a.prompt_tokens,
                "completion_tokens": a.completion_tokens,
                "error": a.error,
            }
            for strategy, a in row.answers.items()
        },
    }


def to_json(
    result: EvalResult, *, dataset: str | None = None, gates: Sequence[GateResult] = ()
) -> dict[str, Any]:
    """Every aggregate and every question's rows, as plain data."""
    options = result.options
    return {
        "format": FORMAT_VERSION,
        "dataset": dataset,
        "collection": options.collection,
        "backend": result.backend,
        "started_at": datetime.fromtimestamp(result.started_at, UTC).isoformat(),
        "seconds": result.seconds,
        "options": {
            "modes": list(options.modes),
            "strategies": list(options.answer_strategies),
            "k": options.k,
            "retrieval_top_k": options.retrieval_top_k,
            "top_k": options.top_k,
            "answer_mode": options.answer_mode,
            "samples": options.samples,
            "skip_answers": options.skip_answers,
        },
        "ingested": result.ingested,
        "retrieval": result.retrieval,
        "answers": result.answers,
        "metrics": result.metrics(),
        "gates": [{"gate": str(g.gate), "value": g.value, "passed": g.passed} for g in gates],
        "questions": [_question_row(row) for row in result.questions],
    }


def write_json(data: dict[str, Any], path: Path) -> None:
    """Write the report whole or not at all (temporary file, then rename)."""
    path = path.expanduser()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    except OSError as exc:
        raise InvalidRequest(f"cannot write {path}: {exc.strerror or exc}") from exc
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2, ensure_ascii=False)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException as exc:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise InvalidRequest(f"cannot write {path}: {exc.strerror or exc}") from exc
        raise
