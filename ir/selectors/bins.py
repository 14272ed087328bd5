"""`bins`: a case by the value of a reference (its first element): ``cases[i]`` for
``edges[i-1] <= v < edges[i]``. Timestep-aware variants chosen by t, whatever the
sampler and its step count."""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass
from typing import Any

from . import Choice, PlanError, Selector, register_selector


@register_selector("bins")
@dataclass(frozen=True)
class Bins(Selector):
    input: str                 # the reference whose first element decides, e.g. "in:t"
    edges: tuple[float, ...]   # ascending bin edges
    cases: tuple[str, ...]     # one per bin: len(edges) + 1, lowest values first

    def __post_init__(self):
        object.__setattr__(self, "edges", tuple(float(e) for e in self.edges))
        if len(self.cases) != len(self.edges) + 1:
            raise PlanError(f"bins selector: {len(self.edges)} edges need {len(self.edges) + 1} cases, "
                            f"got {len(self.cases)}")
        if any(not math.isfinite(e) for e in self.edges) or list(self.edges) != sorted(set(self.edges)):
            raise PlanError(f"bins selector: edges must be finite and strictly ascending, got {list(self.edges)}")

    def labels(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(self.cases))

    def reads(self) -> tuple[str, ...]:
        return (self.input,)

    def bin_of(self, value: float) -> str:
        return self.cases[bisect.bisect_right(self.edges, value)]

    def choose(self, state: Any, c: Choice) -> tuple[str, Any]:
        return self.bin_of(c.scalar(self.input)), state
