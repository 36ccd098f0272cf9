"""The real app under uvicorn on 127.0.0.1, in a background thread, for tests that need TCP."""

from __future__ import annotations

import socket
import threading
import time

import uvicorn

from rag_service.api import create_app
from rag_service.config import Settings
from rag_service.embedding import Embedder
from rag_service.llm.base import ChatModel
from tests.helpers import ScriptedChatModel


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LiveServer:
    """The real app under uvicorn in a thread; uvicorn binds host and port itself.

    The model is a ``ScriptedChatModel`` unless another is given.
    """

    def __init__(
        self, settings: Settings, embedder: Embedder, chat_model: ChatModel | None = None
    ) -> None:
        self.model = chat_model or ScriptedChatModel("Adults pay twelve euros [1].")
        app = create_app(settings, embedder=embedder, chat_model=self.model)
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            assert self.thread.is_alive(), "uvicorn exited while starting"
            assert time.monotonic() < deadline, "uvicorn did not start within 60 s"
            time.sleep(0.01)
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "uvicorn did not stop"
