"""`motion`: a precision level per policy call from kinematic proxies of the robot's state,
with hysteresis (DyQ-VLA, "DyQ-VLA: Temporal-Dynamic-Aware Quantization for Embodied
Vision-Language-Action Models", 2026: coarse motion runs at low activation bits, fine
manipulation at high bits).

The proxies, read from the state vector's first row at each call of the request:
  speed    |p - p_prev| over the end-effector `position` indices, p_prev the `previous`
           indices (the state's own copy of the last tick, as Meta-World's observation has)
           or, without them, the position at the request's previous call
  gripper  |g - g_prev| over the (current, previous) `gripper` indices
  jerk     |v_t - 2 v_{t-1} + v_{t-2}|, the second difference across calls of the velocity
           above (a change of acceleration: contact, a turn)
The level is the speed's bin (`edges`, ascending): `cases[0]`, the finest, below edges[0],
the coarsest above the last edge. A gripper change or a jerk above its threshold forces the
finest level. Hysteresis: a finer level is taken at once (fine manipulation must not wait);
a coarser one only after it was proposed `dwell` calls in a row. The first call of a request
whose speed is unknown (no `previous`, no earlier call) runs the finest level.

All selects of one request call share one choice: the state is read once per call
(`Choice.request_call`), so a motion select inside a loop (denoising steps, decoding) or
several selects with one `key` (every graph of the policy) agree and update the history once.
"""
from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field
from typing import Any

from . import Choice, PlanError, Selector, check_finite, register_selector


@dataclass
class MotionState:
    """Per request: the current level and what the proxies remember."""
    level: int = 0
    pending: int = 0                 # calls in a row a coarser level was proposed
    last_pos: Any = None             # position at the previous call (no `previous` indices)
    velocities: list = field(default_factory=list)   # the last three velocities, newest last
    call: int = -1                   # the request call the level was chosen for
    proxies: tuple = ()              # (speed, gripper change, jerk) of that call (None: unknown)


@register_selector("motion")
@dataclass(frozen=True)
class Motion(Selector):
    input: str                        # the reference holding the state, e.g. "in:state" (first row read)
    cases: tuple[str, ...]            # one per level, finest (most precise) first
    position: tuple[int, ...]         # indices of the end-effector position in the state
    edges: tuple[float, ...]          # ascending speed edges: len(cases) - 1
    previous: tuple[int, ...] = ()    # indices of the position one tick earlier (else the previous call's)
    gripper: tuple[int, ...] = ()     # (current, previous) indices of the gripper opening; () off
    gripper_threshold: float | None = None   # a gripper change above this forces the finest level
    jerk_threshold: float | None = None      # a jerk above this forces the finest level
    dwell: int = 2                    # calls in a row a coarser level must be proposed before it is taken

    def __post_init__(self):
        object.__setattr__(self, "edges", tuple(float(e) for e in self.edges))
        for name in ("position", "previous", "gripper"):
            v = tuple(getattr(self, name))
            if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in v):
                raise PlanError(f"motion selector: {name} must be state indices (ints >= 0), got {list(v)}")
            object.__setattr__(self, name, v)
        if not self.position:
            raise PlanError("motion selector: position needs at least one state index")
        if self.previous and len(self.previous) != len(self.position):
            raise PlanError(f"motion selector: previous has {len(self.previous)} indices for the "
                            f"{len(self.position)} of position; give one per position index, or none")
        if self.gripper and len(self.gripper) != 2:
            raise PlanError(f"motion selector: gripper is (current, previous) indices, got {list(self.gripper)}")
        if len(self.cases) < 1 or len(set(self.cases)) != len(self.cases):
            raise PlanError(f"motion selector: cases must be distinct labels, got {list(self.cases)}")
        if len(self.edges) != len(self.cases) - 1:
            raise PlanError(f"motion selector: {len(self.cases)} levels need {len(self.cases) - 1} speed edges, "
                            f"got {len(self.edges)}")
        if any(not math.isfinite(e) for e in self.edges) or list(self.edges) != sorted(set(self.edges)):
            raise PlanError(f"motion selector: edges must be finite and strictly ascending, got {list(self.edges)}")
        for name in ("gripper_threshold", "jerk_threshold"):
            v = getattr(self, name)
            if v is not None:
                check_finite("motion", name, v)
                if v < 0:
                    raise PlanError(f"motion selector: {name} must be >= 0, got {v}")
        if self.gripper_threshold is not None and not self.gripper:
            raise PlanError("motion selector: gripper_threshold needs the gripper indices")
        if isinstance(self.dwell, bool) or not isinstance(self.dwell, int) or self.dwell < 1:
            raise PlanError(f"motion selector: dwell must be an int >= 1, got {self.dwell!r}")

    def labels(self) -> tuple[str, ...]:
        return tuple(self.cases)

    def reads(self) -> tuple[str, ...]:
        return (self.input,)

    def new_state(self) -> Any:
        return MotionState()

    def measure(self, state_vec: Any, s: MotionState) -> tuple[float | None, float | None, float | None]:
        """The proxies (speed, gripper change, jerk) of one state vector, updating the history in
        `s` (None: not known yet). The pass that calibrates the edges calls it too."""
        import numpy as np
        x = np.asarray(state_vec, dtype=np.float64).reshape(-1)
        need = max(self.position + self.previous + self.gripper)
        if x.size <= need:
            raise PlanError(f"motion selector: {self.input} has {x.size} values per row; index {need} is past them")
        v = velocity(x, self.position, self.previous, s)
        speed = None if v is None else float(np.linalg.norm(v))
        grip = float(abs(x[self.gripper[0]] - x[self.gripper[1]])) if self.gripper else None
        jerk = None
        if v is not None:
            s.velocities = (s.velocities + [v])[-3:]
            if len(s.velocities) == 3:
                a, b, c = s.velocities
                jerk = float(np.linalg.norm(c - 2 * b + a))
        return speed, grip, jerk

    def proxies_over(self, states: Any) -> list[tuple[float | None, float | None, float | None]]:
        """The proxies of a sequence of state vectors, read as one request (calibration)."""
        st = MotionState()
        return [self.measure(x, st) for x in states]

    def propose(self, speed: float | None, grip: float | None, jerk: float | None) -> int:
        """The level the proxies ask for, before hysteresis (0: finest)."""
        if speed is None:
            return 0
        if self.gripper_threshold is not None and grip is not None and grip > self.gripper_threshold:
            return 0
        if self.jerk_threshold is not None and jerk is not None and jerk > self.jerk_threshold:
            return 0
        return bisect.bisect_right(self.edges, speed)

    def choose(self, s: Any, c: Choice) -> tuple[str, Any]:
        if s.call == c.request_call:          # another select (or loop iteration) of the same call
            return self.cases[s.level], s
        proxies = self.measure(c.value(self.input), s)
        want = self.propose(*proxies)
        if s.call < 0:                        # a request starts at the finest level
            s.level, s.pending = 0, 0
        if want < s.level:
            s.level, s.pending = want, 0
        elif want > s.level:
            s.pending += 1
            if s.pending >= self.dwell:
                s.level, s.pending = want, 0
        else:
            s.pending = 0
        s.call, s.proxies = c.request_call, proxies
        return self.cases[s.level], s


def velocity(x: Any, position: tuple[int, ...], previous: tuple[int, ...], s: Any) -> Any:
    """The end effector's velocity in state vector `x`: the `position` indices less the `previous`
    ones (the state's own copy of the last tick), or without them less the position `s.last_pos`
    held from the previous call (updated; None on a request's first call)."""
    pos = x[list(position)]
    if previous:
        return pos - x[list(previous)]
    v = None if s.last_pos is None else pos - s.last_pos
    s.last_pos = pos
    return v


def speed_edges(speeds: Any, shares: Any, who: str) -> tuple[float, ...]:
    """Speed edges that put `shares` (one per level, finest first, summing to 1) of the observed
    `speeds` in each level: the quantiles at the shares' running sums.

    Raises:
        PlanError: naming `who`, when there are too few speeds or the edges do not separate the levels.
    """
    import numpy as np
    v = np.asarray([x for x in speeds if x is not None], dtype=np.float64)
    k = len(shares)
    if k > 1 and v.size < 2 * k:
        raise PlanError(f"{who}: the calibration run gives {v.size} speeds; {k} levels need at least {2 * k} "
                        "(give more observations, or 'previous' indices so every observation has a speed)")
    edges = tuple(float(np.quantile(v, q)) for q in np.cumsum(shares)[:-1])
    if any(b <= a for a, b in zip(edges, edges[1:])):
        raise PlanError(f"{who}: the calibration speeds give edges {list(edges)} that do not separate the levels "
                        "(too few distinct speeds); give other shares or more observations")
    return edges


def first_rows(values: Any) -> list:
    """The first row of each value (a tensor or an array), flattened, as float64 numpy: the state
    vectors a calibration run's observations hold."""
    import numpy as np
    out = []
    for v in values:
        v = v.detach().cpu().numpy() if hasattr(v, "detach") else np.asarray(v)
        out.append(np.asarray(v, dtype=np.float64).reshape(v.shape[0] if v.ndim > 1 else 1, -1)[0])
    return out
