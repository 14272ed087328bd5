"""W8A8 for diffusion models that knows about timesteps: the temporal features
come from a per-step table in full precision, and activation scales are
calibrated per step bucket, one graph variant per bucket sharing one set of int8
weights (TFMQ-DM, "TFMQ-DM: Temporal Feature Maintenance Quantization for
Diffusion Models", Huang et al., CVPR 2024; per-bucket precision after
6Bit-Diffusion's block input-output predictor, Su et al., 2026).

Before:  c = t_mlp(sinusoid(t)); mod = ada(c)                      every call, float
         y = addmm(b, x, W^T)                                      every linear, float
After:   mod = where(|t - T[k]| <= tol, table_mod[k], ada(t_mlp(sinusoid(t))))
                 with k = argmin_j |t - T[j]| per row              fp32 table, float fallback
         y = QGemm(x; s_x[bucket], Wq, s_w)                        graph `bucket<i>` at its steps
         each call of the graph G:  Select(bins by t -> G.bucket<i>)   (or a table by call index)

Temporal features (TFMQ-DM's temporal information block): every node that
depends on the timestep input alone (the sinusoidal embedding, the t-MLP, an
adaLN modulation Linear that reads only them) is evaluated once per calibrated
timestep, in fp32, and stored as a table with one row per distinct timestep of
the calibration run; the graph looks its row up by matching t against the
table's timesteps. A row whose t is not in the table (another sampler, another
step count) takes the float t-path instead, so the artifact stays correct for any
timestep: the t-path nodes stay in the graph as the other branch of a Where.
ONNX Runtime evaluates both branches, so the table does not remove the t-path's
(small) compute; what it buys is that the temporal features never pass through a
quantizer and are the exact fp32 values of the calibration, and the t-path's
linears are left out of quantization (they are not worth it: one row per sample).
Only the values at the border of the t-only subgraph (those a node depending on
other inputs reads) are tabled; the t-path must act on each batch row alone (it
does in every embedding / MLP), which the table build checks on the calibration
run (rows with equal t must get equal features).

Step buckets: the calibration run's calls (the sampler's steps) are split into
`buckets` contiguous, near-equal ranges. Each bucket gets its own graph variant
whose activation scales are calibrated on that bucket's calls only (ranges drift
across steps: large noise early, fine detail late); weights, their scales and the
table are the same tensor objects in every variant (a variant differs only in
its activation scales and the int32 biases, whose scale s_x * s_w follows s_x).
The ORT backend then stores the initializers several graph files share once
(backends/onnxruntime/shared.py), so the artifact holds one copy of the weights.
The Plan chooses the variant by the timestep itself (`select: timestep`, the
default): a Bins schedule on the timestep input, with an edge halfway between the
timestep ranges of neighbouring buckets, so a request with another step count or
sampler still gets the scales calibrated for its noise level (the variant is
chosen by the first batch row's t; the calibration run must be one sampler
request, whose buckets cover disjoint timestep ranges). `select: call` keeps a
static Table by call index, like interval_cache's (past its end, the last bucket),
for loops whose t does not identify the step. With `buckets: 1` the program stays
one graph under its own name with its plan (calibrated on every step, the table
still in).

Per-bucket precision (`float_blocks: k`, off by default): per bucket, the k
repeated blocks whose relative input-output difference |out - in| / |in| is
largest on the bucket's calls (6Bit-Diffusion: the most volatile blocks are the
most sensitive to quantization) keep their linears in float in that variant.
The lower precision 6Bit-Diffusion gives the stable blocks (FP4) has no fast
kernel on the ORT CPU target (int4 MatMulNBits measured slower than fp32 at
compute-bound shapes, issue 5), so the choice here is INT8 vs float.

Reads: the calibration run (ctx.calibration). Writes: a TimestepQuantPlan record
(buckets, schedule, table timesteps, per-bucket layers, block changes), graphs
`G.bucket0..G.bucket<n-1>` (numeric variants of G: cache passes after this one
let them share their caches) and a bins (or table) Select in place of each call of G; int8/int32 constants and the tables on
the graph modules; `pared.ir.region` / `pared.ir.created_by` on inserted nodes.
Invariant: with the calibration's timesteps every variant computes what
quantize_linears' rewrite computes with that bucket's scales, on fp32 temporal
features. It calibrates the model's one graph: run it first (after
constant_folding); cache passes after it cache every bucket.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.fx as fx

from pared.analysis.redundancy import block_regions, observe_values, primary_io
from pared.ir import meta
from pared.ir.errors import OptionError, PassError
from pared.ir.plan import Bins, Call, Select, Table
from pared.ir.program import Graph, Program
from pared.ir.regions import match, region_of
from pared.ir.rewrite import add_constant, splice
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, Record, RewritePass, check_range, register_pass
from pared.passes.quant.common import LayerQuant, RangeObserver, int8_weight_qmax, weight_format
from pared.passes.quant.convert import apply
from pared.passes.quant.quantize_linears import PLAIN_INT8, decide, find_sites, next_index, spec_of, Site

_aten = torch.ops.aten
#: ops that only reshape, cast or copy: a t-only border reached through these alone is not worth a table
_TRIVIAL = {_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default, _aten.unsqueeze.default,
            _aten.squeeze.dim, _aten.expand.default, _aten._to_copy.default, _aten.clone.default,
            _aten.alias.default, _aten.slice.Tensor, _aten.select.int}
#: the constants of one quantized layer that do not depend on the activation scale (shared by all
#: variants): int8 weight, its scales and zero points, the bias's zero points
_WEIGHT_KEYS = ("w", "ws", "wz", "bz")



@dataclass(frozen=True)
class BucketQuant:
    """One step bucket: its calls, its variant graph and what that variant quantized."""
    graph: str                          # the variant graph ("bucket0")
    first_step: int                     # call indices first..last (inclusive)
    last_step: int
    layers: tuple[LayerQuant, ...]      # quantized layers with this bucket's activation scales
    float_blocks: tuple[str, ...] = ()  # blocks whose linears stay float in this bucket (option float_blocks)
    block_change: tuple[tuple[str, float], ...] = ()  # block -> mean |out - in| / |in| over the bucket's calls


@dataclass(frozen=True)
class TimestepQuantPlan(Record):
    """What timestep_quant decided."""
    method: str                         # timestep_quant
    calibration: str                    # minmax | percentile
    percentile: float | None
    activations: str                    # "uint8 asymmetric per-tensor, per step bucket"
    weights: str                        # "int8 symmetric per-channel, shared by the buckets"
    timestep_input: str                 # the program input holding t
    timesteps: tuple[float, ...]        # the table's timesteps (one row each), in calibration order
    temporal: tuple[str, ...]           # the tabled t-only values (node names of the source graph)
    temporal_layers: tuple[str, ...]    # regions of the linears on the t-path (float, not quantized)
    buckets: tuple[BucketQuant, ...]
    schedule: tuple[str, ...]           # variant per call index
    default: str                        # past the end of the schedule
    tolerance: float                    # |t - T[k]| accepted as a table hit
    excluded: tuple[str, ...] = ()      # regions left float by option `exclude`
    calls: int = 0
    select: str = "call"                # how the plan picks a variant: by "timestep" value or by "call" index
    edges: tuple[float, ...] = ()       # select timestep: the Bins edges (ascending t)
    t_ranges: tuple[tuple[float, float], ...] = ()  # per bucket: [min, max] t of its calibration calls


@register_pass("timestep_quant")
class QuantizePerTimestep(RewritePass):
    """Timestep-aware static INT8 for diffusion (see module docstring)."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        buckets: int = 4                 # step buckets, each with its own activation scales (1: one set)
        timestep: str = "t"              # the program input that holds the timestep, one value per batch row
        method: Literal["minmax", "percentile"] = "minmax"  # how activation ranges are calibrated
        percentile: float = 99.99        # percentile method: keep this share of values (per side) in range
        exclude: tuple[str, ...] | str = ()  # region patterns whose linear layers stay float (ir.regions syntax)
        float_blocks: int = 0            # per bucket, this many most-changing blocks keep float linears
        tolerance: float = 1e-4          # a row's t matches a table timestep within this (absolute)
        select: Literal["timestep", "call"] = "timestep"  # the plan picks a bucket by t's value, or by call index

        def __post_init__(self):
            check_range("timestep_quant", "buckets", self.buckets, lo=1)
            check_range("timestep_quant", "percentile", self.percentile, lo=50.0, hi=100.0, lo_open=True)
            check_range("timestep_quant", "float_blocks", self.float_blocks, lo=0)
            check_range("timestep_quant", "tolerance", self.tolerance, lo=0.0)
            object.__setattr__(self, "exclude", (self.exclude,) if isinstance(self.exclude, str)
                               else tuple(self.exclude))

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        if program.graphs and all(g.made_by(self.name) for g in program.graphs.values()):
            # its own buckets: running it again finds nothing more to do
            return PassResult(program, modified=False, preserved=PRESERVE_ALL,
                              stats={"quantized": 0, "excluded": 0, "temporal": 0})
        if len(program.graphs) != 1:
            made = program.variant_makers()
            raise PassError(f"pass 'timestep_quant' calibrates activation ranges per step of the model's one graph "
                            f"and picks a variant per step itself; this program's steps already run variants "
                            f"{list(program.graphs)} chosen by {', '.join(made) or 'its plan'}. Run timestep_quant "
                            "first (cache passes after it cache every bucket)")
        gname = next(iter(program.graphs))
        src = program.graphs[gname]
        gm = src.module
        t_node = _timestep_placeholder(src, o.timestep)
        t_only = _t_only_nodes(gm, t_node)
        borders = _borders(gm, t_node, t_only)
        sites = find_sites(gm, batched=not any(src.dynamic_dims))
        t_sites = [s for s in sites if s.out in t_only]
        excluded = sorted({s.region for s in sites if s.out not in t_only and _excluded(s, o.exclude)})
        todo = [s for s in sites if s.out not in t_only and not _excluded(s, o.exclude)]
        if not todo and not borders:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL,
                              stats={"quantized": 0, "excluded": len(excluded), "temporal": 0})

        blocks = _blocks(program, gname) if o.float_blocks else []
        obs = _observe(gm, t_node, borders, todo, blocks, ctx.calibration, o, self.name)
        calls = obs.calls
        if o.buckets > calls:
            raise OptionError(f"pass 'timestep_quant': option 'buckets' ({o.buckets}) exceeds the {calls} calls of "
                              "the calibration run; use at most one bucket per step")
        spans = _bucket_spans(calls, o.buckets)
        timesteps, tables = _tables(obs, borders, o.tolerance, self.name)

        base = _with_table(src, t_node, borders, timesteps, tables, o.tolerance, self.name)
        qmax = int8_weight_qmax(ctx.target)
        first_index = next_index(base.module)
        graphs: dict[str, Graph] = {}
        buckets: list[BucketQuant] = []
        shared: dict[str, dict[str, torch.Tensor]] = {}   # layer node -> its weight constants
        for b, (lo_step, hi_step) in enumerate(spans):
            change = _block_change(obs, blocks, lo_step, hi_step)
            floats = tuple(p for p, _ in sorted(change, key=lambda pc: -pc[1])[:o.float_blocks])
            chosen = [s for s in todo if not any(r in floats for r in s.regions)]
            observed = {s.x: _merged(obs.ranges[s.x][lo_step:hi_step + 1], o.method, o.percentile)
                        for s in chosen}
            decided = decide(base.module, chosen, observed, PLAIN_INT8, ctx)
            # one bucket keeps the graph's name and plan; several become graphs `<name>.bucket<i>`
            name = f"bucket{b}" if len(spans) > 1 else gname
            specs = {d.site.out: spec_of(d, self.name, qmax) for d in decided}
            graph, done = apply(base, specs, ctx.target, self.name) if decided else (base, [])
            _share_weights(graph.module, [lq.node for lq in done], first_index, shared, self.name)
            graphs[name] = graph
            buckets.append(BucketQuant(name, lo_step, hi_step, tuple(done), floats, tuple(change)))
            ctx.log.debug("timestep_quant: %s steps %d..%d: %d layers int8, float blocks %s", name, lo_step,
                          hi_step, len(done), list(floats))
        if not any(bq.layers for bq in buckets) and not borders:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL,
                              stats={"quantized": 0, "excluded": len(excluded), "temporal": 0})

        schedule = tuple(buckets[b].graph for b, (lo, hi) in enumerate(spans) for _ in range(lo, hi + 1))
        edges: tuple[float, ...] = ()
        if len(graphs) == 1:
            new = program.replace(graphs=graphs)
        else:
            if o.select == "timestep":
                edges, order = _t_edges(obs, spans, self.name)
                cases = tuple(buckets[b].graph for b in order)
            t_at = src.input_names.index(o.timestep)

            def node(c: Call, graph_of) -> Select:
                sel = Bins(c.inputs[t_at], edges, cases) if o.select == "timestep" else Table(schedule, schedule[-1])
                return Select(sel, tuple((name, Call(graph_of(name), c.inputs, c.outputs, c.device))
                                         for name in graphs), f"{self.name}.{gname}")
            new = program.expand(gname, graphs, node, by=self.name, numeric=True)
        record = TimestepQuantPlan(
            "timestep_quant", o.method, o.percentile if o.method == "percentile" else None,
            "uint8 asymmetric per-tensor, per step bucket", weight_format(qmax) + ", shared by the buckets",
            o.timestep, tuple(float(t) for t in timesteps), tuple(n.name for n in borders),
            tuple(sorted({s.region for s in t_sites})), tuple(buckets), schedule, schedule[-1], o.tolerance,
            tuple(excluded), calls, o.select if len(graphs) > 1 else "call",
            tuple(edges), tuple(_t_range(obs, lo, hi) for lo, hi in spans))
        new = new.replace(records={**program.records, "TimestepQuantPlan": record})
        quantized = max(len(bq.layers) for bq in buckets)
        ctx.log.info("timestep_quant: %d buckets over %d steps, %d linear layers int8 (%d float on the t-path, "
                     "%d excluded), %d temporal values tabled at %d timesteps", len(buckets), calls, quantized,
                     len(t_sites), len(excluded), len(borders), len(timesteps))
        return PassResult(new, modified=True, stats={
            "quantized": quantized, "excluded": len(excluded), "temporal": len(borders),
            "temporal_layers": len(t_sites), "buckets": len(buckets), "timesteps": len(timesteps),
            "float_layers": sum(len(todo) - len(bq.layers) for bq in buckets), "calibration_calls": calls})


# -- the t-path --------------------------------------------------------------
def _timestep_placeholder(graph: Graph, name: str) -> fx.Node:
    phs = [n for n in graph.module.graph.nodes if n.op == "placeholder"]
    if name not in graph.input_names:
        close = difflib.get_close_matches(name, list(graph.input_names), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise OptionError(f"pass 'timestep_quant': option 'timestep': the program has no input '{name}'{hint} "
                          f"(inputs: {list(graph.input_names)}); name the input that holds the timestep")
    node = phs[graph.input_names.index(name)]
    val = node.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.dim() != 1:
        raise PassError(f"pass 'timestep_quant': input '{name}' ({node.format_node()}) must be a 1-D tensor with "
                        f"one timestep per batch row, got {getattr(val, 'shape', None)}")
    return node


def _t_only_nodes(gm: fx.GraphModule, t_node: fx.Node) -> set[str]:
    """Names of the nodes whose value depends on the timestep input and on no other input."""
    deps: dict[fx.Node, frozenset] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            deps[n] = frozenset([n.name])
        elif n.op == "get_attr":
            deps[n] = frozenset()
        else:
            d: frozenset = frozenset()
            for a in n.all_input_nodes:
                d = d | deps[a]
            deps[n] = d
    return {n.name for n, d in deps.items() if d == {t_node.name} and n.op == "call_function"}


def _borders(gm: fx.GraphModule, t_node: fx.Node, t_only: set[str]) -> list[fx.Node]:
    """The t-only float tensors ([B, ...], one row per batch row) that a node
    depending on other inputs (or the output) reads, and that take more than
    reshapes and casts of t to compute."""
    batch = t_node.meta["val"].shape[0]
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for name in t_only:
        n = nodes[name]
        v = n.meta.get("val")
        if not isinstance(v, torch.Tensor) or v.dtype != torch.float32 or v.dim() < 1 or v.shape[0] != batch:
            continue
        if not any(u.op == "output" or u.name not in t_only for u in n.users):
            continue
        if n.meta.get(meta.CREATED_BY) == "timestep_quant":
            continue                  # already a table lookup (the pass ran before)
        if _only_trivial(n, t_node, t_only, nodes):
            continue
        out.append(n)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(out, key=lambda n: order[n])


def _only_trivial(n: fx.Node, t_node: fx.Node, t_only: set[str], nodes: dict) -> bool:
    stack, seen = [n], set()
    while stack:
        m = stack.pop()
        if m.name in seen or m is t_node or m.op != "call_function":
            continue
        seen.add(m.name)
        if m.target not in _TRIVIAL:
            return False
        stack += [a for a in m.all_input_nodes if a.name in t_only or a is t_node]
    return True


def _lookup(tol: float, ndim: int):
    """The table lookup as a torch function (traced into the graph by splice)."""
    def lookup(t, table_t, table, fallback):
        d = (t.to(torch.float32).reshape(-1, 1) - table_t.reshape(1, -1)).abs()
        best, idx = d.min(dim=1)
        row = table.index_select(0, idx)
        hit = (best <= tol).reshape([-1] + [1] * (ndim - 1))
        return torch.where(hit, row, fallback)
    return lookup


def _with_table(src: Graph, t_node: fx.Node, borders: list[fx.Node], timesteps: np.ndarray,
                tables: dict[str, np.ndarray], tol: float, by: str) -> Graph:
    """`src` with each border value taken from its table when t is a table timestep."""
    if not borders:
        return src
    gm = src.copy_module()
    nodes = {n.name: n for n in gm.graph.nodes}
    last_ph = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]

    def const(target: str, value: torch.Tensor) -> fx.Node:
        return add_constant(gm, target, value, by, after=last_ph)

    tt = const("_tsq_timesteps", torch.from_numpy(np.ascontiguousarray(timesteps, dtype=np.float32)))
    t = nodes[t_node.name]
    for k, b in enumerate(borders):
        node = nodes[b.name]
        table = torch.from_numpy(np.ascontiguousarray(tables[b.name], dtype=np.float32))
        tab = const(f"_tsq_table_{k}", table)
        users = list(node.users)
        examples = [torch.zeros(tuple(t.meta["val"].shape), dtype=t.meta["val"].dtype), getattr(gm, "_tsq_timesteps"),
                    table, torch.zeros(tuple(node.meta["val"].shape), dtype=torch.float32)]
        before = set(gm.graph.nodes)
        (y,) = splice(gm, _lookup(tol, node.meta["val"].dim()), [t, tt, tab, node], examples, by)
        for new in gm.graph.nodes:
            if new not in before:
                new.meta[meta.REGION] = region_of(node)
        for u in users:
            u.replace_input_with(node, y)
    gm.graph.lint()
    gm.recompile()
    return src.with_module(gm)


# -- calibration -------------------------------------------------------------
@dataclass
class _Observed:
    calls: int
    t: list                                  # per call: t as float64 numpy [B]
    border: dict                             # node -> per call float32 numpy [B, ...]
    ranges: dict                             # activation node -> per call RangeObserver
    change: dict                             # block path -> per call |out - in| / |in|


def _observe(gm: fx.GraphModule, t_node: fx.Node, borders: list[fx.Node], sites: list[Site],
             blocks: list[tuple[str, fx.Node, fx.Node]], calibration: Any, o: Any, by: str) -> _Observed:
    """One run of the calibration loop through the float graph, everything recorded per call."""
    if calibration is None:
        raise PassError(f"pass '{by}' needs a calibration run to set activation scales per step: pass "
                        "calibration= a loop callable that runs one request (a sampler) through the model")
    nodes = {n.name: n for n in gm.graph.nodes}
    call = [-1]
    rec = _Observed(0, [], {b.name: [] for b in borders}, {s.x: [] for s in sites}, {p: [] for p, _, _ in blocks})
    block_in = {i.name: p for p, i, _ in blocks}
    block_out = {o_.name: p for p, _, o_ in blocks}
    pending: dict[str, torch.Tensor] = {}

    def on_value(name: str, v: torch.Tensor) -> None:
        if name == t_node.name:
            rec.t.append(v.detach().to(torch.float64).numpy().copy())
        if name in rec.border:
            rec.border[name].append(v.detach().to(torch.float32).numpy().copy())
        if name in rec.ranges:
            r = rec.ranges[name]
            while len(r) <= call[0]:
                r.append(RangeObserver(o.method, o.percentile))
            r[call[0]].observe(v)
        if name in block_in:
            pending[block_in[name]] = v.detach()
        if name in block_out:
            p = block_out[name]
            x = pending.pop(p)
            rec.change[p].append(float(torch.linalg.norm(v - x) / (torch.linalg.norm(x) + 1e-12)))

    def counted(fn):
        def step(*a):
            call[0] += 1
            return fn(*a)
        return step

    if callable(calibration):
        def loop(fn):
            return calibration(counted(fn))
    else:
        def loop(fn):                         # a list of input tuples: one call each
            step = counted(fn)
            for item in calibration:
                step(*(item if isinstance(item, (tuple, list)) else (item,)))
    watch = [t_node] + borders + list({s.x: nodes[s.x] for s in sites}.values()) + \
        [n for _, i, o_ in blocks for n in (i, o_)]
    rec.calls = observe_values(gm, watch, loop, on_value)
    if rec.calls == 0:
        raise PassError(f"pass '{by}': the calibration run made no calls")
    for name, per_call in rec.ranges.items():
        while len(per_call) < rec.calls:
            per_call.append(RangeObserver(o.method, o.percentile))
    return rec


def _merged(observers: list[RangeObserver], method: str, percentile: float) -> RangeObserver:
    """One observer holding the per-call figures of several (a bucket's calls)."""
    m = RangeObserver(method, percentile)
    for ob in observers:
        m.lo += ob.lo
        m.hi += ob.hi
    return m


def _bucket_spans(calls: int, buckets: int) -> list[tuple[int, int]]:
    """`buckets` contiguous near-equal ranges of call indices [first, last]."""
    edges = [round(b * calls / buckets) for b in range(buckets + 1)]
    return [(edges[b], edges[b + 1] - 1) for b in range(buckets)]


def _t_range(obs: _Observed, first: int, last: int) -> tuple[float, float]:
    ts = np.concatenate([np.asarray(obs.t[c], dtype=np.float64).reshape(-1) for c in range(first, last + 1)])
    return float(ts.min()), float(ts.max())


def _t_edges(obs: _Observed, spans: list[tuple[int, int]], by: str) -> tuple[tuple[float, ...], list[int]]:
    """Bins edges (ascending t) halfway between neighbouring buckets' timestep
    ranges, and the bucket indices in ascending-t order.

    Raises:
        PassError: when two buckets' timestep ranges overlap (the calibration run
            is not one sampler request with t monotone over its steps).
    """
    ranges = [_t_range(obs, lo, hi) for lo, hi in spans]
    order = sorted(range(len(spans)), key=lambda b: ranges[b])
    edges = []
    for a, b in zip(order, order[1:]):
        if ranges[a][1] >= ranges[b][0]:
            raise PassError(f"pass '{by}': option 'select' is 'timestep' but the calibration steps of bucket {a} "
                            f"(t in [{ranges[a][0]:g}, {ranges[a][1]:g}]) and bucket {b} (t in [{ranges[b][0]:g}, "
                            f"{ranges[b][1]:g}]) overlap, so t cannot tell them apart; calibrate on one sampler "
                            "request, or pick variants by call index with select: call")
        edges.append(0.5 * (ranges[a][1] + ranges[b][0]))
    return tuple(edges), order


def _tables(obs: _Observed, borders: list[fx.Node], tol: float, by: str) -> tuple[np.ndarray, dict]:
    """The distinct timesteps of the calibration run (in order of first use) and,
    per border value, its row at each of them.

    Raises:
        PassError: when two rows with the same timestep got different values (the
            t-path mixes batch rows, or is not deterministic).
    """
    timesteps: list[float] = []
    rows: dict[str, list] = {b.name: [] for b in borders}
    for c, t in enumerate(obs.t):
        for r, tv in enumerate(np.asarray(t).reshape(-1)):
            hit = next((k for k, s in enumerate(timesteps) if abs(s - tv) <= tol), None)
            if hit is None:
                timesteps.append(float(tv))
                for b in borders:
                    rows[b.name].append(obs.border[b.name][c][r])
                continue
            for b in borders:
                have, got = rows[b.name][hit], obs.border[b.name][c][r]
                if not np.allclose(have, got, rtol=1e-5, atol=1e-6 * (1 + float(np.abs(have).max()))):
                    raise PassError(f"pass '{by}': the t-only value {b.format_node()} differs between two batch "
                                    f"rows with timestep {tv:g} (max diff {float(np.abs(have - got).max()):.3g}): "
                                    "it does not depend on each row's t alone, so it cannot be tabled")
    return np.asarray(timesteps, dtype=np.float32), {b: np.stack(v) for b, v in rows.items()}


# -- per-bucket precision ----------------------------------------------------
def _blocks(program: Program, gname: str) -> list[tuple[str, fx.Node, fx.Node]]:
    """(path, input node, output node) of each repeated block with a hidden-state path."""
    gm = program.graphs[gname].module
    out = []
    for r in block_regions(program, None, gname):
        io = primary_io(gm, r)
        if io is not None:
            out.append((r.path, io[0], io[1]))
    return out


def _block_change(obs: _Observed, blocks: list, first: int, last: int) -> list[tuple[str, float]]:
    return [(p, round(float(np.mean(obs.change[p][first:last + 1])), 6)) for p, _, _ in blocks
            if obs.change[p][first:last + 1]]


def _excluded(site: Site, patterns: tuple[str, ...]) -> bool:
    return any(match(p, r) for p in patterns for r in site.regions)


# -- one set of weights ------------------------------------------------------
def _share_weights(gm: fx.GraphModule, layer_nodes: list[str], first_index: int,
                   shared: dict[str, dict[str, torch.Tensor]], by: str) -> None:
    """Point each quantized layer's weight constants at the tensors an earlier
    variant made for the same layer, so every variant holds one copy.

    quantize_linears' rewrite names a layer's constants `_quant_<i>_<key>`, i
    counting the layers it was given from the graph's first free index."""
    for k, layer in enumerate(layer_nodes):
        mine = {key: getattr(gm, f"_quant_{first_index + k}_{key}") for key in _WEIGHT_KEYS
                if hasattr(gm, f"_quant_{first_index + k}_{key}")}
        have = shared.setdefault(layer, mine)
        for key in mine:
            if have[key] is mine[key]:
                continue
            if not torch.equal(have[key], mine[key]):
                raise PassError(f"pass '{by}': layer {layer}: its int8 weight constants differ between bucket "
                                "variants; they must be one set")
            gm.register_buffer(f"_quant_{first_index + k}_{key}", have[key])
    for n in gm.graph.nodes:
        if n.op == "get_attr" and str(n.target).startswith("_quant_"):
            n.meta["val"] = getattr(gm, str(n.target))
