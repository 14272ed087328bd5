"""`latch`: the `compute` case until its one-element `signal` reaches `threshold`
(at a call index >= `warmup`), then `then` for the rest of the request (Adaptive
Guidance: drop the unconditional branch once it agrees)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import Choice, Selector, check_finite, register_selector


@register_selector("latch")
@dataclass(frozen=True)
class Latch(Selector):
    compute: str       # case until the signal reaches the threshold
    then: str          # case for every later call of the request
    signal: str        # reference to a one-element value the `compute` case produces
    threshold: float
    warmup: int = 1    # calls before this index never latch

    def __post_init__(self):
        check_finite("latch", "threshold", self.threshold)

    def labels(self) -> tuple[str, ...]:
        return (self.compute, self.then)

    def reads_after(self) -> tuple[tuple[str, str], ...]:
        return ((self.compute, self.signal),)

    def new_state(self) -> Any:
        return False

    def choose(self, latched: Any, c: Choice) -> tuple[str, Any]:
        return (self.then if latched else self.compute), latched

    def observe(self, latched: Any, label: str, c: Choice) -> Any:
        if latched or label != self.compute or c.call_index < self.warmup:
            return latched
        return c.scalar(self.signal) >= self.threshold
