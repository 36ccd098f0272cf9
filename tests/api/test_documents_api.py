"""Uploading, following jobs, listing and deleting over HTTP, with the real embedder."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient

from tests.helpers import REAL_PDF, make_encrypted_pdf, make_pdf, wait_for_job

PAGES = [
    "Chapter one is about the history of lighthouses on rocky coasts.",
    "The keeper of the lighthouse must refill the lamp oil every evening at dusk.",
    "Chapter three lists the lighthouse museums that are open to visitors in winter.",
]


def upload(client: TestClient, files: list[tuple[str, bytes]], collection: str = "docs") -> dict:
    response = client.post(
        f"/v1/collections/{collection}/documents",
        files=[("files", (name, data)) for name, data in files],
    )
    assert response.status_code == 202, response.text
    return response.json()


def test_upload_answers_202_with_a_job_and_one_document_per_file(client: TestClient) -> None:
    body = upload(client, [("manual.pdf", make_pdf(PAGES)), ("notes.md", b"# Notes\n\nOil lamps.")])

    assert body["job_id"].startswith("job_")
    assert [d["source"] for d in body["documents"]] == ["manual.pdf", "notes.md"]
    assert all(d["status"] == "queued" and len(d["sha256"]) == 64 for d in body["documents"])

    job = wait_for_job(client, body["job_id"])
    assert job["status"] == "succeeded", job
    assert job["stage"] == "done"
    assert job["error"] is None
    progress = job["progress"]
    assert progress["documents_total"] == progress["documents_done"] == 2
    assert progress["chunks_done"] == progress["chunks_total"] > 0

    pdf_id = body["documents"][0]["id"]
    doc = client.get(f"/v1/collections/docs/documents/{pdf_id}").json()
    assert doc["status"] == "indexed"
    assert doc["pages"] == 3
    assert doc["chunk_count"] >= 3
    assert doc["source"] == "manual.pdf"
    assert doc["error"] is None


def test_retrieve_returns_the_page_that_holds_the_answer(client: TestClient) -> None:
    body = upload(client, [("manual.pdf", make_pdf(PAGES))])
    wait_for_job(client, body["job_id"])

    response = client.post(
        "/v1/retrieve",
        json={"collection": "docs", "query": "how often is the lamp oil refilled?", "top_k": 2},
    )

    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == 2
    assert results[0]["page"] == 2
    assert results[0]["source"] == "manual.pdf"
    assert "lamp oil" in results[0]["text"]
    assert results[0]["score"] >= results[1]["score"]
    assert set(response.json()["timings"]) >= {"embed_ms", "search_ms"}


def test_real_multi_page_pdf_is_indexed_page_by_page(client: TestClient) -> None:
    body = upload(client, [(REAL_PDF.name, REAL_PDF.read_bytes())])
    job = wait_for_job(client, body["job_id"])
    assert job["status"] == "succeeded", job

    doc = client.get(f"/v1/collections/docs/documents/{body['documents'][0]['id']}").json()
    assert doc["pages"] > 10
    hits = client.post(
        "/v1/retrieve",
        json={"collection": "docs", "query": "magic rules to recognise a file type", "top_k": 5},
    ).json()["results"]
    assert all(1 <= h["page"] <= doc["pages"] for h in hits)
    assert any("magic" in h["text"].lower() for h in hits)


def test_same_bytes_twice_give_the_same_document_and_no_new_chunks(client: TestClient) -> None:
    data = make_pdf(PAGES)
    first = upload(client, [("manual.pdf", data)])
    wait_for_job(client, first["job_id"])
    chunks = client.get("/v1/collections/docs").json()["chunk_count"]

    second = upload(client, [("copy.pdf", data)])

    assert second["documents"][0]["id"] == first["documents"][0]["id"]
    assert wait_for_job(client, second["job_id"])["status"] == "succeeded"
    assert client.get("/v1/collections/docs").json()["chunk_count"] == chunks


def test_new_version_under_the_same_name_replaces_the_old_chunks(client: TestClient) -> None:
    old = upload(client, [("guide.txt", b"The office opens at nine in the morning.")])
    wait_for_job(client, old["job_id"])
    new = upload(client, [("guide.txt", b"The office now opens at ten o'clock sharp.")])
    wait_for_job(client, new["job_id"])

    listing = client.get("/v1/collections/docs/documents").json()
    assert [d["id"] for d in listing["documents"]] == [new["documents"][0]["id"]]
    hits = client.post(
        "/v1/retrieve", json={"collection": "docs", "query": "when does the office open"}
    ).json()["results"]
    assert [h["text"] for h in hits] == ["The office now opens at ten o'clock sharp."]


def test_deleted_document_never_comes_back_in_results(client: TestClient) -> None:
    body = upload(
        client,
        [
            ("a.txt", b"Penguins live in the southern hemisphere."),
            ("b.txt", b"Owls hunt at night."),
        ],
    )
    wait_for_job(client, body["job_id"])
    penguin_id = body["documents"][0]["id"]

    assert client.delete(f"/v1/collections/docs/documents/{penguin_id}").status_code == 204

    assert client.get(f"/v1/collections/docs/documents/{penguin_id}").status_code == 404
    hits = client.post(
        "/v1/retrieve", json={"collection": "docs", "query": "penguins", "top_k": 10}
    ).json()["results"]
    assert [h["source"] for h in hits] == ["b.txt"]
    assert client.delete(f"/v1/collections/docs/documents/{penguin_id}").status_code == 404


def test_collections_are_listed_and_deleted(client: TestClient) -> None:
    wait_for_job(client, upload(client, [("a.txt", b"alpha")], collection="one")["job_id"])
    wait_for_job(client, upload(client, [("b.txt", b"beta")], collection="two")["job_id"])

    names = [c["name"] for c in client.get("/v1/collections").json()["collections"]]
    assert names == ["one", "two"]
    assert client.delete("/v1/collections/one").status_code == 204
    assert [c["name"] for c in client.get("/v1/collections").json()["collections"]] == ["two"]
    missing = client.post("/v1/retrieve", json={"collection": "one", "query": "alpha"})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "collection_not_found"


def test_json_text_upload_with_metadata(client: TestClient) -> None:
    response = client.post(
        "/v1/collections/docs/documents",
        json={
            "documents": [{"text": "Kiwis cannot fly.", "source": "birds", "metadata": {"k": 1}}]
        },
    )
    assert response.status_code == 202, response.text
    body = response.json()
    wait_for_job(client, body["job_id"])
    doc = client.get(f"/v1/collections/docs/documents/{body['documents'][0]['id']}").json()
    assert doc["status"] == "indexed"
    assert doc["source"] == "birds"
    assert doc["content_type"] == "text/plain"
    assert doc["metadata"] == {"k": 1}


def test_multipart_metadata_field_is_attached(client: TestClient) -> None:
    response = client.post(
        "/v1/collections/docs/documents",
        files=[("files", ("a.txt", b"text"))],
        data={"metadata": json.dumps({"team": "ops"})},
    )
    assert response.status_code == 202
    assert response.json()["documents"][0]["metadata"] == {"team": "ops"}


def test_a_bad_file_fails_alone_and_the_others_are_indexed(client: TestClient) -> None:
    body = upload(
        client,
        [
            ("good.txt", b"Bees make honey from nectar."),
            ("broken.pdf", make_pdf(PAGES)[:400]),
            ("locked.pdf", make_encrypted_pdf("secret plans")),
            ("scan.pdf", make_pdf(["", ""])),
        ],
    )
    job = wait_for_job(client, body["job_id"])

    assert job["status"] == "failed"
    assert job["progress"]["documents_failed"] == 3
    assert "3 of 4 documents failed" in job["error"]
    docs = {
        d["source"]: client.get(f"/v1/collections/docs/documents/{d['id']}").json()
        for d in body["documents"]
    }
    assert docs["good.txt"]["status"] == "indexed"
    assert docs["broken.pdf"]["status"] == "failed"
    assert "password" in docs["locked.pdf"]["error"].lower()
    assert docs["scan.pdf"]["status"] == "failed"
    assert "no text" in docs["scan.pdf"]["error"]
    # the worker is still alive and takes the next job
    again = upload(client, [("more.txt", b"Wasps do not make honey.")])
    assert wait_for_job(client, again["job_id"])["status"] == "succeeded"


def test_a_failed_document_can_be_retried_by_uploading_it_again(client: TestClient) -> None:
    first = upload(client, [("empty.txt", b" " * 70_000)])
    assert wait_for_job(client, first["job_id"])["status"] == "failed"
    second = upload(client, [("empty.txt", b" " * 70_000)])
    assert second["documents"][0]["id"] == first["documents"][0]["id"]
    assert wait_for_job(client, second["job_id"])["status"] == "failed"


def test_document_listing_pages(client: TestClient) -> None:
    files = [(f"f{i}.txt", f"document number {i}".encode()) for i in range(5)]
    wait_for_job(client, upload(client, files)["job_id"])
    page = client.get("/v1/collections/docs/documents", params={"limit": 2, "offset": 2}).json()
    assert page["total"] == 5
    assert [d["source"] for d in page["documents"]] == ["f2.txt", "f3.txt"]
