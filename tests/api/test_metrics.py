"""`GET /metrics`: what a Prometheus scrape shows after specific requests."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from rag_service.api import create_app
from rag_service.config import IngestSettings, Settings
from rag_service.embedding import SentenceTransformerEmbedder
from rag_service.errors import ModelBusy, ModelTimeout
from tests.helpers import ScriptedChatModel, wait_for_job

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

GUIDE = (
    "The museum opens at nine o'clock on weekdays.\n\n"
    "Tickets cost twelve euros for adults and five euros for children.\n\n"
    "The cafe on the roof serves lunch until three in the afternoon."
)
QUESTION = {"collection": "docs", "question": "How much does a ticket cost for adults?"}


def scrape(client: TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def upload(client: TestClient, text: str = GUIDE, collection: str = "docs") -> str:
    response = client.post(
        f"/v1/collections/{collection}/documents",
        json={"documents": [{"text": text, "source": "guide.txt"}]},
    )
    assert response.status_code == 202, response.text
    job_id: str = response.json()["job_id"]
    return job_id


def test_requests_are_counted_by_route_template_method_and_status(client: TestClient) -> None:
    client.get("/v1/collections/first")
    client.get("/v1/collections/second")
    client.get("/v1/jobs/job_123")
    client.get("/v1/collections")
    client.get("/no/such/page/42")

    samples = scrape(client)

    requests = "rag_http_requests_total"
    one = "/v1/collections/{collection}"
    assert value(samples, requests, method="GET", route=one, status="404") == 2
    assert value(samples, requests, method="GET", route="/v1/jobs/{job_id}", status="404") == 1
    assert value(samples, requests, method="GET", route="/v1/collections", status="200") == 1
    assert value(samples, requests, method="GET", route="unmatched", status="404") == 1
    # Raw paths never become labels.
    assert not [key for key in samples if ("route", "/v1/collections/first") in key[1]]

    duration = "rag_http_request_duration_seconds"
    assert value(samples, f"{duration}_count", method="GET", route=one) == 2
    assert value(samples, f"{duration}_bucket", method="GET", route=one, le="+Inf") == 2
    assert (value(samples, f"{duration}_sum", method="GET", route=one) or 0) > 0


def test_jobs_documents_and_chunks_are_read_from_the_catalog_at_scrape_time(
    client: TestClient,
) -> None:
    assert wait_for_job(client, upload(client))["status"] == "succeeded"
    chunks = client.get("/v1/collections/docs").json()["chunk_count"]
    assert chunks > 0

    samples = scrape(client)

    assert value(samples, "rag_ingest_jobs", state="succeeded") == 1
    assert value(samples, "rag_ingest_jobs", state="queued") == 0
    assert value(samples, "rag_ingest_jobs", state="running") == 0
    assert value(samples, "rag_ingest_jobs", state="failed") == 0
    assert value(samples, "rag_ingest_queue_depth") == 0
    assert value(samples, "rag_collection_chunks", collection="docs") == chunks
    assert value(samples, "rag_collection_documents", collection="docs") == 1

    client.delete("/v1/collections/docs")
    assert value(scrape(client), "rag_collection_chunks", collection="docs") is None


def test_queue_depth_counts_jobs_waiting_for_a_worker(
    tmp_path: Path, embedder: SentenceTransformerEmbedder, scripted: ScriptedChatModel
) -> None:
    settings = Settings(data_dir=tmp_path / "data", ingest=IngestSettings(worker_threads=0))
    with TestClient(create_app(settings, embedder=embedder, chat_model=scripted)) as client:
        upload(client, "First text.")
        upload(client, "Second text.")

        samples = scrape(client)

    assert value(samples, "rag_ingest_jobs", state="queued") == 2
    assert value(samples, "rag_ingest_queue_depth") == 2


def test_model_tokens_and_errors_by_code(client: TestClient, scripted: ScriptedChatModel) -> None:
    wait_for_job(client, upload(client))
    before = scrape(client)
    assert value(before, "rag_model_tokens_total", kind="prompt") == 0
    assert value(before, "rag_model_tokens_total", kind="completion") == 0

    answered = client.post("/v1/query", json=QUESTION).json()
    usage = answered["usage"]
    assert usage["prompt_tokens"] > 0 and usage["completion_tokens"] > 0

    scripted.error = ModelTimeout("the model took too long")
    degraded = client.post("/v1/query", json=QUESTION).json()
    assert degraded["degraded"] is True

    scripted.error = ModelBusy("the model's queue is full", retry_after=3)
    assert client.post("/v1/query", json=QUESTION).status_code == 503

    samples = scrape(client)
    assert value(samples, "rag_model_tokens_total", kind="prompt") == usage["prompt_tokens"]
    completion = value(samples, "rag_model_tokens_total", kind="completion")
    assert completion == usage["completion_tokens"]
    assert value(samples, "rag_model_errors_total", code="model_timeout") == 1
    assert value(samples, "rag_model_errors_total", code="model_busy") == 1
    query = {"method": "POST", "route": "/v1/query"}
    assert value(samples, "rag_http_requests_total", status="200", **query) == 2
    assert value(samples, "rag_http_requests_total", status="503", **query) == 1


def test_each_app_has_its_own_registry(
    tmp_path: Path, embedder: SentenceTransformerEmbedder, scripted: ScriptedChatModel
) -> None:
    first = create_app(Settings(data_dir=tmp_path / "one"), embedder=embedder, chat_model=scripted)
    second = create_app(Settings(data_dir=tmp_path / "two"), embedder=embedder, chat_model=scripted)
    with TestClient(first) as one, TestClient(second) as two:
        one.get("/v1/collections")
        one.get("/v1/collections")
        two.get("/v1/collections")

        listed = {"method": "GET", "route": "/v1/collections", "status": "200"}
        assert value(scrape(one), "rag_http_requests_total", **listed) == 2
        assert value(scrape(two), "rag_http_requests_total", **listed) == 1


def test_metrics_answer_before_the_service_has_started(
    settings: Settings, embedder: SentenceTransformerEmbedder
) -> None:
    client = TestClient(create_app(settings, embedder=embedder))  # no lifespan: nothing opened

    samples = scrape(client)

    assert value(samples, "rag_ingest_queue_depth") is None
    assert value(samples, "rag_model_tokens_total", kind="prompt") == 0


def test_openmetrics_when_the_scraper_asks_for_it(client: TestClient) -> None:
    response = client.get("/metrics", headers={"accept": "application/openmetrics-text"})

    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")
