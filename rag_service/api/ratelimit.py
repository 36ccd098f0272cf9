"""Per-client rate limits in memory: requests per minute and model tokens per minute.

A client is whatever string the API hands in as its id: the client address
today, an API key's id once keys exist; nothing here knows which.

- Requests: a token bucket per client holding up to ``requests_per_minute``
  requests and refilled evenly over the minute, so a client may burst that
  many at once and then goes at the steady rate.
- Model tokens: the tokens a client's answered queries used in the trailing
  minute, kept in one-second slots (at most 61 a client).  A request arriving
  while that sum is at or over ``tokens_per_minute`` waits until enough of
  them age out.

Every call is O(1) amortised under one lock.  A client idle for a full minute
is indistinguishable from a new one (bucket full, no tokens in the window), so
its state is dropped; ``max_clients`` bounds memory even under a flood of
distinct addresses by dropping the least recently seen first.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable

WINDOW_S = 60.0
SLOT_S = 1.0


class _Slot:
    """Tokens spent within one second: from ``start``, last spent at ``last``."""

    __slots__ = ("last", "start", "tokens")

    def __init__(self, now: float, tokens: int) -> None:
        self.start = now
        self.last = now
        self.tokens = tokens


class _Client:
    __slots__ = ("allowance", "refilled", "seen", "slots", "spent")

    def __init__(self, now: float, burst: int) -> None:
        self.allowance = float(burst)
        self.refilled = now
        self.seen = now
        self.slots: deque[_Slot] = deque()
        self.spent = 0

    def expire(self, now: float) -> None:
        while self.slots and self.slots[0].last + WINDOW_S <= now:
            self.spent -= self.slots.popleft().tokens


class RateLimiter:
    """Thread-safe per-client budgets; a limit of 0 is no limit."""

    def __init__(
        self,
        *,
        requests_per_minute: int = 0,
        tokens_per_minute: int = 0,
        max_clients: int = 100_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.requests_per_minute = requests_per_minute
        self.tokens_per_minute = tokens_per_minute
        self.max_clients = max_clients
        self._clock = clock
        self._lock = threading.Lock()
        self._clients: OrderedDict[str, _Client] = OrderedDict()

    def __len__(self) -> int:
        """Clients currently tracked."""
        with self._lock:
            return len(self._clients)

    def take_request(self, client: str) -> float:
        """Count one request; 0.0 when allowed, else the seconds until one would be."""
        if not self.requests_per_minute:
            return 0.0
        rate = self.requests_per_minute / WINDOW_S
        with self._lock:
            now = self._clock()
            state = self._touch(client, now)
            state.allowance = min(
                float(self.requests_per_minute),
                state.allowance + (now - state.refilled) * rate,
            )
            state.refilled = now
            if state.allowance >= 1.0:
                state.allowance -= 1.0
                return 0.0
            return (1.0 - state.allowance) / rate

    def tokens_wait(self, client: str) -> float:
        """0.0 when the client is under its token budget, else the seconds until it will be."""
        if not self.tokens_per_minute:
            return 0.0
        with self._lock:
            now = self._clock()
            state = self._clients.get(client)
            if state is None:
                return 0.0
            state.expire(now)
            over = state.spent - self.tokens_per_minute + 1
            if over <= 0:
                return 0.0
            for slot in state.slots:
                over -= slot.tokens
                if over <= 0:
                    return slot.last + WINDOW_S - now
            raise AssertionError("unreachable: the slots sum to the tokens spent")

    def spend_tokens(self, client: str, tokens: int) -> None:
        """Record model tokens an answered request of the client used."""
        if not self.tokens_per_minute or tokens <= 0:
            return
        with self._lock:
            now = self._clock()
            state = self._touch(client, now)
            state.expire(now)
            slots = state.slots
            if slots and now - slots[-1].start < SLOT_S:
                slots[-1].tokens += tokens
                slots[-1].last = now
            else:
                slots.append(_Slot(now, tokens))
            state.spent += tokens

    def _touch(self, client: str, now: float) -> _Client:
        """The client's state, marked as seen now; drops clients idle for a minute."""
        state = self._clients.get(client)
        if state is None:
            state = _Client(now, self.requests_per_minute)
            self._clients[client] = state
        else:
            self._clients.move_to_end(client)
        state.seen = now
        clients = self._clients
        while clients:
            oldest = next(iter(clients.values()))
            if oldest.seen + WINDOW_S > now and len(clients) <= self.max_clients:
                break
            clients.popitem(last=False)
        return state
