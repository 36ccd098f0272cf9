"""Model work never holds up the rest of the service: it runs off the event loop."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import httpx

from rag_service.compute import BatchingEmbedder
from rag_service.config import QuerySettings, Settings
from rag_service.embedding import SentenceTransformerEmbedder
from rag_service.llm.base import ChatMessage, Completion
from tests.helpers import ScriptedChatModel, wait_for_job
from tests.live import LiveServer

NOTE = (
    "Museum opening hours. The city museum opens at nine in the morning and closes at six "
    "in the evening. Adults pay twelve euros; children under twelve enter free."
)


class BlockingChatModel(ScriptedChatModel):
    """Answers only once ``release`` is set; ``entered`` says a call is in progress."""

    def __init__(self) -> None:
        super().__init__("Adults pay twelve euros [1].")
        self.entered = threading.Event()
        self.release = threading.Event()

    def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
    ) -> Completion:
        self.entered.set()
        assert self.release.wait(60), "the test never released the model"
        return super().complete(messages, max_tokens=max_tokens, temperature=temperature)


def test_other_requests_are_answered_while_the_model_is_answering(
    settings: Settings, embedder: SentenceTransformerEmbedder
) -> None:
    settings.query = QuerySettings(abstain_min_score=-1.0)  # always ask the model
    model = BlockingChatModel()
    answered: dict[str, httpx.Response] = {}
    with (
        LiveServer(settings, embedder, chat_model=model) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        upload = http.post(
            "/v1/collections/notes/documents",
            json={"documents": [{"source": "museum.txt", "text": NOTE}]},
        )
        assert wait_for_job(http, upload.json()["job_id"])["status"] == "succeeded"
        question = {"collection": "notes", "question": "How much do adults pay?"}
        asking = threading.Thread(
            target=lambda: answered.update(query=http.post("/v1/query", json=question))
        )
        asking.start()
        try:
            assert model.entered.wait(60), "the question never reached the model"

            health = http.get("/healthz")
            retrieved = http.post(
                "/v1/retrieve", json={"collection": "notes", "query": "museum ticket price"}
            )
            listed = http.get("/v1/collections/notes/documents")

            assert asking.is_alive()  # the answer is still being written...
            assert health.status_code == 200  # ...and everything else was answered meanwhile
            assert health.json() == {"status": "ok"}
            assert retrieved.status_code == 200
            assert "twelve euros" in retrieved.json()["results"][0]["text"]
            assert listed.json()["total"] == 1
        finally:
            model.release.set()
            asking.join(60)

    assert answered["query"].status_code == 200
    assert answered["query"].json()["answer"] == "Adults pay twelve euros [1]."


def test_questions_go_through_the_batching_embedder_of_the_real_model(
    settings: Settings, embedder: SentenceTransformerEmbedder
) -> None:
    with (
        LiveServer(settings, embedder) as server,
        httpx.Client(base_url=server.url, timeout=60) as http,
    ):
        upload = http.post(
            "/v1/collections/notes/documents",
            json={"documents": [{"source": "museum.txt", "text": NOTE}]},
        )
        assert wait_for_job(http, upload.json()["job_id"])["status"] == "succeeded"
        results: list[httpx.Response] = []
        threads = [
            threading.Thread(
                target=lambda: results.append(
                    http.post(
                        "/v1/retrieve",
                        json={"collection": "notes", "query": "When does the museum open?"},
                    )
                )
            )
            for _ in range(8)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        runtime = server.server.config.app.state.runtime

    assert [r.status_code for r in results] == [200] * 8
    assert all("nine in the morning" in r.json()["results"][0]["text"] for r in results)
    assert isinstance(runtime.embedder, BatchingEmbedder)
    assert runtime.embedder.inner is embedder
    assert runtime.embedder.questions == 8
