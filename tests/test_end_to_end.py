"""The whole path with every real part: HTTP upload of real PDFs, the worker,
the real embedder, FAISS, SQLite, and the real local language model."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from rag_service.api import create_app
from rag_service.config import Settings
from rag_service.embedding import SentenceTransformerEmbedder
from rag_service.llm.base import ChatModel
from tests.helpers import REAL_PDF, make_pdf, wait_for_job

LIGHTHOUSE = [
    "Chapter one tells the history of the lighthouse on the northern cape.",
    "The keeper refills the lamp oil every evening at dusk, before the first ships pass.",
    "Visitors may climb the tower on Sundays between ten and four.",
]


@pytest.fixture
def real_client(
    settings: Settings, embedder: SentenceTransformerEmbedder, local_model: ChatModel
) -> Iterator[TestClient]:
    with TestClient(create_app(settings, embedder=embedder, chat_model=local_model)) as client:
        yield client


@pytest.mark.slow
def test_upload_real_pdfs_and_get_an_answer_citing_the_right_page(real_client: TestClient) -> None:
    response = real_client.post(
        "/v1/collections/docs/documents",
        files=[
            ("files", ("lighthouse.pdf", make_pdf(LIGHTHOUSE))),
            ("files", (REAL_PDF.name, REAL_PDF.read_bytes())),
        ],
    )
    assert response.status_code == 202
    job = wait_for_job(real_client, response.json()["job_id"], timeout_s=300)
    assert job["status"] == "succeeded", job

    response = real_client.post(
        "/v1/query",
        json={
            "collection": "docs",
            "question": "When does the keeper refill the lamp oil?",
            "top_k": 3,
        },
    )

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["degraded"] is False
    assert body["answer"].strip()
    assert body["usage"]["completion_tokens"] > 0
    cited = [s for s in body["sources"] if s["n"] in body["citations"]]
    assert ("lighthouse.pdf", 2) in [(s["source"], s["page"]) for s in cited], body
    assert body["timings"]["generate_ms"] > 0
    assert real_client.get("/readyz").json()["model"] == "loaded"


@pytest.mark.slow
def test_real_model_answers_about_a_page_of_a_real_pdf(real_client: TestClient) -> None:
    response = real_client.post(
        "/v1/collections/spec/documents", files=[("files", (REAL_PDF.name, REAL_PDF.read_bytes()))]
    )
    wait_for_job(real_client, response.json()["job_id"], timeout_s=300)

    body = real_client.post(
        "/v1/query",
        json={"collection": "spec", "question": "What is the glob element used for?", "top_k": 4},
    ).json()

    assert body["answer"].strip() and not body["degraded"]
    assert all(1 <= s["page"] <= 17 for s in body["sources"])
    assert any("glob" in s["text"].lower() for s in body["sources"])
    assert set(body["citations"]) <= {s["n"] for s in body["sources"]}
