"""The Plan: how a Program's graphs run, as a small control-flow IR. JSON, torch-free.

The Executor interprets the same Plan with numpy arrays that the torch side
interprets with tensors (one `PlanRunner` for both).

Nodes:
  ``Call(graph, inputs, outputs, device)``  run a graph; each input and output is
                                            bound to a reference
  ``Seq(nodes)``                            in order
  ``Select(selector, cases)``               pick one case per call; selectors are
                                            registered classes (ir/selectors/, one
                                            file each: table, rule, latch, bins)
  ``Loop(body, count | until, max_iters, steps)``  repeat the body: `count` times, or
                                            until the first element of `until` is nonzero;
                                            `steps`: each iteration is a step of the
                                            request (a sampler's denoising step), see below
  ``Transfer(ref, src, dst, out)``          a value crossing from device `src` to
                                            `dst`, bound as `out` there

References (the one place they are defined; every pass uses them this way):
  ``in:NAME``      a program input (one per user input, in order)
  ``state:NAME``   a buffer carried between calls of one request (cache features,
                   a previous signal); declared in `Plan.state` with a dtype, a
                   symbolic shape and a device; reset between requests
  ``step:NAME``    a per-step scalar from `Plan.step_values` (a float32 tensor of
                   shape [1], e.g. a forecast coefficient); past the table's end,
                   its last value
  ``link:NAME``    what the runtime measured of link NAME: [bandwidth bytes/s, count]
                   (selectors read it; unbound where no link is measured)

Steps. By default a step is one call of the program (a denoiser called once per
sampler step by the user's loop), so selectors choose, and `step:` references
read, by the call index. Inside a `Loop(..., steps=True)` (a sampler captured
whole, ir/denoise.py) a step is one iteration of that loop instead: selectors
in its body choose by the iteration index and `step:` references there read the
iteration's value, so a cache pass's step table means the same in both forms.
  anything else    an intermediate produced by a call earlier in the same call of
                   the program. Passes name theirs ``<pass>.<graph>.<output>``,
                   and their state ``<pass>.<graph>.<name>``, so two passes never
                   collide; the captured model's outputs are ``<graph>.<output>``.

Program passes transform the Plan they are given: `replace_calls(graph, fn)`
swaps every `Call` of one graph for a node built from it (a cache pass puts a
`Select` over the graph's variants there, bound to the same references), so
what earlier passes built stays around it.

Version 2. Version-1 plans (a flat routine table with one schedule, pared 0.1
artifacts) are migrated on load: each routine becomes a `Seq`, the schedule a
`Select` over them; the trace names stay the same.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping, Sequence, Union

from .errors import PlanError
from .selectors import SELECTORS, Choice, Selector, selector_from_json
from .selectors.bins import Bins
from .selectors.latch import Latch
from .selectors.rule import METRICS, Rule, rel_l1
from .selectors.table import Table

PLAN_VERSION = 2

__all__ = ["PLAN_VERSION", "PlanError", "Call", "Seq", "Select", "Loop", "Transfer", "Node", "StateBuffer",
           "Plan", "PlanRunner", "Selector", "SELECTORS", "Table", "Rule", "Latch", "Bins", "METRICS", "rel_l1"]


@dataclass(frozen=True)
class Call:
    graph: str
    inputs: tuple[str, ...]    # one reference per graph input, in the graph's order
    outputs: tuple[str, ...]   # one reference per graph output, in the graph's order
    device: str | None = None  # the device that runs it (None: the target's only one)


@dataclass(frozen=True)
class Seq:
    nodes: tuple["Node", ...]


@dataclass(frozen=True)
class Select:
    selector: Selector
    cases: tuple[tuple[str, "Node"], ...]   # label -> node, in order
    key: str | None = None   # selects with one key share the selector's per-request state (variants of one
                             # graph at other precisions keep one latch, one rule history); None: its own

    def case(self, label: str) -> "Node":
        for n, node in self.cases:
            if n == label:
                return node
        raise PlanError(f"{self.selector.kind} select has no case {label!r}; it has {[n for n, _ in self.cases]}")


@dataclass(frozen=True)
class Loop:
    body: "Node"
    count: int | None = None   # iterations; or
    until: str | None = None   # stop after an iteration that bound this reference to a nonzero first element
    max_iters: int = 0         # with `until`: the most iterations (0: no cap)
    steps: bool = False        # each iteration is a step: selects and step values inside see its index

    def __post_init__(self):
        if (self.count is None) == (self.until is None):
            raise PlanError("loop: give exactly one of count and until")
        if self.count is not None and self.count < 0:
            raise PlanError(f"loop: count must be >= 0, got {self.count}")
        if self.max_iters < 0:
            raise PlanError(f"loop: max_iters must be >= 0, got {self.max_iters}")


@dataclass(frozen=True)
class Transfer:
    ref: str   # the value on `src`
    src: str
    dst: str
    out: str   # the reference it is bound to on `dst`


Node = Union[Call, Seq, Select, Loop, Transfer]


@dataclass(frozen=True)
class StateBuffer:
    name: str
    shape: tuple[int | str | None, ...] | None = None  # symbolic dims by name; None: from the first value written
    dtype: str | None = None
    device: str | None = None


# -- walking -------------------------------------------------------------------
def iter_nodes(node: Node) -> Iterator[Node]:
    """Every node of a tree, parents before children."""
    yield node
    if isinstance(node, Seq):
        for n in node.nodes:
            yield from iter_nodes(n)
    elif isinstance(node, Select):
        for _, n in node.cases:
            yield from iter_nodes(n)
    elif isinstance(node, Loop):
        yield from iter_nodes(node.body)


def map_calls(node: Node, fn: Callable[[Call], Node]) -> Node:
    """The tree with each Call replaced by fn(call) (which may return the call)."""
    return map_nodes(node, lambda n: fn(n) if isinstance(n, Call) else n)


def map_nodes(node: Node, fn: Callable[[Node], Node]) -> Node:
    """The tree with each node replaced by fn(node), parents first: where fn returns another
    node, that node stands as it is (its children are not visited); where it returns the node,
    its children are mapped."""
    new = fn(node)
    if new is not node:
        return new
    if isinstance(node, Seq):
        return Seq(tuple(map_nodes(n, fn) for n in node.nodes))
    if isinstance(node, Select):
        return Select(node.selector, tuple((lab, map_nodes(n, fn)) for lab, n in node.cases), node.key)
    if isinstance(node, Loop):
        return dataclasses.replace(node, body=map_nodes(node.body, fn))
    return node


def _produced(node: Node) -> set[str]:
    return {r for n in iter_nodes(node) if isinstance(n, Call) for r in n.outputs} | \
           {n.out for n in iter_nodes(node) if isinstance(n, Transfer)}


# -- the plan --------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]   # references returned, in the flat output order
    body: Node
    state: tuple[StateBuffer, ...] = ()
    step_values: tuple[tuple[str, tuple[float, ...]], ...] = ()   # name -> value per call index

    @staticmethod
    def single(graph: str, inputs: Sequence[str], outputs: Sequence[str]) -> "Plan":
        """The trivial plan: one graph called once per call."""
        call = Call(graph, tuple(f"in:{n}" for n in inputs), tuple(f"{graph}.{o}" for o in outputs))
        return Plan(tuple(inputs), call.outputs, call)

    # -- views
    @property
    def output_names(self) -> tuple[str, ...]:
        """The model's output names: each output reference without its prefix (``in:`` / ``state:``,
        or the captured graph's name: `Plan.single` binds output o of graph g to ``g.o``)."""
        return tuple(r.split(":", 1)[1] if ":" in r else r.split(".", 1)[-1] for r in self.outputs)

    def calls(self) -> list[Call]:
        return [n for n in iter_nodes(self.body) if isinstance(n, Call)]

    @property
    def graph_names(self) -> tuple[str, ...]:
        """The graphs the plan calls, in order of first appearance."""
        return tuple(dict.fromkeys(c.graph for c in self.calls()))

    def step_loops(self) -> list[Loop]:
        """The loops whose iterations are steps (`Loop(steps=True)`), outermost first."""
        return [n for n in iter_nodes(self.body) if isinstance(n, Loop) and n.steps]

    def stepped_graphs(self) -> dict[str, int]:
        """Graph -> the iteration count of the steps loop that calls it (`until` loops: their
        `max_iters`), for every graph called inside one; empty when the plan has no steps loop."""
        out: dict[str, int] = {}
        for loop in self.step_loops():
            n = loop.count if loop.count is not None else loop.max_iters
            for c in iter_nodes(loop.body):
                if isinstance(c, Call):
                    out[c.graph] = n
        return out

    def selects(self) -> list[Select]:
        return [n for n in iter_nodes(self.body) if isinstance(n, Select)]

    def step_value(self, name: str, call_index: int) -> float:
        for n, vals in self.step_values:
            if n == name:
                return float(vals[min(call_index, len(vals) - 1)]) if vals else 0.0
        raise PlanError(f"plan has no step value {name!r}")

    # -- transforming
    def replace_calls(self, graph: str, fn: Callable[[Call], Node], *, state: Sequence[StateBuffer] = (),
                      step_values: Sequence[tuple[str, Sequence[float]]] = ()) -> "Plan":
        """A new plan with every Call of `graph` replaced by fn(call), plus the
        state buffers and step values the replacement reads.

        Raises:
            PlanError: when the plan never calls `graph`, or a state buffer or step
                value is declared twice with different contents.
        """
        if graph not in self.graph_names:
            raise PlanError(f"plan does not call graph {graph!r}; it calls {list(self.graph_names)}")
        return self.with_declarations(state, step_values, body=map_calls(
            self.body, lambda c: fn(c) if c.graph == graph else c))

    def with_declarations(self, state: Sequence[StateBuffer] = (),
                          step_values: Sequence[tuple[str, Sequence[float]]] = (), body: Node | None = None) -> "Plan":
        """A new plan declaring more state buffers and step values (an identical
        redeclaration is allowed: variants of one graph share their state)."""
        have_state = {s.name: s for s in self.state}
        for s in state:
            if s.name in have_state and have_state[s.name] != s:
                raise PlanError(f"state {s.name!r} is declared twice: {have_state[s.name]} and {s}")
            have_state.setdefault(s.name, s)
        have_steps = dict(self.step_values)
        for n, vals in step_values:
            vals = tuple(float(v) for v in vals)
            if n in have_steps and have_steps[n] != vals:
                raise PlanError(f"step value {n!r} is declared twice with different values")
            have_steps.setdefault(n, vals)
        return Plan(self.inputs, self.outputs, self.body if body is None else body, tuple(have_state.values()),
                    tuple(have_steps.items()))

    # -- checking
    def validate(self, graph_arity: Mapping[str, tuple[int, int]]) -> None:
        """Check references, selectors and graph arities.

        Args:
            graph_arity: graph name -> (number of inputs, number of outputs).
        Raises:
            PlanError: naming the node, call and reference at fault.
        """
        state = {s.name for s in self.state}
        steps = {n for n, _ in self.step_values}
        keyed: dict[str, Selector] = {}
        for sel in self.selects():
            if sel.key is not None and keyed.setdefault(sel.key, sel.selector) != sel.selector:
                raise PlanError(f"selects keyed {sel.key!r} share state but differ: {keyed[sel.key]} vs {sel.selector}")
        known = {f"in:{n}" for n in self.inputs} | {f"state:{s}" for s in state} | {f"step:{n}" for n in steps}
        known = self._check(self.body, known, graph_arity, state, "plan")
        for ref in self.outputs:
            if ref not in known:
                raise PlanError(f"plan output {ref!r} is not produced on every path through the plan")

    def _check(self, node: Node, known: set[str], arity: Mapping[str, tuple[int, int]], state: set[str],
               where: str) -> set[str]:
        if isinstance(node, Call):
            if node.graph not in arity:
                raise PlanError(f"{where}: call names unknown graph {node.graph!r}")
            n_in, n_out = arity[node.graph]
            if len(node.inputs) != n_in or len(node.outputs) != n_out:
                raise PlanError(f"{where}: call binds {len(node.inputs)} inputs / {len(node.outputs)} outputs but "
                                f"graph {node.graph!r} has {n_in} / {n_out}")
            for ref in node.inputs:
                if ref not in known:
                    raise PlanError(f"{where}: call of {node.graph!r} reads {ref!r} before it is produced")
            for ref in node.outputs:
                if ref.startswith("state:") and ref[6:] not in state:
                    raise PlanError(f"{where}: call of {node.graph!r} writes undeclared state {ref!r}")
                if ref.startswith(("in:", "step:")):
                    raise PlanError(f"{where}: call of {node.graph!r} writes {ref!r}, which is read-only")
            return known | set(node.outputs)
        if isinstance(node, Seq):
            for i, n in enumerate(node.nodes):
                known = self._check(n, known, arity, state, f"{where}/{i}")
            return known
        if isinstance(node, Select):
            sel, labels = node.selector, [lab for lab, _ in node.cases]
            if len(set(labels)) != len(labels):
                raise PlanError(f"{where}: {sel.kind} select has duplicate case labels {labels}")
            for lab in sel.labels():
                if lab not in labels:
                    raise PlanError(f"{where}: {sel.kind} selector chooses case {lab!r}, which the select does not "
                                    f"define (cases: {labels})")
            for ref in sel.reads():
                if ref not in known:
                    raise PlanError(f"{where}: {sel.kind} selector reads {ref!r} before it is produced")
            after = []
            for lab, n in node.cases:
                after.append(self._check(n, known, arity, state, f"{where}/{sel.kind}:{lab}"))
            for lab, ref in sel.reads_after():
                if ref not in after[labels.index(lab)]:
                    raise PlanError(f"{where}: {sel.kind} selector reads {ref!r} after case {lab!r}, which does "
                                    "not produce it")
            return set.intersection(*after) if after else known
        if isinstance(node, Loop):
            inner = self._check(node.body, known, arity, state, f"{where}/loop")
            if node.until is not None and node.until not in inner:
                raise PlanError(f"{where}: loop stops on {node.until!r}, which its body does not produce")
            return inner if (node.count or node.until) else known
        if isinstance(node, Transfer):
            if node.ref not in known:
                raise PlanError(f"{where}: transfer of {node.ref!r} before it is produced")
            return known | {node.out}
        raise PlanError(f"{where}: unknown plan node {type(node).__name__}")

    # -- JSON
    def to_json(self) -> dict:
        return {
            "version": PLAN_VERSION,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "body": _node_json(self.body),
            "state": [{"name": s.name, "shape": None if s.shape is None else list(s.shape), "dtype": s.dtype,
                       "device": s.device} for s in self.state],
            "step_values": {n: list(v) for n, v in self.step_values},
        }

    @staticmethod
    def from_json(d: Mapping) -> "Plan":
        """Read a plan (version 2, or migrate version 1).

        Raises:
            PlanError: an unknown version, node or selector, or a malformed field.
        """
        try:
            version = d.get("version")
            if version == 1:
                d = _migrate_v1(d)
            elif version != PLAN_VERSION:
                raise PlanError(f"plan version {version!r} is not supported (this pared reads versions 1 and "
                                f"{PLAN_VERSION}); rebuild the artifact with this pared")
            return Plan(
                inputs=tuple(d["inputs"]),
                outputs=tuple(d["outputs"]),
                body=_node_from_json(d["body"]),
                state=tuple(StateBuffer(s["name"], None if s.get("shape") is None else tuple(s["shape"]),
                                        s.get("dtype"), s.get("device")) for s in d.get("state", [])),
                step_values=tuple((n, tuple(float(x) for x in v)) for n, v in d.get("step_values", {}).items()),
            )
        except (KeyError, TypeError, AttributeError) as e:
            raise PlanError(f"malformed plan: {type(e).__name__}: {e}") from e


def _node_json(node: Node) -> dict:
    if isinstance(node, Call):
        return {"op": "call", "graph": node.graph, "inputs": list(node.inputs), "outputs": list(node.outputs),
                "device": node.device}
    if isinstance(node, Seq):
        return {"op": "seq", "nodes": [_node_json(n) for n in node.nodes]}
    if isinstance(node, Select):
        return {"op": "select", "selector": node.selector.to_json(),
                "cases": [[lab, _node_json(n)] for lab, n in node.cases], "key": node.key}
    if isinstance(node, Loop):
        out = {"op": "loop", "body": _node_json(node.body), "count": node.count, "until": node.until,
               "max_iters": node.max_iters}
        if node.steps:
            out["steps"] = True
        return out
    if isinstance(node, Transfer):
        return {"op": "transfer", "ref": node.ref, "src": node.src, "dst": node.dst, "out": node.out}
    raise PlanError(f"unknown plan node {type(node).__name__}")


def _node_from_json(d: Mapping) -> Node:
    op = d["op"]
    if op == "call":
        return Call(d["graph"], tuple(d["inputs"]), tuple(d["outputs"]), d.get("device"))
    if op == "seq":
        return Seq(tuple(_node_from_json(n) for n in d["nodes"]))
    if op == "select":
        return Select(selector_from_json(d["selector"]), tuple((lab, _node_from_json(n)) for lab, n in d["cases"]),
                      d.get("key"))
    if op == "loop":
        return Loop(_node_from_json(d["body"]), d.get("count"), d.get("until"), int(d.get("max_iters", 0)),
                    bool(d.get("steps", False)))
    if op == "transfer":
        return Transfer(d["ref"], d["src"], d["dst"], d["out"])
    raise PlanError(f"unknown plan node op {op!r}; known: call, seq, select, loop, transfer")


def _migrate_v1(d: Mapping) -> dict:
    """A version-1 plan (routines + one schedule) as version 2 JSON."""
    def seq(name: str) -> dict:
        calls = [{"op": "call", "graph": c["graph"], "inputs": c["inputs"], "outputs": c["outputs"]}
                 for c in d["routines"][name]]
        return calls[0] if len(calls) == 1 else {"op": "seq", "nodes": calls}

    s = dict(d["schedule"])
    kind = s.pop("kind")
    if kind == "always":
        body = seq(s["routine"])
    elif kind == "table":
        labels = list(dict.fromkeys([*s["routines"], s["default"]]))
        body = {"op": "select", "selector": {"kind": "table", "cases": s["routines"], "default": s["default"]},
                "cases": [[r, seq(r)] for r in labels]}
    elif kind == "bins":
        body = {"op": "select", "selector": {"kind": "bins", "input": f"in:{s['input']}", "edges": s["edges"],
                                             "cases": s["routines"]},
                "cases": [[r, seq(r)] for r in dict.fromkeys(s["routines"])]}
    elif kind == "latch":
        body = {"op": "select", "selector": {"kind": "latch", **s},
                "cases": [[s["compute"], seq(s["compute"])], [s["then"], seq(s["then"])]]}
    elif kind == "rule":
        probe = seq(s.pop("probe"))
        body = {"op": "seq", "nodes": [probe, {
            "op": "select", "selector": {"kind": "rule", **s},
            "cases": [[s["compute"], seq(s["compute"])], [s["reuse"], seq(s["reuse"])]]}]}
    else:
        raise PlanError(f"version-1 plan: unknown schedule kind {kind!r}")
    return {"version": PLAN_VERSION, "inputs": d["inputs"], "outputs": d["outputs"], "body": body,
            "state": d.get("state", []), "step_values": d.get("step_values", {})}


# -- running -----------------------------------------------------------------------
class PlanRunner:
    """Interprets a Plan for one request, over any array type.

    Args:
        plan: the Plan.
        run_graph: ``(graph_name, [arrays]) -> [arrays]``.
        to_numpy: converts an array for selectors (identity for numpy).
        scalar: makes the [1]-shaped float32 array of a step value.
        transfer: ``(value, src, dst) -> value`` for Transfer nodes (default: the value itself).
        signals: ``() -> {ref: array}``, read at the start of each call: what the runtime measures
            and selectors read, bound as ``link:NAME`` references (a link's bandwidth); default none.
        transfer_many: ``([values], src, dst) -> [values]``: consecutive Transfers of a Seq between
            the same two devices go as one message (one round trip over a link); default: each
            through `transfer`.
        pin: ``{select key: case label}``: those selects take that case every call instead of
            asking their selector (a benchmark's fixed arm, an operator forcing local runs).

    Attributes:
        trace: per call of the request, the case labels chosen by the selects it
            passed, joined by "/" (for a plan without selects: its graphs, joined by "+").
        graph_trace: per call, the graphs run, in order.
        device: the device of the Call being run (None: the target's only one), for `run_graph`.
    """

    def __init__(self, plan: Plan, run_graph: Callable[[str, list], list], to_numpy: Callable[[Any], Any] = lambda a: a,
                 scalar: Callable[[float], Any] | None = None,
                 transfer: Callable[[Any, str, str], Any] | None = None,
                 signals: Callable[[], Mapping[str, Any]] | None = None,
                 transfer_many: Callable[[list, str, str], list] | None = None,
                 pin: Mapping[str, str] | None = None):
        self.plan = plan
        self._run_graph = run_graph
        self._to_numpy = to_numpy
        if scalar is None:
            import numpy as np
            scalar = lambda v: np.array([v], dtype=np.float32)   # noqa: E731
        self._scalar = scalar
        self._transfer = transfer or (lambda v, src, dst: v)
        self._signals = signals
        self._transfer_many = transfer_many
        self.pin = dict(pin or {})
        keys = {n.key: n for n in iter_nodes(plan.body) if isinstance(n, Select) and n.key is not None}
        for k, label in self.pin.items():
            if k not in keys:
                raise PlanError(f"pin: the plan has no select with key {k!r}; its keys are {sorted(keys)}")
            keys[k].case(label)            # names the cases when the label is not one
        self.device: str | None = None
        self.reset()

    def reset(self) -> None:
        """Start a new request: forget carried state, selector state and the call counter."""
        self.state: dict[str, Any] = {}
        self.call_index = 0
        self._steps: list[int] = []      # iteration index of each enclosing steps loop
        self.trace: list[str] = []
        self.graph_trace: list[tuple[str, ...]] = []
        self._selectors: dict[tuple, Any] = {}

    def _read(self, ref: str, env: dict) -> Any:
        if ref.startswith("state:"):
            key = ref[6:]
            if key not in self.state:
                raise PlanError(f"call {self.call_index}: reads state {key!r} before any call wrote it; "
                                "the plan must compute it first")
            return self.state[key]
        return env[ref]

    def _run(self, node: Node, env: dict, path: tuple, labels: list, graphs: list) -> None:
        if isinstance(node, Call):
            self.device = node.device
            outs = self._run_graph(node.graph, [self._read(r, env) for r in node.inputs])
            graphs.append(node.graph)
            for ref, val in zip(node.outputs, outs):
                if ref.startswith("state:"):
                    self.state[ref[6:]] = val
                env[ref] = val
        elif isinstance(node, Seq):
            nodes, i = node.nodes, 0
            while i < len(nodes):
                n, j = nodes[i], i + 1
                if isinstance(n, Transfer) and self._transfer_many is not None:
                    while j < len(nodes) and isinstance(nodes[j], Transfer) and \
                            (nodes[j].src, nodes[j].dst) == (n.src, n.dst):
                        j += 1
                if j - i > 1:                   # one message for the run of transfers
                    group = nodes[i:j]
                    vals = self._transfer_many([self._read(t.ref, env) for t in group], n.src, n.dst)
                    for t, val in zip(group, vals):
                        self._bind_transfer(t, val, env)
                else:
                    self._run(n, env, path + (i,), labels, graphs)
                i = j
        elif isinstance(node, Select):
            sel = node.selector
            choice = Choice(self.step_index, lambda ref: self._to_numpy(self._read(ref, env)), self.call_index)
            key = path if node.key is None else node.key
            st = self._selectors[key] if key in self._selectors else sel.new_state()
            if node.key in self.pin:
                label = self.pin[node.key]
            else:
                label, st = sel.choose(st, choice)
            labels.append(label)
            self._run(node.case(label), env, path + (label,), labels, graphs)
            self._selectors[key] = sel.observe(st, label, choice)
        elif isinstance(node, Loop):
            i = 0
            while True:
                if node.count is not None and i >= node.count:
                    break
                if node.until is not None and node.max_iters and i >= node.max_iters:
                    break
                if node.steps:
                    self._steps.append(i)
                    self._bind_steps(env)
                try:
                    self._run(node.body, env, path + ("loop",), labels, graphs)
                finally:
                    if node.steps:
                        self._steps.pop()
                        self._bind_steps(env)
                i += 1
                if node.until is not None:
                    import numpy as np
                    v = np.asarray(self._to_numpy(self._read(node.until, env))).reshape(-1)
                    if v.size and v[0]:
                        break
        elif isinstance(node, Transfer):
            self._bind_transfer(node, self._transfer(self._read(node.ref, env), node.src, node.dst), env)
        else:
            raise PlanError(f"unknown plan node {type(node).__name__}")

    def _bind_transfer(self, node: Transfer, val: Any, env: dict) -> None:
        if node.out.startswith("state:"):
            self.state[node.out[6:]] = val
        env[node.out] = val

    @property
    def step_index(self) -> int:
        """The current step: the iteration of the innermost steps loop, else the call index."""
        return self._steps[-1] if self._steps else self.call_index

    def _bind_steps(self, env: dict) -> None:
        for n, _ in self.plan.step_values:
            env[f"step:{n}"] = self._scalar(self.plan.step_value(n, self.step_index))

    def __call__(self, inputs: Sequence[Any]) -> list:
        if len(inputs) != len(self.plan.inputs):
            raise PlanError(f"expected {len(self.plan.inputs)} inputs {list(self.plan.inputs)}, got {len(inputs)}")
        env: dict[str, Any] = {f"in:{n}": v for n, v in zip(self.plan.inputs, inputs)}
        if self._signals is not None:
            env.update({k: v for k, v in self._signals().items() if k.startswith("link:")})
        self._steps = []
        self._bind_steps(env)
        labels: list[str] = []
        graphs: list[str] = []
        self._run(self.plan.body, env, (), labels, graphs)
        self.trace.append("/".join(labels) if labels else "+".join(graphs))
        self.graph_trace.append(tuple(graphs))
        self.call_index += 1
        return [self._read(r, env) for r in self.plan.outputs]
