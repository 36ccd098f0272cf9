"""Wrappers that keep answering when a model fails: a circuit breaker and a fallback.

Both are ``ChatModel``s around other ``ChatModel``s, so the query service
cannot tell them from a backend.  The factory stacks them (a breaker only
in front of a model server: the local model has no server to spare)::

    FallbackChatModel(CircuitBreaker(primary), CircuitBreaker(fallback))

Which failures mean what:

    model fault         ModelTimeout, ModelUnavailable (connection errors,
                        5xx), ModelBadResponse (not a completion, a cut
                        stream), any other ModelError: counted by the
                        breaker, and the fallback is tried
    overload            ModelBusy (the local model's queue), ModelRateLimited
                        (429): not counted, since the model is alive and said
                        when to come back; the fallback is tried
    request refused     ModelRequestRejected (a 4xx, a prompt too long): not
                        counted and no fallback, the same request would be
                        refused there too
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import Literal

from rag_service.errors import (
    ModelBusy,
    ModelError,
    ModelRateLimited,
    ModelRequestRejected,
    ModelUnavailable,
)
from rag_service.llm.base import (
    ChatMessage,
    ChatModel,
    Completion,
    StreamDelta,
)

logger = logging.getLogger(__name__)

BreakerState = Literal["closed", "open", "half_open"]

#: Retry-After for calls refused while the half-open trial call is running.
TRIAL_RETRY_AFTER_S = 1.0


def is_model_fault(exc: ModelError) -> bool:
    """True when ``exc`` says the model is broken, not busy and not refusing this request."""
    return not isinstance(exc, ModelBusy | ModelRateLimited | ModelRequestRejected)


def falls_back(exc: ModelError) -> bool:
    """True when another model may answer what this one could not."""
    return not isinstance(exc, ModelRequestRejected)


class CircuitBreaker(ChatModel):
    """Stops calling a model that keeps failing, and lets it recover.

    ``closed``: calls go through; ``failures`` model faults in a row open it.
    ``open``: calls fail at once with ``ModelUnavailable`` and a
    ``retry_after``, without touching the model, for ``reset_s`` seconds.
    ``half_open``: after that, one trial call goes through (others still fail
    fast); its success closes the breaker, a model fault opens it again.
    Busy, rate-limited and refused requests neither open nor close it.
    Thread-safe; ``failures=0`` lets every call through.
    """

    def __init__(
        self,
        model: ChatModel,
        *,
        failures: int = 5,
        reset_s: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.model = model
        self.name = model.name
        self.context_window = model.context_window
        self._threshold = failures
        self._reset_s = reset_s
        self._clock = clock
        self._lock = threading.Lock()
        self._failures = 0
        self._opened_at: float | None = None
        self._trial_running = False
        self._last_error = ""

    @property
    def state(self) -> BreakerState:
        """Where the breaker is now."""
        with self._lock:
            if self._opened_at is None:
                return "closed"
            if self._clock() - self._opened_at < self._reset_s:
                return "open"
            return "half_open"

    def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
    ) -> Completion:
        """The wrapped model's answer, or ``ModelUnavailable`` at once while open."""
        trial = self._admit()
        try:
            completion = self.model.complete(
                messages, max_tokens=max_tokens, temperature=temperature, stop=stop
            )
        except ModelError as exc:
            self._failed(exc, trial)
            raise
        except BaseException:
            self._settled(trial)
            raise
        self._succeeded()
        return completion

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
    ) -> Iterator[StreamDelta]:
        """The wrapped model's stream; while open, the first ``next()`` fails at once.

        A stream that ends, or that the consumer closes after a delta came,
        counts as a success; one that fails counts as its error does.
        """
        return self._stream(list(messages), max_tokens, temperature, stop)

    def count_tokens(self, text: str) -> int:
        """The wrapped model's count: local work, never refused."""
        return self.model.count_tokens(text)

    def close(self) -> None:
        """Close the wrapped model."""
        self.model.close()

    # -- state machine ---------------------------------------------------------

    def _admit(self) -> bool:
        """Let a call through (True if it is the half-open trial) or raise."""
        with self._lock:
            if self._opened_at is None:
                return False
            waited = self._clock() - self._opened_at
            if waited < self._reset_s:
                raise self._open_error(self._reset_s - waited)
            if self._trial_running:
                raise self._open_error(TRIAL_RETRY_AFTER_S, trial=True)
            self._trial_running = True
        logger.info("llm breaker half-open model=%s trial=1", self.name)
        return True

    def _open_error(self, retry_after: float, *, trial: bool = False) -> ModelUnavailable:
        why = "a trial call is testing it" if trial else f"last error {self._last_error}"
        return ModelUnavailable(
            f"circuit open for model {self.name} after {self._failures} consecutive failures "
            f"({why}); retry in {retry_after:.1f} s",
            retry_after=retry_after,
        )

    def _succeeded(self) -> None:
        with self._lock:
            was_open = self._opened_at is not None
            self._failures = 0
            self._opened_at = None
            self._trial_running = False
        if was_open:
            logger.info("llm breaker closed model=%s", self.name)

    def _failed(self, exc: ModelError, trial: bool) -> None:
        if not is_model_fault(exc):
            self._settled(trial)
            return
        with self._lock:
            if self._threshold <= 0:
                return
            self._last_error = f"{exc.code}: {exc.message}"
            if self._opened_at is not None:
                # A call that started before the breaker opened may end after;
                # only the trial's failure restarts the wait.
                if not trial:
                    return
                self._trial_running = False
            else:
                self._failures += 1
                if self._failures < self._threshold:
                    return
            self._opened_at = self._clock()
            failures = self._failures
        logger.warning(
            "llm breaker open model=%s failures=%d reset_s=%g error=%s",
            self.name,
            failures,
            self._reset_s,
            exc.code,
        )

    def _settled(self, trial: bool) -> None:
        """The call ended with no verdict on the model's health: free the trial slot."""
        if trial:
            with self._lock:
                self._trial_running = False

    def _stream(
        self,
        messages: list[ChatMessage],
        max_tokens: int,
        temperature: float,
        stop: Sequence[str] | None,
    ) -> Iterator[StreamDelta]:
        trial = self._admit()
        received = False
        deltas: Iterator[StreamDelta] | None = None
        try:
            deltas = self.model.stream(
                messages, max_tokens=max_tokens, temperature=temperature, stop=stop
            )
            for delta in deltas:
                received = True
                yield delta
        except ModelError as exc:
            self._failed(exc, trial)
            raise
        except GeneratorExit:
            # The consumer stopped reading: a model that was sending is healthy.
            if received:
                self._succeeded()
            else:
                self._settled(trial)
            raise
        except BaseException:
            self._settled(trial)
            raise
        finally:
            _close(deltas)
        self._succeeded()


class FallbackChatModel(ChatModel):
    """Answers with ``primary``, or with ``fallback`` when the primary cannot.

    The fallback is tried when the primary fails with anything but a refused
    request (see the module docstring), an open breaker included.  The
    ``Completion.model`` (and ``StreamDelta.model``) says which one answered.
    A stream falls back only while no text has been sent; after that a
    failure is raised as it is.  When both fail, the error is the
    fallback's kind, with both reasons in its message.
    """

    def __init__(self, primary: ChatModel, fallback: ChatModel) -> None:
        self.primary = primary
        self.fallback = fallback
        self.name = f"{primary.name} (fallback: {fallback.name})"
        # Prompts are packed once, before it is known who will answer.
        self.context_window = min(primary.context_window, fallback.context_window)

    def complete(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
    ) -> Completion:
        """The primary's answer, else the fallback's."""
        try:
            done = self.primary.complete(
                messages, max_tokens=max_tokens, temperature=temperature, stop=stop
            )
            return done if done.model else replace(done, model=self.primary.name)
        except ModelError as exc:
            if not falls_back(exc):
                raise
            first = exc
        self._log_fallback(first, stream=False)
        try:
            done = self.fallback.complete(
                messages, max_tokens=max_tokens, temperature=temperature, stop=stop
            )
        except ModelError as exc:
            raise self._both_failed(first, exc) from exc
        return done if done.model else replace(done, model=self.fallback.name)

    def stream(
        self,
        messages: Sequence[ChatMessage],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        stop: Sequence[str] | None = None,
    ) -> Iterator[StreamDelta]:
        """The primary's stream, or the fallback's if the primary fails before any text."""
        return self._stream(list(messages), max_tokens, temperature, stop)

    def count_tokens(self, text: str) -> int:
        """The larger of the two counts, so a packed prompt fits either model."""
        return max(self.primary.count_tokens(text), self.fallback.count_tokens(text))

    def close(self) -> None:
        """Close both models."""
        try:
            self.primary.close()
        finally:
            self.fallback.close()

    def _stream(
        self,
        messages: list[ChatMessage],
        max_tokens: int,
        temperature: float,
        stop: Sequence[str] | None,
    ) -> Iterator[StreamDelta]:
        primary: Iterator[StreamDelta] | None = None
        try:
            # Hold back empty deltas until text comes: until then nothing was
            # sent, and switching models is invisible to the consumer.
            held: list[StreamDelta] = []
            try:
                primary = self.primary.stream(
                    messages, max_tokens=max_tokens, temperature=temperature, stop=stop
                )
                for delta in primary:
                    held.append(delta)
                    if delta.text:
                        break
            except ModelError as exc:
                if not falls_back(exc):
                    raise
                first = exc
            else:
                name = self.primary.name
                for delta in held:
                    yield replace(delta, model=name)
                for delta in primary:
                    yield replace(delta, model=name)
                return
        finally:
            _close(primary)
        self._log_fallback(first, stream=True)
        deltas: Iterator[StreamDelta] | None = None
        try:
            deltas = self.fallback.stream(
                messages, max_tokens=max_tokens, temperature=temperature, stop=stop
            )
            for delta in deltas:
                yield replace(delta, model=self.fallback.name)
        except ModelError as exc:
            raise self._both_failed(first, exc) from exc
        finally:
            _close(deltas)

    def _log_fallback(self, exc: ModelError, *, stream: bool) -> None:
        logger.warning(
            "llm fallback primary=%s fallback=%s stream=%s error=%s",
            self.primary.name,
            self.fallback.name,
            stream,
            exc.code,
        )

    def _both_failed(self, first: ModelError, second: ModelError) -> ModelError:
        """The fallback's error, its message naming both failures."""
        return type(second)(
            f"primary model {self.primary.name} failed ({first.code}: {first.message}); "
            f"fallback model {self.fallback.name} failed ({second.code}: {second.message})",
            retry_after=second.retry_after,
        )


def _close(deltas: Iterator[StreamDelta] | None) -> None:
    """Close a stream early (generators free their connection or model turn)."""
    close = getattr(deltas, "close", None)
    if close is not None:
        close()
