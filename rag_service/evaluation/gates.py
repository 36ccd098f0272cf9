"""``--gate METRIC>=VALUE``: thresholds a run must meet, for CI.

A gate names one aggregate as the report does (``hybrid.ndcg@10``,
``direct.contains``, ``direct.latency_p50_ms``) and compares it with ``>=``
or ``<=``.  A metric with no value (say abstention precision of a run that
never abstained) fails its gate.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from rag_service.errors import InvalidRequest

_GATE = re.compile(r"^\s*(?P<name>[^\s<>=]+)\s*(?P<op><=|>=)\s*(?P<value>\S+)\s*$")


class GateError(InvalidRequest):
    """A ``--gate`` expression is malformed or names a metric the run does not report."""

    code = "invalid_gate"


@dataclass(frozen=True)
class Gate:
    """``metric op threshold``."""

    metric: str
    op: str
    threshold: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.threshold:g}"

    def passes(self, value: float | None) -> bool:
        if value is None or math.isnan(value):
            return False
        return value >= self.threshold if self.op == ">=" else value <= self.threshold


@dataclass(frozen=True)
class GateResult:
    gate: Gate
    value: float | None
    passed: bool


def parse_gate(text: str, known: Sequence[str]) -> Gate:
    """A gate from ``NAME>=VALUE`` or ``NAME<=VALUE``; the name must be one of ``known``."""
    found = _GATE.match(text)
    if found is None:
        raise GateError(f"bad gate {text!r}: expected METRIC>=VALUE or METRIC<=VALUE")
    try:
        threshold = float(found["value"])
    except ValueError:
        raise GateError(f"bad gate {text!r}: {found['value']!r} is not a number") from None
    if math.isnan(threshold):
        raise GateError(f"bad gate {text!r}: the threshold is not a number")
    name = found["name"].lower()
    if name not in known:
        raise GateError(
            f"unknown metric {found['name']!r} in gate {text!r}; this run reports: "
            + ", ".join(known)
        )
    return Gate(name, found["op"], threshold)


def check_gates(gates: Sequence[Gate], metrics: Mapping[str, float | None]) -> list[GateResult]:
    """Each gate against the run's metrics."""
    return [GateResult(g, metrics.get(g.metric), g.passes(metrics.get(g.metric))) for g in gates]
