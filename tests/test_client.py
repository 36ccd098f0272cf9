"""The Python client against the real app served by uvicorn on 127.0.0.1.

The app runs with the real embedder and a scripted model, in a background
thread; the clients talk to it over TCP like any other backend would.  The
error mapping details (Retry-After, unknown codes, newer servers) are checked
with ``httpx.MockTransport``.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from rag_service.client import AsyncRagClient, RagClient
from rag_service.config import IngestSettings, Settings
from rag_service.embedding import SentenceTransformerEmbedder
from rag_service.errors import (
    CollectionNotFound,
    ConflictError,
    DocumentNotFound,
    DocumentTooLarge,
    InvalidRequest,
    JobNotFound,
    JobTimeout,
    ModelBusy,
    ModelRateLimited,
    NotFound,
    RagError,
    ServiceUnavailable,
    UnsupportedDocument,
)
from tests.helpers import make_pdf
from tests.live import LiveServer, free_port

PAGES = [
    "The museum opens at nine o'clock on weekdays.",
    "Tickets cost twelve euros for adults and five euros for children.",
    "The cafe on the roof serves lunch until three in the afternoon.",
]
NOTES = "# Parking\n\nThe car park behind the museum is free for visitors on Sundays.\n"


ServeFn = Callable[[Settings], LiveServer]


@pytest.fixture
def serve(embedder: SentenceTransformerEmbedder) -> Iterator[ServeFn]:
    """Start the app on given settings; every server is stopped after the test."""
    with ExitStack() as stack:
        yield lambda settings: stack.enter_context(LiveServer(settings, embedder))


@pytest.fixture
def live(serve: ServeFn, settings: Settings) -> LiveServer:
    return serve(settings)


@pytest.fixture
def notes_path(tmp_path: Path) -> Path:
    path = tmp_path / "notes.md"
    path.write_text(NOTES, encoding="utf-8")
    return path


# -- the sync client against the real service -----------------------------------


def test_sync_client_uploads_waits_queries_retrieves_lists_and_deletes(
    live: LiveServer, notes_path: Path
) -> None:
    with RagClient(live.url) as rag:
        assert rag.health().status == "ok"
        assert rag.ready().status == "ready"

        receipt = rag.upload_files(
            "museum", [notes_path, ("guide.pdf", make_pdf(PAGES))], metadata={"team": "front"}
        )
        assert [d.source for d in receipt.documents] == ["notes.md", "guide.pdf"]
        job = rag.wait_for_job(receipt.job_id, timeout_s=120, poll_s=0.05)
        assert job.status == "succeeded", job.error
        assert job.progress.documents_done == 2

        answer = rag.query("museum", "How much is a ticket for an adult?", top_k=3)
        assert answer.answer == "Adults pay twelve euros [1]."
        assert answer.citations == [1]
        assert answer.degraded is False
        cited = answer.sources[0]
        assert cited.source == "guide.pdf" and cited.page == 2
        assert "twelve euros" in cited.text

        found = rag.retrieve("museum", "free parking on Sundays", top_k=2)
        assert found.results[0].source == "notes.md"
        assert len(found.results) == 2

        [collection] = rag.list_collections()
        assert (collection.name, collection.document_count) == ("museum", 2)
        assert rag.get_collection("museum").chunk_count >= 2

        page = rag.list_documents("museum", limit=1, offset=1)
        assert page.total == 2 and [d.source for d in page.documents] == ["guide.pdf"]
        notes_id = receipt.documents[0].id
        document = rag.get_document("museum", notes_id)
        assert document.status == "indexed"
        assert document.metadata["team"] == "front"

        rag.delete_document("museum", notes_id)
        with pytest.raises(DocumentNotFound):
            rag.get_document("museum", notes_id)
        assert all(r.source != "notes.md" for r in rag.retrieve("museum", "parking").results)

        rag.delete_collection("museum")
        with pytest.raises(CollectionNotFound):
            rag.get_collection("museum")
        assert rag.list_collections() == []


def test_sync_client_uploads_text_with_metadata(live: LiveServer) -> None:
    with RagClient(live.url) as rag:
        receipt = rag.upload_text("notes", NOTES, source="parking.md", metadata={"lang": "en"})
        assert rag.wait_for_job(receipt.job_id, poll_s=0.05).status == "succeeded"
        document = rag.get_document("notes", receipt.documents[0].id)
        assert document.source == "parking.md"
        assert document.metadata["lang"] == "en"
        assert rag.retrieve("notes", "car park").results[0].document_id == document.id


def test_mode_and_filters_reach_the_server(live: LiveServer, notes_path: Path) -> None:
    with RagClient(live.url) as rag:
        receipt = rag.upload_files("museum", [notes_path, ("guide.pdf", make_pdf(PAGES))])
        rag.wait_for_job(receipt.job_id, poll_s=0.05)

        only_pdf = rag.retrieve(
            "museum", "parking", top_k=5, mode="keyword", filters={"file_types": ["pdf"]}
        )
        assert only_pdf.mode == "keyword"
        assert {r.source for r in only_pdf.results} <= {"guide.pdf"}
        answer = rag.query("museum", "ticket price?", mode="dense", filters={"page_from": 2})
        assert answer.mode == "dense"
        assert all((s.page or 0) >= 2 for s in answer.sources)
        with pytest.raises(InvalidRequest):
            rag.retrieve("museum", "x", filters={"colour": "red"})


def test_one_path_or_one_pair_is_accepted_without_a_list(
    live: LiveServer, notes_path: Path
) -> None:
    with RagClient(live.url) as rag:
        by_path = rag.upload_files("single", notes_path)
        by_pair = rag.upload_files("single", ("other.txt", b"Another short text."))
        by_name = rag.upload_files("single", str(notes_path))
    assert [len(r.documents) for r in (by_path, by_pair, by_name)] == [1, 1, 1]
    # the same bytes in the same collection are one document
    assert by_name.documents[0].id == by_path.documents[0].id


# -- the async client against the real service ----------------------------------


def test_async_client_does_the_same(live: LiveServer, notes_path: Path) -> None:
    async def flow() -> None:
        async with AsyncRagClient(live.url) as rag:
            assert (await rag.health()).status == "ok"
            assert (await rag.ready()).status == "ready"
            receipt = await rag.upload_files("museum", [("guide.pdf", make_pdf(PAGES)), notes_path])
            text = await rag.upload_text("museum", "The shop sells postcards.", source="shop.txt")
            for job_id in (receipt.job_id, text.job_id):
                assert (await rag.wait_for_job(job_id, poll_s=0.05)).status == "succeeded"

            answer = await rag.query("museum", "How much is a ticket for an adult?")
            assert answer.citations == [1] and "twelve euros" in answer.sources[0].text
            found = await rag.retrieve("museum", "postcards", top_k=1)
            assert [r.source for r in found.results] == ["shop.txt"]

            assert [c.name for c in await rag.list_collections()] == ["museum"]
            assert (await rag.get_collection("museum")).document_count == 3
            assert (await rag.list_documents("museum")).total == 3
            doc_id = text.documents[0].id
            assert (await rag.get_document("museum", doc_id)).source == "shop.txt"
            await rag.delete_document("museum", doc_id)
            with pytest.raises(DocumentNotFound):
                await rag.get_document("museum", doc_id)
            await rag.delete_collection("museum")
            with pytest.raises(CollectionNotFound):
                await rag.query("museum", "anything?")
            with pytest.raises(JobNotFound):
                await rag.wait_for_job("job_does_not_exist")

    asyncio.run(flow())


# -- errors from the real service -------------------------------------------------


def test_server_errors_come_back_as_the_service_error_classes(live: LiveServer) -> None:
    with RagClient(live.url) as rag:
        with pytest.raises(CollectionNotFound, match="nowhere"):
            rag.query("nowhere", "anything?")
        with pytest.raises(CollectionNotFound):
            rag.retrieve("nowhere", "anything")
        with pytest.raises(JobNotFound):
            rag.get_job("job_does_not_exist")
        with pytest.raises(InvalidRequest):
            rag.list_documents("nowhere", limit=0)
        with pytest.raises(UnsupportedDocument):
            rag.upload_files("docs", ("program.exe", b"MZ\x90\x00\x03\x00\x00\x00" * 64))

        rag.upload_text("docs", "Some text to make the collection exist.")
        with pytest.raises(InvalidRequest, match="top_k") as caught:
            rag.query("docs", "anything?", top_k=100_000)
        assert caught.value.code == "invalid_request"
        with pytest.raises(InvalidRequest):
            rag.retrieve("docs", "anything", top_k=0)


def test_busy_model_raises_model_busy_with_retry_after(live: LiveServer) -> None:
    with RagClient(live.url) as rag:
        receipt = rag.upload_text("docs", NOTES)
        rag.wait_for_job(receipt.job_id, poll_s=0.05)
        live.model.error = ModelBusy("the local model is busy; retry shortly", retry_after=7)
        with pytest.raises(ModelBusy) as caught:
            rag.query("docs", "Where can I park?")
    assert caught.value.retry_after == 7.0


def test_too_large_upload_streamed_from_disk_raises_document_too_large(
    serve: ServeFn, tmp_path: Path
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        ingest=IngestSettings(worker_threads=1, poll_interval_s=0.05, max_file_bytes=1024),
    )
    big = tmp_path / "big.txt"
    big.write_bytes(b"All work and no play makes a dull text.\n" * 50_000)  # 2 MB
    live = serve(settings)
    with RagClient(live.url) as rag:
        with pytest.raises(DocumentTooLarge, match="1024"):
            rag.upload_files("docs", [big])
        with pytest.raises(DocumentTooLarge):
            rag.upload_files("docs", [("small-but-not-enough.txt", b"x" * 2048)])
        assert rag.health().status == "ok"

    async def flow() -> None:
        async with AsyncRagClient(live.url) as rag:
            with pytest.raises(DocumentTooLarge):
                await rag.upload_files("docs", big)

    asyncio.run(flow())


def test_service_down_raises_service_unavailable() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with RagClient(url) as rag, pytest.raises(ServiceUnavailable, match="cannot reach"):
        rag.health()

    async def flow() -> None:
        async with AsyncRagClient(url) as rag:
            with pytest.raises(ServiceUnavailable):
                await rag.query("docs", "anything?")

    asyncio.run(flow())


def test_missing_local_file_is_an_invalid_request(tmp_path: Path) -> None:
    with RagClient(transport=httpx.MockTransport(lambda r: httpx.Response(500))) as rag:
        with pytest.raises(InvalidRequest, match="cannot read"):
            rag.upload_files("docs", [tmp_path / "missing.pdf"])
        with pytest.raises(InvalidRequest, match="no files"):
            rag.upload_files("docs", [])


# -- the wire details, with MockTransport ----------------------------------------


def error_client(status: int, body: Any, headers: dict[str, str] | None = None) -> RagClient:
    def answer(request: httpx.Request) -> httpx.Response:
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        return httpx.Response(status, content=content, headers=headers)

    return RagClient(transport=httpx.MockTransport(answer))


def error_body(code: str, message: str = "it went wrong") -> dict[str, Any]:
    return {"error": {"code": code, "message": message}}


def every_error_class() -> list[type[RagError]]:
    """The classes of rag_service.errors (tests elsewhere may subclass RagError too)."""
    found: list[type[RagError]] = []
    pending: list[type[RagError]] = [RagError]
    while pending:
        cls = pending.pop()
        if cls.__module__ == "rag_service.errors":
            found.append(cls)
        pending.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("cls", every_error_class(), ids=lambda c: c.__name__)
def test_every_error_code_maps_back_to_its_class(cls: type[RagError]) -> None:
    with error_client(cls.status_code, error_body(cls.code)) as rag, pytest.raises(cls) as caught:
        rag.health()
    assert type(caught.value) is cls
    assert caught.value.message == "it went wrong"


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        (400, InvalidRequest),
        (404, NotFound),
        (409, ConflictError),
        (413, DocumentTooLarge),
        (415, UnsupportedDocument),
        (422, InvalidRequest),
        (429, ModelRateLimited),
        (500, RagError),
        (502, ServiceUnavailable),
        (503, ServiceUnavailable),
        (504, ServiceUnavailable),
        (401, RagError),
    ],
)
def test_unknown_codes_map_by_status(status: int, expected: type[RagError]) -> None:
    with (
        error_client(status, error_body("from_the_future", "new")) as rag,
        pytest.raises(RagError) as caught,
    ):
        rag.get_job("job_1")
    assert type(caught.value) is expected
    assert str(caught.value) == "new [from_the_future]"


def test_an_error_without_a_json_body_maps_by_status() -> None:
    with (
        error_client(502, b"<html>Bad Gateway</html>") as rag,
        pytest.raises(ServiceUnavailable, match=r"HTTP 502 .*Bad Gateway"),
    ):
        rag.list_collections()


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("7", 7.0), ("2.5", 2.5), ("-3", 0.0), ("soon", None), ("nan", None), (None, None)],
)
def test_retry_after_in_seconds(header: str | None, seconds: float | None) -> None:
    headers = {"Retry-After": header} if header is not None else None
    with (
        error_client(429, error_body("model_rate_limited"), headers) as rag,
        pytest.raises(ModelRateLimited) as caught,
    ):
        rag.query("docs", "q")
    assert caught.value.retry_after == seconds


def test_retry_after_as_an_http_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    with (
        error_client(503, error_body("model_busy"), {"Retry-After": when}) as rag,
        pytest.raises(ModelBusy) as caught,
    ):
        rag.query("docs", "q")
    assert caught.value.retry_after is not None
    assert 25 <= caught.value.retry_after <= 31


def job_body(status: str, stage: str, **extra: Any) -> dict[str, Any]:
    """A job as ``GET /v1/jobs/{id}`` sends it."""
    counts = ("documents_total", "documents_done", "documents_failed", "chunks_total")
    return {
        "id": "job_1",
        "collection": "docs",
        "status": status,
        "stage": stage,
        "progress": dict.fromkeys((*counts, "chunks_done"), 1),
        "error": None,
        "attempts": 1,
        "document_ids": ["doc_1"],
        "created_at": 1.0,
        "started_at": 2.0,
        "finished_at": None,
        **extra,
    }


def test_fields_from_a_newer_server_are_ignored() -> None:
    job = job_body("succeeded", "done", priority="high", finished_at=3.0)
    job["progress"]["bytes_done"] = 10
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=job))
    with RagClient(transport=transport) as rag:
        assert rag.get_job("job_1").progress.chunks_done == 1


def test_a_response_that_is_not_the_expected_shape_is_a_rag_error() -> None:
    with error_client(200, {"status": 3}) as rag, pytest.raises(RagError, match="unexpected"):
        rag.get_job("job_1")
    with error_client(200, b"not json") as rag, pytest.raises(RagError, match="unexpected"):
        rag.health()


def test_readiness_503_is_a_result_not_an_error() -> None:
    loading = {
        "status": "loading",
        "embedder": "loading",
        "index": "loading",
        "model": "loading",
        "workers": 0,
    }
    with error_client(503, loading) as rag:
        assert rag.ready().status == "loading"
    with error_client(503, error_body("index_not_ready")) as rag, pytest.raises(RagError):
        rag.ready()


def test_api_key_is_sent_as_a_bearer_token_and_paths_are_quoted() -> None:
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(204)

    with RagClient(
        "http://rag.internal/prefix", api_key="sk-123", transport=httpx.MockTransport(answer)
    ) as rag:
        rag.delete_document("docs", "doc/1?x")
    assert seen[0].headers["authorization"] == "Bearer sk-123"
    assert seen[0].url.raw_path == b"/prefix/v1/collections/docs/documents/doc%2F1%3Fx"


def test_wait_for_job_gives_up_with_job_timeout() -> None:
    running = job_body("running", "embedding")
    transport = httpx.MockTransport(lambda request: httpx.Response(200, json=running))
    with RagClient(transport=transport) as rag, pytest.raises(JobTimeout, match="embedding"):
        rag.wait_for_job("job_1", timeout_s=0.1, poll_s=0.02)

    async def flow() -> None:
        async with AsyncRagClient(transport=httpx.MockTransport(transport.handler)) as rag:
            with pytest.raises(JobTimeout):
                await rag.wait_for_job("job_1", timeout_s=0.1, poll_s=0.02)

    asyncio.run(flow())


class RecordingTransport(httpx.BaseTransport):
    """Reads the request body piece by piece, as a network transport would."""

    def __init__(self) -> None:
        self.pieces: list[int] = []

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        assert isinstance(request.stream, httpx.SyncByteStream)
        self.pieces = [len(piece) for piece in request.stream]
        return httpx.Response(202, json={"job_id": "job_1", "documents": []})


def test_files_are_streamed_from_disk_in_pieces(tmp_path: Path) -> None:
    big = tmp_path / "big.txt"
    big.write_bytes(b"x" * (3 * 1024 * 1024))
    transport = RecordingTransport()
    with RagClient(transport=transport) as rag:
        assert rag.upload_files("docs", [big]).job_id == "job_1"
    assert sum(transport.pieces) > 3 * 1024 * 1024
    assert max(transport.pieces) <= 64 * 1024
