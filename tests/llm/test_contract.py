"""One contract, every backend: what callers of ``ChatModel`` may rely on.

The local backend runs the real SmolLM2 model (marked slow); the openai
backend talks to the tiny OpenAI-compatible server on 127.0.0.1.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from rag_service.config import LLMSettings
from rag_service.errors import ModelUnavailable
from rag_service.llm.base import ChatMessage, ChatModel
from rag_service.llm.factory import create_chat_model

MESSAGES = [
    ChatMessage("system", "You answer in one short sentence."),
    ChatMessage("user", "What is the capital of France?"),
]

BACKENDS = [
    pytest.param("local", marks=pytest.mark.slow),
    pytest.param("openai"),
]

MakeModel = Callable[[], ChatModel]


@pytest.fixture(params=BACKENDS)
def backend_settings(request: pytest.FixtureRequest) -> LLMSettings:
    """Settings for each backend in turn."""
    name = "local_settings" if request.param == "local" else "openai_settings"
    settings: LLMSettings = request.getfixturevalue(name)
    return settings


@pytest.fixture
def chat_model(backend_settings: LLMSettings, request: pytest.FixtureRequest) -> ChatModel:
    """A ready model; the local one is shared by the session since loading is slow."""
    if backend_settings.backend == "local":
        model: ChatModel = request.getfixturevalue("local_model")
        return model
    model = create_chat_model(backend_settings)
    request.addfinalizer(model.close)
    return model


@pytest.fixture
def make_model(backend_settings: LLMSettings) -> Iterator[MakeModel]:
    """Build fresh models of the backend (for tests that close them)."""
    made: list[ChatModel] = []

    def make() -> ChatModel:
        made.append(create_chat_model(backend_settings))
        return made[-1]

    yield make
    for model in made:
        model.close()


def test_describes_itself(chat_model: ChatModel, backend_settings: LLMSettings) -> None:
    assert chat_model.name
    assert chat_model.context_window == backend_settings.context_window


def test_complete_answers_with_usage(chat_model: ChatModel) -> None:
    completion = chat_model.complete(MESSAGES, max_tokens=40)

    assert completion.text.strip()
    assert completion.finish_reason in {"stop", "length"}
    assert completion.model
    assert completion.usage.prompt_tokens > 0
    assert 0 < completion.usage.completion_tokens <= 40
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )


def test_stream_matches_complete(chat_model: ChatModel) -> None:
    completion = chat_model.complete(MESSAGES, max_tokens=40)
    deltas = list(chat_model.stream(MESSAGES, max_tokens=40))

    *pieces, last = deltas
    assert pieces
    assert all(d.text and d.usage is None and d.finish_reason is None for d in pieces)
    assert "".join(d.text for d in pieces) == completion.text
    assert last.text == ""
    assert last.finish_reason == completion.finish_reason
    assert last.usage is not None
    assert last.usage.prompt_tokens == completion.usage.prompt_tokens
    assert last.usage.completion_tokens > 0


def test_max_tokens_cuts_the_answer(chat_model: ChatModel) -> None:
    completion = chat_model.complete(MESSAGES, max_tokens=1)
    assert completion.finish_reason == "length"
    assert completion.usage.completion_tokens == 1

    last = list(chat_model.stream(MESSAGES, max_tokens=1))[-1]
    assert last.finish_reason == "length"


def test_stream_closed_early_leaves_the_model_usable(chat_model: ChatModel) -> None:
    stream = chat_model.stream(MESSAGES, max_tokens=40)
    assert next(stream).text
    stream.close()  # type: ignore[attr-defined]

    assert chat_model.complete(MESSAGES, max_tokens=5).text


def test_stream_not_iterated_holds_nothing(chat_model: ChatModel) -> None:
    chat_model.stream(MESSAGES, max_tokens=5)
    assert chat_model.complete(MESSAGES, max_tokens=5).text


def test_count_tokens_grows_with_text(chat_model: ChatModel) -> None:
    short = chat_model.count_tokens("Paris is the capital of France.")
    long = chat_model.count_tokens("Paris is the capital of France. " * 10)
    assert 0 < short < long


def test_close_is_idempotent_and_final(make_model: MakeModel) -> None:
    model = make_model()
    assert model.complete(MESSAGES, max_tokens=3).text
    model.close()
    model.close()
    with pytest.raises(ModelUnavailable):
        model.complete(MESSAGES, max_tokens=3)
    with pytest.raises(ModelUnavailable):
        list(model.stream(MESSAGES, max_tokens=3))
