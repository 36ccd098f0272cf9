"""The circuit breaker in front of a model: open, fail fast, half-open, close.

The model behind it is the real openai backend talking to the fake
OpenAI-compatible server on 127.0.0.1, whose request log shows whether a
call reached it; a hand-written model covers what a server cannot script
(a busy local model, a trial call held in flight).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

import pytest
from fake_openai_server import FakeOpenAIServer, Mode

from rag_service.config import LLMSettings
from rag_service.errors import ModelBusy, ModelError, ModelUnavailable
from rag_service.llm.base import ChatMessage, ChatModel, Completion, StreamDelta
from rag_service.llm.factory import create_chat_model
from rag_service.llm.openai import OpenAIChatModel
from rag_service.llm.resilient import CircuitBreaker

MESSAGES = [ChatMessage("user", "What is the capital of France?")]

#: ``make(failures=3, reset_s=30.0, **llm_settings_changes)``
BreakerFactory = Callable[..., CircuitBreaker]


@pytest.fixture
def breaker_for(openai_settings: LLMSettings) -> Iterator[BreakerFactory]:
    """Breakers around the openai backend on ``fake_openai``, one attempt per call."""
    made: list[ChatModel] = []

    def make(failures: int = 3, reset_s: float = 30.0, **changes: object) -> CircuitBreaker:
        settings = openai_settings.model_copy(update={"max_retries": 0, **changes})
        breaker = CircuitBreaker(OpenAIChatModel(settings), failures=failures, reset_s=reset_s)
        made.append(breaker)
        return breaker

    yield make
    for model in made:
        model.close()


def ask(model: ChatModel) -> Completion:
    return model.complete(MESSAGES, max_tokens=20)


def fail_times(model: ChatModel, n: int) -> list[ModelError]:
    errors = []
    for _ in range(n):
        with pytest.raises(ModelError) as caught:
            ask(model)
        errors.append(caught.value)
    return errors


def test_it_opens_after_consecutive_failures_and_then_fails_fast_without_calling(
    fake_openai: FakeOpenAIServer, breaker_for: BreakerFactory
) -> None:
    breaker = breaker_for(failures=3)
    fake_openai.set_mode("server_error")

    errors = fail_times(breaker, 3)

    assert all("(500)" in e.message for e in errors)
    assert breaker.state == "open"
    assert len(fake_openai.requests) == 3

    started = time.monotonic()
    refused = fail_times(breaker, 20)
    elapsed = time.monotonic() - started

    assert len(fake_openai.requests) == 3, "an open breaker must not reach the server"
    assert elapsed < 1.0, f"20 refused calls took {elapsed:.2f}s"
    first = refused[0]
    assert isinstance(first, ModelUnavailable)
    assert first.message.startswith("circuit open for model fake-model after 3 consecutive")
    assert "model_unavailable: model server failed (500)" in first.message
    assert first.retry_after is not None and 25 < first.retry_after <= 30
    assert "retry in" in first.message


def test_a_success_resets_the_count_of_consecutive_failures(
    fake_openai: FakeOpenAIServer, breaker_for: BreakerFactory
) -> None:
    breaker = breaker_for(failures=3)
    fake_openai.set_mode("server_error", failures=2)
    fail_times(breaker, 2)
    assert ask(breaker).text  # the third request is answered

    fake_openai.set_mode("server_error", failures=2)
    fail_times(breaker, 2)

    assert breaker.state == "closed"
    assert len(fake_openai.requests) == 5


def test_it_half_opens_after_reset_s_and_a_successful_trial_closes_it(
    fake_openai: FakeOpenAIServer, breaker_for: BreakerFactory
) -> None:
    breaker = breaker_for(failures=2, reset_s=0.3)
    fake_openai.set_mode("server_error", failures=2)  # then the server recovers
    fail_times(breaker, 2)
    assert breaker.state == "open"
    fail_times(breaker, 1)
    assert len(fake_openai.requests) == 2

    time.sleep(0.35)
    assert breaker.state == "half_open"
    completion = ask(breaker)

    assert completion.text == fake_openai.answer
    assert breaker.state == "closed"
    assert len(fake_openai.requests) == 3
    ask(breaker)
    assert len(fake_openai.requests) == 4


def test_a_failed_trial_opens_it_again_for_another_reset_s(
    fake_openai: FakeOpenAIServer, breaker_for: BreakerFactory
) -> None:
    breaker = breaker_for(failures=2, reset_s=0.3)
    fake_openai.set_mode("server_error")
    fail_times(breaker, 2)
    time.sleep(0.35)

    (trial,) = fail_times(breaker, 1)

    assert "(500)" in trial.message, "the trial call reaches the server"
    assert len(fake_openai.requests) == 3
    assert breaker.state == "open"
    (refused,) = fail_times(breaker, 1)
    assert refused.message.startswith("circuit open")
    assert len(fake_openai.requests) == 3


@pytest.mark.parametrize("mode", ["down", "slow", "invalid_json", "no_choices", "stream_cut"])
def test_model_faults_count(
    fake_openai: FakeOpenAIServer, breaker_for: BreakerFactory, mode: Mode
) -> None:
    breaker = breaker_for(failures=1, timeout_s=0.5)
    fake_openai.set_mode(mode, delay_s=5.0)

    fail_times(breaker, 1)

    assert breaker.state == "open"


@pytest.mark.parametrize("mode", ["bad_request", "rate_limited"])
def test_refused_and_rate_limited_requests_do_not_count(
    fake_openai: FakeOpenAIServer, breaker_for: BreakerFactory, mode: Mode
) -> None:
    breaker = breaker_for(failures=2)
    fake_openai.set_mode(mode, retry_after="0")

    fail_times(breaker, 4)

    assert breaker.state == "closed"
    assert len(fake_openai.requests) == 4


class HeldModel(ChatModel):
    """A hand-written model: raises what ``error`` holds, or waits for ``gate``."""

    name = "held"
    context_window = 1024

    def __init__(self) -> None:
        self.error: ModelError | None = None
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.calls = 0

    def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
    ) -> Completion:
        self.calls += 1
        if self.error is not None:
            raise self.error
        self.entered.set()
        assert self.gate.wait(5), "the test never released the call"
        return Completion("done", model=self.name)

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
    ) -> Iterator[StreamDelta]:
        yield StreamDelta(self.complete(messages, max_tokens=max_tokens).text)
        yield StreamDelta("", finish_reason="stop")


def test_a_busy_local_model_does_not_count() -> None:
    held = HeldModel()
    held.error = ModelBusy("local model busy", retry_after=3)
    breaker = CircuitBreaker(held, failures=1)

    fail_times(breaker, 3)

    assert breaker.state == "closed"
    assert held.calls == 3


def test_only_one_trial_call_goes_through_while_half_open() -> None:
    held = HeldModel()
    breaker = CircuitBreaker(held, failures=1, reset_s=0.05)
    held.error = ModelUnavailable("server down")
    fail_times(breaker, 1)
    time.sleep(0.1)
    held.error = None
    results: list[Completion] = []
    trial = threading.Thread(target=lambda: results.append(ask(breaker)))
    trial.start()
    try:
        assert held.entered.wait(5)
        (refused,) = fail_times(breaker, 1)
        assert "a trial call is testing it" in refused.message
        assert held.calls == 2
    finally:
        held.gate.set()
        trial.join(5)

    assert results[0].text == "done"
    assert breaker.state == "closed"
    assert ask(breaker).text == "done"


def test_streams_count_and_fail_fast_at_the_first_read(
    fake_openai: FakeOpenAIServer, breaker_for: BreakerFactory
) -> None:
    breaker = breaker_for(failures=1)
    fake_openai.set_mode("server_error", failures=1)
    with pytest.raises(ModelUnavailable, match=r"\(500\)"):
        list(breaker.stream(MESSAGES, max_tokens=20))
    assert breaker.state == "open"

    deltas = breaker.stream(MESSAGES, max_tokens=20)  # nothing happens until read
    with pytest.raises(ModelUnavailable, match="circuit open"):
        next(deltas)
    assert len(fake_openai.requests) == 1


def test_a_stream_cut_after_tokens_counts_and_a_whole_one_closes_it(
    fake_openai: FakeOpenAIServer, breaker_for: BreakerFactory
) -> None:
    breaker = breaker_for(failures=1, reset_s=0.2)
    fake_openai.set_mode("stream_cut", failures=1)
    pieces: list[str] = []
    with pytest.raises(ModelError, match="stream cut"):
        for delta in breaker.stream(MESSAGES, max_tokens=20):
            pieces.append(delta.text)
    assert pieces, "tokens came before the cut"
    assert breaker.state == "open"

    time.sleep(0.25)
    text = "".join(d.text for d in breaker.stream(MESSAGES, max_tokens=20))

    assert text == fake_openai.answer
    assert breaker.state == "closed"


def test_the_factory_puts_a_breaker_in_front_of_the_backend(
    openai_settings: LLMSettings,
) -> None:
    model = create_chat_model(openai_settings.model_copy(update={"breaker_failures": 2}))
    try:
        assert isinstance(model, CircuitBreaker)
        assert model.name == "fake-model"
        assert model.context_window == openai_settings.context_window
    finally:
        model.close()

    bare = create_chat_model(openai_settings.model_copy(update={"breaker_failures": 0}))
    try:
        assert isinstance(bare, OpenAIChatModel)
    finally:
        bare.close()
