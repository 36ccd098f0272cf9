"""A tiny real OpenAI-compatible HTTP server for tests.

It listens on 127.0.0.1 on a free port in a background thread and answers
``POST /v1/chat/completions`` with JSON or, when the request says
``"stream": true``, with server-sent events.  Tests switch it into a *mode*
to make it misbehave, and read back the requests it received::

    with FakeOpenAIServer() as server:
        settings = LLMSettings(backend="openai", base_url=server.base_url)
        server.set_mode("server_error", failures=1)   # one 500, then ok
        ...
        assert server.requests[0].json["model"] == settings.model

Modes (``failures`` counts the requests that misbehave before the server
answers normally; ``None`` means every request):

    ok             answer ``server.answer`` (default cites ``[1]``)
    slow           sleep ``delay_s`` before answering (interrupted by stop())
    rate_limited   429 with ``Retry-After: retry_after``, ``failures`` times
    server_error   500 with an OpenAI-style error body, ``failures`` times
    bad_request    400 with an OpenAI-style error body
    invalid_json   200 whose body is not JSON
    no_choices     200 with a JSON object that has no ``choices``
    stream_cut     the stream (or body) stops half way: the connection is
                   closed before the promised length, with no ``[DONE]``
    down           the listening socket is closed: connections are refused

The answer is deterministic: it is split on spaces into pieces, each piece is
one "token", ``max_tokens`` cuts it (finish reason ``length``), and prompt
tokens are the words in all messages.  It depends on the standard library
only, so API tests can reuse it as they like.
"""

from __future__ import annotations

import contextlib
import json
import logging
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

Mode = Literal[
    "ok",
    "slow",
    "rate_limited",
    "server_error",
    "bad_request",
    "invalid_json",
    "no_choices",
    "stream_cut",
    "down",
]

DEFAULT_ANSWER = "Paris is the capital of France [1]."

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecordedRequest:
    """One request the server received, as the test wants to see it."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float

    @property
    def json(self) -> Any:
        """The request body decoded as JSON."""
        return json.loads(self.body)


@dataclass
class _State:
    mode: Mode = "ok"
    failures: int | None = None
    delay_s: float = 5.0
    retry_after: str = "1"
    answer: str = DEFAULT_ANSWER
    model: str | None = None
    requests: list[RecordedRequest] = field(default_factory=list)


class FakeOpenAIServer:
    """An OpenAI-compatible server on 127.0.0.1 with switchable failure modes."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._state = _State()
        self._stopping = threading.Event()
        self._httpd = _Server(("127.0.0.1", 0), _Handler, self)
        self.port: int = self._httpd.server_address[1]
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------

    def start(self) -> FakeOpenAIServer:
        """Start serving in a background thread."""
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name=f"fake-openai-{self.port}",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, wake sleeping handlers, close every socket; idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.close_connections()
        self._httpd.server_close()

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # -- what tests use --------------------------------------------------------

    @property
    def base_url(self) -> str:
        """The URL to put in ``LLMSettings.base_url`` (ends in ``/v1``)."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def requests(self) -> list[RecordedRequest]:
        """A copy of the requests received so far, oldest first."""
        with self._lock:
            return list(self._state.requests)

    @property
    def answer(self) -> str:
        """The text ``ok`` mode answers."""
        return self._state.answer

    @answer.setter
    def answer(self, value: str) -> None:
        with self._lock:
            self._state.answer = value

    def set_mode(
        self,
        mode: Mode,
        *,
        failures: int | None = None,
        delay_s: float = 5.0,
        retry_after: str = "1",
    ) -> None:
        """Switch behaviour; ``down`` stops the server for good."""
        with self._lock:
            self._state.mode = mode
            self._state.failures = failures
            self._state.delay_s = delay_s
            self._state.retry_after = retry_after
        if mode == "down":
            self.stop()

    # -- used by the handler ---------------------------------------------------

    def _record(self, request: RecordedRequest) -> tuple[Mode, float, str, str]:
        """Remember ``request``; return the mode it gets, the delay, Retry-After, answer."""
        with self._lock:
            state = self._state
            state.requests.append(request)
            mode = state.mode
            if state.failures is not None:
                if state.failures > 0:
                    state.failures -= 1
                else:
                    mode = "ok"
            return mode, state.delay_s, state.retry_after, state.answer

    def _sleep(self, seconds: float) -> bool:
        """Sleep unless the server stops first; True when the full time passed."""
        return not self._stopping.wait(seconds)


class _Server(ThreadingHTTPServer):
    """Joins its handler threads on close, and can cut open connections."""

    daemon_threads = False
    block_on_close = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type[BaseHTTPRequestHandler],
        owner: FakeOpenAIServer,
    ) -> None:
        super().__init__(address, handler)
        self.owner = owner
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        """Wake handlers blocked reading a kept-alive connection so they can end."""
        with self._open_lock:
            sockets = list(self._open)
        for sock in sockets:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hung up (timeout tests) is expected, not a failure.
        logger.debug("fake openai server: client %s went away", client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("fake openai server: " + format, *args)

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        owner = self.server.owner
        recorded = RecordedRequest(
            method="POST",
            path=self.path,
            headers={k.lower(): v for k, v in self.headers.items()},
            body=body,
            received_at=time.monotonic(),
        )
        mode, delay_s, retry_after, answer = owner._record(recorded)
        if self.path.rstrip("/") != "/v1/chat/completions":
            self._send_json(404, _error_body("no such route: " + self.path, "not_found"))
            return
        try:
            request = json.loads(body)
        except ValueError:
            self._send_json(400, _error_body("request body is not JSON", "invalid_request"))
            return
        if mode == "slow" and not owner._sleep(delay_s):
            self.close_connection = True
            return
        if mode == "rate_limited":
            self._send_json(
                429,
                _error_body("Rate limit reached, slow down", "rate_limit_exceeded"),
                {"Retry-After": retry_after},
            )
        elif mode == "server_error":
            self._send_json(500, _error_body("The server had an error", "server_error"))
        elif mode == "bad_request":
            self._send_json(
                400, _error_body("This model's maximum context length is 2048", "invalid_request")
            )
        elif mode == "invalid_json":
            self._send_raw(200, b"<html>this is not json", "text/html")
        elif mode == "no_choices":
            self._send_json(200, {"id": "chatcmpl-fake", "object": "chat.completion"})
        elif request.get("stream"):
            self._send_stream(request, answer, cut=mode == "stream_cut")
        else:
            self._send_completion(request, answer, cut=mode == "stream_cut")

    # -- responses -------------------------------------------------------------

    def _send_raw(
        self,
        status: int,
        payload: bytes,
        content_type: str,
        headers: dict[str, str] | None = None,
        *,
        declared_length: int | None = None,
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(declared_length or len(payload)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)
        self.wfile.flush()

    def _send_json(
        self, status: int, data: dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        self._send_raw(status, json.dumps(data).encode(), "application/json", headers)

    def _send_completion(self, request: dict[str, Any], answer: str, *, cut: bool) -> None:
        pieces, finish = _answer_pieces(answer, request.get("max_tokens"))
        data = {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": request.get("model", "fake"),
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "".join(pieces)},
                    "finish_reason": finish,
                }
            ],
            "usage": _usage(request, len(pieces)),
        }
        payload = json.dumps(data).encode()
        if cut:
            self._send_raw(
                200, payload[: len(payload) // 2], "application/json", declared_length=len(payload)
            )
            self.close_connection = True
        else:
            self._send_raw(200, payload, "application/json")

    def _send_stream(self, request: dict[str, Any], answer: str, *, cut: bool) -> None:
        pieces, finish = _answer_pieces(answer, request.get("max_tokens"))
        events = list(_stream_events(request, pieces, finish))
        if cut:
            events = events[: max(1, len(pieces) // 2)]
        payload = b"".join(f"data: {event}\n\n".encode() for event in events)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        if cut:
            # Promise more than is sent, then hang up: what a killed proxy does.
            self.send_header("Content-Length", str(len(payload) * 2))
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        for event in events:
            self.wfile.write(f"data: {event}\n\n".encode())
            self.wfile.flush()


def _error_body(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": code, "code": code}}


def _answer_pieces(answer: str, max_tokens: Any) -> tuple[list[str], str]:
    words = answer.split(" ")
    pieces = [w if i == 0 else " " + w for i, w in enumerate(words)]
    if isinstance(max_tokens, int) and 0 < max_tokens < len(pieces):
        return pieces[:max_tokens], "length"
    return pieces, "stop"


def _usage(request: dict[str, Any], completion_tokens: int) -> dict[str, int]:
    prompt = sum(len(str(m.get("content", "")).split()) for m in request.get("messages", []))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt + completion_tokens,
    }


def _stream_events(request: dict[str, Any], pieces: list[str], finish: str) -> Iterator[str]:
    model = request.get("model", "fake")

    def chunk(delta: dict[str, Any], finish_reason: str | None) -> str:
        return json.dumps(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
            }
        )

    yield chunk({"role": "assistant", "content": ""}, None)
    for piece in pieces:
        yield chunk({"content": piece}, None)
    yield chunk({}, finish)
    if (request.get("stream_options") or {}).get("include_usage"):
        yield json.dumps(
            {
                "id": "chatcmpl-fake",
                "object": "chat.completion.chunk",
                "model": model,
                "choices": [],
                "usage": _usage(request, len(pieces)),
            }
        )
    yield "[DONE]"
