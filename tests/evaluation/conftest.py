"""Fixtures of the evaluation tests; the helpers live in ``evalkit``."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from rag_service.config import Settings
from rag_service.embedding import SentenceTransformerEmbedder
from tests.evaluation.evalkit import DOCS, GUIDE_PAGES, QUESTIONS, write_jsonl
from tests.helpers import ScriptedChatModel, make_pdf
from tests.live import LiveServer


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    """Four small documents with distinct facts: two Markdown, a text file, a 3-page PDF."""
    folder = tmp_path / "docs"
    folder.mkdir()
    for name, text in DOCS.items():
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "guide.pdf").write_bytes(make_pdf(GUIDE_PAGES))
    return folder


@pytest.fixture
def questions_file(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "questions.jsonl", QUESTIONS)


@pytest.fixture
def data_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """``Settings()`` as the command builds it points at a fresh data directory."""
    data = tmp_path / "data"
    monkeypatch.setenv("RAG_DATA_DIR", str(data))
    monkeypatch.setenv("RAG_INGEST__POLL_INTERVAL_S", "0.05")
    return data


@pytest.fixture
def serve(embedder: SentenceTransformerEmbedder) -> Iterator[Callable[[Settings], LiveServer]]:
    """Start the app on given settings; every server is stopped after the test."""
    with ExitStack() as stack:
        yield lambda settings: stack.enter_context(
            LiveServer(
                settings, embedder, ScriptedChatModel("The lighthouse is kept by Marta Quill [1].")
            )
        )
