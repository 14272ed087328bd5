"""The Plan: how a Program's graphs run, as declarative, JSON-serializable data.

Torch-free: the Executor interprets the same Plan with numpy arrays that the
torch side interprets with tensors.

Values are named by references:
  ``in:NAME``     a program input (one per user input, in order)
  ``state:NAME``  a buffer carried between calls of one request (cache features,
                  the previous probe signal); reset by ``reset()``
  ``step:NAME``   a per-call scalar from the plan's ``step_values`` table (a float32
                  tensor of shape [1]: e.g. a forecast coefficient that depends on
                  how many steps ago the cache was computed); past the table's
                  end, its last value
  anything else   an intermediate value produced by a call in this step
A *routine* is an ordered list of graph calls; a call binds each graph input to
a reference and each graph output to a reference, so graphs exchange tensors
(an edge part feeding a cloud part) and write state (a step that emits the
features a later step reuses). The *schedule* picks the routine for each call
of the program:

  always  one routine every call (a plain model)
  table   a routine per call index (static caching: step -> variant); past the
          end of the table, ``default``
  rule    run ``probe`` first, compare its ``signal`` with the previous call's by
          ``metric``; below ``threshold`` (optionally accumulated), past
          ``warmup`` and under ``max_consecutive`` reuses, run ``reuse``,
          otherwise ``compute`` (adaptive caching: TeaCache, FirstBlockCache)
  latch   run ``compute`` until its scalar ``signal`` reaches ``threshold`` (at a
          call index >= ``warmup``), then ``then`` for the rest of the request
          (Adaptive Guidance: drop the unconditional branch once it agrees)
  bins    a routine by the value of a program input (its first element):
          ``routines[i]`` for ``edges[i-1] <= v < edges[i]`` (timestep-aware
          variants chosen by t, whatever the sampler and its step count)
"""
from __future__ import annotations

import bisect
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from .errors import ParedError

PLAN_VERSION = 1


class PlanError(ParedError):
    """A Plan is malformed: a reference is never produced, a graph is unknown, ..."""


@dataclass(frozen=True)
class Call:
    graph: str
    inputs: tuple[str, ...]   # one reference per graph input, in the graph's order
    outputs: tuple[str, ...]  # one reference per graph output, in the graph's order

    def to_json(self) -> dict:
        return {"graph": self.graph, "inputs": list(self.inputs), "outputs": list(self.outputs)}

    @staticmethod
    def from_json(d: Mapping) -> "Call":
        return Call(d["graph"], tuple(d["inputs"]), tuple(d["outputs"]))


@dataclass(frozen=True)
class StateBuffer:
    name: str
    shape: tuple[int | None, ...] | None = None  # None: taken from the first value written
    dtype: str | None = None


@dataclass(frozen=True)
class Always:
    routine: str
    kind: str = field(default="always", init=False)


@dataclass(frozen=True)
class Table:
    routines: tuple[str, ...]  # routine for call index 0, 1, ...
    default: str               # routine past the end of the table
    kind: str = field(default="table", init=False)


@dataclass(frozen=True)
class Rule:
    probe: str            # routine run first every call
    signal: str           # reference the probe produces, compared across calls
    compute: str          # routine run when the signal changed
    reuse: str            # routine run when it did not
    threshold: float
    metric: str = "rel_l1"
    accumulate: bool = True   # sum the metric over consecutive reuses (TeaCache)
    warmup: int = 1           # the first calls always compute
    max_consecutive: int = 0  # 0: no cap on consecutive reuses
    kind: str = field(default="rule", init=False)


@dataclass(frozen=True)
class Latch:
    compute: str          # routine until the signal reaches the threshold
    then: str             # routine for every later call of the request
    signal: str           # reference to a one-element value `compute` produces
    threshold: float
    warmup: int = 1       # calls before this index never latch
    kind: str = field(default="latch", init=False)


@dataclass(frozen=True)
class Bins:
    input: str                  # the program input whose first element decides (e.g. the timestep)
    edges: tuple[float, ...]    # ascending bin edges
    routines: tuple[str, ...]   # one per bin: len(edges) + 1, lowest values first
    kind: str = field(default="bins", init=False)

    def __post_init__(self):
        if len(self.routines) != len(self.edges) + 1:
            raise PlanError(f"bins schedule: {len(self.edges)} edges need {len(self.edges) + 1} routines, "
                            f"got {len(self.routines)}")
        if any(not math.isfinite(e) for e in self.edges) or list(self.edges) != sorted(set(self.edges)):
            raise PlanError(f"bins schedule: edges must be finite and strictly ascending, got {list(self.edges)}")

    def choose(self, value: float) -> str:
        return self.routines[bisect.bisect_right(self.edges, value)]


Schedule = Always | Table | Rule | Latch | Bins
_SCHEDULES = {"always": Always, "table": Table, "rule": Rule, "latch": Latch, "bins": Bins}


@dataclass(frozen=True)
class Plan:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]          # references returned, in the flat output order
    routines: tuple[tuple[str, tuple[Call, ...]], ...]
    schedule: Schedule
    state: tuple[StateBuffer, ...] = ()
    step_values: tuple[tuple[str, tuple[float, ...]], ...] = ()   # name -> value per call index

    def step_value(self, name: str, call_index: int) -> float:
        for n, vals in self.step_values:
            if n == name:
                return float(vals[min(call_index, len(vals) - 1)]) if vals else 0.0
        raise PlanError(f"plan has no step value {name!r}")

    @staticmethod
    def single(graph: str, inputs: Sequence[str], outputs: Sequence[str]) -> "Plan":
        """The trivial plan: one graph called once per call."""
        call = Call(graph, tuple(f"in:{n}" for n in inputs), tuple(f"{graph}:{o}" for o in outputs))
        return Plan(tuple(inputs), call.outputs, (("main", (call,)),), Always("main"))

    def routine(self, name: str) -> tuple[Call, ...]:
        for n, calls in self.routines:
            if n == name:
                return calls
        raise PlanError(f"plan has no routine {name!r}; it has {[n for n, _ in self.routines]}")

    @property
    def graph_names(self) -> tuple[str, ...]:
        seen: dict[str, None] = {}
        for _, calls in self.routines:
            for c in calls:
                seen.setdefault(c.graph)
        return tuple(seen)

    def validate(self, graph_arity: Mapping[str, tuple[int, int]]) -> None:
        """Check references and graph arities.

        Args:
            graph_arity: graph name -> (number of inputs, number of outputs).
        Raises:
            PlanError: naming the routine, call and reference at fault.
        """
        state = {s.name for s in self.state}
        routine_names = [n for n, _ in self.routines]
        used = _schedule_routines(self.schedule)
        if isinstance(self.schedule, Bins) and self.schedule.input not in self.inputs:
            raise PlanError(f"bins schedule reads input {self.schedule.input!r}; the plan's inputs are "
                            f"{list(self.inputs)}")
        for r in used:
            if r not in routine_names:
                raise PlanError(f"schedule names routine {r!r}, which the plan does not define")
        for rname, calls in self.routines:
            known = ({f"in:{n}" for n in self.inputs} | {f"state:{s}" for s in state}
                     | {f"step:{n}" for n, _ in self.step_values})
            if isinstance(self.schedule, Rule) and rname != self.schedule.probe:
                known |= _produced(self.routine(self.schedule.probe))
            for i, c in enumerate(calls):
                if c.graph not in graph_arity:
                    raise PlanError(f"routine {rname!r} call {i} names unknown graph {c.graph!r}")
                n_in, n_out = graph_arity[c.graph]
                if len(c.inputs) != n_in or len(c.outputs) != n_out:
                    raise PlanError(
                        f"routine {rname!r} call {i} binds {len(c.inputs)} inputs / {len(c.outputs)} "
                        f"outputs but graph {c.graph!r} has {n_in} / {n_out}")
                for ref in c.inputs:
                    if ref not in known:
                        raise PlanError(f"routine {rname!r} call {i} ({c.graph}) reads {ref!r} before it is produced")
                for ref in c.outputs:
                    if ref.startswith("state:") and ref[6:] not in state:
                        raise PlanError(f"routine {rname!r} writes undeclared state {ref!r}")
                    known.add(ref)
            if rname in _final_routines(self.schedule):
                for ref in self.outputs:
                    if ref not in known:
                        raise PlanError(f"plan output {ref!r} is not produced by routine {rname!r}")

    def to_json(self) -> dict:
        sched = {f.name: (list(v) if isinstance(v, tuple) else v)
                 for f in dataclasses.fields(self.schedule) for v in [getattr(self.schedule, f.name)]}
        return {
            "version": PLAN_VERSION,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "routines": {n: [c.to_json() for c in calls] for n, calls in self.routines},
            "schedule": sched,
            "state": [{"name": s.name, "shape": None if s.shape is None else list(s.shape), "dtype": s.dtype}
                      for s in self.state],
            "step_values": {n: list(v) for n, v in self.step_values},
        }

    @staticmethod
    def from_json(d: Mapping) -> "Plan":
        try:
            if d.get("version") != PLAN_VERSION:
                raise PlanError(f"plan version {d.get('version')!r} is not supported (this pared reads {PLAN_VERSION})")
            sched = dict(d["schedule"])
            kind = sched.pop("kind")
            if kind not in _SCHEDULES:
                raise PlanError(f"unknown schedule kind {kind!r}; known: {sorted(_SCHEDULES)}")
            if kind in ("table", "bins"):
                sched["routines"] = tuple(sched["routines"])
            if kind == "bins":
                sched["edges"] = tuple(float(e) for e in sched["edges"])
            return Plan(
                inputs=tuple(d["inputs"]),
                outputs=tuple(d["outputs"]),
                routines=tuple((n, tuple(Call.from_json(c) for c in calls)) for n, calls in d["routines"].items()),
                schedule=_SCHEDULES[kind](**sched),
                state=tuple(StateBuffer(s["name"], None if s["shape"] is None else tuple(s["shape"]), s["dtype"])
                            for s in d.get("state", [])),
                step_values=tuple((n, tuple(float(x) for x in v)) for n, v in d.get("step_values", {}).items()),
            )
        except (KeyError, TypeError) as e:
            raise PlanError(f"malformed plan: {type(e).__name__}: {e}") from e


def _schedule_routines(s: Schedule) -> list[str]:
    if isinstance(s, Always):
        return [s.routine]
    if isinstance(s, Table):
        return list(dict.fromkeys([*s.routines, s.default]))
    if isinstance(s, Bins):
        return list(dict.fromkeys(s.routines))
    if isinstance(s, Latch):
        return [s.compute, s.then]
    return [s.probe, s.compute, s.reuse]


def _final_routines(s: Schedule) -> list[str]:
    if isinstance(s, Rule):
        return [s.compute, s.reuse]
    return _schedule_routines(s)


def _produced(calls: Sequence[Call]) -> set[str]:
    return {r for c in calls for r in c.outputs}


def rel_l1(a: Any, b: Any) -> float:
    """mean|a - b| / mean|b| on numpy arrays (or anything np.asarray takes)."""
    import numpy as np

    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    denom = float(np.mean(np.abs(b)))
    return float(np.mean(np.abs(a - b))) / denom if denom > 0 else math.inf


METRICS: dict[str, Callable[[Any, Any], float]] = {"rel_l1": rel_l1}


class PlanRunner:
    """Interprets a Plan for one request, over any array type.

    Args:
        plan: the Plan.
        run_graph: ``(graph_name, [arrays]) -> [arrays]``.
        to_numpy: converts an array for the decision metric (identity for numpy).
    """

    def __init__(self, plan: Plan, run_graph: Callable[[str, list], list], to_numpy: Callable[[Any], Any] = lambda a: a,
                 scalar: Callable[[float], Any] | None = None):
        self.plan = plan
        self._run_graph = run_graph
        self._to_numpy = to_numpy
        if scalar is None:
            import numpy as np
            scalar = lambda v: np.array([v], dtype=np.float32)   # noqa: E731
        self._scalar = scalar
        self.reset()

    def reset(self) -> None:
        """Start a new request: forget carried state and the call counter."""
        self.state: dict[str, Any] = {}
        self.call_index = 0
        self.trace: list[str] = []   # routine chosen per call, for reports and tests
        self._acc = 0.0
        self._consecutive = 0
        self._prev_signal = None
        self._latched = False

    def _run_routine(self, name: str, env: dict) -> None:
        for call in self.plan.routine(name):
            args = []
            for ref in call.inputs:
                if ref.startswith("state:"):
                    key = ref[6:]
                    if key not in self.state:
                        raise PlanError(f"call {self.call_index}: routine {name!r} reads state {key!r} "
                                        "before any call wrote it; the schedule must compute first")
                    args.append(self.state[key])
                else:
                    args.append(env[ref])
            outs = self._run_graph(call.graph, args)
            for ref, val in zip(call.outputs, outs):
                if ref.startswith("state:"):
                    self.state[ref[6:]] = val
                env[ref] = val

    def __call__(self, inputs: Sequence[Any]) -> list:
        if len(inputs) != len(self.plan.inputs):
            raise PlanError(f"expected {len(self.plan.inputs)} inputs {list(self.plan.inputs)}, got {len(inputs)}")
        env: dict[str, Any] = {f"in:{n}": v for n, v in zip(self.plan.inputs, inputs)}
        for n, _ in self.plan.step_values:
            env[f"step:{n}"] = self._scalar(self.plan.step_value(n, self.call_index))
        s = self.plan.schedule
        if isinstance(s, Always):
            chosen = s.routine
        elif isinstance(s, Table):
            chosen = s.routines[self.call_index] if self.call_index < len(s.routines) else s.default
        elif isinstance(s, Latch):
            chosen = s.then if self._latched else s.compute
        elif isinstance(s, Bins):
            import numpy as np
            value = np.asarray(self._to_numpy(env[f"in:{s.input}"])).reshape(-1)
            if value.size == 0:
                raise PlanError(f"call {self.call_index}: bins schedule input {s.input!r} is empty")
            chosen = s.choose(float(value[0]))
        else:
            self._run_routine(s.probe, env)
            signal = self._to_numpy(env[s.signal])
            chosen = s.compute
            if self._prev_signal is not None and self.call_index >= s.warmup:
                d = METRICS[s.metric](signal, self._prev_signal)
                self._acc = self._acc + d if s.accumulate else d
                cap_ok = s.max_consecutive == 0 or self._consecutive < s.max_consecutive
                if self._acc < s.threshold and cap_ok:
                    chosen = s.reuse
            if chosen == s.reuse:
                self._consecutive += 1
            else:
                self._consecutive = 0
                self._acc = 0.0
            self._prev_signal = signal
        self._run_routine(chosen, env)
        if isinstance(s, Latch) and not self._latched and self.call_index >= s.warmup:
            import numpy as np
            if float(np.asarray(self._to_numpy(env[s.signal])).reshape(-1)[0]) >= s.threshold:
                self._latched = True
        self.trace.append(chosen)
        self.call_index += 1
        return [env[r] if not r.startswith("state:") else self.state[r[6:]] for r in self.plan.outputs]
