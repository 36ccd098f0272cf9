"""Where ``rag eval`` sends its questions: this process, or a running service.

Both backends answer with plain JSON dicts in the HTTP API's shapes
(``RetrieveOut``, ``QueryOut``, ``JobOut``), so the metrics read one format
whichever way the numbers were made, and a run over HTTP can be compared
with a run in process.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from types import TracebackType
from typing import Any, Self
from urllib.parse import quote

import httpx

from rag_service.config import Settings
from rag_service.embedding import Embedder
from rag_service.errors import InvalidRequest, JobTimeout, RagError
from rag_service.llm.base import ChatModel
from rag_service.services.documents import expand_paths

#: A question waits for the language model, and some strategies call it several times.
HTTP_TIMEOUT = httpx.Timeout(300.0, connect=10.0)
#: Longest wait for an ingestion job.
JOB_TIMEOUT_S = 900.0
#: Files per upload request, below the service's default per-request limit.
UPLOAD_BATCH = 32

Body = dict[str, Any]


class Backend(ABC):
    """Retrieve, ask and ingest against one service; a context manager that closes it."""

    #: Shown in reports: ``in-process`` or the service URL.
    name: str

    @abstractmethod
    def ingest(self, collection: str, paths: Sequence[Path]) -> list[Body]:
        """Upload files (folders are walked), wait for the jobs; the finished jobs."""

    @abstractmethod
    def retrieve(self, collection: str, query: str, *, top_k: int, mode: str) -> Body:
        """``POST /v1/retrieve``'s answer."""

    @abstractmethod
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
        """``POST /v1/query``'s answer."""

    @abstractmethod
    def close(self) -> None:
        """Release what the backend holds."""

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class InProcessBackend(Backend):
    """The services of a data directory, opened in this process."""

    name = "in-process"

    def __init__(
        self,
        settings: Settings,
        *,
        embedder: Embedder | None = None,
        chat_model: ChatModel | None = None,
        ingesting: bool = False,
    ) -> None:
        from rag_service.runtime import Runtime

        self.runtime = Runtime.open(
            settings, embedder=embedder, chat_model=chat_model, workers=1 if ingesting else 0
        )

    def ingest(self, collection: str, paths: Sequence[Path]) -> list[Body]:
        from rag_service.api.schemas import JobOut

        receipt = self.runtime.documents.add_paths(collection, list(paths))
        if receipt.rejected:
            why = "; ".join(f"{name}: {reason}" for name, reason in receipt.rejected)
            raise InvalidRequest(f"could not ingest {why}")
        job = self.runtime.wait_for_job(receipt.job_id, timeout_s=JOB_TIMEOUT_S)
        if job.status not in ("succeeded", "failed"):
            raise JobTimeout(f"ingest job {job.id} is still {job.status} after {JOB_TIMEOUT_S} s")
        return [JobOut.of(job).model_dump(mode="json")]

    def retrieve(self, collection: str, query: str, *, top_k: int, mode: str) -> Body:
        from rag_service.api.schemas import RetrieveOut

        found = self.runtime.query.retrieve(collection, query, top_k, mode=mode)
        return RetrieveOut.of(found).model_dump(mode="json")

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
        from rag_service.api.schemas import QueryOut

        answer = self.runtime.query.ask(
            collection, question, top_k, mode=mode, strategy=strategy, samples=samples
        )
        return QueryOut.of(answer).model_dump(mode="json")

    def close(self) -> None:
        self.runtime.close()


class HttpBackend(Backend):
    """A running service, over its REST API."""

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        transport: httpx.BaseTransport | None = None,
        poll_s: float = 0.3,
    ) -> None:
        self.name = url
        headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.http = httpx.Client(
            base_url=url, headers=headers, timeout=HTTP_TIMEOUT, transport=transport
        )
        self.poll_s = poll_s

    def _send(self, method: str, path: str, **kwargs: Any) -> Body:
        # The clients' translation, so a failure here raises what the library would.
        from rag_service.client_calls import error_from_response, unreachable

        try:
            response = self.http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise unreachable(self.http.base_url, exc) from exc
        if not response.is_success:
            raise error_from_response(response)
        try:
            body = response.json()
        except ValueError as exc:
            raise RagError(f"unexpected response to {method} {path}: {exc}") from exc
        if not isinstance(body, dict):
            raise RagError(f"unexpected response to {method} {path}: not a JSON object")
        return body

    def ingest(self, collection: str, paths: Sequence[Path]) -> list[Body]:
        files = expand_paths(paths)
        if not files:
            raise InvalidRequest("no ingestible files found (pdf, txt, md, html)")
        jobs: list[str] = []
        for start in range(0, len(files), UPLOAD_BATCH):
            with ExitStack() as stack:
                parts = [
                    ("files", (p.name, stack.enter_context(p.open("rb"))))
                    for p in files[start : start + UPLOAD_BATCH]
                ]
                receipt = self._send(
                    "POST", f"/v1/collections/{quote(collection, safe='')}/documents", files=parts
                )
            jobs.append(str(receipt["job_id"]))
        return [self._wait(job_id) for job_id in jobs]

    def _wait(self, job_id: str) -> Body:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while True:
            job = self._send("GET", f"/v1/jobs/{quote(job_id, safe='')}")
            if job.get("status") in ("succeeded", "failed"):
                return job
            if time.monotonic() >= deadline:
                raise JobTimeout(
                    f"ingest job {job_id} is still {job.get('status')} after {JOB_TIMEOUT_S} s"
                )
            time.sleep(self.poll_s)

    def retrieve(self, collection: str, query: str, *, top_k: int, mode: str) -> Body:
        body = {"collection": collection, "query": query, "top_k": top_k, "mode": mode}
        return self._send("POST", "/v1/retrieve", json=body)

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
        sent = {
            "collection": collection,
            "question": question,
            "top_k": top_k,
            "mode": mode,
            "strategy": strategy,
            "samples": samples,
        }
        return self._send(
            "POST", "/v1/query", json={k: v for k, v in sent.items() if v is not None}
        )

    def close(self) -> None:
        self.http.close()
