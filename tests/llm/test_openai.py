"""The openai backend against a real tiny OpenAI-compatible server."""

from __future__ import annotations

import email.utils
import logging
import time
from collections.abc import Callable, Iterator

import pytest
from fake_openai_server import DEFAULT_ANSWER, FakeOpenAIServer
from pydantic import SecretStr

from rag_service.config import LLMSettings
from rag_service.errors import (
    ModelBadResponse,
    ModelRateLimited,
    ModelTimeout,
    ModelUnavailable,
)
from rag_service.llm.base import ChatMessage
from rag_service.llm.openai import OpenAIChatModel

MESSAGES = [
    ChatMessage("system", "Answer from the sources."),
    ChatMessage("user", "What is the capital of France?"),
]

#: Scheduling noise allowed on top of a deadline.
SLACK_S = 0.75

MakeModel = Callable[..., OpenAIChatModel]


@pytest.fixture
def make_model(openai_settings: LLMSettings) -> Iterator[MakeModel]:
    """Build models on ``openai_settings`` with overrides; all closed after the test."""
    made: list[OpenAIChatModel] = []

    def make(backoff_base_s: float = 0.05, **overrides: object) -> OpenAIChatModel:
        settings = openai_settings.model_copy(update=overrides)
        model = OpenAIChatModel(settings, backoff_base_s=backoff_base_s)
        made.append(model)
        return model

    yield make
    for model in made:
        model.close()


def retries_logged(caplog: pytest.LogCaptureFixture) -> int:
    return sum(1 for r in caplog.records if r.getMessage().startswith("llm retry "))


# -- happy path ----------------------------------------------------------------


def test_complete_returns_answer_usage_and_sends_the_request(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    model = make_model(api_key=SecretStr("sk-test"))
    completion = model.complete(MESSAGES, max_tokens=50, temperature=0.3, stop=["\n\n"])

    assert completion.text == DEFAULT_ANSWER
    assert completion.finish_reason == "stop"
    assert completion.model == "fake-model"
    assert completion.usage.prompt_tokens == 10  # words in MESSAGES
    assert completion.usage.completion_tokens == len(DEFAULT_ANSWER.split())
    [request] = fake_openai.requests
    assert request.path == "/v1/chat/completions"
    assert request.headers["authorization"] == "Bearer sk-test"
    body = request.json
    assert body["model"] == "fake-model"
    assert body["messages"] == [{"role": m.role, "content": m.content} for m in MESSAGES]
    assert body["max_tokens"] == 50
    assert body["temperature"] == 0.3
    assert body["stop"] == ["\n\n"]
    assert body["stream"] is False


def test_no_authorization_header_without_api_key(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    make_model().complete(MESSAGES, max_tokens=10)
    assert "authorization" not in fake_openai.requests[0].headers


def test_max_tokens_cut_reports_length(make_model: MakeModel) -> None:
    completion = make_model().complete(MESSAGES, max_tokens=2)
    assert completion.text == "Paris is"
    assert completion.finish_reason == "length"


def test_stream_yields_pieces_then_usage(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    deltas = list(make_model().stream(MESSAGES, max_tokens=50))

    assert "".join(d.text for d in deltas) == DEFAULT_ANSWER
    assert len([d for d in deltas if d.text]) == len(DEFAULT_ANSWER.split())
    last = deltas[-1]
    assert last.finish_reason == "stop"
    assert last.usage is not None
    assert last.usage.completion_tokens == len(DEFAULT_ANSWER.split())
    body = fake_openai.requests[0].json
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}


def test_stream_sends_nothing_until_iterated(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    stream = make_model().stream(MESSAGES, max_tokens=5)
    assert fake_openai.requests == []
    assert next(iter(stream)).text
    assert len(fake_openai.requests) == 1


def test_stream_closed_early_then_model_still_works(make_model: MakeModel) -> None:
    model = make_model()
    stream = model.stream(MESSAGES, max_tokens=50)
    first = next(stream)
    stream.close()  # type: ignore[attr-defined]
    assert first.text == "Paris"
    assert model.complete(MESSAGES, max_tokens=50).text == DEFAULT_ANSWER


def test_closed_model_raises_unavailable(make_model: MakeModel) -> None:
    model = make_model()
    model.close()
    with pytest.raises(ModelUnavailable, match="closed"):
        model.complete(MESSAGES, max_tokens=5)


# -- server down, slow -----------------------------------------------------------


def test_down_server_is_unavailable_after_retries(
    fake_openai: FakeOpenAIServer, make_model: MakeModel, caplog: pytest.LogCaptureFixture
) -> None:
    model = make_model(max_retries=2, timeout_s=3.0)
    fake_openai.set_mode("down")
    caplog.set_level(logging.WARNING, logger="rag_service.llm.openai")

    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match="unreachable"):
        model.complete(MESSAGES, max_tokens=5)
    assert time.monotonic() - started < 3.0 + SLACK_S
    assert retries_logged(caplog) == 2


def test_down_server_fails_stream_too(fake_openai: FakeOpenAIServer, make_model: MakeModel) -> None:
    fake_openai.set_mode("down")
    with pytest.raises(ModelUnavailable):
        list(make_model(max_retries=0).stream(MESSAGES, max_tokens=5))


@pytest.mark.parametrize("stream", [False, True], ids=["complete", "stream"])
def test_slow_server_times_out_within_the_deadline(
    fake_openai: FakeOpenAIServer, make_model: MakeModel, stream: bool
) -> None:
    model = make_model(timeout_s=1.0, max_retries=2)
    fake_openai.set_mode("slow", delay_s=10.0)

    started = time.monotonic()
    with pytest.raises(ModelTimeout):
        if stream:
            list(model.stream(MESSAGES, max_tokens=5))
        else:
            model.complete(MESSAGES, max_tokens=5)
    elapsed = time.monotonic() - started
    assert 1.0 <= elapsed < 1.0 + SLACK_S
    assert len(fake_openai.requests) == 1


def test_slow_but_within_timeout_succeeds(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    fake_openai.set_mode("slow", delay_s=0.3)
    assert make_model(timeout_s=3.0).complete(MESSAGES, max_tokens=50).text == DEFAULT_ANSWER


# -- 429 ---------------------------------------------------------------------------


def test_rate_limited_once_waits_retry_after_then_answers(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    fake_openai.set_mode("rate_limited", failures=1, retry_after="1")
    completion = make_model(timeout_s=5.0).complete(MESSAGES, max_tokens=50)

    assert completion.text == DEFAULT_ANSWER
    first, second = fake_openai.requests
    assert second.received_at - first.received_at >= 1.0


def test_retry_after_as_http_date_is_honoured(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    when = email.utils.formatdate(time.time() + 2, usegmt=True)
    fake_openai.set_mode("rate_limited", failures=1, retry_after=when)
    make_model(timeout_s=5.0).complete(MESSAGES, max_tokens=50)

    first, second = fake_openai.requests
    # HTTP dates have one-second resolution: at least one second is left.
    assert second.received_at - first.received_at >= 0.9


def test_rate_limited_always_raises_after_retries(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    fake_openai.set_mode("rate_limited", retry_after="1")
    model = make_model(timeout_s=5.0, max_retries=2)

    started = time.monotonic()
    with pytest.raises(ModelRateLimited) as caught:
        model.complete(MESSAGES, max_tokens=5)
    elapsed = time.monotonic() - started
    assert caught.value.retry_after == 1.0
    assert "Rate limit reached" in caught.value.message
    assert len(fake_openai.requests) == 3
    assert 2.0 <= elapsed < 5.0


def test_retry_after_past_the_deadline_fails_at_once(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    fake_openai.set_mode("rate_limited", retry_after="30")
    model = make_model(timeout_s=3.0, max_retries=5)

    started = time.monotonic()
    with pytest.raises(ModelRateLimited) as caught:
        model.complete(MESSAGES, max_tokens=5)
    assert time.monotonic() - started < SLACK_S
    assert caught.value.retry_after == 30.0
    assert len(fake_openai.requests) == 1


# -- 5xx ---------------------------------------------------------------------------


def test_server_error_once_is_retried(
    fake_openai: FakeOpenAIServer, make_model: MakeModel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="rag_service.llm.openai")
    fake_openai.set_mode("server_error", failures=1)
    assert make_model().complete(MESSAGES, max_tokens=50).text == DEFAULT_ANSWER
    assert len(fake_openai.requests) == 2
    assert retries_logged(caplog) == 1


def test_server_error_once_is_retried_for_streams(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    fake_openai.set_mode("server_error", failures=1)
    deltas = list(make_model().stream(MESSAGES, max_tokens=50))
    assert "".join(d.text for d in deltas) == DEFAULT_ANSWER
    assert len(fake_openai.requests) == 2


def test_server_error_always_is_unavailable_after_retries(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    fake_openai.set_mode("server_error")
    with pytest.raises(ModelUnavailable, match=r"\(500\): The server had an error"):
        make_model(max_retries=2).complete(MESSAGES, max_tokens=5)
    assert len(fake_openai.requests) == 3


def test_no_retries_when_max_retries_is_zero(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    fake_openai.set_mode("server_error", failures=1)
    with pytest.raises(ModelUnavailable):
        make_model(max_retries=0).complete(MESSAGES, max_tokens=5)
    assert len(fake_openai.requests) == 1


def test_retries_stop_at_the_deadline(fake_openai: FakeOpenAIServer, make_model: MakeModel) -> None:
    fake_openai.set_mode("server_error")
    model = make_model(timeout_s=1.0, max_retries=10, backoff_base_s=0.2)
    started = time.monotonic()
    with pytest.raises(ModelUnavailable):
        model.complete(MESSAGES, max_tokens=5)
    assert time.monotonic() - started < 1.0 + SLACK_S
    assert 2 <= len(fake_openai.requests) < 11


# -- bad answers ---------------------------------------------------------------------


def test_bad_request_is_not_retried_and_names_the_server_message(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    fake_openai.set_mode("bad_request")
    with pytest.raises(ModelBadResponse, match=r"\(400\).*maximum context length"):
        make_model().complete(MESSAGES, max_tokens=5)
    assert len(fake_openai.requests) == 1


def test_invalid_json_is_a_bad_response(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    fake_openai.set_mode("invalid_json")
    with pytest.raises(ModelBadResponse, match=r"invalid JSON.*this is not json"):
        make_model().complete(MESSAGES, max_tokens=5)
    assert len(fake_openai.requests) == 1


def test_missing_choices_is_a_bad_response(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    fake_openai.set_mode("no_choices")
    with pytest.raises(ModelBadResponse, match="no choices"):
        make_model().complete(MESSAGES, max_tokens=5)


def test_stream_cut_half_way_is_a_bad_response(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    fake_openai.set_mode("stream_cut")
    received: list[str] = []
    with pytest.raises(ModelBadResponse, match="stream cut"):
        for delta in make_model().stream(MESSAGES, max_tokens=50):
            received.append(delta.text)
    assert 0 < len("".join(received)) < len(DEFAULT_ANSWER)
    assert len(fake_openai.requests) == 1


def test_body_cut_half_way_is_a_bad_response(
    fake_openai: FakeOpenAIServer, make_model: MakeModel
) -> None:
    fake_openai.set_mode("stream_cut")
    with pytest.raises(ModelBadResponse, match="cut"):
        make_model().complete(MESSAGES, max_tokens=50)
