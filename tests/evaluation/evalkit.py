"""Helpers of the evaluation tests: a hand-written fake backend, API-shaped bodies,
a small real document set with its questions, and the real app on 127.0.0.1."""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rag_service.errors import RagError
from rag_service.evaluation.backends import Backend, Body


def hit(source: str, page: int | None = None, text: str = "", n: int = 1) -> Body:
    """One result or source in the API's shape."""
    return {
        "n": n,
        "chunk_id": n,
        "document_id": f"doc-{source}",
        "source": source,
        "page": page,
        "text": text,
        "score": 1.0 / n,
    }


def answer(
    text: str,
    *,
    sources: Sequence[Body] = (),
    citations: Sequence[int] = (),
    answerable: bool = True,
    invalid: int = 0,
    degraded: bool = False,
    cost: dict[str, Any] | None = None,
    usage: tuple[int, int] = (100, 10),
) -> Body:
    """A ``/v1/query`` body in the new contract's shape."""
    body: Body = {
        "answer": text,
        "answerable": answerable,
        "abstain_reason": None if answerable else "low_score",
        "strategy": "direct",
        "reasoning": None,
        "agreement": None,
        "sources": list(sources),
        "citations": list(citations),
        "citation_mode": "model" if citations else "none",
        "invalid_citations": invalid,
        "usage": {
            "prompt_tokens": usage[0],
            "completion_tokens": usage[1],
            "total_tokens": sum(usage),
        },
        "timings": {},
        "model": "fake",
        "degraded": degraded,
        "degraded_reason": "model_unavailable: down" if degraded else None,
        "mode": "hybrid",
    }
    if cost is not None:
        body["cost"] = cost
    return body


class FakeBackend(Backend):
    """Answers from tables keyed by question text; records every call."""

    name = "fake"

    def __init__(
        self,
        retrievals: Mapping[tuple[str, str], list[Body]] | None = None,
        answers: Mapping[tuple[str, str], Body | Exception] | None = None,
        jobs: list[Body] | None = None,
        delay_s: float = 0.0,
    ) -> None:
        self.retrievals = dict(retrievals or {})
        self.answers = dict(answers or {})
        self.jobs = jobs or []
        self.delay_s = delay_s
        self.calls: list[tuple[Any, ...]] = []
        self.closed = False

    def ingest(self, collection: str, paths: Sequence[Path]) -> list[Body]:
        self.calls.append(("ingest", collection, tuple(paths)))
        return self.jobs

    def retrieve(self, collection: str, query: str, *, top_k: int, mode: str) -> Body:
        self.calls.append(("retrieve", collection, query, top_k, mode))
        return {"results": self.retrievals.get((mode, query), []), "timings": {}, "mode": mode}

    def ask(
        self,
        collection: str,
        question: str,
        *,
        top_k: int | None,
        mode: str | None,
        strategy: str,
        samples: int | None,
    ) -> Body:
        self.calls.append(("ask", collection, question, top_k, mode, strategy, samples))
        time.sleep(self.delay_s)
        found = self.answers.get((strategy, question))
        if isinstance(found, Exception):
            raise found
        if found is None:
            raise RagError(f"no scripted answer for {question!r}")
        return found

    def close(self) -> None:
        self.closed = True


def write_jsonl(path: Path, rows: Sequence[dict[str, Any] | str]) -> Path:
    """Rows as JSON lines; strings are written as they are (for broken lines)."""
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


# -- a small real document set ---------------------------------------------------

GUIDE_PAGES = [
    "Welcome to the visitor guide of Heron Island. Read it before you travel.",
    "The island museum opens at nine o'clock in the morning and closes at five.",
    "Camping on Heron Island is allowed only at the north meadow site.",
]

DOCS = {
    "lighthouse.md": "# The lighthouse\n\nThe lighthouse on Gull Point is kept by Marta Quill. "
    "It was built in 1887 from granite blocks shipped from Aberdeen.\n",
    "bakery.txt": "The bakery on Mill Street bakes rye bread every Tuesday. Its sourdough "
    "starter is named Bartholomew and is older than the baker.\n",
    "ferry.md": "# Taking a bicycle on the ferry\n\nTo bring a bicycle on the ferry, reserve a "
    "bike slot at the harbour office at least one day before you sail.\n",
}

QUESTIONS: list[dict[str, Any]] = [
    {
        "id": "keeper",
        "question": "Who keeps the lighthouse on Gull Point?",
        "answers": ["Marta Quill"],
        "relevant": [{"source": "lighthouse.md"}],
        "kind": "fact",
    },
    {
        "id": "starter",
        "question": "What is the name of the bakery's sourdough starter?",
        "answers": ["Bartholomew"],
        "relevant": [{"source": "bakery.txt"}],
        "kind": "fact",
    },
    {
        "id": "bicycle",
        "question": "How do I bring my bicycle on the ferry?",
        "answers": ["reserve a bike slot"],
        "relevant": [{"source": "ferry.md"}],
        "kind": "howto",
    },
    {
        "id": "museum",
        "question": "When does the island museum open in the morning?",
        "answers": ["nine o'clock", "9"],
        "relevant": [{"source": "guide.pdf", "page": 2}],
        "kind": "fact",
    },
    {
        "id": "camping",
        "question": "Where is camping allowed on Heron Island?",
        "answers": ["north meadow"],
        "relevant": [{"source": "docs/guide.pdf", "page": 3}],
        "kind": "fact",
    },
    {
        "id": "runway",
        "question": "How long is the runway of the international airport?",
        "answers": [],
        "relevant": [],
        "kind": "unanswerable",
    },
]
