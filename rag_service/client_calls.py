"""The HTTP API as a client sees it: requests and how to read their answers.

No I/O here: each function builds a ``Call`` (method, path, body, parser)
that ``RagClient`` sends with ``httpx.Client`` and ``AsyncRagClient`` with
``httpx.AsyncClient``, so routes, bodies and error mapping are written once.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Generic, Literal, TypeAlias, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel

from rag_service import __version__
from rag_service.api.schemas import (
    CollectionList,
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
from rag_service.errors import (
    ConflictError,
    DocumentTooLarge,
    InvalidRequest,
    JobTimeout,
    ModelRateLimited,
    NotFound,
    RagError,
    ServiceUnavailable,
    UnsupportedDocument,
)
from rag_service.httputil import parse_retry_after

FINISHED = frozenset({"succeeded", "failed"})

#: One file to upload: a path on disk (streamed from the file), or a
#: ``(name, bytes)`` / ``(name, binary file object)`` pair.
FileInput: TypeAlias = str | os.PathLike[str] | tuple[str, bytes | BinaryIO]
FilePart: TypeAlias = tuple[str, tuple[str, bytes | BinaryIO]]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

# Unknown error codes (a newer server, a gateway in front of it) are mapped by
# status.  502/503/504 without a code we know say only "not available now",
# whoever sent them, so they become ServiceUnavailable.
_BY_STATUS: dict[int, type[RagError]] = {
    400: InvalidRequest,
    404: NotFound,
    409: ConflictError,
    413: DocumentTooLarge,
    415: UnsupportedDocument,
    422: InvalidRequest,
    429: ModelRateLimited,
    502: ServiceUnavailable,
    503: ServiceUnavailable,
    504: ServiceUnavailable,
}


# -- errors ---------------------------------------------------------------------


def error_classes() -> dict[str, type[RagError]]:
    """Every ``RagError`` class by its ``code``, walking the tree parent first.

    Built on each call so that classes defined after import are found too; a
    subclass that inherits its parent's code never shadows the parent.
    """
    found: dict[str, type[RagError]] = {}
    pending: list[type[RagError]] = [RagError]
    while pending:
        cls = pending.pop(0)
        found.setdefault(cls.code, cls)
        pending.extend(cls.__subclasses__())
    return found


def error_from_response(response: httpx.Response) -> RagError:
    """The ``RagError`` an error response stands for."""
    code: str | None = None
    message = f"HTTP {response.status_code} from {response.request.method} {response.request.url}"
    try:
        body = response.json()
    except ValueError:
        body = None
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict) and isinstance(error.get("code"), str):
        code = error["code"]
        message = str(error.get("message") or message)
    elif response.text:
        message = f"{message}: {response.text[:200]}"
    cls = error_classes().get(code) if code else None
    if cls is None:
        cls = _BY_STATUS.get(response.status_code, RagError)
        if code:
            message = f"{message} [{code}]"
    return cls(message, retry_after=parse_retry_after(response.headers.get("retry-after")))


def unreachable(base_url: httpx.URL, exc: httpx.TransportError) -> ServiceUnavailable:
    """The error for a request that got no HTTP answer at all."""
    what = "timed out talking to" if isinstance(exc, httpx.TimeoutException) else "cannot reach"
    return ServiceUnavailable(
        f"{what} the RAG service at {base_url}: {str(exc) or type(exc).__name__}"
    )


# -- requests, built once for both clients --------------------------------------


@dataclass(frozen=True)
class Call(Generic[T]):
    """One HTTP request and how to read its answer; the clients only send it."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    params: Mapping[str, Any] | None = None
    json: Any = None
    data: Mapping[str, str] | None = None
    files: list[FilePart] | None = None
    #: Error statuses whose body ``parse`` reads itself (``/readyz`` answers 503).
    accept: frozenset[int] = frozenset()

    def finish(self, response: httpx.Response) -> T:
        """The result of a response, or the ``RagError`` it stands for."""
        if not response.is_success and response.status_code not in self.accept:
            raise error_from_response(response)
        try:
            return self.parse(response)
        except ValueError as exc:  # bad JSON and pydantic's ValidationError alike
            raise RagError(f"unexpected response to {self.method} {self.path}: {exc}") from exc


def _model(cls: type[M]) -> Callable[[httpx.Response], M]:
    return lambda response: cls.model_validate(response.json())


def _nothing(response: httpx.Response) -> None:
    return None


def _collections(response: httpx.Response) -> list[CollectionOut]:
    return CollectionList.model_validate(response.json()).collections


def _readiness(response: httpx.Response) -> Readiness:
    body = response.json()
    if not response.is_success and (not isinstance(body, dict) or "error" in body):
        raise error_from_response(response)
    return Readiness.model_validate(body)


def _seg(value: str) -> str:
    return quote(value, safe="")


def file_parts(files: FileInput | Iterable[FileInput], stack: ExitStack) -> list[FilePart]:
    """Multipart ``files`` parts; paths are opened (and closed by ``stack``), not read.

    httpx reads an open file in 64 KiB pieces while it sends, so a large file
    never sits in memory whole.  The async client reads those pieces with
    plain blocking reads, which is fine for local disks.
    """
    if isinstance(files, str | os.PathLike) or (
        isinstance(files, tuple)
        and len(files) == 2
        and isinstance(files[0], str)
        and (isinstance(files[1], bytes) or hasattr(files[1], "read"))
    ):
        items: list[Any] = [files]
    else:
        items = list(files)
    parts: list[FilePart] = []
    for item in items:
        if isinstance(item, str | os.PathLike):
            path = Path(item)
            try:
                handle: BinaryIO = stack.enter_context(path.open("rb"))
            except OSError as exc:
                raise InvalidRequest(f"cannot read {path}: {exc.strerror or exc}") from exc
            parts.append(("files", (path.name, handle)))
        elif isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str):
            parts.append(("files", (item[0], item[1])))
        else:
            raise InvalidRequest(
                f"each file is a path or a (name, bytes) pair, not {type(item).__name__}"
            )
    if not parts:
        raise InvalidRequest("no files to upload")
    return parts


# One builder per route, named after the client method that sends it.


def upload_files(
    collection: str,
    parts: list[FilePart],
    metadata: Mapping[str, Any] | None,
) -> Call[UploadResponse]:
    return Call(
        "POST",
        f"/v1/collections/{_seg(collection)}/documents",
        _model(UploadResponse),
        data=None if metadata is None else {"metadata": json.dumps(dict(metadata))},
        files=parts,
    )


def upload_text(
    collection: str, text: str, source: str, metadata: Mapping[str, Any] | None
) -> Call[UploadResponse]:
    document = {"text": text, "source": source, "metadata": dict(metadata or {})}
    return Call(
        "POST",
        f"/v1/collections/{_seg(collection)}/documents",
        _model(UploadResponse),
        json={"documents": [document]},
    )


def get_job(job_id: str) -> Call[JobOut]:
    return Call("GET", f"/v1/jobs/{_seg(job_id)}", _model(JobOut))


def _question(path: str, parse: Callable[[httpx.Response], T], **body: Any) -> Call[T]:
    return Call("POST", path, parse, json={k: v for k, v in body.items() if v is not None})


def query(
    collection: str,
    question: str,
    top_k: int | None,
    mode: str | None = None,
    filters: Mapping[str, Any] | None = None,
    strategy: str | None = None,
    samples: int | None = None,
    *,
    stream: bool = False,
) -> Call[QueryOut]:
    return _question(
        "/v1/query",
        _model(QueryOut),
        collection=collection,
        question=question,
        top_k=top_k,
        mode=mode,
        filters=dict(filters) if filters else None,
        strategy=strategy,
        samples=samples,
        stream=stream or None,
    )


@dataclass(frozen=True)
class StreamEvent:
    """One event of a streamed answer.

    ``kind`` is ``sources`` (the numbered sources, first), ``token`` (a piece
    of the answer as the model writes it) or ``done`` (the checked answer,
    as ``query`` returns it, last).
    """

    kind: Literal["sources", "token", "done"]
    text: str = ""
    sources: list[SourceOut] = field(default_factory=list)
    answer: QueryOut | None = None


def stream_event(event: str, data: str) -> StreamEvent | None:
    """Read one Server-Sent Event of ``/v1/query``; None for kinds this client does not know."""
    body = json.loads(data)
    match event:
        case "sources":
            return StreamEvent("sources", sources=[SourceOut(**s) for s in body["sources"]])
        case "token":
            return StreamEvent("token", text=str(body["text"]))
        case "done":
            answer = QueryOut(**body)
            return StreamEvent("done", text=answer.answer, answer=answer)
    return None


def stream_opened(call: Call[Any], response: httpx.Response) -> None:
    """Raise the service's error if a streamed request was refused (its body is read)."""
    if response.status_code != 200 or not response.headers.get("content-type", "").startswith(
        "text/event-stream"
    ):
        raise error_from_response(response)


def retrieve(
    collection: str,
    query: str,
    top_k: int | None,
    mode: str | None = None,
    filters: Mapping[str, Any] | None = None,
) -> Call[RetrieveOut]:
    return _question(
        "/v1/retrieve",
        _model(RetrieveOut),
        collection=collection,
        query=query,
        top_k=top_k,
        mode=mode,
        filters=dict(filters) if filters else None,
    )


def list_collections() -> Call[list[CollectionOut]]:
    return Call("GET", "/v1/collections", _collections)


def get_collection(name: str) -> Call[CollectionOut]:
    return Call("GET", f"/v1/collections/{_seg(name)}", _model(CollectionOut))


def delete_collection(name: str) -> Call[None]:
    return Call("DELETE", f"/v1/collections/{_seg(name)}", _nothing)


def list_documents(collection: str, limit: int, offset: int) -> Call[DocumentList]:
    return Call(
        "GET",
        f"/v1/collections/{_seg(collection)}/documents",
        _model(DocumentList),
        params={"limit": limit, "offset": offset},
    )


def _document_path(collection: str, document_id: str) -> str:
    return f"/v1/collections/{_seg(collection)}/documents/{_seg(document_id)}"


def get_document(collection: str, document_id: str) -> Call[DocumentOut]:
    return Call("GET", _document_path(collection, document_id), _model(DocumentOut))


def delete_document(collection: str, document_id: str) -> Call[None]:
    return Call("DELETE", _document_path(collection, document_id), _nothing)


def health() -> Call[Health]:
    return Call("GET", "/healthz", _model(Health))


def ready() -> Call[Readiness]:
    return Call("GET", "/readyz", _readiness, accept=frozenset({503}))


def headers(api_key: str | None) -> dict[str, str]:
    """Headers sent with every request; the key as a bearer token, as OpenAI clients send it."""
    sent = {"user-agent": f"rag-service-client/{__version__}"}
    if api_key:
        sent["authorization"] = f"Bearer {api_key}"
    return sent


def job_timeout(job: JobOut, timeout_s: float) -> JobTimeout:
    """The error for a job still unfinished when ``wait_for_job`` gives up."""
    return JobTimeout(
        f"job {job.id} is still {job.status} (stage {job.stage}) after {timeout_s:g} s"
    )
