"""Prometheus metrics of one app, served at ``GET /metrics``.

Each app owns its ``CollectorRegistry``, so several apps in one process (tests,
a host that mounts two services) never share or clash on series.

- ``rag_http_requests_total{method, route, status}`` and
  ``rag_http_request_duration_seconds{method, route}``: counted by a
  middleware under the matched route's template (``/v1/jobs/{job_id}``), never
  the raw path, so ids do not multiply series.  Paths that match no route are
  ``route="unmatched"``.
- ``rag_ingest_jobs{state}``, ``rag_ingest_queue_depth``,
  ``rag_collection_documents{collection}``, ``rag_collection_chunks{collection}``:
  read from the catalog at scrape time, so they include work other processes
  sharing the data directory did.
- ``rag_model_tokens_total{kind}`` (prompt, completion) and
  ``rag_model_errors_total{code}``: recorded by the query route after each
  answer, and by the error handler for model errors that fail a request.
- ``rag_rate_limited_total{limit}``: requests refused with 429, by the limit
  that refused them (requests, tokens).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rag_service.llm.base import Usage
from rag_service.runtime import Runtime
from rag_service.storage.stats import JOB_STATUSES, catalog_stats

log = logging.getLogger(__name__)

UNMATCHED = "unmatched"
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
#: Seconds: from a health check to a slow answer of the language model.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class CatalogCollector(Collector):
    """Job and collection gauges, read from the catalog when Prometheus scrapes."""

    def __init__(self, runtime: Callable[[], Runtime | None]) -> None:
        self._runtime = runtime

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily("rag_ingest_jobs", "Ingestion jobs by state.", labels=["state"]),
            GaugeMetricFamily(
                "rag_ingest_queue_depth",
                "Ingestion jobs waiting for a worker: queued, or running on an expired lease.",
            ),
            GaugeMetricFamily(
                "rag_collection_documents", "Documents per collection.", labels=["collection"]
            ),
            GaugeMetricFamily(
                "rag_collection_chunks", "Indexed chunks per collection.", labels=["collection"]
            ),
        )

    def describe(self) -> Iterable[Metric]:
        return self._families()

    def collect(self) -> Iterator[Metric]:
        jobs, depth, documents, chunks = families = self._families()
        runtime = self._runtime()
        if runtime is not None:
            try:
                stats = catalog_stats(runtime.catalog)
            except sqlite3.Error as exc:
                log.warning("catalog metrics unavailable error=%s", exc)
                return
            for state in JOB_STATUSES:
                jobs.add_metric([state], stats.jobs[state])
            for state, count in stats.jobs.items():
                if state not in JOB_STATUSES:
                    jobs.add_metric([state], count)
            depth.add_metric([], stats.queue_depth)
            for name, counts in stats.collections.items():
                documents.add_metric([name], counts.documents)
                chunks.add_metric([name], counts.chunks)
        yield from families


class ServiceMetrics:
    """The metrics of one app and the calls that record them."""

    def __init__(self, runtime: Callable[[], Runtime | None]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "rag_http_requests",
            "HTTP requests by method, route template and status code.",
            ["method", "route", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "rag_http_request_duration_seconds",
            "Time from receiving a request to the end of its response, by route template.",
            ["method", "route"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.model_tokens = Counter(
            "rag_model_tokens",
            "Language-model tokens used by answered queries.",
            ["kind"],
            registry=self.registry,
        )
        self.model_errors = Counter(
            "rag_model_errors",
            "Language-model failures by error code, whether the answer degraded or the "
            "request failed.",
            ["code"],
            registry=self.registry,
        )
        self.rate_limited = Counter(
            "rag_rate_limited",
            "Requests refused with 429 by the limit that refused them.",
            ["limit"],
            registry=self.registry,
        )
        for kind in ("prompt", "completion"):
            self.model_tokens.labels(kind)
        for limit in ("requests", "tokens"):
            self.rate_limited.labels(limit)
        self.registry.register(CatalogCollector(runtime))

    def record_request(self, method: str, route: str, status: int, seconds: float) -> None:
        method = method if method in METHODS else "other"
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def record_answer(self, usage: Usage, degraded_reason: str | None) -> None:
        """Count an answer's tokens, and its model error when it degraded.

        ``degraded_reason`` is ``"<code>: <message>"`` as the query service
        writes it; the code is the label.
        """
        if usage.prompt_tokens:
            self.model_tokens.labels("prompt").inc(usage.prompt_tokens)
        if usage.completion_tokens:
            self.model_tokens.labels("completion").inc(usage.completion_tokens)
        if degraded_reason:
            self.record_model_error(degraded_reason.partition(":")[0].strip() or "model_error")

    def record_model_error(self, code: str) -> None:
        self.model_errors.labels(code).inc()

    def record_rate_limited(self, limit: str) -> None:
        self.rate_limited.labels(limit).inc()

    def render(self, accept: str | None) -> tuple[bytes, str]:
        """The exposition body and its content type, in the format ``accept`` asks for."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type


def route_template(scope: Scope) -> str:
    """The path template of the route that handled a request, else ``unmatched``."""
    route = scope.get("route")
    template = getattr(route, "path_format", None) or getattr(route, "path", None)
    return template if isinstance(template, str) else UNMATCHED


class MetricsMiddleware:
    """Counts and times every HTTP request under its route template and status."""

    def __init__(self, app: ASGIApp, metrics: ServiceMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        # An exception that escapes the app becomes a 500 in the outermost middleware.
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            self.metrics.record_request(
                scope["method"], route_template(scope), status, time.perf_counter() - started
            )
