"""`rule`: compare a probe's `signal` (bound before the Select) with the previous
call's by `metric`; below `threshold` (optionally accumulated over consecutive
reuses), from call `warmup` on and under `max_consecutive` reuses in a row, choose
`reuse`, otherwise `compute` (adaptive caching: TeaCache, FirstBlockCache)."""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from . import Choice, PlanError, Selector, check_finite, register_selector


def rel_l1(a: Any, b: Any) -> float:
    """mean|a - b| / mean|b| on numpy arrays (or anything np.asarray takes)."""
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    denom = float(np.mean(np.abs(b)))
    return float(np.mean(np.abs(a - b))) / denom if denom > 0 else math.inf


METRICS: dict[str, Callable[[Any, Any], float]] = {"rel_l1": rel_l1}


@dataclass
class _RuleState:
    acc: float = 0.0
    consecutive: int = 0
    prev: Any = None


@register_selector("rule")
@dataclass(frozen=True)
class Rule(Selector):
    signal: str              # reference compared across calls (produced before the Select)
    compute: str             # case when the signal changed
    reuse: str               # case when it did not
    threshold: float
    metric: str = "rel_l1"
    accumulate: bool = True  # sum the metric over consecutive reuses (TeaCache)
    warmup: int = 1          # the first calls always compute
    max_consecutive: int = 0  # 0: no cap on consecutive reuses

    def __post_init__(self):
        check_finite("rule", "threshold", self.threshold)
        if self.metric not in METRICS:
            raise PlanError(f"rule selector: unknown metric {self.metric!r}; known: {sorted(METRICS)}")

    def labels(self) -> tuple[str, ...]:
        return (self.compute, self.reuse)

    def reads(self) -> tuple[str, ...]:
        return (self.signal,)

    def new_state(self) -> Any:
        return _RuleState()

    def choose(self, s: Any, c: Choice) -> tuple[str, Any]:
        signal = c.value(self.signal)
        chosen = self.compute
        if s.prev is not None and c.call_index >= self.warmup:
            d = METRICS[self.metric](signal, s.prev)
            s.acc = s.acc + d if self.accumulate else d
            if s.acc < self.threshold and (self.max_consecutive == 0 or s.consecutive < self.max_consecutive):
                chosen = self.reuse
        if chosen == self.reuse:
            s.consecutive += 1
        else:
            s.consecutive, s.acc = 0, 0.0
        s.prev = signal
        return chosen, s
