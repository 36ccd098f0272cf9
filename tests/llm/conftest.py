"""Fixtures for the language-model backends.

``fake_openai`` is a real OpenAI-compatible server on 127.0.0.1 (see
``fake_openai_server.py``); ``openai_settings`` points an ``LLMSettings`` at it
with short timeouts.  ``local_settings`` and ``local_model`` (the real SmolLM2
GGUF) live in the root conftest.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

# The server module sits next to this file and test dirs are not packages;
# pytest's default import mode already does this, other modes may not.
_HERE = str(Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

from fake_openai_server import FakeOpenAIServer  # noqa: E402

from rag_service.config import LLMSettings  # noqa: E402


@pytest.fixture
def fake_openai() -> Iterator[FakeOpenAIServer]:
    """A fresh OpenAI-compatible server in ``ok`` mode, stopped after the test."""
    with FakeOpenAIServer() as server:
        yield server


@pytest.fixture
def openai_settings(fake_openai: FakeOpenAIServer) -> LLMSettings:
    """Settings for the openai backend against ``fake_openai``, short timeouts."""
    return LLMSettings(
        backend="openai",
        base_url=fake_openai.base_url,
        model="fake-model",
        timeout_s=3.0,
        connect_timeout_s=1.0,
        max_retries=2,
    )
