"""Run an evaluation set through a backend and score every call.

Questions run one after the other, so latencies are those of a service with
one caller.  Retrieval asks for ``max(k, 10)`` chunks per mode (MRR and nDCG
look ten deep); answers ask with the service's ``top_k`` unless one is given.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from rag_service.config import QuerySettings
from rag_service.errors import InvalidRequest, ModelError, RagError, ServiceUnavailable
from rag_service.evaluation.backends import Backend
from rag_service.evaluation.dataset import Question
from rag_service.evaluation.metrics import (
    ANSWER_METRICS,
    DEPTH,
    AnswerRow,
    RetrievalRow,
    answer_summary,
    retrieval_metrics,
    retrieval_summary,
    score_answer,
    score_retrieval,
)
from rag_service.retrieval import MODES

log = logging.getLogger(__name__)

STRATEGIES: tuple[str, ...] = get_args(QuerySettings.model_fields["default_strategy"].annotation)

#: Called after every call to the service, with what was just done.
OnStep = Callable[[str], None]


@dataclass(frozen=True)
class EvalOptions:
    """What one run measures."""

    collection: str
    modes: tuple[str, ...] = ("dense", "keyword", "hybrid")
    strategies: tuple[str, ...] = ("direct",)
    #: The cut-off of hit@k and recall@k.
    k: int = 5
    #: Sources given to the model; None: the service's default.
    top_k: int | None = None
    #: Retrieval mode of the answer runs; None: the service's default.
    answer_mode: str | None = None
    #: Samples of ``self_consistency``; None: the service's default.
    samples: int | None = None
    skip_answers: bool = False

    def __post_init__(self) -> None:
        unknown = [m for m in self.modes if m not in MODES]
        if unknown or not self.modes:
            raise InvalidRequest(f"modes must be among {', '.join(MODES)}; got {self.modes}")
        if self.answer_mode is not None and self.answer_mode not in MODES:
            raise InvalidRequest(f"answer mode must be one of {', '.join(MODES)}")
        bad = [s for s in self.strategies if s not in STRATEGIES]
        if bad or (not self.strategies and not self.skip_answers):
            raise InvalidRequest(
                f"strategies must be among {', '.join(STRATEGIES)}; got {self.strategies}"
            )
        if self.k < 1:
            raise InvalidRequest("k must be at least 1")

    @property
    def retrieval_top_k(self) -> int:
        return max(self.k, DEPTH)

    @property
    def answer_strategies(self) -> tuple[str, ...]:
        return () if self.skip_answers else self.strategies

    def metric_names(self) -> list[str]:
        """Every ``<mode>.<metric>`` and ``<strategy>.<metric>`` this run reports."""
        names = [f"{m}.{name}" for m in self.modes for name in retrieval_metrics(self.k)]
        names += [f"{s}.{name}" for s in self.answer_strategies for name in ANSWER_METRICS]
        return names


@dataclass
class QuestionResult:
    """Everything one question scored, per mode and per strategy."""

    question: Question
    retrieval: dict[str, RetrievalRow] = field(default_factory=dict)
    answers: dict[str, AnswerRow] = field(default_factory=dict)


@dataclass
class EvalResult:
    """A finished run: its options, the aggregates and every question's rows."""

    options: EvalOptions
    backend: str
    questions: list[QuestionResult]
    retrieval: dict[str, dict[str, float | None]]
    answers: dict[str, dict[str, float | None]]
    started_at: float
    seconds: float
    ingested: list[dict[str, Any]] = field(default_factory=list)

    def metrics(self) -> dict[str, float | None]:
        """Every aggregate by its gate name, ``<mode|strategy>.<metric>``."""
        flat: dict[str, float | None] = {}
        for group in (self.retrieval, self.answers):
            for prefix, values in group.items():
                flat.update({f"{prefix}.{name}": v for name, v in values.items()})
        return flat


def retrieval_scored(question: Question) -> bool:
    """Whether a question counts for retrieval: answerable, with labels."""
    return question.answerable and bool(question.relevant)


def planned_calls(questions: Sequence[Question], options: EvalOptions) -> int:
    """How many calls ``evaluate`` will make: the length of its progress bar."""
    scored = sum(retrieval_scored(q) for q in questions)
    return scored * len(options.modes) + len(questions) * len(options.answer_strategies)


def ingest(backend: Backend, collection: str, paths: Sequence[Path]) -> list[dict[str, Any]]:
    """Upload files and wait; an ingestion that did not fully succeed is an error."""
    jobs = backend.ingest(collection, paths)
    for job in jobs:
        failed = int((job.get("progress") or {}).get("documents_failed") or 0)
        if job.get("status") != "succeeded" or failed:
            raise RagError(
                f"ingest job {job.get('id')} {job.get('status')}"
                f" ({failed} document(s) failed): {job.get('error')}"
            )
    return jobs


def evaluate(
    backend: Backend,
    questions: Sequence[Question],
    options: EvalOptions,
    *,
    on_step: OnStep | None = None,
) -> EvalResult:
    """Run every question through ``backend`` and score it.

    A model or service failure on one answer is recorded on that question's
    row and the run goes on; any other error (unknown collection, bad
    option) stops the run.
    """
    started_at = time.time()
    started = time.perf_counter()
    step = on_step or (lambda _: None)
    results = [QuestionResult(q) for q in questions]
    for mode in options.modes:
        for row in results:
            if retrieval_scored(row.question):
                body = backend.retrieve(
                    options.collection,
                    row.question.question,
                    top_k=options.retrieval_top_k,
                    mode=mode,
                )
                row.retrieval[mode] = score_retrieval(row.question, body, options.k)
                step(f"{mode} {row.question.id}")
    for strategy in options.answer_strategies:
        for row in results:
            row.answers[strategy] = _answer(backend, row.question, options, strategy)
            step(f"{strategy} {row.question.id}")
    return EvalResult(
        options=options,
        backend=backend.name,
        questions=results,
        retrieval={
            mode: retrieval_summary(
                [r.retrieval[mode] for r in results if mode in r.retrieval], options.k
            )
            for mode in options.modes
        },
        answers={
            strategy: answer_summary([r.answers[strategy] for r in results])
            for strategy in options.answer_strategies
        },
        started_at=started_at,
        seconds=round(time.perf_counter() - started, 3),
    )


def _answer(backend: Backend, question: Question, options: EvalOptions, strategy: str) -> AnswerRow:
    start = time.perf_counter()
    try:
        body = backend.ask(
            options.collection,
            question.question,
            top_k=options.top_k,
            mode=options.answer_mode,
            strategy=strategy,
            samples=options.samples if strategy == "self_consistency" else None,
        )
    except (ModelError, ServiceUnavailable) as exc:
        log.warning("question failed id=%s strategy=%s error=%s", question.id, strategy, exc)
        return AnswerRow(answerable_truth=question.answerable, error=f"{exc.code}: {exc.message}")
    latency_ms = round((time.perf_counter() - start) * 1000.0, 2)
    return score_answer(question, body, latency_ms)
