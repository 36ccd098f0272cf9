"""The OpenAI-compatible endpoints, driven by the real `openai` SDK and LangChain.

The app runs under uvicorn on 127.0.0.1 with the real embedder; the model
is scripted where the exact text matters and the real local model once.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import openai
import pytest
from langchain_openai import ChatOpenAI

from rag_service.config import Settings
from rag_service.embedding import SentenceTransformerEmbedder
from rag_service.llm.base import ChatModel
from tests.helpers import ScriptedChatModel, make_pdf, wait_for_job
from tests.live import LiveServer

PAGES = [
    "The museum opens at nine o'clock on weekdays.",
    "Tickets cost twelve euros for adults and five euros for children.",
    "The cafe on the roof serves lunch until three in the afternoon.",
]
TICKETS = "How much does an adult ticket cost?"


def ingest(url: str) -> None:
    with httpx.Client(base_url=url) as http:
        response = http.post(
            "/v1/collections/docs/documents",
            files=[("files", ("guide.pdf", make_pdf(PAGES)))],
        )
        assert wait_for_job(http, response.json()["job_id"])["status"] == "succeeded"


@pytest.fixture
def live(settings: Settings, embedder: SentenceTransformerEmbedder) -> Iterator[LiveServer]:
    with LiveServer(settings, embedder) as server:
        ingest(server.url)
        assert isinstance(server.model, ScriptedChatModel)
        server.model.answer = "Adults pay twelve euros [1]."
        yield server


def sdk(live: LiveServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{live.url}/v1", api_key="not-needed", max_retries=0)


def test_models_lists_one_model_per_collection(live: LiveServer) -> None:
    with sdk(live) as client:
        ids = [m.id for m in client.models.list()]
    assert ids == ["rag:docs"]


def test_chat_completion_answers_with_sources_in_an_extra_field(live: LiveServer) -> None:
    with sdk(live) as client:
        reply = client.chat.completions.create(
            model="rag:docs", messages=[{"role": "user", "content": TICKETS}]
        )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.content == "Adults pay twelve euros [1]."
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.prompt_tokens > 0
    extra: dict[str, Any] = reply.model_extra or {}
    assert extra["sources"][0]["source"] == "guide.pdf"
    assert extra["sources"][0]["page"] == 2
    assert extra["rag"]["citations"] == [1] and extra["rag"]["answerable"] is True


def test_earlier_turns_are_context_and_a_follow_up_is_searched_with_them(
    live: LiveServer,
) -> None:
    assert isinstance(live.model, ScriptedChatModel)
    with sdk(live) as client:
        client.chat.completions.create(
            model="rag:docs",
            messages=[
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "How much is a ticket for an adult?"},
                {"role": "assistant", "content": "Twelve euros [1]."},
                {"role": "user", "content": "And for a child?"},
            ],
        )
    prompt = live.model.prompts[-1]
    assert [m.role for m in prompt] == ["system", "user", "assistant", "user"]
    assert prompt[1].content == "How much is a ticket for an adult?"
    assert "Be brief." not in "".join(m.content for m in prompt)
    # The follow-up alone says nothing of tickets; searched with the previous
    # question, the prices page is the first source.
    assert "[1] (guide.pdf, page 2)" in prompt[-1].content


def test_streaming_sends_chunks_ending_in_done_with_sources_in_the_last(
    live: LiveServer,
) -> None:
    with sdk(live) as client:
        stream = client.chat.completions.create(
            model="rag:docs",
            messages=[{"role": "user", "content": TICKETS}],
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == "Adults pay twelve euros [1]."
    finished = [c for c in chunks if c.choices and c.choices[0].finish_reason == "stop"]
    assert len(finished) == 1
    assert (finished[0].model_extra or {})["sources"][0]["page"] == 2
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_async_client_works_too(live: LiveServer) -> None:
    async def run() -> tuple[str, str]:
        async with openai.AsyncOpenAI(
            base_url=f"{live.url}/v1", api_key="x", max_retries=0
        ) as client:
            reply = await client.chat.completions.create(
                model="rag:docs", messages=[{"role": "user", "content": TICKETS}]
            )
            stream = await client.chat.completions.create(
                model="rag:docs", messages=[{"role": "user", "content": TICKETS}], stream=True
            )
            pieces = [c.choices[0].delta.content or "" async for c in stream if c.choices]
            return reply.choices[0].message.content or "", "".join(pieces)

    whole, streamed = asyncio.run(run())
    assert whole == "Adults pay twelve euros [1]."
    assert streamed.strip() == whole


def test_errors_reach_the_sdk_as_its_own_exceptions(live: LiveServer) -> None:
    with sdk(live) as client:
        with pytest.raises(openai.NotFoundError, match="nope"):
            client.chat.completions.create(
                model="rag:nope", messages=[{"role": "user", "content": TICKETS}]
            )
        with pytest.raises(openai.UnprocessableEntityError, match="user message"):
            client.chat.completions.create(
                model="rag:docs", messages=[{"role": "assistant", "content": "hi"}]
            )
        with pytest.raises(openai.UnprocessableEntityError, match="n"):
            client.chat.completions.create(
                model="rag:docs", messages=[{"role": "user", "content": TICKETS}], n=2
            )


def test_embeddings_match_the_collections_model_in_floats_and_base64(
    live: LiveServer, embedder: SentenceTransformerEmbedder
) -> None:
    texts = ["twelve euros", "lunch on the roof"]
    expected = embedder.embed(texts)
    with sdk(live) as client:
        # The SDK asks for base64 by default and decodes it.
        reply = client.embeddings.create(model="rag:docs", input=texts)
        floats = client.embeddings.create(
            model=embedder.model_id, input=texts[0], encoding_format="float"
        )
    got = np.array([d.embedding for d in reply.data], dtype=np.float32)
    assert got.shape == (2, embedder.dim)
    np.testing.assert_allclose(got, expected, atol=1e-5)
    np.testing.assert_allclose(floats.data[0].embedding, expected[0], atol=1e-5)
    assert reply.usage.prompt_tokens > 0
    with httpx.Client(base_url=live.url) as http:
        raw = http.post(
            "/v1/embeddings",
            json={"model": "rag:docs", "input": "x", "encoding_format": "base64"},
        ).json()
        vector = np.frombuffer(base64.b64decode(raw["data"][0]["embedding"]), dtype="<f4")
        assert vector.shape == (embedder.dim,)
        bad = http.post("/v1/embeddings", json={"model": "rag:nope", "input": "x"})
        assert bad.status_code == 404
        bad = http.post("/v1/embeddings", json={"model": "rag:docs", "input": []})
        assert bad.status_code == 422


def test_langchain_chat_openai_invokes_and_streams(live: LiveServer) -> None:
    chat = ChatOpenAI(
        base_url=f"{live.url}/v1", api_key="not-needed", model="rag:docs", max_retries=0
    )  # type: ignore[call-arg]
    message = chat.invoke(TICKETS)
    assert message.content == "Adults pay twelve euros [1]."
    streamed = "".join(str(chunk.content) for chunk in chat.stream(TICKETS))
    assert streamed.strip() == "Adults pay twelve euros [1]."


def test_the_real_model_answers_through_the_sdk(
    settings: Settings, embedder: SentenceTransformerEmbedder, local_model: ChatModel
) -> None:
    with LiveServer(settings, embedder, local_model) as live:
        ingest(live.url)
        with openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", timeout=300) as client:
            stream = client.chat.completions.create(
                model="rag:docs", messages=[{"role": "user", "content": TICKETS}], stream=True
            )
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text.strip()
