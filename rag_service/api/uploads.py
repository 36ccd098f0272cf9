"""Streaming multipart uploads: each file goes to the blob store as it arrives.

The size limits (``max_file_bytes`` per file, ``max_request_bytes`` per
request) are checked on every piece, so an oversized upload is refused as
soon as it crosses one, not after the whole body has been read.
"""

from __future__ import annotations

import json
from typing import Any, cast

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import Request

from rag_service.errors import DocumentTooLarge, InvalidRequest
from rag_service.services.documents import DocumentService, PendingUpload

FILE_FIELD = "files"
METADATA_FIELD = "metadata"
MAX_FIELD_BYTES = 64 * 1024


class _Collector:
    """Callbacks for python-multipart that route file parts to blob writers."""

    def __init__(self, service: DocumentService, file_fields: tuple[str, ...]) -> None:
        self.service = service
        self.file_fields = file_fields
        self.uploads: list[PendingUpload] = []
        self.fields: dict[str, bytes] = {}
        self._headers: dict[bytes, bytes] = {}
        self._field_name = b""
        self._field_value = b""
        self._current: PendingUpload | None = None
        self._field: str | None = None
        self._buffer = bytearray()
        self.complete = False

    def callbacks(self) -> dict[str, Any]:
        return {
            "on_part_begin": self.on_part_begin,
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
            "on_part_end": self.on_part_end,
            "on_end": self.on_end,
        }

    def on_end(self) -> None:
        self.complete = True

    def on_part_begin(self) -> None:
        self._headers = {}
        self._current = None
        self._field = None
        self._buffer = bytearray()

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._field_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._field_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[self._field_name.lower()] = self._field_value
        self._field_name = b""
        self._field_value = b""

    def on_headers_finished(self) -> None:
        disposition, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        if disposition != b"form-data" or b"name" not in options:
            raise InvalidRequest("every multipart part needs Content-Disposition: form-data; name=")
        name = options[b"name"].decode("utf-8", "replace")
        filename = options.get(b"filename")
        if name in self.file_fields or filename is not None:
            if name not in self.file_fields:
                raise InvalidRequest(
                    f"send files in parts named {self.file_fields[0]!r}, not {name!r}"
                )
            if len(self.uploads) >= self.service.settings.max_files_per_request:
                raise InvalidRequest(
                    "too many files in one upload; the limit is "
                    f"{self.service.settings.max_files_per_request}"
                )
            content_type = self._headers.get(b"content-type")
            self._current = self.service.start_upload(
                None if filename is None else filename.decode("utf-8", "replace"),
                content_type=content_type.decode("latin-1") if content_type else None,
            )
            self.uploads.append(self._current)
        else:
            self._field = name

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._current is not None:
            self._current.writer.write(data[start:end])
        elif self._field is not None:
            self._buffer += data[start:end]
            if len(self._buffer) > MAX_FIELD_BYTES:
                raise InvalidRequest(f"form field {self._field!r} is over {MAX_FIELD_BYTES} bytes")

    def on_part_end(self) -> None:
        if self._field is not None:
            self.fields[self._field] = bytes(self._buffer)
        self._current = None
        self._field = None


def parse_metadata(raw: bytes | str | None) -> dict[str, Any]:
    """The optional ``metadata`` field: a JSON object attached to every file."""
    if raw is None or raw in (b"", ""):
        return {}
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"metadata must be a JSON object: {exc}") from exc
    if not isinstance(value, dict):
        raise InvalidRequest("metadata must be a JSON object")
    return value


async def receive_files(
    request: Request, service: DocumentService, *, file_fields: tuple[str, ...] = (FILE_FIELD,)
) -> list[PendingUpload]:
    """Stream a multipart body into pending uploads; the caller registers them.

    File parts must be named one of ``file_fields``.
    """
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if content_type != b"multipart/form-data" or not boundary:
        raise InvalidRequest("send files as multipart/form-data with a boundary")
    limit = service.settings.max_request_bytes
    too_large = DocumentTooLarge(
        f"the upload is over the {limit} byte limit per request "
        "(RAG_INGEST__MAX_REQUEST_BYTES); send the files in several requests"
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    collector = _Collector(service, file_fields)
    parser = MultipartParser(boundary, cast(Any, collector.callbacks()))
    received = 0
    try:
        async for piece in request.stream():
            received += len(piece)
            if received > limit:
                raise too_large
            parser.write(piece)
        parser.finalize()
        if not collector.complete:
            raise InvalidRequest("malformed multipart body: it ended before the closing boundary")
        metadata = parse_metadata(collector.fields.get(METADATA_FIELD))
    except MultipartParseError as exc:
        service.abort(collector.uploads)
        raise InvalidRequest(f"malformed multipart body: {exc}") from exc
    except BaseException:
        service.abort(collector.uploads)
        raise
    for upload in collector.uploads:
        upload.metadata.update(metadata)
    return collector.uploads
