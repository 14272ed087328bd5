"""`table`: a case per call index of the request (static caching: step -> variant)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import Choice, PlanError, Selector, register_selector


@register_selector("table")
@dataclass(frozen=True)
class Table(Selector):
    cases: tuple[str, ...]   # the case for call index 0, 1, ...
    default: str             # the case past the end of the table

    def __post_init__(self):
        if not isinstance(self.default, str) or not all(isinstance(c, str) for c in self.cases):
            raise PlanError(f"table selector: cases and default are case labels, got {self.cases!r} / {self.default!r}")

    def labels(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys([*self.cases, self.default]))

    def choose(self, state: Any, c: Choice) -> tuple[str, Any]:
        i = c.call_index
        return (self.cases[i] if i < len(self.cases) else self.default), state
