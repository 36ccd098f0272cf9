"""Hostile input: a corpus of bad files and requests, all generated here, against one live app.

Every case gets a clear answer (the right status and a message saying what
to fix) or a failed job with a message, within the ingestion limits; after
the whole corpus the service still serves, and nothing else is damaged.
Single-case behaviour already pinned elsewhere (tests/api/test_bad_input.py,
tests/ingest/test_loaders.py) is not repeated here except as corpus members.
"""

from __future__ import annotations

import base64
import json
import re
import select
import socket
import sqlite3
import struct
import time
import zlib
from collections.abc import Callable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from ingest.loaders import load_document
from ingest.loaders.pdf import check_inflated_size
from rag_service.config import IngestSettings, Settings
from rag_service.embedding import SentenceTransformerEmbedder
from rag_service.errors import DocumentTooLarge
from rag_service.runtime import Runtime
from tests.helpers import HashEmbedder, make_encrypted_pdf, make_pdf, wait_for_job
from tests.live import LiveServer

MiB = 1024 * 1024
BOUNDARY = "HostileBoundary"
# Chunks a document may make in the app under test (small, so a case can cross it).
MAX_CHUNKS = 1000
# Wall time any single case may take, upload to finished job.
CASE_SECONDS = 120.0
# Memory cap of the PDF extraction child in the app under test.
MEMORY_MB = 512


# -- generators ----------------------------------------------------------------


def build_pdf(objects: list[bytes]) -> bytes:
    """A PDF from raw object bodies numbered from 1 (object 1 is the catalog), with a valid xref."""
    out = bytearray(b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)


def pdf_page(contents: bytes, extra: bytes = b"") -> list[bytes]:
    """Catalog, page tree, one page with Helvetica and the given contents object (4)."""
    return [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >>" + extra + b" >>",
        contents,
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]


def stream(data: bytes, filters: bytes = b"") -> bytes:
    return b"<< /Length %d %s >>\nstream\n" % (len(data), filters) + data + b"\nendstream"


def zeros_deflate(total: int, step: int = MiB) -> bytes:
    """A zlib stream of ``total`` zero bytes, built from one repeated full-flush block.

    Compressing 2 GB for real would take seconds; full flushes make blocks
    independent, so one block can be repeated and the checksum computed
    (Adler-32 of n zeros is ``(n mod 65521) << 16 | 1``).
    """
    compressor = zlib.compressobj(9)
    zeros = bytes(step)
    first = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    block = compressor.compress(zeros) + compressor.flush(zlib.Z_FULL_FLUSH)
    tail = compressor.flush(zlib.Z_FINISH)[:-4]
    adler = ((total % 65521) << 16) | 1
    return first + block * (total // step - 1) + tail + struct.pack(">I", adler)


def flate_bomb_pdf() -> bytes:
    """One page whose second content stream inflates to 2 GiB of zeros (about 2 MB on disk)."""
    text = stream(
        zlib.compress(b"BT /F1 12 Tf 72 720 Td (Hello bomb) Tj ET"), b"/Filter /FlateDecode"
    )
    bomb = stream(zeros_deflate(2048 * MiB), b"/Filter /FlateDecode")
    objects = pdf_page(text)
    objects[2] = objects[2].replace(b"/Contents 4 0 R", b"/Contents [4 0 R 6 0 R]")
    return build_pdf([*objects, bomb])


def double_flate_bomb_pdf() -> bytes:
    """A stream compressed twice: 1 GiB of zeros in a couple of kilobytes."""
    twice = zlib.compress(zeros_deflate(1024 * MiB), 9)
    return build_pdf(pdf_page(stream(twice, b"/Filter [/FlateDecode /FlateDecode]")))


def _text_and(bomb: bytes) -> bytes:
    """One page: a readable text stream, then ``bomb`` as its second content stream."""
    objects = pdf_page(stream(b"BT /F1 12 Tf 72 720 Td (Hello bomb) Tj ET"))
    objects[2] = objects[2].replace(b"/Contents 4 0 R", b"/Contents [4 0 R 6 0 R]")
    return build_pdf([*objects, bomb])


def ascii85_flate_bomb_pdf() -> bytes:
    """2 GiB of zeros, deflated then ASCII85-encoded: the Flate pre-scan cannot inflate it."""
    encoded = base64.a85encode(zeros_deflate(2048 * MiB)) + b"~>"
    return _text_and(stream(encoded, b"/Filter [/ASCII85Decode /FlateDecode]"))


def lzw_zeros(total: int) -> bytes:
    """An LZWDecode stream (EarlyChange 1) of at least ``total`` zero bytes.

    For zeros the codes are known: after a clear, ``0`` then 258, 259, ...,
    code 256 + k standing for k zeros; the table is cleared before it fills.
    About 2,600 output bytes per input byte, the most LZW allows.
    """
    out = bytearray()
    acc = bits = 0

    def put(code: int, width: int) -> None:
        nonlocal acc, bits
        acc = (acc << width) | code
        bits += width
        while bits >= 8:
            bits -= 8
            out.append((acc >> bits) & 0xFF)
        acc &= (1 << bits) - 1

    produced, width = 0, 9
    while produced < total:
        put(256, width)  # clear, read at the width in force
        width, next_code = 9, 258
        put(0, width)
        produced += 1
        for code in range(258, 258 + 3700):
            put(code, width)
            produced += code - 256
            next_code += 1
            if next_code + 1 >= 1 << width and width < 12:
                width += 1
    put(257, width)
    if bits:
        put(0, 8 - bits)
    return bytes(out)


def lzw_bomb_pdf() -> bytes:
    """2 GiB of zeros in about 1.6 MB of LZW, a filter the Flate pre-scan does not read."""
    return _text_and(stream(lzw_zeros(2048 * MiB), b"/Filter /LZWDecode"))


def nested_forms_pdf(depth: int) -> bytes:
    """A page that draws form 1, which draws form 2 twice, ... : 2**depth tiny paths.

    A few kilobytes that keep PDFium inside one call for a long time, building
    page objects all along: slow and memory-hungry, and no stream is large.
    """
    objects = pdf_page(stream(b"BT /F1 12 Tf 72 720 Td (Forms page) Tj ET /X Do"))
    objects[2] = objects[2].replace(b">> >>", b">> /XObject << /X 6 0 R >> >>")
    form = b"<< /Type /XObject /Subtype /Form /BBox [0 0 612 792] %s /Length %d >>\nstream\n"
    for level in range(depth):
        if level < depth - 1:
            body = b"/X Do /X Do"
            resources = b"/Resources << /XObject << /X %d 0 R >> >>" % (7 + level)
        else:
            body, resources = b"0 0 1 1 re f", b""
        objects.append(form % (resources, len(body)) + body + b"\nendstream")
    return build_pdf(objects)


def empty_pages_pdf(pages: int) -> bytes:
    kids = b" ".join(b"%d 0 R" % (3 + i) for i in range(pages))
    page = b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] >>"
    return build_pdf(
        [
            b"<< /Type /Catalog /Pages 2 0 R >>",
            b"<< /Type /Pages /Kids [" + kids + b"] /Count %d >>" % pages,
            *[page] * pages,
        ]
    )


def nested_arrays_pdf(depth: int = 100_000) -> bytes:
    deep = b"[" * depth + b"]" * depth
    return build_pdf(
        pdf_page(stream(b"BT /F1 12 Tf 72 720 Td (Nested arrays) Tj ET"), b" /Deep " + deep)
    )


def nested_content_pdf(depth: int = 100_000) -> bytes:
    return build_pdf(pdf_page(stream(b"BT /F1 12 Tf 72 720 Td " + b"[" * depth + b" ET")))


def corrupt_xref_pdf() -> bytes:
    good = make_pdf(["The xref table of this file is garbage, the objects are fine."])
    at = good.rindex(b"xref")
    return good[:at] + b"xref\n0 99\nGARBAGE GARBAGE GARBAGE\n" + good[at + 60 :]


def multipart(parts: list[tuple[bytes, bytes]], *, close: bool = True) -> bytes:
    """A multipart body from (header block, data) pairs, written by hand to keep it hostile."""
    body = b""
    for headers, data in parts:
        body += f"--{BOUNDARY}\r\n".encode() + headers + b"\r\n\r\n" + data + b"\r\n"
    return body + (f"--{BOUNDARY}--\r\n".encode() if close else b"")


def file_part(filename: str | bytes, data: bytes) -> tuple[bytes, bytes]:
    name = filename.encode() if isinstance(filename, str) else filename
    return b'Content-Disposition: form-data; name="files"; filename="' + name + b'"', data


def nested_json(depth: int) -> bytes:
    return (
        b'{"collection": "docs", "question": "q", "filters": ' + b"[" * depth + b"]" * depth + b"}"
    )


# -- the corpus ----------------------------------------------------------------

Send = Callable[[httpx.Client], httpx.Response]


@dataclass(frozen=True)
class Case:
    """One hostile request and what the service must answer.

    ``status`` 202 means accepted: then ``job`` says how the job must end,
    and ``fragment`` must be in the job's error (for a failed job).
    """

    name: str
    send: Send
    status: int
    fragment: str = ""
    job: str | None = None
    check: Callable[[httpx.Client, dict[str, Any]], None] | None = field(default=None)


def upload(collection: str, name: str, data: bytes, content_type: str | None = None) -> Send:
    def send(client: httpx.Client) -> httpx.Response:
        file = (name, data) if content_type is None else (name, data, content_type)
        return client.post(f"/v1/collections/{collection}/documents", files=[("files", file)])

    return send


def raw(path: str, body: bytes, content_type: str) -> Send:
    def send(client: httpx.Client) -> httpx.Response:
        return client.post(path, content=body, headers={"content-type": content_type})

    return send


def post_json(path: str, payload: object) -> Send:
    return lambda client: client.post(path, json=payload)


DOCS = "/v1/collections/hostile/documents"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}"


def _document(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    doc_id = body["documents"][0]["id"]
    doc: dict[str, Any] = client.get(f"/v1/collections/hostile/documents/{doc_id}").json()
    return doc


def read_as(content_type: str) -> Callable[[httpx.Client, dict[str, Any]], None]:
    def check(client: httpx.Client, body: dict[str, Any]) -> None:
        assert _document(client, body)["content_type"] == content_type

    return check


def at_least_chunks(count: int) -> Callable[[httpx.Client, dict[str, Any]], None]:
    def check(client: httpx.Client, body: dict[str, Any]) -> None:
        assert _document(client, body)["chunk_count"] >= count

    return check


def source_is(name: str) -> Callable[[httpx.Client, dict[str, Any]], None]:
    def check(client: httpx.Client, body: dict[str, Any]) -> None:
        assert body["documents"][0]["source"] == name

    return check


def _bad_utf8_text() -> bytes:
    line = "Grüße from a text file with broken bytes and NULs. ".encode()
    return (line + b"\xff\xfe\xc3\x28\x00 ") * 200


# CJK, an emoji, Hebrew and a right-to-left override that makes it display as "dm.txt".
UNICODE_NAME = "报告 📄 \u05e9\u05dc\u05d5\u05dd \u202etxt.md"


def _query(**extra: object) -> dict[str, object]:
    return {"collection": "hostile", "question": "what is in the files?", **extra}


CASES: list[Case] = [
    # PDFs that are damaged, locked, empty or built to exhaust the reader
    Case(
        "pdf_truncated_half",
        lambda c: upload("hostile", "half.pdf", (p := make_pdf(["cut"] * 4))[: len(p) // 2])(c),
        202, "damaged", "failed",
    ),
    Case(
        "pdf_corrupt_xref_is_recovered",
        lambda c: upload("hostile", "xref.pdf", corrupt_xref_pdf())(c),
        202, job="succeeded",
    ),
    Case(
        "pdf_garbage_after_header",
        upload("hostile", "garbage.pdf", b"%PDF-1.7\n" + bytes(range(256)) * 400),
        202, "damaged", "failed",
    ),
    Case(
        "pdf_user_password",
        lambda c: upload("hostile", "locked.pdf", make_encrypted_pdf("secret text"))(c),
        202, "password", "failed",
    ),
    Case(
        "pdf_owner_password_only_opens",
        lambda c: upload("hostile", "owner.pdf", _owner_only_pdf())(c),
        202, job="succeeded",
    ),
    Case("pdf_zero_bytes", upload("hostile", "zero.pdf", b""), 422, "empty"),
    Case("txt_zero_bytes", upload("hostile", "zero.txt", b""), 422, "empty"),
    Case("md_zero_bytes", upload("hostile", "zero.md", b""), 422, "empty"),
    Case("html_zero_bytes", upload("hostile", "zero.html", b""), 422, "empty"),
    Case(
        "pdf_6000_empty_pages_over_max_pages",
        lambda c: upload("hostile", "pages6000.pdf", empty_pages_pdf(6000))(c),
        202, "6,000 pages; the limit is 5,000", "failed",
    ),
    Case(
        "pdf_3000_empty_pages_no_text",
        lambda c: upload("hostile", "pages3000.pdf", empty_pages_pdf(3000))(c),
        202, "no text layer", "failed",
    ),
    Case(
        "pdf_flate_bomb_2gib",
        lambda c: upload("hostile", "bomb.pdf", flate_bomb_pdf())(c),
        202, "RAG_INGEST__MAX_INFLATED_BYTES", "failed",
    ),
    Case(
        "pdf_double_flate_bomb_1gib",
        lambda c: upload("hostile", "bomb2.pdf", double_flate_bomb_pdf())(c),
        202, "compression bomb", "failed",
    ),
    # bombs the Flate pre-scan cannot see: stopped by the extraction child's memory cap
    Case(
        "pdf_ascii85_flate_bomb_2gib",
        lambda c: upload("hostile", "bomb85.pdf", ascii85_flate_bomb_pdf())(c),
        202, f"{MEMORY_MB} MiB memory limit", "failed",
    ),
    Case(
        "pdf_lzw_bomb_2gib",
        lambda c: upload("hostile", "bomblzw.pdf", lzw_bomb_pdf())(c),
        202, f"{MEMORY_MB} MiB memory limit", "failed",
    ),
    Case(
        "pdf_forms_drawn_4m_times",
        lambda c: upload("hostile", "forms.pdf", nested_forms_pdf(22))(c),
        202, f"{MEMORY_MB} MiB memory limit", "failed",
    ),
    Case(
        "pdf_arrays_nested_100k_deep",
        lambda c: upload("hostile", "nested.pdf", nested_arrays_pdf())(c),
        202, job="succeeded",
    ),
    Case(
        "pdf_content_nested_100k_deep",
        lambda c: upload("hostile", "nested-content.pdf", nested_content_pdf())(c),
        202, "no text layer", "failed",
    ),
    # extensions that lie
    Case(
        "png_named_pdf", upload("hostile", "photo.pdf", b"\x89PNG\r\n\x1a\n" + bytes(500)),
        422, "looks like a PNG image",
    ),
    Case(
        "pdf_named_txt",
        lambda c: upload("hostile", "really-a-pdf.txt", make_pdf(["A PDF in disguise."]))(c),
        202, job="succeeded", check=read_as("application/pdf"),
    ),
    Case(
        "html_named_md",
        upload(
            "hostile", "page.md",
            b"<!DOCTYPE html><html><body><main><h1>Saved page</h1><p>Its words.</p></main>"
            b"</body></html>",
        ),
        202, job="succeeded", check=read_as("text/html"),
    ),
    # text in hostile encodings and shapes
    Case(
        "txt_invalid_utf8_and_nul", upload("hostile", "broken.txt", _bad_utf8_text()),
        202, job="succeeded",
    ),
    Case(
        "txt_utf16_with_bom",
        upload("hostile", "utf16.txt", ("UTF-16 text with a BOM. " * 50).encode("utf-16")),
        202, job="succeeded",
    ),
    Case(
        "html_200k_nested_divs",
        upload("hostile", "divs.html", b"<div>" * 200_000 + b"deep text" + b"</div>" * 200_000),
        202, job="succeeded",
    ),
    Case(
        "txt_one_line_near_size_limit",
        lambda c: upload("hostile", "line.txt", b"word " * (49 * MiB // 5))(c),
        202, "the limit is 20,000,000", "failed",
    ),
    Case(
        "txt_300k_without_a_space_is_split",
        upload("hostile", "nospace.txt", b"x" * 300_000),
        202, job="succeeded", check=at_least_chunks(90),
    ),
    Case(
        "txt_over_max_chunks",
        lambda c: upload("hostile", "chunky.txt", b"y" * 4 * MiB)(c),
        202, "RAG_INGEST__MAX_CHUNKS_PER_DOCUMENT", "failed",
    ),
    # names
    Case(
        "name_absolute_path_traversal",
        upload("hostile", "/etc/cron.d/../../root/.ssh/authorized_keys.txt", b"key text"),
        202, job="succeeded", check=source_is("authorized_keys.txt"),
    ),
    Case("name_1000_chars", upload("hostile", "n" * 1000 + ".txt", b"text"), 422, "longer than"),
    Case(
        "name_emoji_rtl_cjk",
        upload("hostile", UNICODE_NAME, b"# Unicode name\n\ntext"),
        202, job="succeeded", check=source_is(UNICODE_NAME),
    ),
    Case(
        "name_control_chars",
        raw(DOCS, multipart([file_part(b"a\x01b\x1b[31m.txt", b"text")]), MULTIPART),
        422, "control characters",
    ),
    # malformed multipart bodies
    Case(
        "multipart_no_closing_boundary",
        raw(DOCS, multipart([file_part("a.txt", b"text")], close=False), MULTIPART),
        422, "closing boundary",
    ),
    Case(
        "multipart_part_without_headers",
        raw(DOCS, multipart([(b"X-Nothing: here", b"text")]), MULTIPART),
        422, "Content-Disposition",
    ),
    Case(
        "multipart_boundary_in_the_middle",
        raw(
            DOCS,
            multipart([file_part("a.txt", f"one\r\n--{BOUNDARY}\r\nnot a header".encode())]),
            MULTIPART,
        ),
        422, "multipart",
    ),
    Case(
        "multipart_without_boundary",
        raw(DOCS, multipart([file_part("a.txt", b"text")]), "multipart/form-data"),
        422, "boundary",
    ),
    Case(
        "multipart_random_bytes",
        raw(DOCS, bytes(range(256)) * 64, MULTIPART),
        422, "multipart",
    ),
    # JSON bodies and query parameters
    Case(
        "json_text_upload_just_over_the_limit",
        lambda c: post_json(DOCS, {"documents": [{"text": "z" * (50 * MiB)}]})(c),
        413, "RAG_INGEST__MAX_FILE_BYTES",
    ),
    Case(
        "json_upload_unknown_field",
        post_json(DOCS, {"documents": [{"text": "t", "source": "a.txt"}], "sneaky": 1}),
        422, "sneaky: Extra inputs are not permitted",
    ),
    Case(
        "query_json_nested_100k_deep",
        raw("/v1/query", nested_json(100_000), "application/json"),
        422, "",
    ),
    Case(
        "query_100k_characters",
        post_json("/v1/query", _query(question="why " * 25_000)),
        422, "RAG_QUERY__MAX_QUESTION_CHARS",
    ),
    Case("query_top_k_string", post_json("/v1/query", _query(top_k="ten")), 422, "top_k"),
    Case("query_top_k_negative", post_json("/v1/query", _query(top_k=-5)), 422, "top_k"),
    Case("query_top_k_huge", post_json("/v1/query", _query(top_k=10**30)), 422, "top_k"),
    Case("query_unknown_field", post_json("/v1/query", _query(temperature=9)), 422, "temperature"),
    Case(
        "retrieve_query_with_nul_and_100k",
        post_json("/v1/retrieve", {"collection": "hostile", "query": "\x00" * 100_000}),
        422, "",
    ),
]  # fmt: skip


def _owner_only_pdf() -> bytes:
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    pdf.add_page()
    pdf.multi_cell(0, 6, "Readable by anyone; only printing is restricted.")
    pdf.set_encryption(owner_password="owner")
    return bytes(pdf.output())


# -- the app -------------------------------------------------------------------


@dataclass
class Live:
    server: LiveServer
    client: httpx.Client
    settings: Settings


@pytest.fixture(scope="module")
def live(
    tmp_path_factory: pytest.TempPathFactory, embedder: SentenceTransformerEmbedder
) -> Iterator[Live]:
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("hostile") / "data",
        ingest=IngestSettings(
            worker_threads=1,
            poll_interval_s=0.05,
            max_chunks_per_document=MAX_CHUNKS,
            max_extract_memory_mb=MEMORY_MB,
        ),
    )
    with (
        LiveServer(settings, embedder) as server,
        httpx.Client(base_url=server.url, timeout=CASE_SECONDS) as client,
    ):
        # a document from before the corpus, that it must not disturb
        response = upload("hostile", "before.txt", b"The museum opens at nine every day.")(client)
        assert wait_for_job(client, response.json()["job_id"])["status"] == "succeeded"
        yield Live(server, client, settings)


def test_the_corpus_has_at_least_30_cases() -> None:
    assert len(CASES) + len(STREAMED_CASES) >= 30
    assert len({case.name for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_hostile_case(live: Live, case: Case) -> None:
    started = time.monotonic()
    response = case.send(live.client)
    assert response.status_code == case.status, response.text[:500]
    body = response.json()
    if case.status != 202:
        error = body["error"]
        assert error["code"] and error["message"]
        assert case.fragment in error["message"]
    else:
        job = wait_for_job(live.client, body["job_id"], timeout_s=CASE_SECONDS)
        assert job["status"] == case.job, job
        if case.job == "failed":
            assert isinstance(job["error"], str) and case.fragment in job["error"], job
        if case.check is not None:
            case.check(live.client, body)
    assert time.monotonic() - started < CASE_SECONDS


# -- a 100 MB upload, streamed over a raw socket --------------------------------


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def stream_upload(port: int, total: int, *, chunked: bool) -> tuple[int, bytes, int]:
    """POST a ``total``-byte file 1 MiB at a time; stop sending once the server answers.

    Returns the status, the response body and the bytes sent.
    """
    head = multipart([file_part("huge.txt", b"")], close=False).split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    piece = b"h" * MiB
    request = (f"POST {DOCS} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {MULTIPART}\r\n").encode()
    request += (
        b"Transfer-Encoding: chunked\r\n\r\n"
        if chunked
        else b"Content-Length: %d\r\n\r\n" % (len(head) + total)
    )
    sent = 0
    with closing(socket.create_connection(("127.0.0.1", port), timeout=60)) as sock:
        sock.sendall(request)
        frame: Callable[[bytes], bytes] = (
            (lambda data: b"%x\r\n" % len(data) + data + b"\r\n") if chunked else (lambda d: d)
        )
        sock.sendall(frame(head))
        while sent < total:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered: no point sending the rest
            try:
                sock.sendall(frame(piece))
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(piece)
        response = b""
        while b"\r\n\r\n" not in response or not _complete(response):
            data = sock.recv(65536)
            if not data:
                break
            response += data
    status = int(response.split(b" ", 2)[1])
    return status, response.split(b"\r\n\r\n", 1)[1], sent


def _complete(response: bytes) -> bool:
    head, _, body = response.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return body.endswith(b"0\r\n\r\n")


STREAMED_CASES = {"upload_100mib_declared_length": False, "upload_100mib_chunked": True}


@pytest.mark.parametrize("chunked", STREAMED_CASES.values(), ids=list(STREAMED_CASES))
def test_100mib_upload_is_refused_while_streaming(live: Live, chunked: bool) -> None:
    before = rss_bytes()
    started = time.monotonic()
    status, body, sent = stream_upload(live.server.port, 100 * MiB, chunked=chunked)
    seconds = time.monotonic() - started
    assert status == 413, body[:300]
    message = json.loads(_dechunk(body) if body[:1] != b"{" else body)["error"]["message"]
    assert "RAG_INGEST__MAX_" in message
    # refused once the 50 MiB file limit was crossed, long before the 100 MiB were sent
    assert sent <= 80 * MiB, sent
    assert seconds < 60
    assert rss_bytes() - before < 60 * MiB
    assert list((live.settings.data_dir / "blobs" / "tmp").iterdir()) == []


def _dechunk(body: bytes) -> bytes:
    out = b""
    while body:
        size_line, _, rest = body.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        out += rest[:size]
        body = rest[size + 2 :]
    return out


# -- after the corpus ----------------------------------------------------------


def test_the_service_is_intact_after_the_corpus(live: Live) -> None:
    client = live.client
    assert client.get("/healthz").status_code == 200
    response = upload("after", "after.txt", b"The aquarium closes at six in winter.")(client)
    assert wait_for_job(client, response.json()["job_id"])["status"] == "succeeded"
    answer = client.post("/v1/query", json={"collection": "after", "question": "aquarium?"})
    assert answer.status_code == 200, answer.text
    assert answer.json()["sources"][0]["source"] == "after.txt"
    before = client.post("/v1/retrieve", json={"collection": "hostile", "query": "museum"})
    assert before.status_code == 200
    assert "before.txt" in {s["source"] for s in before.json()["results"]}

    data = live.settings.data_dir
    with closing(sqlite3.connect(data / "catalog.sqlite3")) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert conn.execute("SELECT count(*) FROM jobs WHERE status = 'running'").fetchone() == (0,)
        assert conn.execute(
            "SELECT count(*) FROM documents WHERE status IN ('queued', 'processing')"
        ).fetchone() == (0,)
        collections = dict(conn.execute("SELECT name, id FROM collections").fetchall())
        chunk_ids = {
            name: {
                row[0]
                for row in conn.execute("SELECT id FROM chunks WHERE collection_id = ?", (cid,))
            }
            for name, cid in collections.items()
        }
    assert list((data / "blobs" / "tmp").iterdir()) == []
    runtime = live.server.server.config.app.state.runtime
    for name, ids in chunk_ids.items():
        runtime.vectors.sync(name)
        assert set(runtime.vectors.ids(name).tolist()) == ids, name


# -- the limits this corpus added, one by one ------------------------------------


@pytest.mark.parametrize("engine", ["pypdfium2", "pypdf"])
def test_flate_bomb_is_refused_by_both_engines_before_extraction(engine: str) -> None:
    settings = IngestSettings(pdf_engine=engine, max_inflated_bytes=64 * MiB)
    with pytest.raises(DocumentTooLarge, match="RAG_INGEST__MAX_INFLATED_BYTES"):
        load_document(
            build_pdf(pdf_page(stream(zeros_deflate(128 * MiB), b"/Filter /FlateDecode"))),
            "b.pdf",
            settings,
        )


def test_inflated_size_counts_content_but_not_images() -> None:
    image = (
        b"<< /Type /XObject /Subtype /Image /Width 1 /Height 1 /Length %d /Filter /FlateDecode >>"
    )
    big = zeros_deflate(8 * MiB)
    objects = pdf_page(
        stream(zlib.compress(b"BT /F1 12 Tf 72 720 Td (Image page) Tj ET"), b"/Filter /FlateDecode")
    )
    objects.append(image % len(big) + b"\nstream\n" + big + b"\nendstream")
    loaded = load_document(build_pdf(objects), "i.pdf", IngestSettings(max_inflated_bytes=MiB))
    assert loaded.sections[0].text == "Image page"


def test_pdf_reading_has_a_time_budget() -> None:
    settings = IngestSettings(max_seconds_per_document=1e-9)
    with pytest.raises(DocumentTooLarge, match="RAG_INGEST__MAX_SECONDS_PER_DOCUMENT"):
        load_document(make_pdf(["one", "two"]), "slow.pdf", settings)


@pytest.mark.parametrize(
    ("ingest", "fragment"),
    [
        (IngestSettings(max_seconds_per_document=1e-9), "RAG_INGEST__MAX_SECONDS_PER_DOCUMENT"),
        (IngestSettings(max_chunks_per_document=2), "the limit is 2 (RAG_INGEST__MAX_CHUNKS"),
    ],
)
def test_pipeline_fails_a_document_over_its_time_or_chunk_budget(
    tmp_path: Path, ingest: IngestSettings, fragment: str
) -> None:
    settings = Settings(data_dir=tmp_path / "data", ingest=ingest)
    text = "\n\n".join(f"Paragraph {i} " + "word " * 150 for i in range(5)).encode()
    with Runtime.open(settings, embedder=HashEmbedder()) as runtime:
        receipt = runtime.documents.add_bytes("docs", [("long.txt", text)])
        assert runtime.make_worker().run_once()
        document = runtime.catalog.document_by_id(receipt.documents[0].id)
        assert document is not None and document.status == "failed"
        assert document.error is not None and fragment in document.error
        assert runtime.jobs.get(receipt.job_id).status == "failed"


# -- bombs and slow pages, stopped by the extraction child's caps ---------------

CHILD_BOMBS = {
    "ascii85_flate": ascii85_flate_bomb_pdf,
    "lzw": lzw_bomb_pdf,
    "forms_drawn_4m_times": lambda: nested_forms_pdf(22),
}


@pytest.mark.parametrize("make", CHILD_BOMBS.values(), ids=list(CHILD_BOMBS))
def test_bombs_the_flate_prescan_misses_are_stopped_by_the_memory_cap(
    make: Callable[[], bytes],
) -> None:
    data = make()
    check_inflated_size(data, "b.pdf", 64 * MiB)  # invisible to the pre-scan
    settings = IngestSettings(max_extract_memory_mb=MEMORY_MB)
    message = f"exceeded the {MEMORY_MB} MiB memory limit (RAG_INGEST__MAX_EXTRACT_MEMORY_MB)"
    with pytest.raises(DocumentTooLarge, match=re.escape(message)):
        load_document(data, "b.pdf", settings)
    # the next PDF is read as usual
    assert load_document(make_pdf(["after the bomb"]), "a.pdf", settings).sections[0].text == (
        "after the bomb"
    )


def test_a_pdf_that_keeps_pdfium_busy_is_stopped_at_the_time_budget_and_the_worker_goes_on(
    tmp_path: Path,
) -> None:
    # memory cap high enough that the clock, not memory, stops this one
    ingest = IngestSettings(max_seconds_per_document=4, max_extract_memory_mb=4096)
    settings = Settings(data_dir=tmp_path / "data", ingest=ingest)
    with Runtime.open(settings, embedder=HashEmbedder()) as runtime:
        worker = runtime.make_worker()
        first = runtime.documents.add_bytes(
            "docs", [("slow.pdf", nested_forms_pdf(22)), ("ok.txt", b"Plain words still work.")]
        )
        assert worker.run_once()
        slow, ok = (runtime.catalog.document_by_id(d.id) for d in first.documents)
        assert slow is not None and slow.status == "failed"
        assert slow.error == (
            "PDF extraction of slow.pdf took longer than 4 s and was stopped "
            "(RAG_INGEST__MAX_SECONDS_PER_DOCUMENT); split it into smaller files"
        )
        assert ok is not None and ok.status == "indexed"
        job = runtime.jobs.get(first.job_id)
        assert job.error == f"1 of 2 documents failed: slow.pdf: {slow.error}"

    # the same process reads the next PDF (with a budget a loaded machine cannot miss)
    settings = settings.model_copy(update={"ingest": IngestSettings()})
    with Runtime.open(settings, embedder=HashEmbedder()) as runtime:
        second = runtime.documents.add_bytes("docs", [("good.pdf", make_pdf(["A good PDF."]))])
        assert runtime.make_worker().run_once()
        good = runtime.catalog.document_by_id(second.documents[0].id)
        assert good is not None and good.status == "indexed" and good.chunk_count == 1
