"""Asking questions over HTTP: the prompt, citations, degradation, health, restarts.

The model here is a scripted fake so the parts around it can be checked
exactly; tests/test_end_to_end.py runs the same path with the real model.
"""

from __future__ import annotations

from fastapi.testclient import TestClient

from rag_service.api import create_app
from rag_service.config import Settings
from rag_service.embedding import SentenceTransformerEmbedder
from rag_service.errors import ModelBusy, ModelTimeout
from tests.helpers import ScriptedChatModel, make_pdf, wait_for_job

PAGES = [
    "The museum opens at nine o'clock on weekdays.",
    "Tickets cost twelve euros for adults and five euros for children.",
    "The cafe on the roof serves lunch until three in the afternoon.",
]


def ingest(client: TestClient) -> None:
    response = client.post(
        "/v1/collections/docs/documents", files=[("files", ("guide.pdf", make_pdf(PAGES)))]
    )
    assert wait_for_job(client, response.json()["job_id"])["status"] == "succeeded"


def test_query_returns_answer_sources_citations_usage_and_timings(
    client: TestClient, scripted: ScriptedChatModel
) -> None:
    ingest(client)
    scripted.answer = "Adults pay twelve euros [1]."

    response = client.post(
        "/v1/query",
        json={"collection": "docs", "question": "How much is a ticket for an adult?", "top_k": 3},
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["answer"] == "Adults pay twelve euros [1]."
    assert body["citations"] == [1]
    assert body["invalid_citations"] == 0
    assert [s["n"] for s in body["sources"]] == [1, 2, 3]
    first = body["sources"][0]
    assert first["page"] == 2 and first["source"] == "guide.pdf"
    assert first["document_id"].startswith("doc_")
    assert "twelve euros" in first["text"]
    assert body["usage"]["prompt_tokens"] > 0
    assert body["usage"]["total_tokens"] == (
        body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )
    assert set(body["timings"]) >= {"embed_ms", "search_ms", "generate_ms", "total_ms"}
    assert body["degraded"] is False


def test_prompt_numbers_the_sources_and_states_the_rules(
    client: TestClient, scripted: ScriptedChatModel
) -> None:
    ingest(client)
    client.post("/v1/query", json={"collection": "docs", "question": "When does it open?"})

    system, user = scripted.prompts[-1]
    assert system.role == "system"
    assert "[1]" in system.content and "only" in system.content
    assert "do not contain the answer" in system.content
    assert user.content.count("(guide.pdf, page ") == 3
    assert "[1] (guide.pdf, page 1)" in user.content
    assert "Question: When does it open?" in user.content


def test_citations_to_sources_never_given_are_dropped_and_counted(
    client: TestClient, scripted: ScriptedChatModel
) -> None:
    ingest(client)
    scripted.answer = "It opens at nine [1][9]. Lunch until three [3, 7]."

    body = client.post(
        "/v1/query",
        json={"collection": "docs", "question": "When does it open and when is lunch?", "top_k": 3},
    ).json()

    assert body["citations"] == [1, 3]
    assert body["invalid_citations"] == 2
    assert "[9]" not in body["answer"] and "7" not in body["answer"]
    assert "[1]" in body["answer"] and "[3]" in body["answer"]


def test_model_failure_degrades_to_the_sources(
    client: TestClient, scripted: ScriptedChatModel
) -> None:
    ingest(client)
    scripted.error = ModelTimeout("the model did not answer within 60 s")

    response = client.post(
        "/v1/query", json={"collection": "docs", "question": "What does a ticket cost?"}
    )

    assert response.status_code == 200
    body = response.json()
    assert body["degraded"] is True
    assert "model_timeout" in body["degraded_reason"]
    assert body["sources"] and body["citations"] == []


def test_busy_model_is_503_with_retry_after(
    client: TestClient, scripted: ScriptedChatModel
) -> None:
    ingest(client)
    scripted.error = ModelBusy("the local model is busy; retry shortly", retry_after=7)

    response = client.post(
        "/v1/query", json={"collection": "docs", "question": "What does a ticket cost?"}
    )

    assert response.status_code == 503
    assert response.headers["retry-after"] == "7"
    assert response.json()["error"]["code"] == "model_busy"


def test_empty_collection_answers_without_calling_the_model(
    client: TestClient, scripted: ScriptedChatModel
) -> None:
    response = client.post(
        "/v1/collections/docs/documents", files=[("files", ("x.txt", b"hello there"))]
    )
    doc_id = response.json()["documents"][0]["id"]
    wait_for_job(client, response.json()["job_id"])
    client.delete(f"/v1/collections/docs/documents/{doc_id}")

    body = client.post("/v1/query", json={"collection": "docs", "question": "hello?"}).json()

    assert body["sources"] == []
    assert "no indexed documents" in body["answer"]
    assert scripted.prompts == []


def test_health_and_readiness(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert body["model"] == "loaded" and body["index"] == "open"
    assert body["embedder"] == "all-MiniLM-L6-v2"
    assert body["workers"] == 1


def test_everything_survives_a_restart(
    settings: Settings, embedder: SentenceTransformerEmbedder
) -> None:
    question = {"collection": "docs", "question": "What does lunch cost?", "top_k": 3}
    with TestClient(create_app(settings, embedder=embedder, chat_model=ScriptedChatModel())) as c:
        ingest(c)
        jobs_before = c.get("/v1/collections/docs/documents").json()
        first = c.post("/v1/query", json=question).json()
        job_id = c.post(
            "/v1/collections/docs/documents", files=[("files", ("b.txt", b"A second file."))]
        ).json()["job_id"]
        wait_for_job(c, job_id)
    assert (settings.data_dir / "docs" / "vectors.faiss").is_file()

    with TestClient(create_app(settings, embedder=embedder, chat_model=ScriptedChatModel())) as c:
        docs_after = c.get("/v1/collections/docs/documents").json()
        assert docs_after["total"] == jobs_before["total"] + 1
        assert c.get(f"/v1/jobs/{job_id}").json()["status"] == "succeeded"
        again = c.post("/v1/query", json=question).json()
        assert again["answer"] == first["answer"]
        assert [(s["chunk_id"], s["score"]) for s in again["sources"]] == [
            (s["chunk_id"], s["score"]) for s in first["sources"]
        ]
