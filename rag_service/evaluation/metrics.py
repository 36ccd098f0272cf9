"""What ``rag eval`` measures, as pure functions over the API's JSON shapes.

Matching.  A retrieved chunk matches a label when its ``source`` has the
label's base name and, if the label names a page, its ``page`` is that page.
A question's relevant set is its distinct labels.

Retrieval, per mode, over the answerable questions that have labels (each
run with ``top_k = max(k, 10)``; ranks are 1-based):

- ``hit@k``: 1 when a chunk in the top ``k`` matches any label, else 0.
- ``recall@k``: the share of labels matched by some chunk in the top ``k``.
- ``mrr``: 1 / the rank of the first chunk matching any label within the
  top 10, else 0.
- ``ndcg@10``: binary gains, each label counted once.  Walking the top 10 in
  order, a chunk gains 1 when it matches a label not counted yet, and then
  counts that label (the first such label in the dataset's order); every
  other chunk gains 0.  DCG = sum of gain / log2(rank + 1); the ideal DCG is
  that of min(#labels, 10) gains of 1 at ranks 1, 2, ...; nDCG = DCG / ideal.

Each is averaged over the questions.

Answers, per strategy (text is compared case-insensitively with runs of
whitespace made one space):

- ``contains``: over answerable questions, the share whose answer contains
  any of the expected answers.  A question whose call failed counts as 0.
- ``citation_validity``: over the answerable questions' citations.  A cited
  number is valid when it is one of the sources the answer was given AND
  that source's text contains an expected answer or the source matches a
  relevant label.  Each cited number counts once per answer; the service's
  ``invalid_citations`` (numbers it removed) count as invalid.  Valid /
  (cited + invalid); none when nothing was cited.
- ``cited_share``: the share of answerable questions' answers citing at least
  one source.
- ``abstain_precision`` and ``abstain_recall``: an abstention
  (``answerable: false``) is the positive prediction; a question of kind
  ``unanswerable`` is the positive truth.  Precision = correct abstentions /
  abstentions (none when it never abstained); recall = correct abstentions /
  unanswerable questions (none when there are none).
- ``degraded``: answers the service returned with ``degraded: true``;
  ``errors``: questions whose call failed with a model or service error.
- ``latency_p50_ms``, ``latency_p95_ms``: wall-clock time of each call as the
  caller saw it, linear interpolation between the closest ranks.
- ``prompt_tokens``, ``completion_tokens``, ``calls``: means per question of
  the answer's ``cost`` (all model calls of the strategy), falling back to its
  ``usage`` (and 1 call when it used any tokens) from services without
  ``cost``.

Failed calls count only for ``contains``, ``cited_share`` and ``errors``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rag_service.evaluation.dataset import Label, Question, basename

#: Depth of MRR and nDCG, and the least ``top_k`` every retrieval asks for.
DEPTH = 10

#: Names of the answer metrics, as ``--gate`` and the JSON report spell them.
ANSWER_METRICS = (
    "contains",
    "citation_validity",
    "cited_share",
    "abstain_precision",
    "abstain_recall",
    "degraded",
    "errors",
    "latency_p50_ms",
    "latency_p95_ms",
    "prompt_tokens",
    "completion_tokens",
    "calls",
)


def retrieval_metrics(k: int) -> tuple[str, ...]:
    """Names of the retrieval metrics for a cut-off ``k``."""
    return (f"hit@{k}", f"recall@{k}", "mrr", f"ndcg@{DEPTH}")


Hit = Mapping[str, Any]


# -- matching -----------------------------------------------------------------


def matches(hit: Hit, label: Label) -> bool:
    """Whether a retrieved chunk (``source``, ``page``) is what the label points at."""
    source = hit.get("source")
    if not isinstance(source, str) or basename(source) != label.source:
        return False
    return label.page is None or hit.get("page") == label.page


def label_ranks(results: Sequence[Hit], labels: Sequence[Label]) -> list[int | None]:
    """For each label, the 1-based rank of the first chunk matching it (None: none does)."""
    ranks: list[int | None] = []
    for label in labels:
        found = next((i for i, hit in enumerate(results, 1) if matches(hit, label)), None)
        ranks.append(found)
    return ranks


def first_match(results: Sequence[Hit], labels: Sequence[Label]) -> int | None:
    """The 1-based rank of the first chunk matching any label."""
    return next(
        (i for i, hit in enumerate(results, 1) if any(matches(hit, lb) for lb in labels)), None
    )


def hit_at(ranks: Sequence[int | None], k: int) -> float:
    """1.0 when any label is matched within the top ``k``."""
    return 1.0 if any(r is not None and r <= k for r in ranks) else 0.0


def recall_at(ranks: Sequence[int | None], k: int) -> float:
    """The share of labels matched within the top ``k``."""
    if not ranks:
        return 0.0
    return sum(r is not None and r <= k for r in ranks) / len(ranks)


def reciprocal_rank(first: int | None, depth: int = DEPTH) -> float:
    """1 / rank of the first match within ``depth``, else 0."""
    return 1.0 / first if first is not None and first <= depth else 0.0


def gains(results: Sequence[Hit], labels: Sequence[Label], depth: int = DEPTH) -> list[int]:
    """Binary gains of the top ``depth``: 1 where a chunk matches a label not yet counted."""
    counted: set[Label] = set()
    out: list[int] = []
    for hit in results[:depth]:
        fresh = next((lb for lb in labels if lb not in counted and matches(hit, lb)), None)
        if fresh is None:
            out.append(0)
        else:
            counted.add(fresh)
            out.append(1)
    return out


def ndcg(results: Sequence[Hit], labels: Sequence[Label], depth: int = DEPTH) -> float:
    """nDCG at ``depth`` with binary gains, each label counted once."""
    if not labels:
        return 0.0
    dcg = sum(g / math.log2(rank + 1) for rank, g in enumerate(gains(results, labels, depth), 1))
    ideal = sum(1.0 / math.log2(rank + 1) for rank in range(1, min(len(labels), depth) + 1))
    return dcg / ideal


# -- answers ------------------------------------------------------------------


def normalise(text: str) -> str:
    """Case-folded, with every run of whitespace one space."""
    return " ".join(text.casefold().split())


def contains_expected(text: str, answers: Sequence[str]) -> bool:
    """Whether ``text`` contains any expected answer, ignoring case and spacing."""
    have = normalise(text)
    return any(normalise(a) in have for a in answers if a.strip())


def citation_counts(body: Mapping[str, Any], question: Question) -> tuple[int, int]:
    """(valid, invalid) citations of one answer, as the module docstring defines them."""
    by_n = {s.get("n"): s for s in body.get("sources") or [] if isinstance(s, Mapping)}
    valid = invalid = 0
    for n in dict.fromkeys(body.get("citations") or []):
        source = by_n.get(n)
        if source is not None and (
            contains_expected(str(source.get("text") or ""), question.answers)
            or any(matches(source, label) for label in question.relevant)
        ):
            valid += 1
        else:
            invalid += 1
    return valid, invalid + int(body.get("invalid_citations") or 0)


def cost_of(body: Mapping[str, Any]) -> tuple[int, int, int]:
    """(model calls, prompt tokens, completion tokens) of one answer."""
    cost = body.get("cost")
    if isinstance(cost, Mapping):
        return (
            int(cost.get("calls") or 0),
            int(cost.get("prompt_tokens") or 0),
            int(cost.get("completion_tokens") or 0),
        )
    usage = body.get("usage")
    if not isinstance(usage, Mapping):
        usage = {}
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return (1 if prompt or completion else 0), prompt, completion


def precision_recall(
    predicted: Sequence[bool], truth: Sequence[bool]
) -> tuple[float | None, float | None]:
    """Precision and recall of boolean predictions; None where the denominator is 0."""
    tp = sum(p and t for p, t in zip(predicted, truth, strict=True))
    positives = sum(predicted)
    relevant = sum(truth)
    return (tp / positives if positives else None, tp / relevant if relevant else None)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q`` quantile (0..1), interpolating linearly between the closest ranks."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


# -- one question, then a whole run --------------------------------------------


@dataclass(frozen=True)
class RetrievalRow:
    """How one question's retrieval in one mode scored."""

    label_ranks: tuple[int | None, ...]
    first_rank: int | None
    hit: float
    recall: float
    reciprocal_rank: float
    ndcg: float
    #: ``(source, page)`` of the top ``k`` results, to compare runs by eye.
    top: tuple[tuple[str, int | None], ...]


def score_retrieval(question: Question, body: Mapping[str, Any], k: int) -> RetrievalRow:
    """Score a ``/v1/retrieve`` response against the question's labels."""
    results = [r for r in body.get("results") or [] if isinstance(r, Mapping)]
    labels = question.relevant
    ranks = label_ranks(results, labels)
    first = first_match(results, labels)
    return RetrievalRow(
        label_ranks=tuple(ranks),
        first_rank=first,
        hit=hit_at(ranks, k),
        recall=recall_at(ranks, k),
        reciprocal_rank=reciprocal_rank(first),
        ndcg=ndcg(results, labels),
        top=tuple((str(r.get("source")), r.get("page")) for r in results[:k]),
    )


def retrieval_summary(rows: Sequence[RetrievalRow], k: int) -> dict[str, float | None]:
    """The retrieval metrics of one mode, averaged over its scored questions."""
    hit, recall, mrr, ndcg_ = retrieval_metrics(k)
    return {
        hit: mean([r.hit for r in rows]),
        recall: mean([r.recall for r in rows]),
        mrr: mean([r.reciprocal_rank for r in rows]),
        ndcg_: mean([r.ndcg for r in rows]),
        "questions": len(rows),
    }


@dataclass(frozen=True)
class AnswerRow:
    """How one question's answer with one strategy scored."""

    answerable_truth: bool
    answer: str = ""
    abstained: bool = False
    contains: bool = False
    citations: tuple[int, ...] = ()
    valid_citations: int = 0
    invalid_citations: int = 0
    degraded: bool = False
    latency_ms: float = 0.0
    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    #: The service's error message when the call failed; the other fields are then empty.
    error: str | None = None


def score_answer(question: Question, body: Mapping[str, Any], latency_ms: float) -> AnswerRow:
    """Score a ``/v1/query`` response against the question."""
    text = str(body.get("answer") or "")
    valid, invalid = citation_counts(body, question)
    calls, prompt, completion = cost_of(body)
    return AnswerRow(
        answerable_truth=question.answerable,
        answer=text,
        abstained=body.get("answerable") is False,
        contains=question.answerable and contains_expected(text, question.answers),
        citations=tuple(dict.fromkeys(int(n) for n in body.get("citations") or [])),
        valid_citations=valid,
        invalid_citations=invalid,
        degraded=bool(body.get("degraded")),
        latency_ms=latency_ms,
        calls=calls,
        prompt_tokens=prompt,
        completion_tokens=completion,
    )


def answer_summary(rows: Sequence[AnswerRow]) -> dict[str, float | None]:
    """The answer metrics of one strategy, as the module docstring defines them."""
    answerable = [r for r in rows if r.answerable_truth]
    done = [r for r in rows if r.error is None]
    scored = [r for r in answerable if r.error is None]
    valid = sum(r.valid_citations for r in scored)
    judged = valid + sum(r.invalid_citations for r in scored)
    precision, recall = precision_recall(
        [r.abstained for r in done], [not r.answerable_truth for r in done]
    )
    latencies = [r.latency_ms for r in done]
    return {
        "contains": mean([float(r.contains) for r in answerable]),
        "citation_validity": valid / judged if judged else None,
        "cited_share": mean([float(bool(r.citations)) for r in answerable]),
        "abstain_precision": precision,
        "abstain_recall": recall,
        "degraded": sum(r.degraded for r in done),
        "errors": len(rows) - len(done),
        "latency_p50_ms": percentile(latencies, 0.5),
        "latency_p95_ms": percentile(latencies, 0.95),
        "prompt_tokens": mean([float(r.prompt_tokens) for r in done]),
        "completion_tokens": mean([float(r.completion_tokens) for r in done]),
        "calls": mean([float(r.calls) for r in done]),
        "questions": len(rows),
    }
