"""The service configured for an OpenAI-compatible server, end to end over HTTP.

The model server is a real HTTP server on 127.0.0.1 (fake_openai_server.py).
"""

from __future__ import annotations

from pathlib import Path

from fake_openai_server import FakeOpenAIServer
from fastapi.testclient import TestClient

from rag_service.api import create_app
from rag_service.config import IngestSettings, LLMSettings, Settings
from rag_service.embedding import SentenceTransformerEmbedder
from tests.helpers import wait_for_job


def settings_for(server: FakeOpenAIServer, data: Path) -> Settings:
    return Settings(
        data_dir=data,
        ingest=IngestSettings(worker_threads=1, poll_interval_s=0.05),
        llm=LLMSettings(
            backend="openai",
            base_url=server.base_url,
            model="served-model",
            api_key="sk-test",
            timeout_s=2.0,
            connect_timeout_s=0.5,
            max_retries=1,
        ),
    )


def ingest(client: TestClient) -> None:
    response = client.post(
        "/v1/collections/docs/documents",
        files=[("files", ("bikes.txt", b"Bicycle tyres should be pumped to 4 bar."))],
    )
    wait_for_job(client, response.json()["job_id"])


def test_query_through_an_openai_compatible_server(
    fake_openai: FakeOpenAIServer, tmp_path: Path, embedder: SentenceTransformerEmbedder
) -> None:
    fake_openai.answer = "Pump them to 4 bar [1]."
    with TestClient(create_app(settings_for(fake_openai, tmp_path), embedder=embedder)) as client:
        ingest(client)
        body = client.post(
            "/v1/query", json={"collection": "docs", "question": "tyre pressure?"}
        ).json()

    assert body["answer"] == "Pump them to 4 bar [1]."
    assert body["citations"] == [1] and body["citation_mode"] == "model"
    sent = fake_openai.requests[-1]
    assert sent.headers["authorization"] == "Bearer sk-test"
    assert sent.json["model"] == "served-model"
    assert "4 bar" in sent.json["messages"][-1]["content"]


def test_a_model_server_that_is_down_degrades_to_sources(
    fake_openai: FakeOpenAIServer, tmp_path: Path, embedder: SentenceTransformerEmbedder
) -> None:
    with TestClient(create_app(settings_for(fake_openai, tmp_path), embedder=embedder)) as client:
        ingest(client)
        fake_openai.set_mode("down")
        response = client.post("/v1/query", json={"collection": "docs", "question": "tyres?"})

    assert response.status_code == 200
    body = response.json()
    assert body["degraded"] is True
    assert body["degraded_reason"].startswith("model_unavailable")
    assert body["sources"][0]["source"] == "bikes.txt"


def test_a_slow_model_server_degrades_within_the_timeout(
    fake_openai: FakeOpenAIServer, tmp_path: Path, embedder: SentenceTransformerEmbedder
) -> None:
    with TestClient(create_app(settings_for(fake_openai, tmp_path), embedder=embedder)) as client:
        ingest(client)
        fake_openai.set_mode("slow", delay_s=10)
        response = client.post("/v1/query", json={"collection": "docs", "question": "tyres?"})

    body = response.json()
    assert body["degraded"] is True and "timeout" in body["degraded_reason"]
    assert body["timings"]["generate_ms"] < 4000
