"""A fallback model answers when the primary cannot, and says that it did.

Two real OpenAI-compatible servers on 127.0.0.1 (fake_openai_server.py): the
primary (``fake_openai``) is made to fail, the fallback answers.  The last
tests run the whole app: ``/v1/query`` answered by the fallback, and
degraded to the sources when both are down.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fake_openai_server import FakeOpenAIServer, Mode
from fastapi.testclient import TestClient
from pydantic import ValidationError

from rag_service.api import create_app
from rag_service.config import IngestSettings, LLMSettings, Settings
from rag_service.embedding import SentenceTransformerEmbedder
from rag_service.errors import ModelBadResponse, ModelError, ModelUnavailable
from rag_service.llm.base import ChatMessage, ChatModel, StreamDelta
from rag_service.llm.factory import create_chat_model
from rag_service.llm.resilient import CircuitBreaker, FallbackChatModel
from tests.helpers import wait_for_job

MESSAGES = [ChatMessage("user", "What is the capital of France?")]
FALLBACK_ANSWER = "The fallback says Paris [1]."

#: ``make(**changes_to_the_primary_settings)``
ModelFactory = Callable[..., ChatModel]


@pytest.fixture
def fallback_openai() -> Iterator[FakeOpenAIServer]:
    """A second fake server, for the fallback model."""
    with FakeOpenAIServer() as server:
        server.answer = FALLBACK_ANSWER
        yield server


def two_models(
    primary: FakeOpenAIServer, fallback: FakeOpenAIServer, **primary_changes: object
) -> LLMSettings:
    """The primary on one server, the fallback on the other, short timeouts, no retries."""
    return LLMSettings(
        backend="openai",
        base_url=primary.base_url,
        model="primary-model",
        timeout_s=1.0,
        connect_timeout_s=0.5,
        max_retries=0,
        fallback=LLMSettings(
            backend="openai",
            base_url=fallback.base_url,
            model="fallback-model",
            context_window=1024,
            timeout_s=1.0,
            connect_timeout_s=0.5,
            max_retries=0,
        ),
    ).model_copy(update=primary_changes)


@pytest.fixture
def model_for(
    fake_openai: FakeOpenAIServer, fallback_openai: FakeOpenAIServer
) -> Iterator[ModelFactory]:
    made: list[ChatModel] = []

    def make(**primary_changes: object) -> ChatModel:
        made.append(create_chat_model(two_models(fake_openai, fallback_openai, **primary_changes)))
        return made[-1]

    yield make
    for model in made:
        model.close()


def ask(model: ChatModel) -> str:
    completion = model.complete(MESSAGES, max_tokens=20)
    return f"{completion.model}: {completion.text}"


def streamed(model: ChatModel) -> tuple[str, set[str | None]]:
    deltas: list[StreamDelta] = list(model.stream(MESSAGES, max_tokens=20))
    assert deltas[-1].finish_reason == "stop"
    return "".join(d.text for d in deltas), {d.model for d in deltas}


def test_the_factory_stacks_breakers_under_the_fallback(model_for: ModelFactory) -> None:
    model = model_for()

    assert isinstance(model, FallbackChatModel)
    assert isinstance(model.primary, CircuitBreaker) and model.primary.name == "primary-model"
    assert isinstance(model.fallback, CircuitBreaker) and model.fallback.name == "fallback-model"
    assert model.context_window == 1024, "prompts must fit the smaller window"
    assert "primary-model" in model.name and "fallback-model" in model.name


def test_the_primary_answers_when_it_can(
    model_for: ModelFactory, fake_openai: FakeOpenAIServer, fallback_openai: FakeOpenAIServer
) -> None:
    assert ask(model_for()) == f"primary-model: {fake_openai.answer}"
    assert fallback_openai.requests == []


@pytest.mark.parametrize("mode", ["down", "slow", "server_error"])
def test_the_fallback_answers_when_the_primary_fails(
    model_for: ModelFactory,
    fake_openai: FakeOpenAIServer,
    fallback_openai: FakeOpenAIServer,
    mode: Mode,
) -> None:
    model = model_for()
    fake_openai.set_mode(mode, delay_s=5.0)

    started = time.monotonic()
    answer = ask(model)

    assert answer == f"fallback-model: {FALLBACK_ANSWER}"
    assert len(fallback_openai.requests) == 1
    assert fallback_openai.requests[0].json["model"] == "fallback-model"
    assert time.monotonic() - started < 3.0, "the primary's timeout (1 s) plus one answer"


def test_a_request_the_primary_refuses_is_not_sent_to_the_fallback(
    model_for: ModelFactory, fake_openai: FakeOpenAIServer, fallback_openai: FakeOpenAIServer
) -> None:
    model = model_for()
    fake_openai.set_mode("bad_request")

    with pytest.raises(ModelBadResponse, match=r"\(400\)"):
        ask(model)

    assert fallback_openai.requests == []


def test_an_open_primary_breaker_sends_calls_straight_to_the_fallback_until_it_recovers(
    model_for: ModelFactory, fake_openai: FakeOpenAIServer, fallback_openai: FakeOpenAIServer
) -> None:
    model = model_for(breaker_failures=2, breaker_reset_s=0.5)
    fake_openai.set_mode("server_error", failures=2)  # then the primary recovers

    assert ask(model).startswith("fallback-model:")
    assert ask(model).startswith("fallback-model:")
    assert len(fake_openai.requests) == 2
    started = time.monotonic()
    for _ in range(5):
        assert ask(model).startswith("fallback-model:")
    elapsed = time.monotonic() - started

    assert len(fake_openai.requests) == 2, "the open breaker keeps calls off the primary"
    assert len(fallback_openai.requests) == 7
    assert elapsed < 2.0, f"five fallback answers took {elapsed:.2f}s"

    time.sleep(0.55)
    assert ask(model) == f"primary-model: {fake_openai.answer}", "half-open trial succeeds"
    assert ask(model).startswith("primary-model:")
    assert len(fake_openai.requests) == 4
    assert len(fallback_openai.requests) == 7


def test_when_both_fail_the_error_names_both_and_comes_within_the_timeouts(
    model_for: ModelFactory, fake_openai: FakeOpenAIServer, fallback_openai: FakeOpenAIServer
) -> None:
    model = model_for()
    fake_openai.set_mode("slow", delay_s=5.0)
    fallback_openai.set_mode("down")

    started = time.monotonic()
    with pytest.raises(ModelUnavailable) as caught:
        ask(model)
    elapsed = time.monotonic() - started

    message = caught.value.message
    assert message.startswith("primary model primary-model failed (model_timeout: ")
    assert "; fallback model fallback-model failed (model_unavailable: " in message
    assert elapsed < 3.0


def test_a_stream_falls_back_when_the_primary_fails_before_the_first_token(
    model_for: ModelFactory, fake_openai: FakeOpenAIServer, fallback_openai: FakeOpenAIServer
) -> None:
    model = model_for()
    fake_openai.set_mode("server_error")

    text, models = streamed(model)

    assert text == FALLBACK_ANSWER
    assert models == {"fallback-model"}
    assert len(fake_openai.requests) == 1 and len(fallback_openai.requests) == 1


def test_a_stream_from_a_healthy_primary_is_marked_as_its(
    model_for: ModelFactory, fake_openai: FakeOpenAIServer, fallback_openai: FakeOpenAIServer
) -> None:
    assert streamed(model_for()) == (fake_openai.answer, {"primary-model"})
    assert fallback_openai.requests == []


def test_a_stream_cut_after_tokens_were_sent_is_raised_not_switched(
    model_for: ModelFactory, fake_openai: FakeOpenAIServer, fallback_openai: FakeOpenAIServer
) -> None:
    model = model_for()
    fake_openai.set_mode("stream_cut")
    pieces: list[str] = []

    with pytest.raises(ModelBadResponse, match="stream cut"):
        for delta in model.stream(MESSAGES, max_tokens=20):
            pieces.append(delta.text)

    assert "".join(pieces) and fake_openai.answer.startswith("".join(pieces))
    assert fallback_openai.requests == []


def test_a_stream_with_both_down_raises_one_error_naming_both(
    model_for: ModelFactory, fake_openai: FakeOpenAIServer, fallback_openai: FakeOpenAIServer
) -> None:
    model = model_for()
    fake_openai.set_mode("down")
    fallback_openai.set_mode("server_error")
    deltas = model.stream(MESSAGES, max_tokens=20)

    with pytest.raises(ModelError) as caught:
        next(deltas)

    assert caught.value.code == "model_unavailable"
    assert "primary model primary-model failed" in caught.value.message
    assert "fallback model fallback-model failed" in caught.value.message


# -- settings -------------------------------------------------------------------


def test_the_fallback_section_reads_from_nested_env_and_its_key_is_masked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("RAG_LLM__API_KEY", "sk-primary")
    monkeypatch.setenv("RAG_LLM__FALLBACK__BACKEND", "openai")
    monkeypatch.setenv("RAG_LLM__FALLBACK__BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("RAG_LLM__FALLBACK__MODEL", "small-model")
    monkeypatch.setenv("RAG_LLM__FALLBACK__API_KEY", "sk-fallback")
    monkeypatch.setenv("RAG_LLM__FALLBACK__BREAKER_RESET_S", "5")

    settings = Settings()

    fallback = settings.llm.fallback
    assert fallback is not None and fallback.backend == "openai"
    assert fallback.model == "small-model" and fallback.breaker_reset_s == 5.0
    assert fallback.api_key is not None
    assert fallback.api_key.get_secret_value() == "sk-fallback"
    shown = str(settings.masked())
    assert "sk-fallback" not in shown and "sk-primary" not in shown
    assert settings.masked()["llm"]["fallback"]["api_key"] == "**********"


def test_no_fallback_by_default_and_a_fallback_must_name_its_backend(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert Settings().llm.fallback is None
    assert Settings().llm.breaker_failures == 5 and Settings().llm.breaker_reset_s == 30.0

    monkeypatch.setenv("RAG_LLM__FALLBACK__BASE_URL", "http://127.0.0.1:9/v1")
    with pytest.raises(ValidationError, match="RAG_LLM__FALLBACK__BACKEND"):
        Settings()


def test_a_fallback_of_the_fallback_is_refused() -> None:
    with pytest.raises(ValidationError, match="one fallback"):
        LLMSettings(fallback=LLMSettings(backend="openai", fallback=LLMSettings(backend="local")))


# -- through the app ------------------------------------------------------------


def app_settings(primary: FakeOpenAIServer, fallback: FakeOpenAIServer, data: Path) -> Settings:
    return Settings(
        data_dir=data,
        ingest=IngestSettings(worker_threads=1, poll_interval_s=0.05),
        llm=two_models(primary, fallback).model_copy(update={"max_retries": 1}),
    )


def test_the_query_api_answers_with_the_fallback_then_degrades_when_both_are_down(
    fake_openai: FakeOpenAIServer,
    fallback_openai: FakeOpenAIServer,
    tmp_path: Path,
    embedder: SentenceTransformerEmbedder,
) -> None:
    fallback_openai.answer = "Pump them to 4 bar [1]."
    settings = app_settings(fake_openai, fallback_openai, tmp_path)
    with TestClient(create_app(settings, embedder=embedder)) as client:
        response = client.post(
            "/v1/collections/docs/documents",
            files=[("files", ("bikes.txt", b"Bicycle tyres should be pumped to 4 bar."))],
        )
        wait_for_job(client, response.json()["job_id"])
        fake_openai.set_mode("down")

        answered = client.post(
            "/v1/query", json={"collection": "docs", "question": "tyre pressure?"}
        )
        fallback_openai.set_mode("down")
        degraded = client.post(
            "/v1/query", json={"collection": "docs", "question": "tyre pressure?"}
        )

    assert answered.status_code == 200
    body = answered.json()
    assert body["degraded"] is False
    assert body["model"] == "fallback-model"
    assert body["answer"] == "Pump them to 4 bar [1]."
    assert body["citations"] == [1]

    assert degraded.status_code == 200
    body = degraded.json()
    assert body["degraded"] is True
    reason = body["degraded_reason"]
    assert reason.startswith("model_unavailable: primary model primary-model failed")
    assert "fallback model fallback-model failed" in reason
    assert body["sources"][0]["source"] == "bikes.txt"
    assert body["timings"]["generate_ms"] < 4000
