"""openai backend details that are easier to pin with ``httpx.MockTransport``."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime

import httpx
import pytest

from rag_service.config import LLMSettings
from rag_service.errors import ModelBadResponse, ModelTimeout, ModelUnavailable
from rag_service.llm.base import ChatMessage
from rag_service.llm.openai import OpenAIChatModel, parse_retry_after

MESSAGES = [ChatMessage("user", "Hello?")]
SETTINGS = LLMSettings(
    backend="openai", base_url="http://model.test/v1/", model="m", timeout_s=2.0, max_retries=2
)

Handler = Callable[[httpx.Request], httpx.Response]


def make(handler: Handler, **overrides: object) -> OpenAIChatModel:
    settings = SETTINGS.model_copy(update=overrides)
    return OpenAIChatModel(settings, httpx.MockTransport(handler), backoff_base_s=0.01)


def sse(*events: str) -> httpx.Response:
    body = "".join(f"data: {e}\n\n" for e in events)
    return httpx.Response(200, text=body, headers={"Content-Type": "text/event-stream"})


def chunk(content: str | None = None, finish: str | None = None) -> str:
    delta = {} if content is None else {"content": content}
    return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def test_url_is_joined_without_double_slash() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json={"choices": [{"message": {"content": "hi"}}]})

    model = make(handler)
    try:
        completion = model.complete(MESSAGES, max_tokens=3)
    finally:
        model.close()
    assert seen == ["http://model.test/v1/chat/completions"]
    assert completion.text == "hi"
    assert completion.usage.total_tokens == 0


def test_connect_errors_are_retried_then_unavailable() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        raise httpx.ConnectError("connection refused", request=request)

    model = make(handler)
    try:
        with pytest.raises(ModelUnavailable, match="unreachable"):
            model.complete(MESSAGES, max_tokens=3)
    finally:
        model.close()
    assert calls == 3


def test_read_timeout_is_a_model_timeout() -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    model = make(handler)
    try:
        with pytest.raises(ModelTimeout):
            model.complete(MESSAGES, max_tokens=3)
    finally:
        model.close()


def test_stream_ending_cleanly_without_done_is_cut() -> None:
    model = make(lambda request: sse(chunk("Hel"), chunk("lo")))
    try:
        with pytest.raises(ModelBadResponse, match="stream cut"):
            list(model.stream(MESSAGES, max_tokens=3))
    finally:
        model.close()


def test_stream_with_finish_reason_but_no_done_is_accepted() -> None:
    model = make(lambda request: sse(chunk("Hi"), chunk(None, "stop")))
    try:
        deltas = list(model.stream(MESSAGES, max_tokens=3))
    finally:
        model.close()
    assert [d.text for d in deltas] == ["Hi", ""]
    assert deltas[-1].finish_reason == "stop"
    assert deltas[-1].usage is None


def test_stream_error_event_is_a_bad_response() -> None:
    error = json.dumps({"error": {"message": "model overloaded"}})
    model = make(lambda request: sse(chunk("Hi"), error))
    try:
        with pytest.raises(ModelBadResponse, match="model overloaded"):
            list(model.stream(MESSAGES, max_tokens=3))
    finally:
        model.close()


def test_stream_skips_comments_and_keepalives() -> None:
    body = ": keep-alive\n\nevent: message\n" + "".join(
        f"data: {e}\n\n" for e in (chunk("A"), chunk(None, "stop"), "[DONE]")
    )
    model = make(lambda request: httpx.Response(200, text=body))
    try:
        assert "".join(d.text for d in model.stream(MESSAGES, max_tokens=3)) == "A"
    finally:
        model.close()


def test_long_error_bodies_are_truncated() -> None:
    model = make(lambda request: httpx.Response(400, text="x" * 5000))
    try:
        with pytest.raises(ModelBadResponse) as caught:
            model.complete(MESSAGES, max_tokens=3)
    finally:
        model.close()
    assert len(caught.value.message) < 400
    assert caught.value.message.endswith("...")


def test_501_is_unavailable_without_retry() -> None:
    calls = 0

    def handler(request: httpx.Request) -> httpx.Response:
        nonlocal calls
        calls += 1
        return httpx.Response(501, json={"error": {"message": "not implemented"}})

    model = make(handler)
    try:
        with pytest.raises(ModelUnavailable, match="not implemented"):
            model.complete(MESSAGES, max_tokens=3)
    finally:
        model.close()
    assert calls == 1


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (None, None),
        ("", None),
        ("3", 3.0),
        ("1.5", 1.5),
        ("-4", 0.0),
        ("Wed, 21 Oct 2015 07:28:10 GMT", 10.0),
        ("Wed, 21 Oct 2015 07:27:00 GMT", 0.0),
        ("soon", None),
    ],
)
def test_parse_retry_after(header: str | None, expected: float | None) -> None:
    now = datetime(2015, 10, 21, 7, 28, 0, tzinfo=UTC)
    assert parse_retry_after(header, now=now) == expected
