"""Helpers shared by the tests: a scripted model, job polling, PDFs made on the fly."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx
import numpy as np

from rag_service.embedding import Embedder, Vectors
from rag_service.llm.base import ChatMessage, ChatModel, Completion, StreamDelta, Usage

DATA = Path(__file__).parent / "data"
REAL_PDF = DATA / "shared-mime-info-spec.pdf"


class ScriptedChatModel(ChatModel):
    """A hand-written fake: answers with a fixed text and records every prompt."""

    name = "scripted"
    context_window = 2048

    def __init__(self, answer: str = "The answer is in the first source [1].") -> None:
        self.answer = answer
        #: Replies (or errors) for the next calls, in order, before ``answer`` again.
        self.queue: list[str | Exception] = []
        self.prompts: list[list[ChatMessage]] = []
        self.temperatures: list[float] = []
        self.error: Exception | None = None

    def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
    ) -> Completion:
        self.prompts.append(list(messages))
        self.temperatures.append(temperature)
        if self.error is not None:
            raise self.error
        reply = self.queue.pop(0) if self.queue else self.answer
        if isinstance(reply, Exception):
            raise reply
        prompt = sum(self.count_tokens(m.content) for m in messages)
        return Completion(reply, Usage(prompt, self.count_tokens(reply)), "stop")

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
    ) -> Iterator[StreamDelta]:
        done = self.complete(messages, max_tokens=max_tokens, temperature=temperature)
        for word in done.text.split(" "):
            yield StreamDelta(word + " ")
        yield StreamDelta("", usage=done.usage, finish_reason="stop")


def wait_for_job(
    client: httpx.Client,
    job_id: str,
    timeout_s: float = 120.0,
    headers: dict[str, str] | None = None,
) -> dict[str, object]:
    """Poll ``GET /v1/jobs/{id}`` until it has finished."""
    deadline = time.monotonic() + timeout_s
    while True:
        job: dict[str, object] = client.get(f"/v1/jobs/{job_id}", headers=headers).json()
        if job["status"] in ("succeeded", "failed"):
            return job
        if time.monotonic() > deadline:
            raise AssertionError(f"job did not finish: {job}")
        time.sleep(0.05)


def make_pdf(pages: Sequence[str]) -> bytes:
    """A real PDF with one text per page, written by fpdf2."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 6, text)
    return bytes(pdf.output())


def make_encrypted_pdf(text: str) -> bytes:
    from fpdf import FPDF
    from fpdf.enums import EncryptionMethod

    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    pdf.add_page()
    pdf.multi_cell(0, 6, text)
    pdf.set_encryption(
        owner_password="owner", user_password="secret", encryption_method=EncryptionMethod.AES_128
    )
    return bytes(pdf.output())


class HashEmbedder(Embedder):
    """Deterministic vectors from text hashes; raises on texts containing BOOM."""

    model_id = "hash-embedder"
    dim = 16
    max_seq_length = 256

    def embed_batch(self, texts: Sequence[str]) -> Vectors:
        if any("BOOM" in t for t in texts):
            raise RuntimeError("the embedder blew up")
        rows = []
        for text in texts:
            seed = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
            v = np.random.default_rng(seed).standard_normal(self.dim).astype(np.float32)
            rows.append(v / np.linalg.norm(v))
        return np.vstack(rows)

    def count_tokens(self, text: str) -> int:
        return len(text.split())
