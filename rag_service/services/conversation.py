"""Earlier turns of a conversation: what a follow-up searches for, what the prompt carries."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from rag_service.llm.base import ChatMessage

#: Tokens of earlier conversation turns a prompt may carry.
HISTORY_TOKENS = 300
#: A question this short may lean on the previous one ("and for children?").
FOLLOW_UP_WORDS = 12


def search_text(question: str, history: Sequence[ChatMessage]) -> str:
    """What to retrieve for: the question, after the user's previous one if it is short."""
    if len(question.split()) > FOLLOW_UP_WORDS:
        return question
    earlier = [m.content for m in history if m.role == "user" and m.content.strip()]
    return f"{earlier[-1]}\n{question}" if earlier else question


def recent_turns(
    history: Sequence[ChatMessage], count_tokens: Callable[[str], int]
) -> tuple[ChatMessage, ...]:
    """The latest user and assistant turns that fit ``HISTORY_TOKENS``, oldest first."""
    kept: list[ChatMessage] = []
    used = 0
    for message in reversed(history):
        if message.role == "system":
            continue
        used += count_tokens(message.content)
        if used > HISTORY_TOKENS:
            break
        kept.append(message)
    return tuple(reversed(kept))
