"""The one error tree of the service.

Adapters translate library exceptions into these at their boundary
(``raise ... from exc``); the API maps them to HTTP in one handler and the
CLI prints them as one line.

    RagError
    ├── InvalidRequest            400/422  a request value is out of bounds
    ├── NotFound                  404
    │   ├── CollectionNotFound
    │   ├── DocumentNotFound
    │   └── JobNotFound
    ├── DocumentError             422      a document cannot be ingested
    │   ├── UnsupportedDocument   415
    │   ├── DocumentTooLarge      413
    │   ├── EmptyDocument
    │   ├── CorruptDocument
    │   └── EncryptedDocument
    ├── ConflictError             409
    │   └── EmbeddingMismatch
    ├── IndexNotReady             503
    ├── TooManyRequests           429      a client is over its rate limit
    ├── ServiceUnavailable        503      (client) the service cannot be reached
    ├── JobTimeout                504      (client) a job did not finish in time
    ├── EmbeddingError            500
    └── ModelError                502
        ├── ModelTimeout          504
        ├── ModelRateLimited      429
        ├── ModelBadResponse      502
        ├── ModelUnavailable      503
        └── ModelBusy             503
"""

from __future__ import annotations


class RagError(Exception):
    """Base of every error the service raises on purpose."""

    code = "rag_error"
    status_code = 500

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class InvalidRequest(RagError):
    """A request value is malformed or out of its allowed range."""

    code = "invalid_request"
    status_code = 422


class NotFound(RagError):
    """Something the request names does not exist."""

    code = "not_found"
    status_code = 404


class CollectionNotFound(NotFound):
    """The named collection does not exist."""

    code = "collection_not_found"


class DocumentNotFound(NotFound):
    """The document id does not exist in the collection."""

    code = "document_not_found"


class JobNotFound(NotFound):
    """The job id does not exist."""

    code = "job_not_found"


class DocumentError(RagError):
    """A document cannot be turned into text."""

    code = "document_error"
    status_code = 422


class UnsupportedDocument(DocumentError):
    """The file type is not one the service can read."""

    code = "unsupported_document"
    status_code = 415


class DocumentTooLarge(DocumentError):
    """The file is over a configured size, page or character limit."""

    code = "document_too_large"
    status_code = 413


class EmptyDocument(DocumentError):
    """The file holds no extractable text."""

    code = "empty_document"


class CorruptDocument(DocumentError):
    """The file is damaged and its parser gave up."""

    code = "corrupt_document"


class EncryptedDocument(DocumentError):
    """The PDF is password-protected."""

    code = "encrypted_document"


class ConflictError(RagError):
    """The request conflicts with the current state."""

    code = "conflict"
    status_code = 409


class EmbeddingMismatch(ConflictError):
    """The collection was embedded by another model than the one loaded."""

    code = "embedding_mismatch"


class IndexNotReady(RagError):
    """The service is still loading its models or index."""

    code = "index_not_ready"
    status_code = 503


class EmbeddingError(RagError):
    """The embedding model failed."""

    code = "embedding_error"
    status_code = 500


class ModelError(RagError):
    """The language model failed to answer."""

    code = "model_error"
    status_code = 502


class ModelTimeout(ModelError):
    """The language model did not answer within the configured timeout."""

    code = "model_timeout"
    status_code = 504


class ModelRateLimited(ModelError):
    """The model server answered 429 and retries ran out."""

    code = "model_rate_limited"
    status_code = 429


class ModelBadResponse(ModelError):
    """The model server answered with something that is not a completion."""

    code = "model_bad_response"
    status_code = 502


class ModelRequestRejected(ModelBadResponse):
    """The model refused this request (a 4xx other than 429, a prompt too long).

    The request is at fault, not the model: it does not count against the
    circuit breaker and is not retried on the fallback model.
    """

    code = "model_request_rejected"


class ModelUnavailable(ModelError):
    """The model server cannot be reached or the model cannot be loaded."""

    code = "model_unavailable"
    status_code = 503


class ModelBusy(ModelError):
    """The local model's wait queue is full; retry after a moment."""

    code = "model_busy"
    status_code = 503


class ServiceUnavailable(RagError):
    """The Python client cannot reach the RAG service, or a gateway in front of it gave up."""

    code = "service_unavailable"
    status_code = 503


class JobTimeout(RagError):
    """The Python client waited for an ingestion job longer than its ``timeout_s``."""

    code = "job_timeout"
    status_code = 504


class TooManyRequests(RagError):
    """A client is over its requests-per-minute or model-tokens-per-minute limit."""

    code = "rate_limited"
    status_code = 429


class Unauthorized(RagError):
    """A request needs an API key and brought none, or one that is unknown or revoked."""

    code = "unauthorized"
    status_code = 401


class Forbidden(RagError):
    """The API key is valid but its scope or collections do not cover the request."""

    code = "forbidden"
    status_code = 403


class BackupInvalid(RagError):
    """A backup cannot be made or restored: damaged, incomplete or from a newer version."""

    code = "backup_invalid"
    status_code = 422
