"""The ``openai`` backend: any OpenAI-compatible ``/chat/completions`` endpoint.

Works with OpenAI, vLLM, Ollama, the llama.cpp server and LM Studio.  Every
call has one deadline (``timeout_s``) that covers connecting, retries and
backoff; 429, 5xx and network failures are retried with exponential backoff
and jitter, honouring ``Retry-After``.  httpx errors never leave this module:
they are translated into the ``ModelError`` tree here.

How a failure ends up, once retries are spent or the deadline is reached:

    ModelTimeout        no answer before the deadline
    ModelRateLimited    429 (``retry_after`` from the server when it said)
    ModelUnavailable    connection refused/reset, or 5xx
    ModelBadResponse    a body that is not a completion, an SSE stream that
                        stops before ``[DONE]``; any other 4xx as its
                        subclass ``ModelRequestRejected`` (the request's fault)
"""

from __future__ import annotations

import json
import logging
import random
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from rag_service.config import LLMSettings
from rag_service.errors import (
    ModelBadResponse,
    ModelError,
    ModelRateLimited,
    ModelRequestRejected,
    ModelTimeout,
    ModelUnavailable,
)
from rag_service.httputil import parse_retry_after
from rag_service.llm.base import (
    ChatMessage,
    ChatModel,
    Completion,
    StreamDelta,
    Usage,
)

logger = logging.getLogger(__name__)

#: Statuses worth another try: the server may answer next time.
RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})

#: Longest backoff between two attempts when the server gives no Retry-After.
MAX_BACKOFF_S = 8.0

#: How much of a server's error text goes into our error message.
MAX_ERROR_CHARS = 300


class _Retryable(Exception):
    """One attempt failed in a way another attempt may fix.

    ``final`` is the error to raise if no attempt is left; ``retry_after`` is
    the server's requested wait, if it gave one.
    """

    def __init__(self, final: ModelError, retry_after: float | None = None) -> None:
        super().__init__(final.message)
        self.final = final
        self.retry_after = retry_after


class OpenAIChatModel(ChatModel):
    """A chat model behind an OpenAI-compatible HTTP API.

    ``transport`` replaces httpx's network transport (tests pass an
    ``httpx.MockTransport``); ``backoff_base_s`` is the first backoff step,
    doubled on each retry.
    """

    def __init__(
        self,
        settings: LLMSettings,
        transport: httpx.BaseTransport | None = None,
        *,
        backoff_base_s: float = 0.5,
    ) -> None:
        self.name = settings.model
        self.context_window = settings.context_window
        self._timeout_s = settings.timeout_s
        self._connect_timeout_s = settings.connect_timeout_s
        self._max_retries = settings.max_retries
        self._backoff_base_s = backoff_base_s
        self._url = settings.base_url.rstrip("/") + "/chat/completions"
        headers = {"Accept": "application/json"}
        if settings.api_key is not None:
            headers["Authorization"] = f"Bearer {settings.api_key.get_secret_value()}"
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(settings.timeout_s, connect=settings.connect_timeout_s),
            transport=transport,
        )

    def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
    ) -> Completion:
        """Answer ``messages`` in one piece; see the module docstring for failures."""
        deadline = time.monotonic() + self._timeout_s
        body = self._body(messages, max_tokens, temperature, stop, stream=False)
        response = self._send_with_retries(body, deadline)
        try:
            raw = _read_before(response, deadline)
        finally:
            response.close()
        data = _parse_json(raw)
        return _completion_from(data, default_model=self.name)

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
    ) -> Iterator[StreamDelta]:
        """Answer ``messages`` piece by piece over server-sent events.

        Nothing is sent until the first ``next()``.  The deadline covers
        connecting and retries up to the response headers; after that each
        read may wait up to ``timeout_s``, since a long answer that keeps
        coming is healthy.  The last delta has empty text and carries the
        finish reason and, when the server reports it, the usage.  Closing
        the iterator early closes the connection.
        """
        body = self._body(messages, max_tokens, temperature, stop, stream=True)
        return self._stream(body)

    def close(self) -> None:
        """Close the HTTP client and its pooled connections."""
        self._client.close()

    # -- request plumbing --------------------------------------------------

    def _body(
        self,
        messages: Sequence[ChatMessage],
        max_tokens: int,
        temperature: float,
        stop: Sequence[str] | None,
        *,
        stream: bool,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.name,
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "max_tokens": max_tokens,
            "temperature": temperature,
            "stream": stream,
        }
        if stop:
            body["stop"] = list(stop)
        if stream:
            body["stream_options"] = {"include_usage": True}
        return body

    def _send_with_retries(self, body: dict[str, Any], deadline: float) -> httpx.Response:
        """Send ``body`` until a 2xx arrives; return the open (unread) response."""
        attempt = 0
        while True:
            try:
                return self._attempt(body, deadline)
            except _Retryable as failure:
                remaining = deadline - time.monotonic()
                if attempt >= self._max_retries:
                    raise failure.final from failure.__cause__
                delay = (
                    failure.retry_after
                    if failure.retry_after is not None
                    else self._backoff(attempt)
                )
                if delay >= remaining:
                    # Waiting would run past the deadline: the answer is the
                    # same as if the retries had run out.
                    logger.warning(
                        "llm give up url=%s attempt=%d delay_s=%.2f remaining_s=%.2f error=%s",
                        self._url,
                        attempt + 1,
                        delay,
                        remaining,
                        failure.final.code,
                    )
                    raise failure.final from failure.__cause__
                attempt += 1
                logger.warning(
                    "llm retry url=%s attempt=%d delay_s=%.2f error=%s",
                    self._url,
                    attempt,
                    delay,
                    failure.final.code,
                )
                time.sleep(delay)

    def _attempt(self, body: dict[str, Any], deadline: float) -> httpx.Response:
        """One HTTP attempt: a 2xx response (open), or an error (retryable or not)."""
        if self._client.is_closed:
            raise ModelUnavailable("model client is closed")
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise ModelTimeout(f"model call took longer than timeout_s={self._timeout_s:g}")
        timeout = httpx.Timeout(remaining, connect=min(self._connect_timeout_s, remaining))
        request = self._client.build_request("POST", self._url, json=body, timeout=timeout)
        try:
            response = self._client.send(request, stream=True)
        except httpx.ConnectTimeout as exc:
            error = ModelUnavailable(f"could not connect to model server {self._url}: timed out")
            raise _Retryable(error) from exc
        except httpx.TimeoutException as exc:
            raise ModelTimeout(
                f"model server {self._url} did not answer within timeout_s={self._timeout_s:g}"
            ) from exc
        except httpx.TransportError as exc:
            error = ModelUnavailable(f"model server {self._url} unreachable: {exc}")
            raise _Retryable(error) from exc
        if response.is_success:
            return response
        try:
            detail = _error_detail(_read_before(response, deadline))
        finally:
            response.close()
        status = response.status_code
        if status == 429:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            limited = ModelRateLimited(
                f"model server rate-limited the request (429): {detail}",
                retry_after=retry_after,
            )
            raise _Retryable(limited, retry_after)
        if status >= 500:
            unavailable = ModelUnavailable(f"model server failed ({status}): {detail}")
            if status in RETRY_STATUSES:
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
                raise _Retryable(unavailable, retry_after)
            raise unavailable
        raise ModelRequestRejected(f"model server refused the request ({status}): {detail}")

    def _backoff(self, attempt: int) -> float:
        """Exponential backoff with jitter: half fixed, half random."""
        step: float = min(MAX_BACKOFF_S, self._backoff_base_s * 2**attempt)
        return step / 2 + random.uniform(0, step / 2)

    # -- streaming ----------------------------------------------------------

    def _stream(self, body: dict[str, Any]) -> Iterator[StreamDelta]:
        deadline = time.monotonic() + self._timeout_s
        response = self._send_with_retries(body, deadline)
        finish_reason: str | None = None
        usage: Usage | None = None
        done = False
        try:
            for line in response.iter_lines():
                payload = _sse_data(line)
                if payload is None:
                    continue
                if payload == "[DONE]":
                    done = True
                    break
                chunk = _parse_json(payload.encode())
                if "error" in chunk:
                    raise ModelBadResponse(
                        f"model server failed mid-stream: {_error_detail(payload.encode())}"
                    )
                if isinstance(chunk.get("usage"), dict):
                    usage = _usage_from(chunk["usage"])
                for choice in chunk.get("choices") or []:
                    delta = choice.get("delta") or {}
                    text = delta.get("content")
                    if text:
                        yield StreamDelta(text=text)
                    if choice.get("finish_reason"):
                        finish_reason = str(choice["finish_reason"])
        except httpx.TimeoutException as exc:
            raise ModelTimeout(
                f"model stream stalled longer than timeout_s={self._timeout_s:g}"
            ) from exc
        except httpx.TransportError as exc:
            raise ModelBadResponse(f"model stream cut: {exc}") from exc
        finally:
            # Also runs when the consumer closes the iterator early.
            response.close()
        if not done and finish_reason is None:
            raise ModelBadResponse("model stream cut: it ended without [DONE] or a finish reason")
        yield StreamDelta(text="", usage=usage, finish_reason=finish_reason)


# -- parsing helpers ----------------------------------------------------------


def _read_before(response: httpx.Response, deadline: float) -> bytes:
    """The whole body, failing with ``ModelTimeout`` if it trickles past ``deadline``."""
    parts: list[bytes] = []
    try:
        for part in response.iter_bytes():
            parts.append(part)
            if time.monotonic() > deadline:
                raise ModelTimeout("model server response body arrived past the deadline")
    except httpx.TimeoutException as exc:
        raise ModelTimeout("model server response body arrived past the deadline") from exc
    except httpx.TransportError as exc:
        raise ModelBadResponse(f"model server response cut: {exc}") from exc
    return b"".join(parts)


def _truncate(text: str) -> str:
    text = " ".join(text.split())
    if len(text) <= MAX_ERROR_CHARS:
        return text
    return text[: MAX_ERROR_CHARS - 3] + "..."


def _error_detail(raw: bytes) -> str:
    """The server's own error message (OpenAI ``{"error": {"message"}}`` or raw text)."""
    text = raw.decode("utf-8", errors="replace")
    try:
        data = json.loads(text)
    except ValueError:
        return _truncate(text) or "(empty body)"
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            return _truncate(error["message"])
        if isinstance(error, str):
            return _truncate(error)
    return _truncate(text)


def _parse_json(raw: bytes) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except ValueError as exc:
        snippet = _truncate(raw.decode("utf-8", errors="replace"))
        raise ModelBadResponse(f"model server sent invalid JSON: {snippet!r}") from exc
    if not isinstance(data, dict):
        raise ModelBadResponse(
            f"model server sent JSON that is not an object: {_truncate(str(data))}"
        )
    return data


def _sse_data(line: str) -> str | None:
    """The payload of an SSE ``data:`` line; None for comments, blanks and other fields."""
    if not line.startswith("data:"):
        return None
    return line[len("data:") :].strip()


def _usage_from(raw: dict[str, Any]) -> Usage:
    return Usage(
        prompt_tokens=int(raw.get("prompt_tokens") or 0),
        completion_tokens=int(raw.get("completion_tokens") or 0),
    )


def _completion_from(data: dict[str, Any], *, default_model: str) -> Completion:
    if "error" in data:
        raise ModelBadResponse(
            f"model server answered with an error: {_error_detail(json.dumps(data).encode())}"
        )
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ModelBadResponse(f"model server answer has no choices: {_truncate(json.dumps(data))}")
    message = choices[0].get("message")
    if not isinstance(message, dict):
        raise ModelBadResponse(f"model server choice has no message: {_truncate(json.dumps(data))}")
    content = message.get("content")
    usage = data.get("usage")
    return Completion(
        text=content if isinstance(content, str) else "",
        usage=_usage_from(usage) if isinstance(usage, dict) else Usage(),
        finish_reason=choices[0].get("finish_reason"),
        model=str(data.get("model") or default_model),
    )
