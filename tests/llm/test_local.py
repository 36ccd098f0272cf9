"""The local backend on the real SmolLM2-135M-Instruct GGUF."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from rag_service.config import LLMSettings
from rag_service.errors import ModelBadResponse, ModelBusy, ModelUnavailable
from rag_service.llm.base import ChatMessage, StreamDelta
from rag_service.llm.local import LocalChatModel

MESSAGES = [ChatMessage("user", "Name three colours.")]

MakeLocal = Callable[..., LocalChatModel]


@pytest.fixture
def make_local(local_settings: LLMSettings) -> Iterator[MakeLocal]:
    """Load extra local models with setting overrides; closed after the test."""
    made: list[LocalChatModel] = []

    def make(**overrides: object) -> LocalChatModel:
        made.append(LocalChatModel(local_settings.model_copy(update=overrides)))
        return made[-1]

    yield make
    for model in made:
        model.close()


class StreamHolder:
    """Runs a stream in another thread and keeps the model's turn until told."""

    def __init__(self, model: LocalChatModel) -> None:
        self._model = model
        self.started = threading.Event()
        self.finish = threading.Event()
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            stream = self._model.stream(MESSAGES, max_tokens=200)
            next(stream)
            self.started.set()
            self.finish.wait(30)
            stream.close()  # type: ignore[attr-defined]
        except BaseException as exc:  # handed to the test thread
            self.error = exc
            self.started.set()

    def __enter__(self) -> StreamHolder:
        self._thread.start()
        assert self.started.wait(60), "stream never started"
        assert self.error is None
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.finish.set()
        self._thread.join(30)
        assert self.error is None


# -- loading ---------------------------------------------------------------------


def test_missing_model_file_is_unavailable_and_names_the_setting(tmp_path: Path) -> None:
    settings = LLMSettings(model_path=str(tmp_path / "nope.gguf"))
    with pytest.raises(ModelUnavailable, match="RAG_LLM__MODEL_PATH"):
        LocalChatModel(settings)


def test_unset_model_path_is_unavailable() -> None:
    with pytest.raises(ModelUnavailable, match="RAG_LLM__MODEL_PATH"):
        LocalChatModel(LLMSettings(model_path=""))


def test_file_that_is_not_gguf_is_unavailable(tmp_path: Path) -> None:
    bogus = tmp_path / "bogus.gguf"
    bogus.write_bytes(b"this is not a gguf file" * 100)
    with pytest.raises(ModelUnavailable, match="could not load"):
        LocalChatModel(LLMSettings(model_path=str(bogus)))


@pytest.mark.slow
def test_loaded_model_is_named_by_its_file(
    local_model: LocalChatModel, local_settings: LLMSettings
) -> None:
    assert local_model.name == Path(local_settings.model_path).stem


# -- answering -------------------------------------------------------------------


@pytest.mark.slow
def test_complete_returns_text_and_llama_usage(local_model: LocalChatModel) -> None:
    completion = local_model.complete(MESSAGES, max_tokens=30)

    assert completion.text.strip()
    assert completion.usage.prompt_tokens == local_model.prompt_tokens(MESSAGES)
    assert 0 < completion.usage.completion_tokens <= 30
    assert completion.model == local_model.name


@pytest.mark.slow
def test_stream_pieces_join_into_the_answer(local_model: LocalChatModel) -> None:
    expected = local_model.complete(MESSAGES, max_tokens=30).text
    deltas = list(local_model.stream(MESSAGES, max_tokens=30))

    assert len(deltas) > 2
    assert "".join(d.text for d in deltas) == expected
    assert deltas[-1].usage is not None
    assert deltas[-1].usage.prompt_tokens == local_model.prompt_tokens(MESSAGES)


@pytest.mark.slow
def test_stop_sequence_ends_the_answer(local_model: LocalChatModel) -> None:
    full = local_model.complete(MESSAGES, max_tokens=30).text
    word = full.split()[1]
    cut = local_model.complete(MESSAGES, max_tokens=30, stop=[word])
    assert word not in cut.text
    assert cut.finish_reason == "stop"


@pytest.mark.slow
def test_count_tokens_uses_the_model_tokenizer(local_model: LocalChatModel) -> None:
    assert local_model.count_tokens("") == 0
    one = local_model.count_tokens("hello")
    many = local_model.count_tokens("hello world, this is a longer sentence " * 5)
    assert one >= 1
    assert many > one * 10


@pytest.mark.slow
def test_prompt_too_long_is_refused_before_llama_sees_it(make_local: MakeLocal) -> None:
    model = make_local(context_window=256)
    long_text = "The quick brown fox jumps over the lazy dog. " * 60
    with pytest.raises(ModelBadResponse, match="context window is 256"):
        model.complete([ChatMessage("user", long_text)], max_tokens=10)
    with pytest.raises(ModelBadResponse, match="context window"):
        next(model.stream([ChatMessage("user", long_text)], max_tokens=10))
    assert model.complete(MESSAGES, max_tokens=5).text


# -- one generation at a time -------------------------------------------------------


@pytest.mark.slow
def test_closing_a_stream_early_releases_the_turn(make_local: MakeLocal) -> None:
    model = make_local(max_queue=0)
    stream = model.stream(MESSAGES, max_tokens=200)
    assert next(stream).text
    with pytest.raises(ModelBusy):
        model.complete(MESSAGES, max_tokens=3)
    stream.close()  # type: ignore[attr-defined]

    assert model.complete(MESSAGES, max_tokens=3).text


@pytest.mark.slow
def test_abandoned_stream_releases_the_turn_when_collected(make_local: MakeLocal) -> None:
    model = make_local(max_queue=0)

    def start() -> None:
        stream: Iterator[StreamDelta] = model.stream(MESSAGES, max_tokens=200)
        next(stream)

    start()  # the generator is dropped here and closed by the garbage collector
    assert model.complete(MESSAGES, max_tokens=3).text


@pytest.mark.slow
def test_full_queue_is_busy_at_once_with_retry_after(make_local: MakeLocal) -> None:
    model = make_local(max_queue=0)
    with StreamHolder(model):
        started = time.monotonic()
        with pytest.raises(ModelBusy) as caught:
            model.complete(MESSAGES, max_tokens=3)
        assert time.monotonic() - started < 0.5
        assert caught.value.retry_after is not None
        assert caught.value.retry_after >= 1
    assert model.complete(MESSAGES, max_tokens=3).text


@pytest.mark.slow
def test_waiting_too_long_is_busy(make_local: MakeLocal) -> None:
    model = make_local(max_queue=1, queue_timeout_s=0.3)
    with StreamHolder(model):
        started = time.monotonic()
        with pytest.raises(ModelBusy, match="queue_timeout_s"):
            model.complete(MESSAGES, max_tokens=3)
        assert 0.3 <= time.monotonic() - started < 2.0


@pytest.mark.slow
def test_a_waiter_gets_the_turn_when_it_frees(make_local: MakeLocal) -> None:
    model = make_local(max_queue=1, queue_timeout_s=30)
    answers: list[str] = []
    with StreamHolder(model) as holder:
        waiter = threading.Thread(
            target=lambda: answers.append(model.complete(MESSAGES, max_tokens=3).text)
        )
        waiter.start()
        time.sleep(0.2)
        assert answers == []
        holder.finish.set()
        waiter.join(30)
    assert answers and answers[0]


@pytest.mark.slow
def test_closed_model_is_unavailable(make_local: MakeLocal) -> None:
    model = make_local()
    model.close()
    with pytest.raises(ModelUnavailable, match="closed"):
        model.complete(MESSAGES, max_tokens=3)
    with pytest.raises(ModelUnavailable, match="closed"):
        model.count_tokens("hello")
    # Prompt packing counts a prompt's tokens outside the turn: a clear error, not a crash.
    with pytest.raises(ModelUnavailable, match="closed"):
        model.prompt_tokens(MESSAGES)
