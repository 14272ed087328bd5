"""Selectors: what a Plan's `Select` node uses to pick one of its cases per call.

A selector is a registered frozen dataclass, one file each in this package. It
owns its options (the dataclass fields), their validation (`__post_init__` and
`check`), its JSON (the fields; `kind` names the class), the choice, and the
per-request state the runner keeps for it (`new_state`). Adding a selector
touches one file: write the class, decorate it with `register_selector`, and
import the module at the bottom of this file.

    table  a case per call index (static caching)
    rule   a probe signal compared with the previous call's (adaptive caching)
    latch  one case until a signal reaches a threshold, another after (Adaptive Guidance)
    bins   a case by the value of a reference, e.g. the timestep t
    motion a precision level by kinematic proxies of a robot's state, with hysteresis (DyQ-VLA)
    bandwidth  a partition cut by the link's measured bandwidth, predicted, with hysteresis (RoboECC)
    offload    stay on the edge or offload, by anomalies of the robot's proprioception (RAPID)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, ClassVar, Mapping

from pared.ir.errors import PlanError


class Choice:
    """What a selector sees when it chooses: the call index within the request (inside a
    steps loop, the iteration), the request's own call counter `request_call` (the same for
    every select of one call, loop or not), and the values already bound (`value(ref)` gives
    a numpy array)."""

    def __init__(self, call_index: int, value: Callable[[str], Any], request_call: int | None = None):
        self.call_index = call_index
        self.value = value
        self.request_call = call_index if request_call is None else request_call

    def scalar(self, ref: str) -> float:
        import numpy as np
        v = np.asarray(self.value(ref)).reshape(-1)
        if v.size == 0:
            raise PlanError(f"call {self.call_index}: selector reads {ref!r}, which is empty")
        return float(v[0])


class Selector:
    """Base of selectors. Subclasses are frozen dataclasses with a `kind`."""

    kind: ClassVar[str] = ""

    def labels(self) -> tuple[str, ...]:
        """The case labels this selector may choose."""
        raise NotImplementedError

    def reads(self) -> tuple[str, ...]:
        """References read before choosing (they must be bound before the Select)."""
        return ()

    def reads_after(self) -> tuple[tuple[str, str], ...]:
        """(case label, reference) pairs read after that case ran (it must produce them)."""
        return ()

    def new_state(self) -> Any:
        """Per-request state (reset with the runner)."""
        return None

    def choose(self, state: Any, c: Choice) -> tuple[str, Any]:
        """(the case label for this call, the new state)."""
        raise NotImplementedError

    def observe(self, state: Any, label: str, c: Choice) -> Any:
        """Called after the chosen case ran; returns the new state."""
        return state

    def to_json(self) -> dict:
        out: dict[str, Any] = {"kind": self.kind}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = list(v) if isinstance(v, tuple) else v
        return out

    @classmethod
    def from_json(cls, d: Mapping) -> "Selector":
        d = dict(d)
        d.pop("kind", None)
        hints = {f.name: f.type for f in dataclasses.fields(cls)}
        unknown = set(d) - set(hints)
        if unknown:
            raise PlanError(f"selector {cls.kind!r}: unknown field(s) {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


SELECTORS: dict[str, type[Selector]] = {}


def register_selector(kind: str):
    """Class decorator: register a selector under its JSON kind."""
    def deco(cls: type[Selector]) -> type[Selector]:
        if kind in SELECTORS and SELECTORS[kind] is not cls:
            raise ValueError(f"selector kind {kind!r} is already registered by {SELECTORS[kind].__qualname__}")
        cls.kind = kind
        SELECTORS[kind] = cls
        return cls
    return deco


def selector_from_json(d: Mapping) -> Selector:
    kind = d.get("kind")
    if kind not in SELECTORS:
        raise PlanError(f"unknown selector kind {kind!r}; known: {sorted(SELECTORS)}")
    return SELECTORS[kind].from_json(d)


def check_finite(kind: str, name: str, value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PlanError(f"{kind} selector: {name} must be a finite number, got {value!r}")


from . import bandwidth, bins, latch, motion, offload, rule, table  # noqa: E402,F401  (registers the built-in selectors)
