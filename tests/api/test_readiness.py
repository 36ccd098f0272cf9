"""`/readyz` reports the embedder, the index and the model each on its own."""

from __future__ import annotations

import gc
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from rag_service import runtime as runtime_module
from rag_service.api import create_app
from rag_service.config import LLMSettings, Settings
from rag_service.embedding import SentenceTransformerEmbedder
from rag_service.errors import ModelUnavailable
from rag_service.llm.base import ChatModel
from tests.helpers import ScriptedChatModel


def readiness(client: TestClient) -> tuple[int, dict[str, Any]]:
    response = client.get("/readyz")
    return response.status_code, response.json()


def wait_until(check: Callable[[], bool], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.02)


def test_ready_when_embedder_index_and_model_are_loaded(client: TestClient) -> None:
    status, body = readiness(client)

    assert status == 200
    assert body == {
        "status": "ready",
        "embedder": "all-MiniLM-L6-v2",
        "index": "open",
        "model": "loaded",
        "workers": 1,
    }
    assert client.app.state.model_loader is None  # the model was given: nothing to load


def test_everything_is_loading_before_the_lifespan_has_run(
    settings: Settings, embedder: SentenceTransformerEmbedder
) -> None:
    client = TestClient(create_app(settings, embedder=embedder))  # no `with`: no startup

    status, body = readiness(client)

    assert status == 503
    assert body == {
        "status": "loading",
        "embedder": "loading",
        "index": "loading",
        "model": "loading",
        "workers": 0,
    }
    assert client.get("/healthz").status_code == 200


@pytest.fixture
def gated_model(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """The model factory blocks until the event is set, then returns a scripted model."""
    gate = threading.Event()

    def create_chat_model(settings: LLMSettings) -> ChatModel:
        assert gate.wait(timeout=60), "the test never let the model load"
        return ScriptedChatModel()

    monkeypatch.setattr(runtime_module, "create_chat_model", create_chat_model)
    try:
        yield gate
    finally:
        gate.set()  # never leave the loader thread (and the app's shutdown) waiting


def test_model_loading_then_loaded_while_the_service_answers(
    settings: Settings, embedder: SentenceTransformerEmbedder, gated_model: threading.Event
) -> None:
    with TestClient(create_app(settings, embedder=embedder)) as client:
        status, body = readiness(client)
        assert status == 503
        assert body["status"] == "loading"
        assert body["model"] == "loading"
        assert body["embedder"] == "all-MiniLM-L6-v2" and body["index"] == "open"
        # Live, scrapeable and able to take uploads meanwhile.
        assert client.get("/healthz").status_code == 200
        assert client.get("/metrics").status_code == 200
        assert client.get("/v1/collections").status_code == 200

        gated_model.set()

        wait_until(lambda: readiness(client)[0] == 200)
        status, body = readiness(client)
        assert body["status"] == "ready" and body["model"] == "loaded"


def test_a_model_that_fails_to_load_is_reported_as_an_error(
    settings: Settings, embedder: SentenceTransformerEmbedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    def create_chat_model(settings: LLMSettings) -> ChatModel:
        raise ModelUnavailable("no GGUF file at /models/missing.gguf")

    monkeypatch.setattr(runtime_module, "create_chat_model", create_chat_model)

    with TestClient(create_app(settings, embedder=embedder)) as client:
        wait_until(lambda: readiness(client)[1]["model"] != "loading")
        status, body = readiness(client)

        assert status == 503
        assert body["status"] == "error"
        assert body["model"] == "error: model_unavailable: no GGUF file at /models/missing.gguf"
        assert body["index"] == "open" and body["embedder"] == "all-MiniLM-L6-v2"
        # Retrieval does not need the model.
        assert client.get("/v1/collections").status_code == 200


def test_an_unreachable_catalog_is_an_index_error(
    client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    catalog = client.app.state.runtime.catalog

    def broken() -> sqlite3.Connection:
        raise sqlite3.OperationalError("disk I/O error")

    with monkeypatch.context() as patched:
        patched.setattr(catalog, "read", broken)
        status, body = readiness(client)

    assert status == 503
    assert body["status"] == "error"
    assert body["index"] == "error: OperationalError: disk I/O error"
    assert body["model"] == "loaded"
    assert readiness(client)[0] == 200  # back once the catalog answers


def test_ready_only_once_the_startup_heap_is_frozen(
    settings: Settings,
    embedder: SentenceTransformerEmbedder,
    gated_model: threading.Event,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The first collection after start walks every object loaded: not on a request's time."""
    from rag_service.api import app as app_module

    gc.unfreeze()  # whatever an earlier test left
    freeze_gate = threading.Event()
    real_freeze = app_module.freeze_startup_heap

    def gated_freeze() -> None:
        assert freeze_gate.wait(timeout=60), "the test never let the heap freeze"
        real_freeze()

    monkeypatch.setattr(app_module, "freeze_startup_heap", gated_freeze)
    try:
        with TestClient(create_app(settings, embedder=embedder)) as client:
            gated_model.set()
            wait_until(lambda: client.app.state.runtime.chat_model_loaded)
            # The model is in, the heap not yet frozen: still loading.
            assert readiness(client)[1]["model"] == "loading"
            assert gc.get_freeze_count() == 0

            freeze_gate.set()
            wait_until(lambda: readiness(client)[0] == 200)
            # torch, transformers and the app: far more than any test's own objects
            assert gc.get_freeze_count() > 100_000
        assert gc.get_freeze_count() == 0  # handed back to the collector at shutdown
    finally:
        freeze_gate.set()


def test_a_given_model_freezes_the_heap_during_startup(
    settings: Settings, embedder: SentenceTransformerEmbedder
) -> None:
    gc.unfreeze()
    with TestClient(create_app(settings, embedder=embedder, chat_model=ScriptedChatModel())) as c:
        assert readiness(c)[0] == 200
        assert gc.get_freeze_count() > 100_000
    assert gc.get_freeze_count() == 0
