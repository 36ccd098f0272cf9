"""Collections and their documents."""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError

from rag_service.api.deps import AuthDep, DocumentsDep
from rag_service.api.schemas import (
    CollectionIn,
    CollectionList,
    CollectionOut,
    DocumentList,
    DocumentOut,
    ErrorResponse,
    ReindexIn,
    ReindexOut,
    TextUploadIn,
    UploadResponse,
)
from rag_service.api.uploads import receive_files
from rag_service.errors import DocumentTooLarge, InvalidRequest
from rag_service.services.documents import PendingUpload
from rag_service.services.validation import collection_name, source_name

router = APIRouter(prefix="/v1/collections", tags=["documents"])

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (401, 403, 404, 413, 415, 422, 429, 503)
}


def _inline_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """A model's JSON schema with its ``#/$defs/...`` references written out in place.

    Those references only resolve inside the model's own schema, not once it
    is put into the OpenAPI document.
    """
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {key: resolve(value) for key, value in node.items()}
        if isinstance(node, list):
            return [resolve(value) for value in node]
        return node

    return {key: resolve(value) for key, value in schema.items()}


UPLOAD_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {
                            "type": "array",
                            "items": {"type": "string", "format": "binary"},
                        },
                        "metadata": {
                            "type": "string",
                            "description": "JSON object attached to every file.",
                        },
                    },
                    "required": ["files"],
                }
            },
            "application/json": {"schema": _inline_defs(TextUploadIn.model_json_schema())},
        },
    }
}


async def _json_uploads(request: Request, documents: DocumentsDep) -> list[PendingUpload]:
    # The whole JSON body counts against one file's limit: texts sent inline are small.
    limit = documents.settings.max_file_bytes
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise DocumentTooLarge(
                f"JSON body is over the {limit} byte limit (RAG_INGEST__MAX_FILE_BYTES); "
                "upload large documents as multipart files"
            )
    try:
        payload = TextUploadIn.model_validate(json.loads(body))
    except ValueError as exc:  # json and pydantic errors alike
        detail = str(exc)
        if isinstance(exc, ValidationError):
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"])
            detail = f"{where}: {first['msg']}" if where else first["msg"]
        raise InvalidRequest(f"invalid JSON body: {detail}") from exc
    uploads: list[PendingUpload] = []
    try:
        for item in payload.documents:
            upload = documents.start_upload(
                item.source, content_type="text/plain", metadata=item.metadata
            )
            uploads.append(upload)
            upload.writer.write(item.text.encode("utf-8"))
    except BaseException:
        documents.abort(uploads)
        raise
    return uploads


@router.post(
    "/{collection}/documents",
    status_code=202,
    response_model=UploadResponse,
    responses=ERRORS,
    openapi_extra=UPLOAD_BODY,
)
async def upload_documents(
    collection: str, request: Request, documents: DocumentsDep, auth: AuthDep
) -> UploadResponse:
    """Upload files (multipart `files` parts) or texts (JSON) into a collection.

    Answers `202` at once with the job that ingests them and one document per
    file; follow the job at `GET /v1/jobs/{job_id}`.  The collection is
    created on first upload.  The same bytes uploaded again map to the same
    document; a file with the same name replaces the older version once it is
    indexed.
    """
    collection_name(collection)
    auth.require("write", collection)
    content_type = request.headers.get("content-type", "")
    if content_type.startswith("application/json"):
        uploads = await _json_uploads(request, documents)
    else:
        uploads = await receive_files(request, documents)
    try:
        receipt = await run_in_threadpool(documents.register, collection, uploads)
    except BaseException:
        documents.abort(uploads)
        raise
    return UploadResponse(
        job_id=receipt.job_id, documents=[DocumentOut.of(d) for d in receipt.documents]
    )


PUT_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "string", "format": "binary"},
                        "metadata": {
                            "type": "string",
                            "description": "JSON object attached to the document.",
                        },
                    },
                    "required": ["file"],
                }
            },
            "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        },
    }
}


async def _raw_upload(request: Request, documents: DocumentsDep, source: str) -> PendingUpload:
    declared = request.headers.get("content-length", "")
    limit = documents.settings.max_file_bytes
    if declared.isdigit() and int(declared) > limit:
        raise DocumentTooLarge(
            f"{source} is over the {limit} byte limit (RAG_INGEST__MAX_FILE_BYTES)"
        )
    content_type = request.headers.get("content-type") or None
    upload = documents.start_upload(source, content_type=content_type)
    try:
        async for piece in request.stream():
            upload.writer.write(piece)
    except BaseException:
        documents.abort([upload])
        raise
    return upload


@router.put(
    "/{collection}/documents/{source}",
    status_code=202,
    response_model=UploadResponse,
    responses=ERRORS,
    openapi_extra=PUT_BODY,
)
async def put_document(
    collection: str, source: str, request: Request, documents: DocumentsDep, auth: AuthDep
) -> UploadResponse:
    """Upload a new version of the document named `source` (URL-encoded in the path).

    Send one file, as a multipart `file` (or `files`) part or as the raw
    request body; its own file name is ignored.  Answers `202` with the job
    and the document, as an upload does: once indexed, the new version
    replaces the chunks of the older ones in one step, so a query sees the
    old version or the new one, never both.  The same bytes as a document
    already in the collection map to that document.
    """
    collection_name(collection)
    # The router has already URL-decoded the segment.  An upload's name loses
    # any folder part; here that would silently name another document.
    if "/" in source or "\\" in source:
        raise InvalidRequest(f"document name {source[:80]!r} must not contain '/' or '\\'")
    name = source_name(source)
    auth.require("write", collection)
    if request.headers.get("content-type", "").startswith("multipart/"):
        uploads = await receive_files(request, documents, file_fields=("file", "files"))
        if len(uploads) != 1:
            documents.abort(uploads)
            raise InvalidRequest(f"send exactly one file part named 'file'; got {len(uploads)}")
        uploads[0].source = name
    else:
        uploads = [await _raw_upload(request, documents, name)]
    try:
        receipt = await run_in_threadpool(documents.register, collection, uploads)
    except BaseException:
        documents.abort(uploads)
        raise
    return UploadResponse(
        job_id=receipt.job_id, documents=[DocumentOut.of(d) for d in receipt.documents]
    )


@router.get(
    "",
    response_model=CollectionList,
    responses={code: {"model": ErrorResponse} for code in (401, 429, 503)},
)
def list_collections(documents: DocumentsDep, auth: AuthDep) -> CollectionList:
    """Every collection (that the API key reaches) with its document and chunk counts."""
    return CollectionList(
        collections=[
            CollectionOut.of(c) for c in documents.list_collections() if auth.can_see(c.name)
        ]
    )


@router.post(
    "",
    status_code=201,
    response_model=CollectionOut,
    responses={code: {"model": ErrorResponse} for code in (401, 403, 409, 422, 429, 503)},
)
def create_collection(body: CollectionIn, documents: DocumentsDep, auth: AuthDep) -> CollectionOut:
    """Create an empty collection with a chosen FAISS index type.

    Uploading to a collection that does not exist creates it with the exact
    `flat` index; create it first to start with another type.  `409` if the
    name is taken (change an existing collection's type with a reindex).
    """
    name = collection_name(body.name)
    auth.require("write", name)
    return CollectionOut.of(documents.create_collection(name, body.index))


@router.get("/{collection}", response_model=CollectionOut, responses=ERRORS)
def get_collection(collection: str, documents: DocumentsDep, auth: AuthDep) -> CollectionOut:
    """One collection, with its index spec and whether a reindex is running."""
    auth.require("read", collection)
    found = documents.get_collection(collection)
    return CollectionOut.of(found, reindexing=documents.reindexing(found.name))


@router.post(
    "/{collection}/reindex",
    status_code=202,
    response_model=ReindexOut,
    responses={code: {"model": ErrorResponse} for code in (401, 403, 404, 409, 422, 429, 503)},
)
def reindex_collection(
    collection: str, body: ReindexIn, documents: DocumentsDep, auth: AuthDep
) -> ReindexOut:
    """Rebuild the collection's FAISS index as another type, in the background.

    Needs an `admin` key.  Queries keep using the old index while the new
    one is built from the catalog; chunks added or removed meanwhile are
    caught up before the swap.  Poll `GET /v1/collections/{collection}`:
    `reindexing` turns false and `index` shows the new spec.  `409` while
    another reindex of the collection runs.
    """
    name = collection_name(collection)
    auth.require("admin", name)
    spec = documents.start_reindex(name, body.index)
    return ReindexOut(collection=name, index=spec, status="started")


@router.delete("/{collection}", status_code=204, responses=ERRORS)
def delete_collection(collection: str, documents: DocumentsDep, auth: AuthDep) -> Response:
    """Remove a collection with all its documents, chunks and vectors."""
    auth.require("write", collection)
    documents.delete_collection(collection)
    return Response(status_code=204)


@router.get("/{collection}/documents", response_model=DocumentList, responses=ERRORS)
def list_documents(
    collection: str,
    documents: DocumentsDep,
    auth: AuthDep,
    limit: int = Query(100, ge=1, le=1000),
    # The upper bound is SQLite's largest integer: past it the query itself fails.
    offset: int = Query(0, ge=0, le=2**63 - 1),
) -> DocumentList:
    """A page of a collection's documents, oldest first."""
    auth.require("read", collection)
    docs, total = documents.list_documents(collection, limit=limit, offset=offset)
    return DocumentList(
        documents=[DocumentOut.of(d) for d in docs], total=total, limit=limit, offset=offset
    )


@router.get("/{collection}/documents/{document_id}", response_model=DocumentOut, responses=ERRORS)
def get_document(
    collection: str, document_id: str, documents: DocumentsDep, auth: AuthDep
) -> DocumentOut:
    """One document: its status, pages, chunk count and error if it failed."""
    auth.require("read", collection)
    return DocumentOut.of(documents.get_document(collection, document_id))


@router.delete("/{collection}/documents/{document_id}", status_code=204, responses=ERRORS)
def delete_document(
    collection: str, document_id: str, documents: DocumentsDep, auth: AuthDep
) -> Response:
    """Remove a document; its chunks never appear in results again."""
    auth.require("write", collection)
    documents.delete_document(collection, document_id)
    return Response(status_code=204)
