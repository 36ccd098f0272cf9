"""``TurnGate``: one holder at a time, a bounded FIFO of waiters, bounded waits.

The local model's queue: a llama.cpp context runs one generation at a time,
and callers beyond ``max_waiting`` or waiting longer than ``wait_timeout_s``
get ``ModelBusy`` with a ``retry_after`` estimate.
"""

from __future__ import annotations

import collections
import math
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from rag_service.errors import ModelBusy

#: First guess of how long one generation holds the model, before any ran.
INITIAL_TURN_S = 5.0


class TurnGate:
    """One holder at a time, a bounded FIFO of waiters, bounded waits.

    ``retry_after`` estimates come from a moving average of how long turns
    took, times the turns ahead of a newcomer.
    """

    def __init__(self, max_waiting: int, wait_timeout_s: float) -> None:
        self._max_waiting = max_waiting
        self._wait_timeout_s = wait_timeout_s
        self._cond = threading.Condition()
        self._held = False
        self._held_since = 0.0
        self._waiters: collections.deque[object] = collections.deque()
        self._avg_turn_s = INITIAL_TURN_S

    @property
    def waiting(self) -> int:
        """Callers queued for a turn right now."""
        with self._cond:
            return len(self._waiters)

    def retry_after(self) -> float:
        """Whole seconds until a newcomer could expect a turn."""
        with self._cond:
            return self._retry_after_locked()

    def _retry_after_locked(self) -> float:
        return float(max(1, math.ceil(self._avg_turn_s * (len(self._waiters) + 1))))

    def acquire(self, *, bounded: bool = True) -> None:
        """Take the turn or raise ``ModelBusy``; ``bounded=False`` skips the queue limit."""
        with self._cond:
            if not self._held and not self._waiters:
                self._take()
                return
            if bounded and len(self._waiters) >= self._max_waiting:
                raise ModelBusy(
                    f"local model busy: {len(self._waiters)} requests already waiting "
                    f"(max_queue={self._max_waiting})",
                    retry_after=self._retry_after_locked(),
                )
            token = object()
            self._waiters.append(token)
            deadline = time.monotonic() + self._wait_timeout_s
            try:
                while self._held or self._waiters[0] is not token:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise ModelBusy(
                            f"local model busy: no turn within queue_timeout_s="
                            f"{self._wait_timeout_s:g}",
                            retry_after=self._retry_after_locked(),
                        )
                    self._cond.wait(remaining)
            finally:
                self._waiters.remove(token)
                # The head may have changed: let the next waiter look again.
                self._cond.notify_all()
            self._take()

    def _take(self) -> None:
        self._held = True
        self._held_since = time.monotonic()

    def release(self) -> None:
        """End the current turn and wake the next waiter."""
        with self._cond:
            took = time.monotonic() - self._held_since
            self._avg_turn_s = 0.7 * self._avg_turn_s + 0.3 * took
            self._held = False
            self._cond.notify_all()

    @contextmanager
    def turn(self) -> Iterator[None]:
        """Hold the turn for the ``with`` block."""
        self.acquire()
        try:
            yield
        finally:
            self.release()
