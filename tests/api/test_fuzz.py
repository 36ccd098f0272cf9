"""Fuzzing the HTTP API with schemathesis, against the app's own OpenAPI document.

Every operation in the document gets requests generated from its schema,
valid ones and (where an operation has inputs that can be invalid) invalid
ones.  Half of the valid ones are aimed at the collection, document and job
that exist, so the paths past the 404s and 422s are fuzzed too.  No response
may be a 5xx, and every one must match what the document declares: status
code, content type, headers and body schema.  A second, shorter run does the
same with API keys required and tight rate limits, for the 401s, 403s and 429s.

Nothing in the document is left out: ``/metrics`` answers text (the document
declares its two media types and no body schema, so status and content type
are checked); ``stream: true`` on ``/v1/query`` and ``/v1/chat/completions``
(and ``Accept: text/event-stream`` on ``/v1/query``) answers Server-Sent
Events, which schemathesis reads to the end and checks against the declared
``text/event-stream``; multipart uploads are generated from the declared form
(``files`` parts of random bytes and a ``metadata`` string).  Uploads are
ingested by the app's worker while the fuzzing goes on.  The web page (``/``
and ``/static/{name}``) is not in the document; tests/web covers it.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import APIOperation, Case, GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.python import asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from rag_service.api import create_app
from rag_service.config import AuthSettings, LimitsSettings, Settings
from rag_service.embedding import SentenceTransformerEmbedder
from rag_service.storage.catalog import Catalog
from rag_service.storage.keys import KeyStore
from tests.helpers import ScriptedChatModel, wait_for_job

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]
COLLECTION = "handbook"
TEXT = (
    "# Lighthouse handbook\n\n"
    "The keeper refills the lamp oil every evening at dusk.\n\n"
    "## Visitors\n\nThe museum is open to visitors on winter weekends."
)
QUESTION = "When is the lamp oil refilled?"
#: Generated requests per operation, by kind.  Operations without inputs
#: (``/healthz``, ``/v1/models`` ...) get only the few distinct ones there are.
EXAMPLES = {GenerationMode.POSITIVE: 100, GenerationMode.NEGATIVE: 80}
MIN_REQUESTS = 1000
#: Fewer with keys and limits on: most requests are refused early there.
LOCKED_EXAMPLES = {GenerationMode.POSITIVE: 20, GenerationMode.NEGATIVE: 10}


@dataclass(frozen=True)
class Known:
    """What exists in the data directory before the fuzzing starts."""

    collection: str
    document_id: str
    job_id: str


@pytest.fixture
def known(
    settings: Settings, embedder: SentenceTransformerEmbedder, scripted: ScriptedChatModel
) -> Iterator[Known]:
    """One small collection, ingested into ``settings.data_dir`` before the fuzzing."""
    with TestClient(create_app(settings, embedder=embedder, chat_model=scripted)) as client:
        response = client.post(
            f"/v1/collections/{COLLECTION}/documents",
            json={"documents": [{"text": TEXT, "source": "handbook.md"}]},
        )
        assert response.status_code == 202, response.text
        body = response.json()
        job = wait_for_job(client, body["job_id"])
        assert job["status"] == "succeeded", job
    try:
        yield Known(COLLECTION, body["documents"][0]["id"], body["job_id"])
    finally:
        # schemathesis runs the app's lifespan from the first request on (its
        # pytest plugin ends it after the test too); end it here, explicitly,
        # while the data directory still exists.
        asgi.shutdown_lifespans()


def _aim(case: Case, known: Known) -> None:
    """Point a valid generated request at what exists, past the settings-bound checks.

    Random valid requests almost always name nothing that exists, and many
    trip bounds that are settings rather than schema (``top_k`` up to
    RAG_QUERY__MAX_TOP_K, ``rerank`` only with a rerank model, ``dimensions``
    the embedder's); everything else stays as generated.
    """
    path = case.path_parameters
    if path is not None:
        for name, value in (
            ("collection", known.collection),
            ("document_id", known.document_id),
            ("job_id", known.job_id),
        ):
            if name in path:
                path[name] = value
    body = case.body
    if not isinstance(body, dict):
        return
    if "collection" in body:
        body["collection"] = known.collection
    if "model" in body:
        body["model"] = f"rag:{known.collection}"
    if isinstance(body.get("top_k"), int):
        body["top_k"] = 1 + body["top_k"] % 8
    if body.get("strategy") != "self_consistency":
        body.pop("samples", None)
    elif isinstance(body.get("samples"), int):
        body["samples"] = 2 + body["samples"] % 3
    body.pop("rerank", None)
    body.pop("dimensions", None)
    for name in ("question", "query"):
        if isinstance(body.get(name), str) and not body[name].strip():
            body[name] = QUESTION
    if isinstance(body.get("messages"), list):
        body["messages"] = [*body["messages"], {"role": "user", "content": QUESTION}]


@dataclass
class Fuzzer:
    """Sends generated requests to an app and collects what came back."""

    known: Known
    examples: dict[GenerationMode, int]
    #: Headers a request is sent with, one drawn per request (API keys).
    headers: list[dict[str, str]] = field(default_factory=lambda: [{}])
    requests: int = 0
    statuses: Counter[tuple[str, int]] = field(default_factory=Counter)
    failures: dict[str, str] = field(default_factory=dict)

    def run(self, app: FastAPI) -> list[APIOperation]:
        """Fuzz every operation of the app's OpenAPI document; the operations, in order."""
        schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        schema.validate()  # the document itself is valid OpenAPI
        assert not schema.iter_schema_warnings()  # and every reference in it resolves
        operations = sorted((result.ok() for result in schema.get_all_operations()), key=_order)
        started = time.monotonic()
        for operation in operations:
            for mode in self.examples:
                if mode is GenerationMode.NEGATIVE and not (operation.body or operation.query):
                    # Its only inputs are path parameters, and every string is a valid one
                    # (names that cannot exist are a 404 or a 422 in the positive run).
                    continue
                try:
                    self._fuzz(operation, mode)
                except (Exception, BaseExceptionGroup) as exc:  # schemathesis raises a group
                    self.failures[f"{operation.label} ({mode.value})"] = str(exc)
        print(f"\n{self.requests} requests in {time.monotonic() - started:.0f} s")
        for (label, status), count in sorted(self.statuses.items()):
            print(f"  {label}: {status} x{count}")
        return operations

    def _fuzz(self, operation: APIOperation, mode: GenerationMode) -> None:
        """Send generated requests to one operation and check every response."""

        @given(
            case=operation.as_strategy(generation_mode=mode),
            aim=st.booleans(),
            headers=st.sampled_from(self.headers),
        )
        @settings(
            max_examples=self.examples[mode],
            derandomize=True,
            database=None,
            deadline=None,
            # No shrinking: a failure is reported as found, with its curl command.
            phases=[Phase.explicit, Phase.generate],
            # Generated bodies are large and slow to make; that is the point here.
            suppress_health_check=list(HealthCheck),
        )
        def run(case: Case, aim: bool, headers: dict[str, str]) -> None:
            if aim and mode is GenerationMode.POSITIVE:
                _aim(case, self.known)
            response = case.call(headers=headers)
            self.requests += 1
            self.statuses[operation.label, response.status_code] += 1
            case.validate_response(response, checks=CHECKS, headers=headers)

        run()

    def report(self) -> str:
        return "\n\n".join(f"== {name}\n{text}" for name, text in self.failures.items())


def _order(operation: APIOperation) -> tuple[bool, int]:
    # Deletes last, a document's before its collection's: an aimed one removes
    # what the other operations are aimed at.
    return operation.method.upper() == "DELETE", -len(operation.path)


def test_every_operation_survives_generated_requests_and_answers_as_documented(
    settings: Settings,
    embedder: SentenceTransformerEmbedder,
    scripted: ScriptedChatModel,
    known: Known,
) -> None:
    # `Accept` picks the format of two answers: Server-Sent Events from /v1/query,
    # OpenMetrics from /metrics.
    accepts = ["text/event-stream", "application/openmetrics-text; version=1.0.0"]
    fuzzer = Fuzzer(known, EXAMPLES, [{}] + [{"Accept": accept} for accept in accepts])
    operations = fuzzer.run(create_app(settings, embedder=embedder, chat_model=scripted))

    assert not fuzzer.failures, fuzzer.report()
    assert fuzzer.requests >= MIN_REQUESTS
    # Every operation was reached past its error paths at least once.
    succeeded = {label for label, status in fuzzer.statuses if status < 300}
    assert succeeded == {operation.label for operation in operations}


def test_with_api_keys_and_rate_limits_every_refusal_is_documented(
    settings: Settings,
    embedder: SentenceTransformerEmbedder,
    scripted: ScriptedChatModel,
    known: Known,
) -> None:
    """Keys required and tight limits: the 401s, 403s and 429s must be declared too."""
    locked = settings.model_copy(
        update={
            "auth": AuthSettings(required=True),
            "limits": LimitsSettings(requests_per_minute=30, tokens_per_minute=200),
        }
    )
    catalog = Catalog(locked.data_dir / "catalog.sqlite3")
    try:
        keys = KeyStore(catalog)
        _, reader = keys.create("reader", "read", [known.collection])
        _, admin = keys.create("admin", "admin", ["*"])
    finally:
        catalog.close()
    headers = [{}, {"Authorization": "Bearer rag_unknown"}] + [
        {"Authorization": f"Bearer {secret}"} for secret in (reader, admin)
    ]
    fuzzer = Fuzzer(known, LOCKED_EXAMPLES, headers)
    fuzzer.run(create_app(locked, embedder=embedder, chat_model=scripted))

    assert not fuzzer.failures, fuzzer.report()
    assert {status for _, status in fuzzer.statuses} >= {200, 401, 403, 429}


# What the fuzzing found, pinned down so it stays fixed whatever it generates next.


def test_a_body_that_is_not_utf8_is_a_422_like_any_bad_input(client: TestClient) -> None:
    for path in ("/v1/query", "/v1/retrieve", "/v1/chat/completions", "/v1/embeddings"):
        response = client.post(
            path, content=b"\x80{}", headers={"content-type": "application/json"}
        )
        assert response.status_code == 422, (path, response.text)
        assert response.json()["error"]["code"] == "invalid_request"


def test_a_page_offset_past_the_largest_integer_is_a_422_not_a_crash(client: TestClient) -> None:
    largest = client.get("/v1/collections/docs/documents", params={"offset": 2**63 - 1})
    assert largest.status_code == 404  # valid, and the collection does not exist
    response = client.get("/v1/collections/docs/documents", params={"offset": 2**63})
    assert response.status_code == 422, response.text
