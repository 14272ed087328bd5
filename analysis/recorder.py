"""The Recorder: drives a calibration run through any Program and taps values.

The calibration is a list of input tuples (consecutive calls of one request) or
a callable ``loop(model)`` that calls the model over one request (a sampler).
The Program runs with its own Plan (any number of graphs, any selects), and the
values of the tapped nodes are handed over keyed by (graph, node, call index);
the returned trace gives the case labels the plan chose at each call.

`replay` runs the calibration through a program as it is (a loop free-running: its
next inputs come from that program's outputs); `record_inputs` keeps the inputs one
program received and `replay_inputs` drives any program with them (teacher-forced:
every candidate sees the reference's history, each computing its own state from it).

Reads: nothing. Writes: nothing (a helper for analyses and passes).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping, Sequence

import numpy as np
import torch
import torch.fx as fx

from pared.ir import structure as _structure
from pared.ir.errors import OptionError, PassError
from pared.ir.plan import PlanRunner
from pared.ir.program import Program


@dataclass(frozen=True)
class Tap:
    """Where a tapped value came from."""
    graph: str
    node: str
    call: int      # call index within the request


#: the submodule through which a tapped graph hands values over
TAP = "_pared_tap"


class _TapSink(torch.nn.Module):
    """What a tapped graph calls after each watched node: hands (node name, tensor) to `on_value`."""

    def __init__(self, on_value: Callable[[str, torch.Tensor], None]):
        super().__init__()
        self.on_value = on_value

    def forward(self, name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            self.on_value(name, value)


def tapped(gm: fx.GraphModule, watch: Collection[str],
           on_value: Callable[[str, torch.Tensor], None]) -> fx.GraphModule:
    """A compiled copy of `gm` that calls `on_value(node name, tensor)` right after each node of
    `watch` computes a tensor, in graph order, as an fx.Interpreter overriding run_node would, but
    the graph's generated code runs the ops, without the interpreter's Python dispatch per node
    (on the 64-token VLA policy, 77 taps over 16 calls: 0.5-0.6 s against 0.9-1.0 s). The copy
    shares `gm`'s parameters and leaves `gm` as it was."""
    graph = copy.deepcopy(gm.graph)
    out = fx.GraphModule(gm, graph, class_name=type(gm).__name__)
    out.add_submodule(TAP, _TapSink(on_value))
    order = list(graph.nodes)
    inputs = [n for n in order if n.op == "placeholder"]
    cursor = inputs[-1] if inputs else None         # inputs' taps go after the last input, in order
    for n in [n for n in order if n.name in watch and n.op != "output"]:
        with graph.inserting_after(cursor if n.op == "placeholder" else n):
            tap = graph.call_module(TAP, (n.name, n))
        if n.op == "placeholder":
            cursor = tap
    out.recompile()
    return out


def drive(calibration: Any, fn: Callable[..., Any]) -> int:
    """Call `fn(*tensors)` as the model through the calibration run; returns the number of calls.

    Raises:
        PassError: when there is no calibration run.
    """
    if calibration is None:
        raise PassError("needs a calibration run: pass calibration= a list of consecutive step inputs, "
                        "or a loop callable that runs one request (e.g. a sampler) through the model")
    if callable(calibration):
        n = [0]

        def counted(*a):
            n[0] += 1
            return fn(*a)
        calibration(counted)
        return n[0]
    count = 0
    for item in calibration:
        fn(*(item if isinstance(item, (tuple, list)) else (item,)))
        count += 1
    return count


def record(program: Program, calibration: Any, taps: Mapping[str, Sequence[str]] | None = None,
           on_value: Callable[[Tap, torch.Tensor], None] | None = None) -> list[str]:
    """Run `program` through the calibration run, handing each tapped node's value
    to `on_value(tap, tensor)` whenever its graph runs.

    Args:
        taps: graph name -> node names to watch in it.
    Returns:
        The trace: the case labels chosen at each call.
    Raises:
        PassError: when a tapped graph or node does not exist.
    """
    taps = {g: set(ns) for g, ns in (taps or {}).items()}
    for g, ns in taps.items():
        if g not in program.graphs:
            raise PassError(f"recorder: no graph {g!r}; the program has {list(program.graphs)}")
        have = {n.name for n in program.graphs[g].module.graph.nodes}
        missing = sorted(ns - have)
        if missing:
            raise PassError(f"recorder: graph {g!r} has no node(s) {missing[:5]}")
    state = {"call": 0}

    def tap_of(graph: str) -> Callable[[str, torch.Tensor], None]:
        return lambda node, value: on_value(Tap(graph, node, state["call"]), value)
    modules = {g: tapped(program.graphs[g].module, ns, tap_of(g)) if on_value is not None and ns
               else program.graphs[g].module for g, ns in taps.items()}

    def run_graph(name: str, args: list) -> list:
        with torch.no_grad():
            return list(modules.get(name, program.graphs[name].module)(*args))

    runner = PlanRunner(program.plan, run_graph, to_numpy=lambda t: t.detach().float().cpu().numpy(),
                        scalar=lambda v: torch.tensor([v], dtype=torch.float32))

    def call(*args):
        flat = [a if isinstance(a, torch.Tensor) else torch.as_tensor(a) for a in args]
        state["call"] = runner.call_index
        outs = runner(flat)
        return _structure.unflatten(program.output_structure, outs)

    drive(calibration, call)
    return list(runner.trace)


def output_rows(res: Any) -> np.ndarray:
    """One call's float outputs as one float64 array [rows, features] (rows: the outputs'
    first dim when they share it, else one row)."""
    res = res if isinstance(res, (tuple, list)) else (res,)
    rows = [r.detach().to(torch.float64).reshape(r.shape[0] if r.dim() else 1, -1)
            for r in res if isinstance(r, torch.Tensor) and r.is_floating_point()]
    if len({r.shape[0] for r in rows}) == 1:
        return np.concatenate([r.numpy() for r in rows], axis=1)
    return np.concatenate([r.reshape(1, -1).numpy() for r in rows], axis=1)


def _stacked(outs: list[np.ndarray]) -> np.ndarray:
    """Calls' output_rows as one array: stacked by rows when they share a width, else one row."""
    width = {o.shape[1] for o in outs}
    return np.concatenate(outs) if len(width) == 1 else np.concatenate([o.reshape(1, -1) for o in outs], axis=1)


def run_output(calibration: Any, call: Callable[..., Any], outs: list[np.ndarray]) -> np.ndarray:
    """Drive `call` through the calibration run (it appends each call's output_rows to
    `outs`) and return the run's output: a loop's returned array, or every call's rows."""
    if callable(calibration):
        result = calibration(call)
        if isinstance(result, (np.ndarray, torch.Tensor)):
            r = np.asarray(result.detach() if isinstance(result, torch.Tensor) else result, dtype=np.float64)
            return r.reshape(r.shape[0] if r.ndim else 1, -1)
    else:
        drive(calibration, call)
    return _stacked(outs)


def replay(program: Program, calibration: Any) -> np.ndarray:
    """The calibration run's output through `program` (its Plan, every graph) as one float64
    array [rows, features]: a loop's returned array, or every call's float outputs stacked."""
    outs: list[np.ndarray] = []
    return run_output(calibration, _caller(program, lambda res: outs.append(output_rows(res))), outs)


def record_inputs(program: Program, calibration: Any) -> list[list[tuple[torch.Tensor, ...]]]:
    """The inputs of every call `program` receives over the calibration run, in order, one list
    per request: the history a teacher-forced comparison replays (`replay_inputs`).

    A loop calibration makes each call's inputs from the outputs it got before (a sampler, a
    free-running rollout), so the inputs are those this program's outputs led to. The run is one
    request, as in `replay` and `record`: one runner, never reset, its Plan's state (a KV cache)
    carried across every call; the result holds one list. Each input is a copy (a loop may
    reuse its buffers).

    Returns:
        [request][call] -> the call's flat input tensors.
    Raises:
        PassError: when there is no calibration run, or it makes no call.
    """
    return record_calls(program, calibration)[0]


def record_calls(program: Program, calibration: Any) -> tuple[list[list[tuple[torch.Tensor, ...]]], np.ndarray]:
    """`record_inputs`, and the outputs the program gave: what `replay_inputs(program, inputs)`
    returns, without running the calibration a second time (a goal search's reference).

    Returns:
        ([request][call] -> flat inputs, each call's float outputs stacked as replay_inputs gives them).
    Raises:
        PassError: when there is no calibration run, or it makes no call.
    """
    runner = program.runner()
    calls: list[tuple[torch.Tensor, ...]] = []
    outs: list[np.ndarray] = []

    def call(*args):
        flat = [a if isinstance(a, torch.Tensor) else torch.as_tensor(a) for a in args]
        calls.append(tuple(t.detach().clone() for t in flat))
        with torch.no_grad():
            res = runner(flat)
        outs.append(output_rows(res))
        return _structure.unflatten(program.output_structure, res)
    drive(calibration, call)
    if not calls:
        raise PassError("recorder: the calibration run made no call of the model; give it at least one")
    return [calls], _stacked(outs)


def run_free(program: Program, calibration: Any,
             on_outputs: Callable[[Sequence[torch.Tensor]], None] | None = None) -> Any:
    """The calibration run through `program`, free-running: every call answers with `program`'s own
    outputs (its state, e.g. a KV cache, carried from call to call), so a loop that feeds its
    outputs back follows `program`'s own trajectory. The state starts fresh; `on_outputs` sees
    each call's flat outputs.

    Returns:
        What the loop returns (a callable calibration, e.g. a rollout's frames), or each call's
        outputs in order (a list calibration).
    Raises:
        PassError: when there is no calibration run.
    """
    if calibration is None:
        raise PassError("needs a calibration run: pass calibration= a list of consecutive step inputs, "
                        "or a loop callable that runs one request (e.g. a sampler) through the model")
    call = _caller(program, on_outputs)
    if callable(calibration):
        return calibration(call)
    return [call(*(item if isinstance(item, (tuple, list)) else (item,))) for item in calibration]


def _caller(program: Program, on_outputs: Callable[[Sequence[torch.Tensor]], None] | None = None
            ) -> Callable[..., Any]:
    """`program` (a fresh runner: its state starts empty) as the model a calibration loop calls."""
    runner = program.runner()

    def call(*args):
        flat = [a if isinstance(a, torch.Tensor) else torch.as_tensor(a) for a in args]
        with torch.no_grad():
            res = runner(flat)
        if on_outputs is not None:
            on_outputs(res)
        return _structure.unflatten(program.output_structure, res)
    return call


def replay_inputs(program: Program, requests: Sequence[Sequence[Sequence[torch.Tensor]]]) -> np.ndarray:
    """Every recorded call through `program`, teacher-forced: each call takes the recorded inputs
    whatever `program` answered before (its own state, e.g. the KV cache its policy keeps, is
    computed from them). A request starts with the Plan's state reset, as it did when recorded.

    Args:
        requests: [request][call] -> flat inputs (`record_inputs`).
    Returns:
        Each call's float outputs (output_rows) stacked, float64 [rows, features]: for the
        program that was recorded, exactly the outputs it gave over the calibration run.
    Raises:
        PassError: when `requests` holds no call.
    """
    runner = program.runner()
    outs: list[np.ndarray] = []
    for request in requests:
        runner.reset()
        for args in request:
            with torch.no_grad():
                outs.append(output_rows(runner(list(args))))
    if not outs:
        raise PassError("recorder: replay_inputs got no recorded call; record them with record_inputs")
    return _stacked(outs)


def analysed_graphs(program: Program, wanted: Sequence[str] | None, by: str) -> list[str]:
    """The graphs an analysis looks at: `wanted` (checked), or every graph the Plan calls.

    Raises:
        OptionError: "pass 'BY' option 'graphs': no graph ..." naming the program's graphs.
    """
    if not wanted:
        return program.called_graphs() or list(program.graphs)
    missing = [g for g in wanted if g not in program.graphs]
    if missing:
        raise OptionError(f"pass '{by}' option 'graphs': no graph {missing[0]!r}; the program has "
                          f"{list(program.graphs)}")
    return list(dict.fromkeys(wanted))


class PerGraph:
    """Mixed into a record holding `graphs`, one entry per analysed graph, each with a
    `graph` name: the lookup every such record offers."""

    def graph(self, name: str | None = None):
        """The entry of graph `name` (default: the first)."""
        for g in self.graphs:
            if name is None or g.graph == name:
                return g
        raise KeyError(f"no graph {name!r} in the {type(self).__name__}; it has {[g.graph for g in self.graphs]}")
