"""Prompting strategies and abstaining, through the real app and retrieval.

The scripted model makes each strategy's handling of the replies exact;
the last tests run every strategy on the real local model.
"""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from rag_service.api import create_app
from rag_service.config import Settings
from rag_service.embedding import SentenceTransformerEmbedder
from rag_service.errors import ModelTimeout
from rag_service.llm.base import ChatModel
from rag_service.strategies import parse_verdicts, split_final_answer, vote, vote_key
from tests.helpers import ScriptedChatModel, make_pdf, wait_for_job

PAGES = [
    "The museum opens at nine o'clock on weekdays and at ten on Sundays.",
    "Tickets cost twelve euros for adults and five euros for children.",
    "The cafe on the roof serves lunch until three in the afternoon.",
]
TICKETS = "How much does an adult ticket cost?"


def ingest(client: TestClient) -> None:
    response = client.post(
        "/v1/collections/docs/documents", files=[("files", ("guide.pdf", make_pdf(PAGES)))]
    )
    assert wait_for_job(client, response.json()["job_id"])["status"] == "succeeded"


def ask(client: TestClient, **body: Any) -> dict[str, Any]:
    response = client.post("/v1/query", json={"collection": "docs", "top_k": 3, **body})
    assert response.status_code == 200, response.text
    result: dict[str, Any] = response.json()
    return result


# -- pure parts -------------------------------------------------------------------


def test_split_final_answer_takes_the_last_marker() -> None:
    reasoning, answer = split_final_answer(
        "Reasoning: [2] gives the price.\nFinal answer: Twelve euros [2]."
    )
    assert reasoning == "[2] gives the price."
    assert answer == "Twelve euros [2]."
    assert split_final_answer("a\nFINAL ANSWER - b\nFinal answer: c") == (
        "a\nFINAL ANSWER - b",
        "c",
    )
    assert split_final_answer("Just an answer [1].") == (None, "Just an answer [1].")


def test_vote_groups_answers_that_say_the_same_and_picks_a_medoid() -> None:
    answers = [
        "Adults pay twelve euros [1].",
        "Children pay five euros [2].",
        "An adult ticket costs twelve euros [1].",
        "Adult tickets are twelve euros.",
    ]
    winner, medoid = vote(answers)
    assert sorted(winner) == [0, 2, 3]
    assert medoid in winner
    # Every way of declining is the same vote.
    assert vote_key("The sources do not contain the answer.") == vote_key(
        "The context doesn't mention it."
    )
    winner, _ = vote(
        ["The sources do not contain the answer.", "x y z", "I cannot answer that from them."]
    )
    assert winner == [0, 2]


def test_parse_verdicts_reads_numbered_lines_and_ignores_the_rest() -> None:
    text = "S1: SUPPORTED [2]\nS2: unsupported\n3) Supported\nS9: SUPPORTED\nnoise"
    assert parse_verdicts(text, 3) == {1: (True, 2), 2: (False, None), 3: (True, None)}
    assert parse_verdicts("S1: NOT SUPPORTED", 1) == {1: (False, None)}


# -- through the API, scripted model ---------------------------------------------------


def test_direct_is_the_default_and_reports_its_cost(
    client: TestClient, scripted: ScriptedChatModel
) -> None:
    ingest(client)
    scripted.answer = "Adults pay twelve euros [1]."
    body = ask(client, question=TICKETS)
    assert body["strategy"] == "direct"
    assert body["answerable"] is True and body["abstain_reason"] is None
    assert body["cost"]["calls"] == 1
    assert body["cost"]["prompt_tokens"] == body["usage"]["prompt_tokens"] > 0
    assert body["cost"]["total_tokens"] == body["usage"]["total_tokens"]
    assert body["reasoning"] is None and body["agreement"] is None


def test_cot_returns_only_the_final_answer_and_the_reasoning_apart(
    client: TestClient, scripted: ScriptedChatModel
) -> None:
    ingest(client)
    scripted.answer = (
        "Reasoning: Source [1] lists the prices; adults pay twelve euros.\n"
        "Final answer: An adult ticket costs twelve euros [1]."
    )
    body = ask(client, question=TICKETS, strategy="cot")
    assert body["answer"] == "An adult ticket costs twelve euros [1]."
    assert body["reasoning"] == "Source [1] lists the prices; adults pay twelve euros."
    assert body["citations"] == [1]
    assert body["cost"]["calls"] == 1
    assert "step by step" in scripted.prompts[-1][-1].content
    assert "Final answer:" in scripted.prompts[-1][-1].content


def test_self_consistency_votes_and_unites_the_winners_citations(
    client: TestClient, scripted: ScriptedChatModel, settings: Settings
) -> None:
    ingest(client)
    scripted.queue = [
        "Reasoning: prices.\nFinal answer: Adults pay twelve euros [1].",
        "Reasoning: hmm.\nFinal answer: The cafe serves lunch until three [3].",
        "Reasoning: prices again.\nFinal answer: An adult pays twelve euros [1][2].",
    ]
    body = ask(client, question=TICKETS, strategy="self_consistency", samples=3)
    assert "twelve euros" in body["answer"]
    assert body["agreement"] == pytest.approx(2 / 3, abs=1e-3)
    assert body["citations"] == [1, 2]
    assert body["cost"]["calls"] == 3
    assert scripted.temperatures == [settings.query.sample_temperature] * 3
    assert body["reasoning"] is not None


def test_self_consistency_sample_count_is_checked(client: TestClient) -> None:
    ingest(client)
    for extra in ({"samples": 1}, {"samples": 99}):
        response = client.post(
            "/v1/query",
            json={"collection": "docs", "question": TICKETS, "strategy": "self_consistency"}
            | extra,
        )
        assert response.status_code == 422
        assert "samples" in response.json()["error"]["message"]
    response = client.post(
        "/v1/query", json={"collection": "docs", "question": TICKETS, "samples": 3}
    )
    assert response.status_code == 422
    assert "self_consistency" in response.json()["error"]["message"]
    response = client.post(
        "/v1/query", json={"collection": "docs", "question": TICKETS, "strategy": "magic"}
    )
    assert response.status_code == 422


def test_reflect_removes_sentences_the_check_finds_unsupported(
    client: TestClient, scripted: ScriptedChatModel
) -> None:
    ingest(client)
    scripted.queue = [
        "Adults pay twelve euros. The museum has a dinosaur hall [2].",
        "S1: SUPPORTED [1]\nS2: UNSUPPORTED",
    ]
    body = ask(client, question=TICKETS, strategy="reflect")
    # The verdict's source is added to the supported sentence that cited none.
    assert body["answer"] == "Adults pay twelve euros [1]."
    assert body["citations"] == [1]
    assert body["unsupported"] == ["The museum has a dinosaur hall [2]."]
    assert body["cost"]["calls"] == 2
    check = scripted.prompts[-1][-1].content
    assert "S1: Adults pay twelve euros." in check
    assert "S2: The museum has a dinosaur hall [2]." in check


def test_reflect_without_verdicts_falls_back_to_word_support(
    client: TestClient, scripted: ScriptedChatModel
) -> None:
    ingest(client)
    scripted.queue = [
        "Tickets cost twelve euros for adults [1]. Parking is free for electric cars.",
        "I am not sure what you mean.",
    ]
    body = ask(client, question=TICKETS, strategy="reflect")
    assert body["answer"].startswith("Tickets cost twelve euros for adults")
    assert body["unsupported"] == ["Parking is free for electric cars."]


def test_reflect_that_removes_everything_abstains(
    client: TestClient, scripted: ScriptedChatModel
) -> None:
    ingest(client)
    scripted.queue = ["The museum has a dinosaur hall.", "S1: UNSUPPORTED"]
    body = ask(client, question=TICKETS, strategy="reflect")
    assert body["answerable"] is False
    assert body["abstain_reason"] == "model_declined"
    assert body["citations"] == []


def test_a_failing_later_call_degrades_and_still_reports_the_cost(
    client: TestClient, scripted: ScriptedChatModel
) -> None:
    ingest(client)
    scripted.queue = ["Adults pay twelve euros [1].", ModelTimeout("too slow")]
    body = ask(client, question=TICKETS, strategy="reflect")
    assert body["degraded"] is True
    assert "too slow" in body["degraded_reason"]
    assert body["cost"]["calls"] == 1
    assert len(body["sources"]) == 3


# -- abstaining -----------------------------------------------------------------------------


def test_a_model_that_declines_makes_the_answer_unanswerable(
    client: TestClient, scripted: ScriptedChatModel
) -> None:
    ingest(client)
    scripted.answer = "The provided sources don't mention the ticket price [2]."
    body = ask(client, question=TICKETS)
    assert body["answerable"] is False
    assert body["abstain_reason"] == "model_declined"
    assert body["answer"] == "The sources do not contain the answer."
    assert body["citations"] == []
    assert len(body["sources"]) == 3  # still shown


def test_far_off_questions_abstain_without_asking_the_model(
    client: TestClient, scripted: ScriptedChatModel
) -> None:
    ingest(client)
    body = ask(client, question="Which kernel module drives an NVIDIA graphics card?")
    assert body["answerable"] is False
    assert body["abstain_reason"] == "low_retrieval_score"
    assert "do not contain the answer" in body["answer"]
    assert body["cost"]["calls"] == 0
    assert scripted.prompts == []
    assert body["sources"]  # what was found is still shown


def test_the_abstain_threshold_is_a_setting(
    settings: Settings, embedder: SentenceTransformerEmbedder, scripted: ScriptedChatModel
) -> None:
    off = settings.model_copy(
        update={"query": settings.query.model_copy(update={"abstain_min_score": -1.0})}
    )
    with TestClient(create_app(off, embedder=embedder, chat_model=scripted)) as client:
        ingest(client)
        body = ask(client, question="Which kernel module drives an NVIDIA graphics card?")
    assert body["answerable"] is True
    assert body["cost"]["calls"] == 1


def test_nothing_matching_abstains_with_no_sources(
    client: TestClient, scripted: ScriptedChatModel
) -> None:
    ingest(client)
    body = ask(client, question=TICKETS, filters={"sources": ["other.pdf"]})
    assert body["answerable"] is False
    assert body["abstain_reason"] == "no_sources"
    assert body["sources"] == []


# -- the real local model ----------------------------------------------------------------


@pytest.fixture
def real_client(
    settings: Settings, embedder: SentenceTransformerEmbedder, local_model: ChatModel
) -> Any:
    with TestClient(create_app(settings, embedder=embedder, chat_model=local_model)) as c:
        ingest(c)
        yield c


@pytest.mark.parametrize(
    ("strategy", "calls"),
    [("direct", {1}), ("cot", {1}), ("self_consistency", {2}), ("reflect", {1, 2})],
)
def test_every_strategy_answers_with_the_real_model(
    real_client: TestClient, strategy: str, calls: set[int]
) -> None:
    extra = {"samples": 2} if strategy == "self_consistency" else {}
    body = ask(real_client, question=TICKETS, strategy=strategy, **extra)
    assert body["strategy"] == strategy
    assert body["degraded"] is False, body["degraded_reason"]
    assert body["answer"].strip()
    assert body["cost"]["calls"] in calls
    assert body["cost"]["completion_tokens"] > 0 and body["cost"]["ms"] > 0
    given = {s["n"] for s in body["sources"]}
    assert set(body["citations"]) <= given
    assert ">>>" not in body["answer"] and "<<<" not in body["answer"]
    if strategy in ("cot", "self_consistency"):
        assert "Final answer" not in body["answer"]
    if strategy == "self_consistency":
        assert body["agreement"] in (0.5, 1.0)
