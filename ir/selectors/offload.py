"""`offload`: decide per policy call whether to offload at all, from the robot's
proprioception (RAPID, arXiv 2603.07949: smooth, redundant steps stay on the edge;
task switches, sudden stops and contact phases go to the cloud).

Two signals, read from the state vector's first row once per request call:
  acceleration  |v_t - v_{t-1}|, v the end-effector velocity: `position` minus the
                `previous` indices (the state's own copy of the last tick, as Meta-World's
                observation has) or, without them, minus the position at the previous call.
                A task switch or a sudden stop is a jump in it.
  effort        sum |x[effort[i]] - x[effort_previous[i]]|: the change of the effort-like
                values the state holds (joint torques where the robot reports them; for a
                Meta-World state, which has none, the gripper opening and the object's
                position, which change when the gripper closes on or pushes the object),
                averaged over the last `smooth` calls (a sliding mean: a contact phase
                lasts, one noisy tick does not make one).
Each signal is scored against its own last `window` values (not the current one):
z = max(0, (x - mean) / max(std, floor * mean|x|, 1e-9)) -- an anomaly in units of the
window's spread, floored so a perfectly smooth window does not turn noise into an anomaly.
The two scores are weighted dynamically: w = softmax(sharpness * z), score = w . z, so
the signal that is anomalous now dominates (a contact with a still arm, a stop with
nothing touched). The call is offloaded when score > `threshold`, and the `hold` calls
after it too (a contact phase lasts); while a signal has fewer than `warmup` past values
(the start of a request: a new task) the call is offloaded, since nothing says it is
smooth. Otherwise it stays on the edge.

All selects of one request call share the decision (the state is read once per call).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from . import Choice, PlanError, Selector, check_finite, register_selector
from .motion import velocity


@dataclass
class OffloadState:
    call: int = -1                   # the request call the decision was made for
    offload: bool = True
    hold: int = 0                    # calls still offloaded after the last trigger
    last_pos: Any = None             # position at the previous call (no `previous` indices)
    last_v: Any = None               # velocity at the previous call
    acc: list = field(default_factory=list)      # the last `window` accelerations, newest last
    raw: list = field(default_factory=list)      # the last `smooth` effort changes
    eff: list = field(default_factory=list)      # the last `window` smoothed efforts
    score: float = math.nan          # the last call's combined score (nan: warm-up)
    z: tuple = ()                    # the last call's (acceleration, effort) scores


def _ints(kind: str, name: str, v: Any) -> tuple[int, ...]:
    v = tuple(v)
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in v):
        raise PlanError(f"{kind} selector: {name} must be state indices (ints >= 0), got {list(v)}")
    return v


@register_selector("offload")
@dataclass(frozen=True)
class Offload(Selector):
    input: str                          # the reference holding the state, e.g. "in:state" (first row read)
    cases: tuple[str, str]              # (stay on the edge, offload)
    position: tuple[int, ...]           # indices of the end-effector position in the state
    previous: tuple[int, ...] = ()      # indices of the position one tick earlier (else the previous call's)
    effort: tuple[int, ...] = ()        # indices of effort-like values (torques; contact proxies)
    effort_previous: tuple[int, ...] = ()   # ... and of the same values one tick earlier
    window: int = 16                    # past values each signal is normalized against
    smooth: int = 3                     # calls the effort change is averaged over
    threshold: float = 2.0              # offload when the weighted score exceeds this
    hold: int = 2                       # calls kept offloaded after a trigger
    warmup: int = 3                     # past values a signal needs before it can call a step smooth
    floor: float = 0.1                  # the spread's floor, as a fraction of the window's mean magnitude
    sharpness: float = 1.0              # of the softmax weighting the two scores

    def __post_init__(self):
        k = "offload"
        for name in ("position", "previous", "effort", "effort_previous"):
            object.__setattr__(self, name, _ints(k, name, getattr(self, name)))
        if not isinstance(self.input, str) or ":" not in self.input:
            raise PlanError(f"{k} selector: input must be a reference like 'in:state', got {self.input!r}")
        if len(self.cases) != 2 or len(set(self.cases)) != 2:
            raise PlanError(f"{k} selector: cases are two distinct labels (edge, offload), got {list(self.cases)}")
        if not self.position:
            raise PlanError(f"{k} selector: position needs at least one state index")
        if self.previous and len(self.previous) != len(self.position):
            raise PlanError(f"{k} selector: previous has {len(self.previous)} indices for the "
                            f"{len(self.position)} of position; give one per position index, or none")
        if len(self.effort) != len(self.effort_previous):
            raise PlanError(f"{k} selector: effort has {len(self.effort)} indices and effort_previous "
                            f"{len(self.effort_previous)}; give one earlier index per effort index")
        for name, lo in (("window", 2), ("smooth", 1), ("hold", 0), ("warmup", 2)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise PlanError(f"{k} selector: {name} must be an int >= {lo}, got {v!r}")
        if self.warmup > self.window:
            raise PlanError(f"{k} selector: warmup ({self.warmup}) cannot exceed window ({self.window})")
        for name in ("threshold", "floor", "sharpness"):
            check_finite(k, name, getattr(self, name))
        if self.floor < 0 or self.sharpness < 0:
            raise PlanError(f"{k} selector: floor and sharpness must be >= 0")

    def labels(self) -> tuple[str, ...]:
        return tuple(self.cases)

    def reads(self) -> tuple[str, ...]:
        return (self.input,)

    def new_state(self) -> OffloadState:
        return OffloadState()

    @staticmethod
    def _z(x: float, past: list, floor: float) -> float:
        import numpy as np
        a = np.asarray(past, dtype=np.float64)
        den = max(float(a.std()), floor * float(np.abs(a).mean()), 1e-9)
        return max(0.0, (x - float(a.mean())) / den)

    def score(self, state_vec: Any, s: OffloadState) -> float:
        """The combined anomaly score of one state vector (nan while a signal warms up), updating
        the history in `s`. The calibration of `threshold` replays it over observations."""
        import numpy as np
        x = np.asarray(state_vec, dtype=np.float64).reshape(-1)
        need = max(self.position + self.previous + self.effort + self.effort_previous)
        if x.size <= need:
            raise PlanError(f"offload selector: {self.input} has {x.size} values per row; index {need} is past them")
        v = velocity(x, self.position, self.previous, s)
        acc = None
        if v is not None:
            if s.last_v is not None:
                acc = float(np.linalg.norm(v - s.last_v))
            s.last_v = v
        eff = None
        if self.effort:
            s.raw = (s.raw + [float(np.abs(x[list(self.effort)] - x[list(self.effort_previous)]).sum())])[-self.smooth:]
            eff = sum(s.raw) / len(s.raw)
        zs, warm = [], False
        for val, hist in ((acc, s.acc), (eff, s.eff)):
            if val is None:
                if hist is s.acc:
                    warm = True
                continue
            if len(hist) < self.warmup:
                warm = True
            else:
                zs.append(self._z(val, hist, self.floor))
            hist.append(val)
            del hist[:-self.window]
        s.z = tuple(zs)
        if warm or not zs:
            s.score = math.nan
            return s.score
        z = np.asarray(zs)
        w = np.exp(self.sharpness * (z - z.max()))
        s.score = float((w / w.sum()) @ z)
        return s.score

    def scores_over(self, states: Any) -> list[float]:
        """The scores of a sequence of state vectors read as one request (calibration)."""
        st = OffloadState()
        return [self.score(x, st) for x in states]

    def offloads_over(self, states: Any) -> list[bool]:
        """Whether each of a sequence of state vectors, read as one request, is offloaded
        (hold and warm-up included): the share a calibration stream would send."""
        st, out = OffloadState(), []
        for i, x in enumerate(states):
            label, st = self.choose(st, Choice(i, lambda ref, x=x: x))
            out.append(label == self.cases[1])
        return out

    def choose(self, s: OffloadState, c: Choice) -> tuple[str, OffloadState]:
        if s.call == c.request_call:          # another select (or loop iteration) of the same call
            return self.cases[int(s.offload)], s
        score = self.score(c.value(self.input), s)
        if math.isnan(score) or score > self.threshold:
            s.offload, s.hold = True, (self.hold if not math.isnan(score) else 0)
        elif s.hold > 0:
            s.offload, s.hold = True, s.hold - 1
        else:
            s.offload = False
        s.call = c.request_call
        return self.cases[int(s.offload)], s


def calibrated_threshold(scores: Any, share: float, who: str) -> float:
    """The threshold above which `share` of the (warmed-up) calibration scores lie.

    Raises:
        PlanError: naming `who`, when too few scores are known.
    """
    import numpy as np
    v = np.asarray([x for x in scores if not math.isnan(x)], dtype=np.float64)
    if v.size < 10:
        raise PlanError(f"{who}: the calibration stream gives {v.size} scores past warm-up; calibrating the "
                        "offload threshold needs at least 10 (give more calibration observations, or a threshold)")
    return float(np.quantile(v, 1.0 - share))
