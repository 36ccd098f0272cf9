"""Bad input gets a clear error with the right status, and nothing else is disturbed."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from rag_service.api import create_app
from rag_service.config import IngestSettings, QuerySettings, Settings
from rag_service.embedding import SentenceTransformerEmbedder
from tests.helpers import ScriptedChatModel, make_pdf, wait_for_job


def error_of(response: object, status: int) -> dict[str, str]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}
    assert body["error"]["code"] and body["error"]["message"]
    return body["error"]  # type: ignore[no-any-return]


def post_files(client: TestClient, files: list[tuple[str, bytes]], collection: str = "docs"):
    return client.post(
        f"/v1/collections/{collection}/documents",
        files=[("files", (name, data)) for name, data in files],
    )


def test_unsupported_file_type_is_415_and_names_what_is_supported(client: TestClient) -> None:
    png = b"\x89PNG\r\n\x1a\n" + b"\x00" * 100
    err = error_of(post_files(client, [("photo.png", png)]), 415)
    assert err["code"] == "unsupported_document"
    assert "PDF" in err["message"] or "pdf" in err["message"]
    assert client.get("/v1/collections").json()["collections"] == []


def test_one_unsupported_file_refuses_the_whole_upload(client: TestClient) -> None:
    zip_bytes = b"PK\x03\x04" + b"\x00" * 200
    err = error_of(post_files(client, [("ok.txt", b"fine"), ("a.docx", zip_bytes)]), 415)
    assert "a.docx" in err["message"]
    assert client.get("/v1/collections").json()["collections"] == []


def test_empty_file_is_refused(client: TestClient) -> None:
    err = error_of(post_files(client, [("empty.txt", b"")]), 422)
    assert err["code"] == "empty_document"
    assert "empty" in err["message"]


def test_corrupt_and_encrypted_pdfs_fail_their_job_with_a_message(client: TestClient) -> None:
    from tests.helpers import make_encrypted_pdf

    response = post_files(
        client,
        [("cut.pdf", make_pdf(["some text"] * 3)[:300]), ("locked.pdf", make_encrypted_pdf("x"))],
    )
    assert response.status_code == 202
    job = wait_for_job(client, response.json()["job_id"])
    assert job["status"] == "failed"
    assert "cut.pdf" in job["error"] and "locked.pdf" in job["error"]
    assert "password" in job["error"]


def test_pdf_name_on_something_else_is_refused(client: TestClient) -> None:
    err = error_of(post_files(client, [("report.pdf", b"just some words, not a PDF")]), 422)
    assert "not a PDF" in err["message"]


def test_file_over_the_size_limit_is_413_while_streaming(
    tmp_path: Path, embedder: SentenceTransformerEmbedder, scripted: ScriptedChatModel
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data", ingest=IngestSettings(max_file_bytes=1000, worker_threads=1)
    )
    with TestClient(create_app(settings, embedder=embedder, chat_model=scripted)) as client:
        err = error_of(post_files(client, [("big.txt", b"a" * 5000)]), 413)
        assert "1000 byte limit" in err["message"]
        assert "RAG_INGEST__MAX_FILE_BYTES" in err["message"]
        # nothing half-written is left behind
        assert list((settings.data_dir / "blobs" / "tmp").iterdir()) == []
        assert [p for p in (settings.data_dir / "blobs").iterdir() if p.is_file()] == []
        ok = post_files(client, [("small.txt", b"a" * 500)])
        assert ok.status_code == 202
        too_long = {"documents": [{"text": "b" * 2000, "source": "inline.txt"}]}
        err = error_of(client.post("/v1/collections/docs/documents", json=too_long), 413)
        assert "multipart" in err["message"]


def test_uploads_have_a_request_size_and_file_count_limit(
    tmp_path: Path, embedder: SentenceTransformerEmbedder, scripted: ScriptedChatModel
) -> None:
    settings = Settings(
        data_dir=tmp_path / "data",
        ingest=IngestSettings(max_request_bytes=3000, max_files_per_request=2, worker_threads=0),
    )
    with TestClient(create_app(settings, embedder=embedder, chat_model=scripted)) as client:
        files = [(f"f{i}.txt", b"a" * 1200) for i in range(3)]
        err = error_of(post_files(client, [*files[:2], ("g.txt", b"b" * 1200)]), 413)
        assert "RAG_INGEST__MAX_REQUEST_BYTES" in err["message"]
        err = error_of(post_files(client, [(n, b"x" * 10) for n, _ in files]), 422)
        assert "too many files" in err["message"] and "2" in err["message"]
        assert [p for p in (settings.data_dir / "blobs").iterdir() if p.is_file()] == []
        assert post_files(client, files[:2]).status_code == 202


@pytest.mark.parametrize(
    ("name", "stored"),
    [("../../etc/passwd.txt", "passwd.txt"), ("dir\\sub\\notes.md", "notes.md")],
)
def test_file_names_lose_their_directories(client: TestClient, name: str, stored: str) -> None:
    response = post_files(client, [(name, b"hello")])
    assert response.status_code == 202, response.text
    assert response.json()["documents"][0]["source"] == stored


def test_file_name_with_nul_is_refused(client: TestClient) -> None:
    body = (
        b'--XyZ\r\nContent-Disposition: form-data; name="files"; filename="a\x00b.txt"\r\n'
        b"Content-Type: text/plain\r\n\r\nhello\r\n--XyZ--\r\n"
    )
    response = client.post(
        "/v1/collections/docs/documents",
        content=body,
        headers={"content-type": "multipart/form-data; boundary=XyZ"},
    )
    err = error_of(response, 422)
    assert "NUL" in err["message"]


def test_malformed_multipart_is_422(client: TestClient) -> None:
    body = b'--XyZ\r\nContent-Disposition: form-data; name="files"; filename="a.txt"\r\n\r\nhel'
    response = client.post(
        "/v1/collections/docs/documents",
        content=body,
        headers={"content-type": "multipart/form-data; boundary=XyZ"},
    )
    err = error_of(response, 422)
    assert "multipart" in err["message"]
    assert client.get("/v1/collections").json()["collections"] == []


def test_upload_without_files_is_422(client: TestClient) -> None:
    response = client.post("/v1/collections/docs/documents", data={"other": "x"})
    error_of(response, 422)


@pytest.mark.parametrize("name", ["bad name", "-dash", "a" * 65, "blobs", "x..y"])
def test_invalid_collection_names_are_422(client: TestClient, name: str) -> None:
    err = error_of(post_files(client, [("a.txt", b"text")], collection=name), 422)
    assert "collection name" in err["message"]


def test_malformed_json_is_422(client: TestClient) -> None:
    response = client.post(
        "/v1/query", content=b"{not json", headers={"content-type": "application/json"}
    )
    error_of(response, 422)
    response = client.post(
        "/v1/collections/docs/documents",
        content=b"{not json",
        headers={"content-type": "application/json"},
    )
    assert "JSON" in error_of(response, 422)["message"]


def test_missing_fields_are_422_and_named(client: TestClient) -> None:
    err = error_of(client.post("/v1/query", json={"collection": "docs"}), 422)
    assert "question" in err["message"]


def test_unknown_collection_document_and_job_are_404(client: TestClient) -> None:
    err = error_of(client.post("/v1/query", json={"collection": "nope", "question": "hi"}), 404)
    assert err["code"] == "collection_not_found"
    error_of(client.get("/v1/collections/nope/documents"), 404)
    error_of(client.delete("/v1/collections/nope"), 404)
    error_of(client.get("/v1/jobs/job_missing"), 404)
    wait_for_job(client, post_files(client, [("a.txt", b"text")]).json()["job_id"])
    assert error_of(client.get("/v1/collections/docs/documents/doc_x"), 404)["code"] == (
        "document_not_found"
    )
    error_of(client.get("/v1/no/such/route"), 404)


@pytest.fixture
def strict_client(
    tmp_path: Path, embedder: SentenceTransformerEmbedder, scripted: ScriptedChatModel
):
    settings = Settings(
        data_dir=tmp_path / "data",
        query=QuerySettings(max_question_chars=100, max_top_k=10),
    )
    with TestClient(create_app(settings, embedder=embedder, chat_model=scripted)) as client:
        wait_for_job(client, post_files(client, [("a.txt", b"some text")]).json()["job_id"])
        yield client


def test_question_over_the_length_limit_is_422(strict_client: TestClient) -> None:
    response = strict_client.post("/v1/query", json={"collection": "docs", "question": "q" * 101})
    assert "RAG_QUERY__MAX_QUESTION_CHARS" in error_of(response, 422)["message"]


@pytest.mark.parametrize("top_k", [0, -1, 11])
def test_top_k_out_of_range_is_422(strict_client: TestClient, top_k: int) -> None:
    for path, key in (("/v1/query", "question"), ("/v1/retrieve", "query")):
        response = strict_client.post(
            path, json={"collection": "docs", key: "text", "top_k": top_k}
        )
        assert "top_k" in error_of(response, 422)["message"]


def test_empty_question_is_422(strict_client: TestClient) -> None:
    error_of(strict_client.post("/v1/query", json={"collection": "docs", "question": "  "}), 422)
