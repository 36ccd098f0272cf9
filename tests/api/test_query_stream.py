"""Streamed answers over Server-Sent Events, in-process and over TCP.

Events: ``sources`` first, ``token`` pieces as the model writes them, one
``done`` with the same body as the plain response.  A client that hangs up
stops the generation.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient
from httpx_sse import connect_sse

from rag_service.client import AsyncRagClient, RagClient
from rag_service.config import Settings
from rag_service.embedding import SentenceTransformerEmbedder
from rag_service.errors import CollectionNotFound, ModelTimeout
from rag_service.llm.base import ChatMessage, ChatModel, StreamDelta
from tests.helpers import ScriptedChatModel, make_pdf, wait_for_job
from tests.live import LiveServer

PAGES = [
    "The museum opens at nine o'clock on weekdays.",
    "Tickets cost twelve euros for adults and five euros for children.",
    "The cafe on the roof serves lunch until three in the afternoon.",
]
TICKETS = "How much does an adult ticket cost?"


def ingest(client: httpx.Client) -> None:
    response = client.post(
        "/v1/collections/docs/documents", files=[("files", ("guide.pdf", make_pdf(PAGES)))]
    )
    assert wait_for_job(client, response.json()["job_id"])["status"] == "succeeded"


def events(client: httpx.Client, **body: Any) -> list[tuple[str, dict[str, Any]]]:
    with connect_sse(
        client, "POST", "/v1/query", json={"collection": "docs", "top_k": 3, **body}
    ) as source:
        assert source.response.status_code == 200
        return [(e.event, json.loads(e.data)) for e in source.iter_sse()]


def test_stream_sends_sources_then_tokens_then_the_answer(
    client: TestClient, scripted: ScriptedChatModel
) -> None:
    ingest(client)
    scripted.answer = "Adults pay twelve euros [1]. Children pay five [2]."
    got = events(client, question=TICKETS, stream=True)

    kinds = [kind for kind, _ in got]
    assert kinds[0] == "sources" and kinds[-1] == "done"
    assert set(kinds[1:-1]) == {"token"} and len(kinds) > 4
    sources = got[0][1]["sources"]
    assert [s["n"] for s in sources] == [1, 2, 3]
    done = got[-1][1]
    streamed = "".join(data["text"] for kind, data in got if kind == "token")
    assert streamed.strip() == done["answer"]
    assert done["citations"] == [1, 2]
    assert done["sources"] == sources
    assert done["strategy"] == "direct" and done["answerable"] is True
    assert done["cost"]["calls"] == 1 and done["usage"]["completion_tokens"] > 0


def test_accept_header_asks_for_a_stream_too(
    client: TestClient, scripted: ScriptedChatModel
) -> None:
    ingest(client)
    with client.stream(
        "POST",
        "/v1/query",
        json={"collection": "docs", "question": TICKETS},
        headers={"Accept": "text/event-stream"},
    ) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        body = response.read().decode()
    assert "event: sources" in body and "event: done" in body


def test_errors_come_as_json_with_their_status_before_any_event(client: TestClient) -> None:
    response = client.post(
        "/v1/query", json={"collection": "nope", "question": TICKETS, "stream": True}
    )
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "collection_not_found"


def test_other_strategies_stream_only_the_end(
    client: TestClient, scripted: ScriptedChatModel
) -> None:
    ingest(client)
    scripted.answer = "Reasoning: [1] has prices.\nFinal answer: Twelve euros [1]."
    got = events(client, question=TICKETS, stream=True, strategy="cot")
    assert [kind for kind, _ in got] == ["sources", "done"]
    assert got[-1][1]["answer"] == "Twelve euros [1]."
    assert got[-1][1]["reasoning"] == "[1] has prices."


def test_abstaining_streams_the_sources_and_the_plain_sentence(
    client: TestClient, scripted: ScriptedChatModel
) -> None:
    ingest(client)
    got = events(client, question="Which kernel module drives an NVIDIA card?", stream=True)
    assert [kind for kind, _ in got] == ["sources", "done"]
    assert got[-1][1]["answerable"] is False
    assert scripted.prompts == []


class BrokenStream(ScriptedChatModel):
    """Writes two pieces, then the connection to the model breaks."""

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
    ) -> Iterator[StreamDelta]:
        yield StreamDelta("Adults ")
        yield StreamDelta("pay ")
        raise ModelTimeout("the model stopped answering")


def test_a_model_failing_mid_stream_ends_with_a_degraded_answer(
    settings: Settings, embedder: SentenceTransformerEmbedder
) -> None:
    from rag_service.api import create_app

    with TestClient(create_app(settings, embedder=embedder, chat_model=BrokenStream())) as c:
        ingest(c)
        got = events(c, question=TICKETS, stream=True)
    assert [kind for kind, _ in got] == ["sources", "token", "token", "done"]
    done = got[-1][1]
    assert done["degraded"] is True
    assert "stopped answering" in done["degraded_reason"]
    assert len(done["sources"]) == 3


class SlowStream(ScriptedChatModel):
    """Writes up to 400 pieces, 20 ms apart; records how many and whether it was closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written = 0
        self.closed = threading.Event()

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
    ) -> Iterator[StreamDelta]:
        try:
            for i in range(400):
                time.sleep(0.02)
                self.written += 1
                yield StreamDelta(f"word{i} ")
        finally:
            self.closed.set()


def test_a_client_that_hangs_up_stops_the_generation(
    settings: Settings, embedder: SentenceTransformerEmbedder
) -> None:
    model = SlowStream()
    with LiveServer(settings, embedder, model) as live, httpx.Client(base_url=live.url) as http:
        ingest(http)
        with connect_sse(
            http, "POST", "/v1/query", json={"collection": "docs", "question": TICKETS}
        ) as source:
            seen = 0
            for event in source.iter_sse():
                seen += event.event == "token"
                if seen == 3:
                    break
        # Leaving the block closed the connection.
        assert model.closed.wait(10), "the generation went on after the client left"
        assert model.written < 100


def test_clients_read_the_stream(settings: Settings, embedder: SentenceTransformerEmbedder) -> None:
    with LiveServer(settings, embedder) as live:
        with RagClient(live.url) as rag:
            receipt = rag.upload_files("docs", [("guide.pdf", make_pdf(PAGES))])
            assert rag.wait_for_job(receipt.job_id).status == "succeeded"
            got = list(rag.query_stream("docs", TICKETS, 3))
            assert got[0].kind == "sources" and len(got[0].sources) == 3
            assert got[-1].kind == "done" and got[-1].answer is not None
            assert got[-1].answer.citations == [1]
            tokens = "".join(e.text for e in got if e.kind == "token")
            assert tokens.strip() == got[-1].answer.answer
            with pytest.raises(CollectionNotFound):
                list(rag.query_stream("nope", TICKETS))

        async def read() -> list[str]:
            async with AsyncRagClient(live.url) as rag:
                return [e.kind async for e in rag.query_stream("docs", TICKETS, 3)]

        kinds = asyncio.run(read())
        assert kinds[0] == "sources" and kinds[-1] == "done" and "token" in kinds


def test_the_real_model_streams_its_first_token_before_the_answer_is_done(
    settings: Settings, embedder: SentenceTransformerEmbedder, local_model: ChatModel
) -> None:
    with (
        LiveServer(settings, embedder, local_model) as live,
        httpx.Client(base_url=live.url, timeout=300) as http,
    ):
        ingest(http)
        started = time.perf_counter()
        first: float | None = None
        done: dict[str, Any] = {}
        with connect_sse(
            http,
            "POST",
            "/v1/query",
            json={"collection": "docs", "question": TICKETS, "stream": True},
        ) as source:
            for event in source.iter_sse():
                if event.event == "token" and first is None:
                    first = time.perf_counter() - started
                if event.event == "done":
                    done = json.loads(event.data)
        total = time.perf_counter() - started
    assert first is not None and done
    assert first < total
    assert done["degraded"] is False and done["answer"].strip()
    assert done["usage"]["completion_tokens"] > 1
