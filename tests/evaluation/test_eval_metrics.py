"""The metrics on hand-made rankings and answers whose values are worked out by hand."""

from __future__ import annotations

import math

import pytest

from rag_service.evaluation.dataset import Label, Question
from rag_service.evaluation.metrics import (
    AnswerRow,
    answer_summary,
    citation_counts,
    contains_expected,
    cost_of,
    first_match,
    gains,
    hit_at,
    label_ranks,
    matches,
    ndcg,
    percentile,
    precision_recall,
    recall_at,
    reciprocal_rank,
    retrieval_summary,
    score_answer,
    score_retrieval,
)
from tests.evaluation.evalkit import answer, hit


def q(
    answers: tuple[str, ...] = ("Marta Quill",),
    relevant: tuple[Label, ...] = (Label("a.md"),),
    kind: str = "fact",
) -> Question:
    return Question(id="q", question="?", answers=answers, relevant=relevant, kind=kind)  # type: ignore[arg-type]


# -- matching -----------------------------------------------------------------


def test_a_chunk_matches_by_base_name_and_page_when_the_label_has_one() -> None:
    assert matches(hit("a.md"), Label("a.md"))
    assert matches(hit("uploads/sub/a.md"), Label("a.md"))
    assert matches(hit("C:\\docs\\a.md"), Label("a.md"))
    assert not matches(hit("b.md"), Label("a.md"))
    assert matches(hit("g.pdf", page=2), Label("g.pdf"))
    assert matches(hit("g.pdf", page=2), Label("g.pdf", page=2))
    assert not matches(hit("g.pdf", page=3), Label("g.pdf", page=2))
    assert not matches(hit("g.pdf", page=None), Label("g.pdf", page=2))
    assert not matches({"page": 1}, Label("g.pdf"))


# -- retrieval ----------------------------------------------------------------

A, B, C = Label("a.md"), Label("b.pdf", page=2), Label("c.txt")
#: Ranks 1..7: a miss, a (A), a again, b p2 (B), b p1 (miss), c (C), miss.
RANKING = [
    hit("x.md"),
    hit("a.md"),
    hit("a.md"),
    hit("b.pdf", page=2),
    hit("b.pdf", page=1),
    hit("c.txt"),
    hit("y.md"),
]


def test_ranks_hit_recall_and_mrr_of_a_hand_made_ranking() -> None:
    ranks = label_ranks(RANKING, [A, B, C])
    assert ranks == [2, 4, 6]
    assert first_match(RANKING, [A, B, C]) == 2
    assert hit_at(ranks, 1) == 0.0
    assert hit_at(ranks, 2) == 1.0
    assert recall_at(ranks, 1) == 0.0
    assert recall_at(ranks, 5) == pytest.approx(2 / 3)
    assert recall_at(ranks, 6) == 1.0
    assert reciprocal_rank(2) == 0.5
    assert reciprocal_rank(None) == 0.0
    assert reciprocal_rank(11) == 0.0  # beyond the depth of 10


def test_ndcg_counts_each_label_once_against_the_ideal_of_one_gain_per_label() -> None:
    assert gains(RANKING, [A, B, C]) == [0, 1, 0, 1, 0, 1, 0]
    # DCG = 1/log2(3) + 1/log2(5) + 1/log2(7) = 0.63093 + 0.43068 + 0.35621 = 1.41782
    # IDCG = 1/log2(2) + 1/log2(3) + 1/log2(4) = 1 + 0.63093 + 0.5 = 2.13093
    assert ndcg(RANKING, [A, B, C]) == pytest.approx(1.41782 / 2.13093, abs=1e-5)
    assert ndcg([hit("a.md")], [A]) == 1.0
    assert ndcg([hit("x.md"), hit("a.md")], [A]) == pytest.approx(1 / math.log2(3))
    assert ndcg([hit("x.md")] * 10 + [hit("a.md")], [A]) == 0.0  # rank 11 is past the depth
    assert ndcg([], [A]) == 0.0


def test_ndcg_ideal_is_capped_at_ten_labels() -> None:
    labels = [Label(f"d{i}.md") for i in range(12)]
    perfect = [hit(f"d{i}.md") for i in range(10)]
    assert ndcg(perfect, labels) == pytest.approx(1.0)


def test_a_chunk_matching_two_labels_counts_only_the_first_uncounted_one() -> None:
    whole, page = Label("g.pdf"), Label("g.pdf", page=2)
    ranking = [hit("g.pdf", page=2), hit("g.pdf", page=1)]
    assert gains(ranking, [whole, page]) == [1, 0]
    assert ndcg(ranking, [whole, page]) == pytest.approx(1 / (1 + 1 / math.log2(3)))
    # the other order of labels lets the second chunk count the whole file
    assert gains(ranking, [page, whole]) == [1, 1]


def test_score_retrieval_and_the_summary_over_questions() -> None:
    question = q(relevant=(A, B, C))
    row = score_retrieval(question, {"results": RANKING}, k=5)
    assert (row.hit, row.reciprocal_rank) == (1.0, 0.5)
    assert row.recall == pytest.approx(2 / 3)
    assert row.label_ranks == (2, 4, 6)
    assert row.top[3] == ("b.pdf", 2)
    assert len(row.top) == 5

    miss = score_retrieval(q(), {"results": [hit("z.md")]}, k=5)
    summary = retrieval_summary([row, miss], k=5)
    assert summary["hit@5"] == 0.5
    assert summary["recall@5"] == pytest.approx(1 / 3)
    assert summary["mrr"] == 0.25
    assert summary["ndcg@10"] == pytest.approx(1.41782 / 2.13093 / 2, abs=1e-5)
    assert summary["questions"] == 2
    assert retrieval_summary([], k=5)["hit@5"] is None


# -- answers ------------------------------------------------------------------


def test_contains_ignores_case_and_spacing() -> None:
    assert contains_expected("It is kept by  MARTA\n quill.", ["Marta Quill"])
    assert contains_expected("nine", ["seven", "Nine"])
    assert not contains_expected("Marta", ["Marta Quill"])
    assert not contains_expected("anything", [])


def test_citations_are_valid_when_given_and_supporting_the_answer() -> None:
    question = q(relevant=(Label("a.md"),))
    sources = [
        hit("a.md", text="unrelated words", n=1),  # matches the label
        hit("b.md", text="Kept by marta  QUILL since 1990.", n=2),  # holds the answer
        hit("c.md", text="nothing useful", n=3),  # neither
    ]
    body = answer("x", sources=sources, citations=[1, 2, 3, 2, 7], invalid=2)
    # 1 and 2 valid; 3 and 7 (never given) invalid, plus the 2 the service removed
    assert citation_counts(body, question) == (2, 4)


def test_cost_prefers_cost_and_falls_back_to_usage() -> None:
    with_cost = answer(
        "x",
        cost={"calls": 5, "prompt_tokens": 900, "completion_tokens": 80, "total_tokens": 980},
    )
    assert cost_of(with_cost) == (5, 900, 80)
    assert cost_of(answer("x", usage=(120, 30))) == (1, 120, 30)
    assert cost_of(answer("x", usage=(0, 0))) == (0, 0, 0)
    assert cost_of({"answer": "old shape"}) == (0, 0, 0)


def test_precision_recall_and_percentiles() -> None:
    assert precision_recall([True, True, False, False], [True, False, True, False]) == (0.5, 0.5)
    assert precision_recall([False, False], [True, False]) == (None, 0.0)
    assert precision_recall([True], [False]) == (0.0, None)
    assert percentile([], 0.5) is None
    assert percentile([7.0], 0.95) == 7.0
    assert percentile([40.0, 10.0, 30.0, 20.0], 0.5) == 25.0
    # p95 of 1..20: position 0.95 * 19 = 18.05 -> 19 + 0.05 * (20 - 19)
    assert percentile([float(i) for i in range(1, 21)], 0.95) == pytest.approx(19.05)


def test_answer_summary_worked_by_hand() -> None:
    fact = q(answers=("Marta Quill",), relevant=(Label("a.md"),))
    none = q(answers=(), relevant=(), kind="unanswerable")
    good_source = hit("a.md", text="Marta Quill keeps it.", n=1)
    rows = [
        # answerable, right, one valid citation, 2 calls via cost
        score_answer(
            fact,
            answer(
                "Marta Quill [1].",
                sources=[good_source],
                citations=[1],
                cost={"calls": 2, "prompt_tokens": 300, "completion_tokens": 20},
            ),
            100.0,
        ),
        # answerable, wrong, cites a source that supports nothing, plus one removed citation
        score_answer(
            fact,
            answer("John [2].", sources=[good_source, hit("z.md", n=2)], citations=[2], invalid=1),
            200.0,
        ),
        # answerable but abstained (a false abstention), no citations
        score_answer(fact, answer("Not in the sources.", answerable=False, usage=(0, 0)), 300.0),
        # unanswerable, abstained (a true abstention)
        score_answer(none, answer("Not in the sources.", answerable=False, usage=(0, 0)), 400.0),
        # unanswerable, answered anyway, degraded
        score_answer(none, answer("Maybe 3 km.", degraded=True, usage=(0, 0)), 500.0),
        # answerable, the call failed
        AnswerRow(answerable_truth=True, error="model_busy: queue full"),
    ]
    s = answer_summary(rows)
    assert s["contains"] == 0.25  # 1 of 4 answerable (the failed one counts as 0)
    assert s["citation_validity"] == pytest.approx(1 / 3)  # 1 valid of 1 + 1 + 1 removed
    assert s["cited_share"] == 0.5  # 2 of 4 answerable cite something
    assert s["abstain_precision"] == 0.5  # 2 abstentions, 1 right
    assert s["abstain_recall"] == 0.5  # 2 unanswerable, 1 abstained
    assert s["degraded"] == 1
    assert s["errors"] == 1
    assert s["latency_p50_ms"] == 300.0  # of the 5 that finished
    assert s["latency_p95_ms"] == pytest.approx(480.0)
    assert s["calls"] == pytest.approx((2 + 1 + 0 + 0 + 0) / 5)
    assert s["prompt_tokens"] == pytest.approx((300 + 100) / 5)
    assert s["completion_tokens"] == pytest.approx((20 + 10) / 5)
    assert s["questions"] == 6


def test_answers_of_services_without_the_abstention_fields_count_as_answered() -> None:
    old = {"answer": "Marta Quill", "sources": [], "citations": [], "invalid_citations": 0}
    row = score_answer(q(), old, 12.0)
    assert (row.abstained, row.contains, row.calls) == (False, True, 0)
