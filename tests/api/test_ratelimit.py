"""Rate limits per client: requests and model tokens a minute, 429 with Retry-After."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from rag_service.api import create_app
from rag_service.api.ratelimit import RateLimiter
from rag_service.config import IngestSettings, LimitsSettings, Settings
from rag_service.embedding import SentenceTransformerEmbedder
from tests.helpers import ScriptedChatModel, wait_for_job


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


# -- the limiter on its own ----------------------------------------------------


def test_a_client_may_burst_its_requests_then_waits_for_the_refill() -> None:
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=3, clock=clock)

    assert [limiter.take_request("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.take_request("a") == pytest.approx(20.0)  # one request every 20 s
    assert limiter.take_request("b") == 0.0  # another client has its own bucket

    clock.now += 5
    assert limiter.take_request("a") == pytest.approx(15.0)  # refused requests cost nothing
    clock.now += 15
    assert limiter.take_request("a") == 0.0
    assert limiter.take_request("a") == pytest.approx(20.0)


def test_tokens_count_over_the_trailing_minute() -> None:
    clock = Clock()
    limiter = RateLimiter(tokens_per_minute=100, clock=clock)

    assert limiter.tokens_wait("a") == 0.0
    limiter.spend_tokens("a", 60)
    assert limiter.tokens_wait("a") == 0.0  # under budget: may ask again
    clock.now += 10
    limiter.spend_tokens("a", 60)  # a query may overshoot; the next one waits
    clock.now += 5
    # 120 used: the first 60 age out 60 s after they were spent, 45 s from now.
    assert limiter.tokens_wait("a") == pytest.approx(45.0)
    assert limiter.tokens_wait("b") == 0.0
    clock.now += 45
    assert limiter.tokens_wait("a") == 0.0
    limiter.spend_tokens("a", 40)  # 60 + 40 = the whole budget: over it
    assert limiter.tokens_wait("a") == pytest.approx(10.0)
    clock.now += 10
    assert limiter.tokens_wait("a") == 0.0  # the 60 aged out; 40 are left in the window
    limiter.spend_tokens("a", 70)
    assert limiter.tokens_wait("a") == pytest.approx(50.0)  # until the 40 age out


def test_a_steady_trickle_ages_out_in_one_second_slots() -> None:
    clock = Clock()
    relaxed = RateLimiter(tokens_per_minute=250, clock=clock)
    strict = RateLimiter(tokens_per_minute=200, clock=clock)

    for _ in range(300):  # one token every 0.25 s for 75 s
        relaxed.spend_tokens("a", 1)
        strict.spend_tokens("a", 1)
        clock.now += 0.25

    # About 240 tokens fall in the trailing minute, not all 300.
    assert relaxed.tokens_wait("a") == 0.0
    # Under 200 again once the oldest ~41 age out: ~10 s, late by at most a slot (1 s).
    assert 10.0 <= strict.tokens_wait("a") <= 11.5


def test_idle_clients_are_dropped_and_memory_is_bounded() -> None:
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=1, tokens_per_minute=10, max_clients=100, clock=clock)

    for n in range(50):
        limiter.take_request(f"10.0.0.{n}")
    limiter.spend_tokens("heavy", 500)
    assert len(limiter) == 51
    clock.now += 61
    limiter.take_request("fresh")
    assert len(limiter) == 1  # a minute idle: bucket full again, no tokens in the window
    assert limiter.take_request("10.0.0.1") == 0.0
    assert limiter.tokens_wait("heavy") == 0.0

    for n in range(1000):
        limiter.take_request(f"flood-{n}")
    assert len(limiter) == 100


def test_the_limiter_is_exact_under_threads() -> None:
    limiter = RateLimiter(requests_per_minute=1000)
    allowed: list[int] = []
    lock = threading.Lock()

    def hammer() -> None:
        count = sum(limiter.take_request("a") == 0.0 for _ in range(500))
        with lock:
            allowed.append(count)

    threads = [threading.Thread(target=hammer) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    # 4000 tries in well under a second: the burst of 1000 plus at most a few refilled.
    assert 1000 <= sum(allowed) <= 1010


def test_zero_means_no_limit() -> None:
    limiter = RateLimiter()
    limiter.spend_tokens("a", 10**9)

    assert all(limiter.take_request("a") == 0.0 for _ in range(10_000))
    assert limiter.tokens_wait("a") == 0.0
    assert len(limiter) == 0


# -- over HTTP -----------------------------------------------------------------


def limited(tmp_path: Path, **limits: int) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        ingest=IngestSettings(worker_threads=1, poll_interval_s=0.05),
        limits=LimitsSettings(**limits),
    )


@pytest.fixture
def app_client(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    embedder: SentenceTransformerEmbedder,
    scripted: ScriptedChatModel,
) -> Iterator[TestClient]:
    limits: dict[str, int] = request.param
    app = create_app(limited(tmp_path, **limits), embedder=embedder, chat_model=scripted)
    with TestClient(app) as client:
        yield client


def assert_rate_limited(response: Any, *, retry_after: range, mentions: str) -> None:
    assert response.status_code == 429, response.text
    assert int(response.headers["retry-after"]) in retry_after
    error = response.json()["error"]
    assert error["code"] == "rate_limited"
    assert mentions in error["message"]


@pytest.mark.parametrize("app_client", [{"requests_per_minute": 3}], indirect=True)
def test_the_request_after_the_limit_gets_429_with_retry_after(app_client: TestClient) -> None:
    for _ in range(3):
        assert app_client.get("/v1/collections").status_code == 200

    refused = app_client.get("/v1/collections/docs")

    assert_rate_limited(refused, retry_after=range(19, 21), mentions="3 requests a minute")
    metrics = app_client.get("/metrics").text
    assert 'rag_rate_limited_total{limit="requests"} 1.0' in metrics
    assert (
        'rag_http_requests_total{method="GET",route="/v1/collections/{collection}",status="429"}'
        in metrics
    )


@pytest.mark.parametrize("app_client", [{"requests_per_minute": 2}], indirect=True)
def test_health_readiness_and_metrics_are_never_limited(app_client: TestClient) -> None:
    for _ in range(10):
        assert app_client.get("/healthz").status_code == 200
        assert app_client.get("/readyz").status_code == 200
        assert app_client.get("/metrics").status_code == 200
    # ...and they did not use up the budget.
    assert app_client.get("/v1/collections").status_code == 200
    assert app_client.get("/v1/collections").status_code == 200
    assert app_client.get("/v1/collections").status_code == 429
    assert app_client.get("/healthz").status_code == 200


@pytest.mark.parametrize("app_client", [{"requests_per_minute": 1}], indirect=True)
def test_each_client_address_has_its_own_budget(app_client: TestClient) -> None:
    other = TestClient(app_client.app, client=("10.1.2.3", 40000))  # same app, another address

    assert app_client.get("/v1/collections").status_code == 200
    assert app_client.get("/v1/collections").status_code == 429
    assert other.get("/v1/collections").status_code == 200
    assert other.get("/v1/collections").status_code == 429


@pytest.mark.parametrize("app_client", [{"tokens_per_minute": 50}], indirect=True)
def test_a_client_over_its_token_budget_waits_for_tokens_to_age_out(
    app_client: TestClient, scripted: ScriptedChatModel
) -> None:
    upload = app_client.post(
        "/v1/collections/docs/documents",
        json={"documents": [{"text": "Tickets cost twelve euros for adults.", "source": "a.txt"}]},
    )
    assert wait_for_job(app_client, upload.json()["job_id"])["status"] == "succeeded"
    question = {"collection": "docs", "question": "How much do tickets cost for adults?"}

    first = app_client.post("/v1/query", json=question)
    assert first.status_code == 200, first.text
    assert first.json()["usage"]["total_tokens"] > 50  # the scripted model counts its prompt
    calls = len(scripted.prompts)

    refused = app_client.post("/v1/query", json=question)

    assert_rate_limited(refused, retry_after=range(59, 61), mentions="50 model tokens a minute")
    assert len(scripted.prompts) == calls  # refused before the model was asked
    # Retrieval spends no model tokens, and other clients have their own budget.
    retrieve = {"collection": "docs", "query": "tickets"}
    assert app_client.post("/v1/retrieve", json=retrieve).status_code == 200
    other = TestClient(app_client.app, client=("10.1.2.3", 40000))
    assert other.post("/v1/query", json=question).status_code == 200
    assert 'rag_rate_limited_total{limit="tokens"} 1.0' in app_client.get("/metrics").text


def test_limits_are_off_by_default(client: TestClient) -> None:
    assert Settings().limits == LimitsSettings(requests_per_minute=0, tokens_per_minute=0)
    assert all(client.get("/v1/collections").status_code == 200 for _ in range(200))
