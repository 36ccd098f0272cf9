"""Python clients for the RAG service's HTTP API, sync and async, on httpx.

    with RagClient("http://127.0.0.1:8000") as rag:
        receipt = rag.upload_files("docs", ["manual.pdf", ("notes.md", b"# Notes ...")])
        rag.wait_for_job(receipt.job_id)
        answer = rag.query("docs", "How do I reset the device?")

``AsyncRagClient`` has the same methods as coroutines.

Results are the API's own pydantic response models from
``rag_service.api.schemas`` (``QueryOut``, ``JobOut``, ...), validated with
``model_validate``.  One definition serves the server and the client, so the
two cannot drift apart, and pydantic ignores fields it does not know, so a
newer server that adds fields still parses.  (Frozen dataclasses would be a
second copy of every shape, kept in step by hand.)

Errors are the service's own ``RagError`` classes: the ``code`` of the
server's ``{"error": {"code", "message"}}`` body picks the class (the map is
built from the class tree, so a class added to ``rag_service.errors`` is
known at once), ``Retry-After`` becomes ``retry_after``, an unknown code falls
back to a class chosen by HTTP status, and a service that cannot be reached
(refused, timed out) raises ``ServiceUnavailable``.  Routes, bodies and that
mapping live in ``rag_service.client_calls``, written once for both clients.

``query_stream`` reads a streamed answer (Server-Sent Events, parsed by
httpx-sse): the sources, the answer's tokens as the model writes them, then
the checked answer with its citations; leaving the loop stops the model.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping
from contextlib import ExitStack
from types import TracebackType
from typing import Any, Self, TypeVar

import httpx
from httpx_sse import EventSource

from rag_service import client_calls as calls
from rag_service.api.schemas import (
    CollectionOut,
    DocumentList,
    DocumentOut,
    Health,
    JobOut,
    QueryOut,
    Readiness,
    RetrieveOut,
    SourceOut,
    UploadResponse,
)
from rag_service.client_calls import FileInput, StreamEvent

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_TIMEOUT",
    "AsyncRagClient",
    "CollectionOut",
    "DocumentList",
    "DocumentOut",
    "FileInput",
    "Health",
    "JobOut",
    "QueryOut",
    "RagClient",
    "Readiness",
    "RetrieveOut",
    "SourceOut",
    "StreamEvent",
    "UploadResponse",
]

DEFAULT_BASE_URL = "http://127.0.0.1:8000"
#: Generous read timeout: a question waits for the language model.
DEFAULT_TIMEOUT = httpx.Timeout(120.0, connect=5.0)

T = TypeVar("T")

SSE = {"Accept": "text/event-stream"}


class RagClient:
    """Blocking client for one RAG service; use it as a context manager or ``close()`` it.

    ``api_key`` is sent as ``Authorization: Bearer``; ``transport`` replaces
    the network (``httpx.MockTransport`` in tests).  Every method raises a
    ``RagError`` subclass on failure.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._http = httpx.Client(
            base_url=base_url, headers=calls.headers(api_key), timeout=timeout, transport=transport
        )

    @property
    def base_url(self) -> httpx.URL:
        """The service's address, as httpx normalised it."""
        return self._http.base_url

    def _send(self, call: calls.Call[T]) -> T:
        try:
            response = self._http.request(
                call.method,
                call.path,
                params=call.params,
                json=call.json,
                data=call.data,
                files=call.files,
            )
        except httpx.TransportError as exc:
            raise calls.unreachable(self.base_url, exc) from exc
        return call.finish(response)

    def upload_files(
        self,
        collection: str,
        files: FileInput | Iterable[FileInput],
        metadata: Mapping[str, Any] | None = None,
    ) -> UploadResponse:
        """Upload files (paths, or ``(name, bytes)`` pairs); returns the job and documents.

        The collection is created on first upload; ``metadata`` is attached to
        every file.  Ingestion runs in the background: follow ``job_id``.
        """
        with ExitStack() as stack:
            parts = calls.file_parts(files, stack)
            return self._send(calls.upload_files(collection, parts, metadata))

    def upload_text(
        self,
        collection: str,
        text: str,
        source: str = "text.txt",
        metadata: Mapping[str, Any] | None = None,
    ) -> UploadResponse:
        """Upload a text as a document listed under ``source``."""
        return self._send(calls.upload_text(collection, text, source, metadata))

    def get_job(self, job_id: str) -> JobOut:
        """Where an ingestion job is: status, stage, progress, error."""
        return self._send(calls.get_job(job_id))

    def wait_for_job(self, job_id: str, *, timeout_s: float = 600.0, poll_s: float = 0.5) -> JobOut:
        """Poll a job until it has succeeded or failed (check ``status``); ``JobTimeout`` else."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = self.get_job(job_id)
            remaining = deadline - time.monotonic()
            if job.status in calls.FINISHED:
                return job
            if remaining <= 0:
                raise calls.job_timeout(job, timeout_s)
            time.sleep(min(poll_s, remaining))

    def query(
        self,
        collection: str,
        question: str,
        top_k: int | None = None,
        *,
        mode: str | None = None,
        filters: Mapping[str, Any] | None = None,
        strategy: str | None = None,
        samples: int | None = None,
    ) -> QueryOut:
        """Answer a question from a collection, with its sources and citations."""
        return self._send(
            calls.query(collection, question, top_k, mode, filters, strategy, samples)
        )

    def query_stream(
        self,
        collection: str,
        question: str,
        top_k: int | None = None,
        *,
        mode: str | None = None,
        filters: Mapping[str, Any] | None = None,
        strategy: str | None = None,
    ) -> Iterator[calls.StreamEvent]:
        """Answer as it is written: a ``sources`` event, ``token`` events, then ``done``.

        Leaving the loop early closes the connection, which stops the generation.
        """
        call = calls.query(collection, question, top_k, mode, filters, strategy, stream=True)
        try:
            with self._http.stream("POST", call.path, json=call.json, headers=SSE) as response:
                if response.status_code != 200:
                    response.read()
                calls.stream_opened(call, response)
                for sse in EventSource(response).iter_sse():
                    event = calls.stream_event(sse.event, sse.data)
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise calls.unreachable(self.base_url, exc) from exc

    def retrieve(
        self,
        collection: str,
        query: str,
        top_k: int | None = None,
        *,
        mode: str | None = None,
        filters: Mapping[str, Any] | None = None,
    ) -> RetrieveOut:
        """The chunks nearest to ``query``, best first, without calling the model."""
        return self._send(calls.retrieve(collection, query, top_k, mode, filters))

    def list_collections(self) -> list[CollectionOut]:
        """Every collection with its document and chunk counts."""
        return self._send(calls.list_collections())

    def get_collection(self, name: str) -> CollectionOut:
        """One collection; ``CollectionNotFound`` if there is none by that name."""
        return self._send(calls.get_collection(name))

    def delete_collection(self, name: str) -> None:
        """Remove a collection with all its documents, chunks and vectors."""
        self._send(calls.delete_collection(name))

    def list_documents(self, collection: str, limit: int = 100, offset: int = 0) -> DocumentList:
        """A page of a collection's documents, oldest first, with the total count."""
        return self._send(calls.list_documents(collection, limit, offset))

    def get_document(self, collection: str, document_id: str) -> DocumentOut:
        """One document: status, pages, chunk count, metadata and error."""
        return self._send(calls.get_document(collection, document_id))

    def delete_document(self, collection: str, document_id: str) -> None:
        """Remove a document; its chunks never appear in results again."""
        self._send(calls.delete_document(collection, document_id))

    def health(self) -> Health:
        """Whether the process is up."""
        return self._send(calls.health())

    def ready(self) -> Readiness:
        """Whether models and index are loaded (``status`` ready or loading); never raises 503."""
        return self._send(calls.ready())

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class AsyncRagClient:
    """The same client for asyncio code: every method of ``RagClient``, awaitable.

    Open it once (an ``async with`` in a FastAPI lifespan, say) and share it:
    it holds a connection pool.
    """

    def __init__(
        self,
        base_url: str = DEFAULT_BASE_URL,
        *,
        api_key: str | None = None,
        timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self._http = httpx.AsyncClient(
            base_url=base_url, headers=calls.headers(api_key), timeout=timeout, transport=transport
        )

    @property
    def base_url(self) -> httpx.URL:
        """The service's address, as httpx normalised it."""
        return self._http.base_url

    async def _send(self, call: calls.Call[T]) -> T:
        try:
            response = await self._http.request(
                call.method,
                call.path,
                params=call.params,
                json=call.json,
                data=call.data,
                files=call.files,
            )
        except httpx.TransportError as exc:
            raise calls.unreachable(self.base_url, exc) from exc
        return call.finish(response)

    async def upload_files(
        self,
        collection: str,
        files: FileInput | Iterable[FileInput],
        metadata: Mapping[str, Any] | None = None,
    ) -> UploadResponse:
        """See ``RagClient.upload_files``."""
        with ExitStack() as stack:
            parts = calls.file_parts(files, stack)
            return await self._send(calls.upload_files(collection, parts, metadata))

    async def upload_text(
        self,
        collection: str,
        text: str,
        source: str = "text.txt",
        metadata: Mapping[str, Any] | None = None,
    ) -> UploadResponse:
        """See ``RagClient.upload_text``."""
        return await self._send(calls.upload_text(collection, text, source, metadata))

    async def get_job(self, job_id: str) -> JobOut:
        """See ``RagClient.get_job``."""
        return await self._send(calls.get_job(job_id))

    async def wait_for_job(
        self, job_id: str, *, timeout_s: float = 600.0, poll_s: float = 0.5
    ) -> JobOut:
        """See ``RagClient.wait_for_job``; sleeps without blocking the event loop."""
        deadline = time.monotonic() + timeout_s
        while True:
            job = await self.get_job(job_id)
            remaining = deadline - time.monotonic()
            if job.status in calls.FINISHED:
                return job
            if remaining <= 0:
                raise calls.job_timeout(job, timeout_s)
            await asyncio.sleep(min(poll_s, remaining))

    async def query(
        self,
        collection: str,
        question: str,
        top_k: int | None = None,
        *,
        mode: str | None = None,
        filters: Mapping[str, Any] | None = None,
        strategy: str | None = None,
        samples: int | None = None,
    ) -> QueryOut:
        """See ``RagClient.query``."""
        return await self._send(
            calls.query(collection, question, top_k, mode, filters, strategy, samples)
        )

    async def query_stream(
        self,
        collection: str,
        question: str,
        top_k: int | None = None,
        *,
        mode: str | None = None,
        filters: Mapping[str, Any] | None = None,
        strategy: str | None = None,
    ) -> AsyncIterator[calls.StreamEvent]:
        """See ``RagClient.query_stream``."""
        call = calls.query(collection, question, top_k, mode, filters, strategy, stream=True)
        try:
            async with self._http.stream(
                "POST", call.path, json=call.json, headers=SSE
            ) as response:
                if response.status_code != 200:
                    await response.aread()
                calls.stream_opened(call, response)
                async for sse in EventSource(response).aiter_sse():
                    event = calls.stream_event(sse.event, sse.data)
                    if event is not None:
                        yield event
        except httpx.TransportError as exc:
            raise calls.unreachable(self.base_url, exc) from exc

    async def retrieve(
        self,
        collection: str,
        query: str,
        top_k: int | None = None,
        *,
        mode: str | None = None,
        filters: Mapping[str, Any] | None = None,
    ) -> RetrieveOut:
        """See ``RagClient.retrieve``."""
        return await self._send(calls.retrieve(collection, query, top_k, mode, filters))

    async def list_collections(self) -> list[CollectionOut]:
        """See ``RagClient.list_collections``."""
        return await self._send(calls.list_collections())

    async def get_collection(self, name: str) -> CollectionOut:
        """See ``RagClient.get_collection``."""
        return await self._send(calls.get_collection(name))

    async def delete_collection(self, name: str) -> None:
        """See ``RagClient.delete_collection``."""
        await self._send(calls.delete_collection(name))

    async def list_documents(
        self, collection: str, limit: int = 100, offset: int = 0
    ) -> DocumentList:
        """See ``RagClient.list_documents``."""
        return await self._send(calls.list_documents(collection, limit, offset))

    async def get_document(self, collection: str, document_id: str) -> DocumentOut:
        """See ``RagClient.get_document``."""
        return await self._send(calls.get_document(collection, document_id))

    async def delete_document(self, collection: str, document_id: str) -> None:
        """See ``RagClient.delete_document``."""
        await self._send(calls.delete_document(collection, document_id))

    async def health(self) -> Health:
        """See ``RagClient.health``."""
        return await self._send(calls.health())

    async def ready(self) -> Readiness:
        """See ``RagClient.ready``."""
        return await self._send(calls.ready())

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()
