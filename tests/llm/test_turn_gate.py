"""The local model's turn gate: one holder, a bounded FIFO queue, bounded waits."""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable

import pytest

from rag_service.errors import ModelBusy
from rag_service.llm.turn_gate import TurnGate


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.005)


def test_full_queue_is_refused_at_once_with_retry_after() -> None:
    gate = TurnGate(max_waiting=0, wait_timeout_s=10.0)
    gate.acquire()
    started = time.monotonic()
    with pytest.raises(ModelBusy) as caught:
        gate.acquire()
    assert time.monotonic() - started < 0.1
    assert caught.value.retry_after is not None
    assert caught.value.retry_after >= 1
    gate.release()
    gate.acquire()  # free again
    gate.release()


def test_waiter_gives_up_after_the_queue_timeout() -> None:
    gate = TurnGate(max_waiting=1, wait_timeout_s=0.2)
    gate.acquire()
    started = time.monotonic()
    with pytest.raises(ModelBusy, match="queue_timeout_s"):
        gate.acquire()
    assert 0.2 <= time.monotonic() - started < 1.0
    assert gate.waiting == 0
    gate.release()


def test_waiters_get_their_turn_in_arrival_order() -> None:
    gate = TurnGate(max_waiting=3, wait_timeout_s=5.0)
    order: list[int] = []
    gate.acquire()

    def worker(n: int) -> None:
        with gate.turn():
            order.append(n)

    threads = []
    for n in range(3):
        thread = threading.Thread(target=worker, args=(n,))
        thread.start()
        threads.append(thread)
        wait_until(functools.partial(lambda k: gate.waiting == k, n + 1))
    with pytest.raises(ModelBusy):
        gate.acquire()
    gate.release()
    for thread in threads:
        thread.join(5)
    assert order == [0, 1, 2]


def test_retry_after_grows_with_the_queue() -> None:
    gate = TurnGate(max_waiting=2, wait_timeout_s=5.0)
    gate.acquire()
    alone = gate.retry_after()

    def wait_for_turn() -> None:
        with gate.turn():
            pass

    waiter = threading.Thread(target=wait_for_turn)
    waiter.start()
    wait_until(lambda: gate.waiting == 1)
    assert gate.retry_after() > alone
    gate.release()
    waiter.join(5)
