"""Graph surgery shared by the cache passes: block spans, variant graphs, the CachePlan.

A *span* is a contiguous range of blocks [first, last], in one stack or running
across stacks in order. Its input is the primary input of the first block and its
output the primary output of the last (see analysis.redundancy.primary_io); its
residual is output - input. A block with several streams (Flux's and SD3's
dual-stream blocks carry the image and the text tokens) gives the span one more
(input, output) pair per stream, `Span.streams`, each cached the same way under
its own key (`span_keys`); otherwise a reuse would still compute the blocks for
the stream nobody cached.

An *output span* (`make_output_span`, DeepCache's feature reuse) caches the values
themselves: every value its blocks hand on, with no input (`""`); a reuse reads
them as they were. It needs no residual path, so it may run from a U-Net's down
blocks through its mid block into its up blocks, whose shapes change on the way.

    emit_residuals(graph, spans)   the graph, plus one output per span stream: its residual
    reuse_spans(graph, spans)      the graph with each span stream replaced by
                                   `input + cached residual` (a new input per stream);
                                   nodes only the span used are removed
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from pared.analysis import cost
from pared.analysis.metrics import psnr_db
from pared.analysis.redundancy import primary_io, shape_of
from pared.analysis.search import Trials, as_trials, bisect_log, pareto_front, pareto_search
from pared.ir import meta
from pared.ir.errors import OptionError, PassError
from pared.ir.goal import Goal
from pared.ir.plan import Call, Select, StateBuffer, Table
from pared.ir.program import Graph, Program
from pared.ir.rewrite import eliminate_dead_code
from pared.ir.regions import Region
from pared.ir.transform import Record


@dataclass(frozen=True)
class Span:
    name: str                 # state name, e.g. "delta_rear"
    blocks: tuple[str, ...]   # region paths, in order
    input: str                # node names in the source graph ("": the output is cached as it is)
    output: str
    streams: tuple[tuple[str, str], ...] = ()   # further (input, output) pairs: the blocks' other streams

    def pairs(self) -> list[tuple[str, str, str]]:
        """(key, input, output) of every stream, the primary first; the key names its
        state and graph input (`cache.<key>`)."""
        return [(self.name, self.input, self.output)] + [
            (f"{self.name}_s{k}", i, o) for k, (i, o) in enumerate(self.streams, 1)]


def span_keys(spans: Sequence[Span]) -> list[str]:
    """The keys of every stream of `spans`, in order (see Span.pairs)."""
    return [k for s in spans for k, _, _ in s.pairs()]


@dataclass(frozen=True)
class CachePlan(Record):
    """What a cache pass decided: which block spans are cached, and the variant per call."""
    method: str
    spans: tuple[Span, ...]
    variants: tuple[tuple[str, tuple[str, ...]], ...]   # variant graph -> spans it reuses
    schedule: tuple[str, ...]                           # variant per call index (static methods)
    default: str                                        # past the end of the schedule
    flops: tuple[tuple[str, int], ...] = ()            # variant -> estimated FLOPs per call
    calibration: tuple[float, ...] = ()                # per-step figures the decision used (MagCache ratios)
    threshold: float | None = None                     # the threshold used (searched when a goal was given)
    search: tuple[tuple[float, float, float], ...] = ()  # (threshold, psnr_db, FLOPs speedup) measured
    pareto: tuple[tuple[float, float, float], ...] = ()  # a two-objective goal: the non-dominated ones of them
    graphs: tuple[str, ...] = ()                       # the graphs it cached (their variants are `graph.variant`)


def refreshes(step: int, interval: int, warmup: int) -> bool:
    """Whether a static schedule computes in full at `step`: the first `warmup`
    steps, then every `interval` steps after the last of them (FORA: 0, N, 2N...)."""
    return step < warmup or (step - warmup + 1) % interval == 0


#: passes that cache block spans, each with its own schedule over the calls of a graph
BLOCK_CACHES = ("interval_cache", "delta_cache", "magnitude_cache", "taylor_cache", "residual_cache", "expert_cache",
                "action_cache")


def graphs_to_cache(program: Program, pass_name: str, why: Callable[[str, str], str] | None = None) -> list[str]:
    """The graphs a cache pass rewrites: every graph the Plan calls, except those
    this pass already made (so running it again finds nothing more); for a captured
    `Denoiser` (a DenoiseLoop record), only its head.

    Args:
        why: (graph, the block cache that made it) -> why this pass cannot follow it;
            default: two block caches would schedule the same calls.

    Raises:
        PassError: when another block-cache pass made a graph: its variants are
            chosen by that pass's schedule, and a second block cache would decide
            the same calls by a second schedule.
    """
    out = []
    for name in program.called_graphs():
        g = program.graphs[name]
        if g.made_by(pass_name):
            continue
        other = next((p for p, _, _ in g.lineage if p in BLOCK_CACHES), None)
        if other is not None:
            raise PassError(f"pass '{pass_name}': graph {name!r} is a variant {other} made" + (
                "; " + why(name, other) if why else " for its own schedule; a second block cache would choose the "
                f"same calls by a second schedule. Use one of {other} and {pass_name} per pipeline"))
        out.append(name)
    loop = program.records.get("DenoiseLoop")
    if loop is not None:
        # a sampler captured whole (ir/denoise.py): its steps are the head's calls in the steps loop;
        # the encoder runs once per request and the update has no blocks
        out = [n for n in out if program.origin(n).split(".")[0] == loop.head]
    return out


def state_name(program: Program, pass_name: str, graph: str, name: str) -> str:
    """A state buffer's name, namespaced by the pass and the graph's origin: numeric
    variants of one graph (timestep buckets) share what they carry across calls."""
    return f"{pass_name}.{program.origin(graph)}.{name}"


def cache_record(program: Program, rec: "CachePlan") -> dict:
    """`program.records` with a cache pass's decision added (several graphs: one
    record, naming them)."""
    prev = program.records.get("CachePlan")
    if prev is not None and prev.method == rec.method:
        rec = dataclasses.replace(prev, graphs=prev.graphs + rec.graphs, flops=prev.flops + rec.flops)
    return {**program.records, "CachePlan": rec}


def make_span(gm: fx.GraphModule, name: str, blocks: Sequence[Region], pass_name: str, *,
              streams: bool = True) -> Span:
    """A span over consecutive blocks, checked to have a residual path. With `streams`,
    every other tensor the last block hands on (read after the span) is paired with the
    first block's input of its shape that only the first block reads: the span's further
    streams (`side_streams`)."""
    if not blocks:
        raise PassError(f"pass '{pass_name}': span {name!r} has no blocks")
    first, last = primary_io(gm, blocks[0]), primary_io(gm, blocks[-1])
    if first is None or last is None:
        bad = blocks[0] if first is None else blocks[-1]
        nodes = {n.name: n for n in gm.graph.nodes}
        outs = [nodes[o] for o in bad.outputs if shape_of(nodes[o]) is not None]
        big = max(outs, key=lambda n: math.prod(s if isinstance(s, int) else 1 for s in shape_of(n)), default=None)
        same = [o.name for o in outs if big is not None and shape_of(o) == shape_of(big)]
        if len(same) > 1:
            raise PassError(f"pass '{pass_name}': region {bad.path!r} gives {same} of one shape {list(shape_of(big))}: "
                            "two streams of one size (image and text tokens of equal count?) or one block run twice, "
                            "so which output continues which input is ambiguous; cache blocks whose streams differ "
                            "in shape, or use reuse: output")
        raise PassError(f"pass '{pass_name}': region {bad.path!r} has no primary input/output of one shape "
                        "(a block that maps hidden states to hidden states); cache a different block range")
    shapes = [shape_of(n) for n in (first[0], last[1])]
    if shapes[0] != shapes[1]:
        raise PassError(f"pass '{pass_name}': span {name!r} from {blocks[0].path!r} to {blocks[-1].path!r} takes "
                        f"{list(shapes[0] or ())} and gives {list(shapes[1] or ())}: it has no residual to reuse "
                        "(the blocks span stacks that change the hidden states' shape); cache one stack's blocks")
    inside = {n for b in blocks for n in b.nodes}
    if first[0].name in inside:
        raise PassError(f"pass '{pass_name}': span {name!r} input {first[0].name} lies inside the span")
    extra = side_streams(gm, blocks, first, last, f"pass '{pass_name}': span {name!r}") if streams else ()
    return Span(name, tuple(b.path for b in blocks), first[0].name, last[1].name, extra)


def make_output_span(gm: fx.GraphModule, name: str, blocks: Sequence[Region], pass_name: str) -> Span:
    """A span whose cached values are the tensors its blocks hand on (read by a node after
    the span), as they are: DeepCache's feature reuse. The first is the span's output, the
    others its streams; every input is "" (no residual)."""
    if not blocks:
        raise PassError(f"pass '{pass_name}': span {name!r} has no blocks")
    nodes = {n.name: n for n in gm.graph.nodes}
    inside = {n for b in blocks for n in b.nodes}
    order = {n: i for i, n in enumerate(nodes)}
    outs = sorted({o for b in blocks for o in b.outputs if shape_of(nodes[o]) is not None
                   and any(u.name not in inside for u in nodes[o].users)}, key=order.get)
    if not outs:
        raise PassError(f"pass '{pass_name}': span {name!r} from {blocks[0].path!r} to {blocks[-1].path!r} hands "
                        "no tensor on: nothing after it reads its blocks")
    return Span(name, tuple(b.path for b in blocks), "", outs[0], tuple(("", o) for o in outs[1:]))


REUSE = ("residual", "output")


def check_reuse(pass_name: str, value: str) -> None:
    """Option `reuse`: "residual" (the span's output - input, added to its new input) or
    "output" (DeepCache: the values the span hands on, as they were)."""
    if value not in REUSE:
        raise OptionError(f"pass '{pass_name}' option 'reuse': must be one of {list(REUSE)}, got {value!r}")


def span_of(gm: fx.GraphModule, name: str, blocks: Sequence[Region], pass_name: str, reuse: str) -> Span:
    """make_span or make_output_span, as option `reuse` says."""
    return (make_output_span if reuse == "output" else make_span)(gm, name, blocks, pass_name)


def side_streams(gm: fx.GraphModule, blocks: Sequence[Region], first: tuple[fx.Node, fx.Node],
                 last: tuple[fx.Node, fx.Node], what: str) -> tuple[tuple[str, str], ...]:
    """The (input, output) pairs of a span's streams besides the primary one: each tensor
    the last block gives that is read after the span, with the one input of its shape
    that the first block reads and no later block of the span does (a side input such as
    the timestep embedding or rotary tables reaches every block). An output with no
    such input stays computed by the reuse variants (correct, fewer FLOPs saved).

    Raises:
        PassError: when two inputs could be an output's stream (same shape, both first-block only).
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    inside = {n for b in blocks for n in b.nodes}
    later = {n for b in blocks[1:] for n in b.nodes}
    outs = [nodes[o] for o in blocks[-1].outputs if o != last[1].name and shape_of(nodes[o]) is not None
            and any(u.name not in inside for u in nodes[o].users)]
    ins = [nodes[i] for i in blocks[0].inputs if i != first[0].name and shape_of(nodes[i]) is not None
           and not any(u.name in later for u in nodes[i].users)]
    pairs = []
    for o in outs:
        cand = [i for i in ins if shape_of(i) == shape_of(o)]
        if len(cand) > 1:
            raise PassError(f"{what}: the last block's output {o.name} {list(shape_of(o))} could continue any of the "
                            f"first block's inputs {[i.name for i in cand]} (same shape): its stream is ambiguous; "
                            "cache a block range of one stream, or name blocks whose streams differ in shape")
        if cand:
            pairs.append((cand[0].name, o.name))
            ins.remove(cand[0])
    return tuple(pairs)


def _nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def _tag(node: fx.Node, by: str, like: fx.Node) -> None:
    node.meta[meta.CREATED_BY] = by
    if "val" in like.meta:
        node.meta["val"] = like.meta["val"]


def emit_residuals(graph: Graph, spans: Sequence[Span], by: str) -> Graph:
    """`graph` with one extra output per span stream (`span_keys`): its residual (output - input)."""
    gm = graph.copy_module()
    nodes = _nodes(gm)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    extra = []
    for _, i_name, o_name in (p for s in spans for p in s.pairs()):
        o = nodes[o_name]
        if not i_name:                      # an output span: the value itself
            extra.append(o)
            continue
        with gm.graph.inserting_before(out_node):
            r = gm.graph.call_function(torch.ops.aten.sub.Tensor, (o, nodes[i_name]))
        _tag(r, by, o)
        extra.append(r)
    outs = out_node.args[0]
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    out_node.args = (tuple(outs + extra),)
    gm.graph.lint()
    gm.recompile()
    return graph.with_module(gm, output_names=graph.output_names + tuple(f"cache.{k}" for k in span_keys(spans)))


def reuse_spans(graph: Graph, spans: Sequence[Span], examples: Sequence[torch.Tensor], by: str) -> Graph:
    """`graph` with each span computed as `input + cached residual` (one new input per
    span stream, in `span_keys` order).

    Args:
        examples: an example residual per span stream (for lowering's re-trace).
    Raises:
        PassError: when spans overlap or a span's output is not read after it.
    """
    gm = graph.copy_module()
    nodes = _nodes(gm)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    last_ph = placeholders[-1]
    new_names = []
    for key, i_name, o_name in (p for s in spans for p in s.pairs()):
        with gm.graph.inserting_after(last_ph):
            ph = gm.graph.placeholder(f"cache_{key}")
        ph.meta["val"] = nodes[o_name].meta.get("val")
        last_ph = ph
        o = nodes[o_name]
        new_names.append(f"cache.{key}")
        if not i_name:                      # an output span: the cached value as it is
            ph.meta[meta.CREATED_BY] = by
            o.replace_all_uses_with(ph)
            continue
        i = nodes[i_name]
        with gm.graph.inserting_after(i):
            h = gm.graph.call_function(torch.ops.aten.add.Tensor, (i, ph))
        _tag(h, by, o)
        o.replace_all_uses_with(h)
    eliminate_dead_code(gm)
    gm.graph.lint()
    gm.recompile()
    # a cache input is batched like the model: it shares the batch symbol, if any
    batch = next((d[0][1] for d in graph.dynamic_dims if d and d[0][0] == 0), None)
    dyn = tuple(graph.dynamic_dims) + tuple(((0, batch),) if batch else () for _ in new_names)
    return graph.with_module(gm, input_names=graph.input_names + tuple(new_names),
                             example_inputs=tuple(graph.example_inputs) + tuple(examples),
                             dynamic_dims=dyn)


def variant_program(program: Program, gname: str, spans: Sequence[Span], reuse: Sequence[tuple[str, Sequence[str]]],
                    schedule: Sequence[str], default: str, by: str) -> Program:
    """Replace graph `gname` by its `full` variant (which also writes each span
    stream's residual to state) and one reuse variant per entry of `reuse` (variant name ->
    span names it reuses), and each Call of it by a table Select over them."""
    src = program.graphs[gname]
    full = emit_residuals(src, spans, by)
    with torch.no_grad():
        outs = full.run(*full.example_inputs)
    keys = span_keys(spans)
    examples = {k: outs[len(src.output_names) + j].detach().clone() for j, k in enumerate(keys)}
    by_name = {s.name: s for s in spans}
    variants = {"full": full}
    for vname, names in reuse:
        chosen = [by_name[n] for n in names]
        variants[vname] = reuse_spans(src, chosen, [examples[k] for k in span_keys(chosen)], by)
    st = {k: f"state:{state_name(program, by, gname, k)}" for k in keys}

    def node(call: Call, graph_of) -> Select:
        cases = [("full", Call(graph_of("full"), call.inputs, call.outputs + tuple(st[k] for k in keys),
                               call.device))]
        for vname, names in reuse:
            cases.append((vname, Call(graph_of(vname), call.inputs + tuple(
                st[k] for k in span_keys([by_name[n] for n in names])), call.outputs, call.device)))
        return Select(Table(tuple(schedule), default), tuple(cases))
    return program.expand(gname, variants, node, by=by, state=[StateBuffer(r[6:]) for r in st.values()])


def graph_flops(graph: Graph) -> int:
    """Estimated FLOPs of one call of a variant graph."""
    return cost.graph_flops(graph.module)


def replace_with_input(graph: Graph, node_name: str, input_name: str, example: torch.Tensor, by: str) -> Graph:
    """`graph` with the value of `node_name` taken from a new input instead
    (what computed it, if nothing else needs it, is removed)."""
    gm = graph.copy_module()
    nodes = _nodes(gm)
    last_ph = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last_ph):
        ph = gm.graph.placeholder(input_name.replace(".", "_"))
    ph.meta["val"] = nodes[node_name].meta.get("val")
    ph.meta[meta.CREATED_BY] = by
    nodes[node_name].replace_all_uses_with(ph)
    eliminate_dead_code(gm)
    gm.graph.lint()
    gm.recompile()
    batch = next((d[0][1] for d in graph.dynamic_dims if d and d[0][0] == 0), None)
    return graph.with_module(gm, input_names=graph.input_names + (input_name,),
                             example_inputs=tuple(graph.example_inputs) + (example,),
                             dynamic_dims=tuple(graph.dynamic_dims) + (((0, batch),) if batch else (),)
                             if any(graph.dynamic_dims) else ())


def with_outputs(graph: Graph, outputs: Sequence[tuple[str, str]], by: str) -> Graph:
    """`graph` returning only the given (output name, node name or `a-b` difference)
    values; everything else is removed."""
    gm = graph.copy_module()
    nodes = _nodes(gm)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    vals = []
    for _, ref in outputs:
        if "-" in ref:
            a, b = ref.split("-")
            with gm.graph.inserting_before(out_node):
                v = gm.graph.call_function(torch.ops.aten.sub.Tensor, (nodes[a], nodes[b]))
            _tag(v, by, nodes[a])
        else:
            v = nodes[ref]
        vals.append(v)
    out_node.args = (tuple(vals),)
    eliminate_dead_code(gm)
    gm.graph.lint()
    gm.recompile()
    return graph.with_module(gm, output_names=tuple(n for n, _ in outputs))


def first_blocks_probe(src: Graph, blocks: Sequence[Region], front: int, by: str) -> tuple[Graph, str]:
    """The probe of the adaptive rule (FirstBlockCache): a graph running the first
    `front` blocks, with outputs `signal` (their residual: the input of block
    `front` minus the input of block 0) and `hidden` (the input of block `front`).
    Returns (probe, the name of the hidden-state node the other variants take as input).

    Raises:
        PassError: when `front` leaves no block, or a block has no hidden-state path.
    """
    if not 0 < front < len(blocks):
        raise PassError(f"pass '{by}': {front} probe block(s) leave none of the model's {len(blocks)} blocks to cache")
    head, cut = primary_io(src.module, blocks[0]), primary_io(src.module, blocks[front])
    if head is None or cut is None:
        bad = blocks[0] if head is None else blocks[front]
        raise PassError(f"pass '{by}': block {bad.path!r} has no hidden-state input/output (a block that maps "
                        "hidden states to hidden states); name the blocks with `regions`")
    hidden = cut[0].name
    return with_outputs(src, [("signal", f"{hidden}-{head[0].name}"), ("hidden", hidden)], by), hidden


def with_search(program: Program, points: tuple, pareto: tuple = ()) -> Program:
    """`program` with the measured threshold search (and the Pareto front of a two-objective
    goal) recorded in its CachePlan."""
    rec = dataclasses.replace(program.records["CachePlan"], search=points, pareto=pareto)
    return program.replace(records={**program.records, "CachePlan": rec})


# -- threshold search --------------------------------------------------------
GOALS = ("psnr_db", "speedup")


def check_goal(pass_name: str, goal: Mapping | None) -> Goal | None:
    """A cache pass's goal (ir/goal.py): {psnr_db: X}, {speedup: X}, or both (a Pareto search), X > 0."""
    return Goal.parse(goal, f"pass '{pass_name}': option 'target'", GOALS, positive=True)


def _final(out: Any) -> "np.ndarray":
    import numpy as np
    leaves = out if isinstance(out, (tuple, list)) else [out]
    return np.concatenate([np.asarray(torch.as_tensor(v).detach().float().numpy()).ravel() for v in leaves])


def evaluate_on_calibration(program: Program, calibration: Any, reference: Any, base_flops: int) -> tuple[float, float]:
    """(PSNR in dB of the loop's final output vs. `reference`, with the reference's
    range as peak; FLOPs speedup over the uncached graph) for one run of the
    calibration loop through the torch side of `program`."""
    runner = program.runner()
    out = calibration(lambda *a: _first(runner(list(a))))
    ref = _final(reference)
    psnr = psnr_db(ref, _final(out), peak=float(ref.max() - ref.min()) or 1.0)
    spent = cost.trace_flops(program, runner.graph_trace)
    return psnr, (base_flops * len(runner.trace)) / spent if spent else 1.0


def _first(outs: list) -> Any:
    return outs[0] if len(outs) == 1 else tuple(outs)


def _measure_threshold(shared: tuple, th: float) -> tuple[float, float]:
    """One trial of a threshold search: (PSNR dB, FLOPs speedup) of the program built at `th`
    (module level: an executor sends it to other processes)."""
    build, calibration, reference, base = shared
    return evaluate_on_calibration(build(th), calibration, reference, base)


def search_threshold(pass_name: str, build: Callable[[float], Program], uncached: Program, calibration: Any,
                     goal: Mapping, lo: float, hi: float, iters: int = 7,
                     progress: Callable[[str], None] = lambda m: None,
                     trials: Trials | None = None) -> tuple[float, tuple, tuple]:
    """Search the threshold that meets `goal` on the calibration run.

    One term: bisect in log space (analysis.search.bisect_log, `trials.width` thresholds a
    round). psnr_db: the largest threshold whose PSNR stays >= the goal; speedup: the
    smallest threshold whose FLOPs speedup reaches the goal. Two terms ({psnr_db: X,
    speedup: Y}): a Pareto search (analysis.search.pareto_search, `trials.trials` trials,
    seeded by `trials.seed`), keeping, of the thresholds that meet both, the best by the
    goal's first-named metric.

    Args:
        trials: the executor the trials run on (analysis.search.Trials; None: in process).
    Returns:
        (threshold, the measured points ((threshold, psnr_db, speedup), ...) in the order
        tried, the Pareto front of them for a two-term goal (else ())).
    Raises:
        PassError: no calibration loop; no threshold in [lo, hi] meets a speedup goal; no
            threshold tried meets both terms of a two-term goal (the message lists the front).
    """
    if not callable(calibration):
        raise PassError(f"pass '{pass_name}': option 'target' needs a calibration loop (a callable that runs one "
                        "request through the model) to measure the trade-off on")
    runner = uncached.runner()
    reference = calibration(lambda *a: _first(runner(list(a))))
    base = cost.trace_flops(uncached, runner.graph_trace) / max(1, len(runner.graph_trace))
    goal = check_goal(pass_name, goal)
    trials = as_trials(trials)
    run = trials.bind(_measure_threshold, (build, calibration, reference, base))
    points = []

    def said(th: float, got: tuple[float, float]) -> None:
        progress(f"{pass_name}: threshold {th:.4g} -> {got[0]:.1f} dB, {got[1]:.2f}x FLOPs")

    def measure(ths: list[float]) -> list[tuple[float, float]]:
        got = run(ths, said)
        points.extend((th, round(psnr, 3), round(sp, 4)) for th, (psnr, sp) in zip(ths, got))
        return got

    if len(goal.terms) == 2:
        return _pareto_threshold(pass_name, goal, measure, points, lo, hi, trials)
    key, want = goal.terms[0]
    # a larger threshold reuses more: PSNR falls and speedup rises with it
    th, met = bisect_log(None, lo, hi, holds_above=key == "speedup", iters=iters, width=trials.width,
                         batch=lambda ths: [goal.met({"psnr_db": p, "speedup": s}) for p, s in measure(ths)])
    if not met and key == "speedup":
        raise PassError(f"pass '{pass_name}': no threshold up to {hi:g} reaches a {want}x FLOPs speedup on "
                        f"the calibration run (best measured: {max(p[2] for p in points):.2f}x)")
    # a PSNR goal no trial met: the smallest threshold, as little reuse as the range allows
    return th, tuple(points), ()


def _pareto_threshold(pass_name: str, goal: Goal, measure: Callable, points: list, lo: float, hi: float,
                      trials: Trials) -> tuple[float, tuple, tuple]:
    """A two-term goal: the Pareto search over the threshold (see search_threshold)."""
    larger = [goal.larger_is_better(k) for k in goal.metrics]
    raw: dict[float, dict[str, float]] = {}

    def batch(settings: list[dict]) -> list[tuple[float, ...]]:
        ths = [s["threshold"] for s in settings]
        got = measure(ths)
        for th, (psnr, sp) in zip(ths, got):
            raw[th] = {"psnr_db": psnr, "speedup": sp}
        return [tuple(raw[th][k] for k in goal.metrics) for th in ths]

    pareto_search(batch, {"threshold": (lo, hi)}, larger, trials=trials.trials, width=trials.width,
                  seed=trials.seed, what=f"pass '{pass_name}': option 'target' with two objectives")
    col = {"psnr_db": 1, "speedup": 2}
    front = tuple(points[i] for i in pareto_front([[p[col[k]] for k in goal.metrics] for p in points], larger))
    meeting = [p for p in points if goal.met(raw[p[0]])]
    if not meeting:
        shown = "; ".join(f"threshold {p[0]:g}: {p[1]:.1f} dB, {p[2]:.2f}x" for p in sorted(front))
        raise PassError(f"pass '{pass_name}': no threshold in [{lo:g}, {hi:g}] of the {len(points)} tried meets "
                        f"{goal} on the calibration run; the Pareto front measured: {shown}. Loosen a bound, or "
                        "give the search more trials (search: {trials: N})")
    first, up = goal.metrics[0], larger[0]
    best = max(meeting, key=lambda p: (raw[p[0]][first] if up else -raw[p[0]][first], -p[0]))
    return best[0], tuple(points), front
