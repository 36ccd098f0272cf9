"""The one interface every language-model backend implements."""

from __future__ import annotations

import abc
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True)
class ChatMessage:
    """One message of a chat prompt."""

    role: Role
    content: str


@dataclass(frozen=True)
class Usage:
    """Tokens one model call consumed."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class Completion:
    """A finished answer from the model."""

    text: str
    usage: Usage = field(default_factory=Usage)
    finish_reason: str | None = None
    model: str = ""


@dataclass(frozen=True)
class StreamDelta:
    """A piece of a streamed answer; the last one carries usage and finish reason."""

    text: str
    usage: Usage | None = None
    finish_reason: str | None = None
    #: The model that wrote it, set by wrappers that choose between models
    #: (``FallbackChatModel``); None means the ``ChatModel``'s own ``name``.
    model: str | None = None


class ChatModel(abc.ABC):
    """A language model that answers chat prompts.

    Implementations are blocking; callers on an event loop run them in a
    thread.  They raise only ``ModelError`` subclasses.
    """

    name: str = "model"

    #: Tokens the model can attend to (prompt plus answer).
    context_window: int = 2048

    @abc.abstractmethod
    def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
    ) -> Completion:
        """Answer ``messages`` in one piece."""

    @abc.abstractmethod
    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
    ) -> Iterator[StreamDelta]:
        """Answer ``messages`` piece by piece."""

    def count_tokens(self, text: str) -> int:
        """Tokens ``text`` takes in this model's prompt (estimate unless overridden)."""
        # About four characters a token for English under BPE tokenizers.
        return max(1, (len(text) + 3) // 4)

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release what the backend holds (threads, clients, weights)."""
