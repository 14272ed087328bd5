"""Temporal redundancy: how much each region's output and residual change
between consecutive calls of an iterative model (diffusion steps).

Runs the captured graph inside the calibration run (a list of consecutive call
inputs, or a loop callable that drives the model through one request, e.g. a
sampler) and records, per region and per call index i >= 1, the change
against call i - 1:

    output_rel_l1[i]    rel-L1(out_i, out_{i-1})            = mean|a-b| / mean|b|
    residual_rel_l1[i]  rel-L1(out_i - in_i, out_{i-1} - in_{i-1})
    output_cos[i], residual_cos[i]   cosine similarity of the flattened tensors

plus the region's FLOPs per call. Regions are the repeated blocks (the
ModuleList children, `transformer_blocks.3`) and their direct sub-regions
(attention, MLP, experts) unless `regions` names others. A region's residual
needs a primary input: the one region input with the output's shape.

Reads: calibration. Writes: RedundancyProfile (a record; nothing on nodes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx

from pared.analysis.cost import node_flops
from pared.ir.errors import OptionError, PassError
from pared.analysis.recorder import drive, tapped
from pared.ir.program import Program
from pared.ir.regions import Region, select
from pared.ir.transform import Analysis, PassContext, Record, register_pass


@dataclass(frozen=True)
class RegionRedundancy:
    path: str
    flops: int                          # per call, whole batch
    output_rel_l1: tuple[float, ...]    # index i: call i vs. call i-1 (index 0 is nan)
    output_cos: tuple[float, ...]
    residual_rel_l1: tuple[float, ...]  # empty when the region has no primary input
    residual_cos: tuple[float, ...]


@dataclass(frozen=True)
class RedundancyProfile(Record):
    graph: str
    calls: int                          # calls recorded (the steps of one request)
    total_flops: int                    # per call, the whole graph
    regions: tuple[RegionRedundancy, ...]

    def region(self, path: str) -> RegionRedundancy:
        for r in self.regions:
            if r.path == path:
                return r
        raise KeyError(f"no region {path!r} in the RedundancyProfile; it has {[r.path for r in self.regions]}")


def shape_of(node: fx.Node) -> tuple | None:
    v = node.meta.get("val")
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    return None


def primary_io(gm: fx.GraphModule, region: Region) -> tuple[fx.Node, fx.Node] | None:
    """The region's main data path: (input, output) nodes of the same shape.

    The output is the region output with the largest tensor; the input the one
    region input with that shape, or, where several have it and the region has one
    output of that shape (LTX-Video's rotary cos and sin are [B, tokens, dim] as its
    hidden states), the one the output's residual chain of adds reaches
    (_residual_inputs). None when there is no such unique pair (a region that changes
    the shape has no residual; a block called twice in one graph has two).
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    outs = [nodes[o] for o in region.outputs if shape_of(nodes[o]) is not None]
    if not outs:
        return None
    out = max(outs, key=lambda n: math.prod(int(s) if isinstance(s, int) else 1 for s in shape_of(n)))
    shape = shape_of(out)
    ins = [nodes[i] for i in region.inputs if shape_of(nodes[i]) == shape]
    if len(ins) > 1 and sum(1 for o in outs if shape_of(o) == shape) == 1:
        # one output of that shape: a block run once, with side inputs of the same shape (rotary cos, sin);
        # a block run several times in one graph has an output per run and no single input
        ins = _residual_inputs(out, ins, set(region.nodes))
    if len(ins) != 1:
        return None
    return ins[0], out


def _residual_inputs(out: fx.Node, ins: list[fx.Node], inside: set[str]) -> list[fx.Node]:
    """Those of `ins` that `out` reaches back through adds of its shape only (x + f(x) + g(...)):
    the residual stream, not an input that only feeds a branch."""
    add = torch.ops.aten.add.Tensor
    shape, want = shape_of(out), {n.name for n in ins}
    found, seen, todo = [], set(), [out]
    while todo:
        n = todo.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if n.name in want:
            found.append(n)
        elif n.name in inside and n.op == "call_function" and n.target is add:
            todo.extend(a for a in n.args if isinstance(a, fx.Node) and shape_of(a) == shape)
    return sorted(found, key=lambda n: [i.name for i in ins].index(n.name))


def block_stacks(program: Program, graph: str | None = None) -> list[list[Region]]:
    """Every stack of repeated blocks: the regions `<parent>.<index>` with at least two
    siblings of one module type, grouped by parent, each group in index order and the
    groups in the order the graph runs them (Flux: `transformer_blocks`, then
    `single_transformer_blocks`). Groups of leaf modules (the Linears of an
    nn.Sequential MLP) are left out unless nothing else repeats."""
    groups: dict[tuple[str, str], list[Region]] = {}
    for p, r in program.regions(graph).items():
        head, _, last = p.rpartition(".")
        if last.isdigit():
            groups.setdefault((head, r.module_type), []).append(r)
    gm = program.graphs[graph].module if graph is not None else program.main.module
    order = {n.name: i for i, n in enumerate(gm.graph.nodes)}
    stacks = [sorted(v, key=lambda r: int(r.path.rpartition(".")[2])) for v in groups.values() if len(v) >= 2]
    stacks = [s for s in stacks if any(r.children for r in s)] or stacks
    return sorted(stacks, key=lambda rs: min((order[n] for n in rs[0].nodes if n in order), default=0))


def block_regions(program: Program, pattern: str | None = None, graph: str | None = None) -> list[Region]:
    """The repeated blocks of a model: of `block_stacks`, the largest (by node count)
    whose blocks each have a residual path (primary_io: a block with two streams, such
    as Flux's dual-stream blocks, has one where its streams differ in shape); or the
    regions matching `pattern`. A comma-separated list of patterns takes each one's
    regions in turn, so a range may run across stacks in order
    (`transformer_blocks.*, single_transformer_blocks.*`).

    Raises:
        PassError: when nothing matches, or a region is named twice.
    """
    regions = program.regions(graph)
    if pattern:
        found: list[Region] = []
        for part in (p.strip() for p in pattern.split(",")):
            got = select(regions, part) if part else []
            if not got:
                raise PassError(f"no region matches {part!r}" + (f" (in {pattern!r})" if part != pattern else "") +
                                f"; top-level regions: {sorted(p for p in regions if '.' not in p)[:12]}")
            twice = [r.path for r in got if r in found]
            if twice:
                raise PassError(f"regions {pattern!r}: {twice[0]!r} is matched by two of its patterns")
            found += got
        return found
    stacks = block_stacks(program, graph)
    if not stacks:
        raise PassError("found no repeated blocks (a ModuleList of >= 2 modules of one type); "
                        "name the regions with the `regions` option")
    gm = program.graphs[graph].module if graph is not None else program.main.module
    ranked = sorted(stacks, key=lambda rs: -sum(len(r.nodes) for r in rs))
    return next((rs for rs in ranked if all(primary_io(gm, r) is not None for r in rs)), ranked[0])


def calibration_calls(calibration: Any, fn: Callable[..., Any]) -> int:
    """Drive `fn(*tensors)` through the calibration run; returns the number of calls
    (analysis.recorder.drive: a list of input tuples, or a loop callable)."""
    return drive(calibration, fn)


def observe_values(gm: fx.GraphModule, nodes: Sequence[fx.Node], calibration: Any,
                   on_value: Callable[[str, torch.Tensor], None]) -> int:
    """Run `gm` as the model through the calibration run, handing the value of each
    of `nodes` to `on_value(node name, tensor)` at every call. Returns the number
    of calls. (What to keep — every value, or a running range — is the caller's.)"""
    observed = tapped(gm, {n.name for n in nodes}, on_value)

    def call(*args):
        flat = [a if isinstance(a, torch.Tensor) else torch.as_tensor(a) for a in args]
        with torch.no_grad():
            out = observed(*flat)
        return out[0] if isinstance(out, (tuple, list)) and len(out) == 1 else out

    return calibration_calls(calibration, call)


def record_values(gm: fx.GraphModule, nodes: Sequence[fx.Node], calibration: Any) -> tuple[int, dict[str, list]]:
    """Run `gm` through the calibration run and keep the value of each of `nodes`
    at every call (float32 numpy). Returns (number of calls, node name -> values)."""
    values: dict[str, list[np.ndarray]] = {n.name: [] for n in nodes}
    calls = observe_values(gm, nodes, calibration,
                           lambda name, v: values[name].append(v.detach().to(torch.float32).numpy().copy()))
    return calls, values


def _rel_l1(a: np.ndarray, b: np.ndarray) -> float:
    d = float(np.mean(np.abs(b)))
    return float(np.mean(np.abs(a - b))) / d if d > 0 else math.inf


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(np.dot(a.ravel(), b.ravel()) / (na * nb)) if na > 0 and nb > 0 else 1.0


@register_pass("temporal_redundancy")
class TemporalRedundancy(Analysis):
    """Measure per-region change across consecutive calls (see module docstring)."""

    record = RedundancyProfile

    @dataclass(frozen=True, kw_only=True)
    class Options:
        regions: str | None = None   # region pattern; default: the repeated blocks and their children
        graph: str | None = None     # which graph of the program (default: the first)

    def analyze(self, program: Program, ctx: PassContext) -> RedundancyProfile:
        gname = self.options.graph or next(iter(program.graphs))
        if gname not in program.graphs:
            raise OptionError(f"pass 'temporal_redundancy' option 'graph': no graph {gname!r}; "
                              f"the program has {list(program.graphs)}")
        g = program.graphs[gname]
        gm = g.module
        regions = program.regions(gname)
        if self.options.regions:
            chosen = block_regions(program, self.options.regions, gname)
        else:
            blocks = block_regions(program, None, gname)
            chosen = []
            for b in blocks:
                chosen.append(b)
                chosen += [regions[c] for c in b.children]
        nodes = {n.name: n for n in gm.graph.nodes}
        taps: list[tuple[str, fx.Node | None, fx.Node]] = []
        for r in chosen:
            io = primary_io(gm, r)
            if io is None:
                outs = [nodes[o] for o in r.outputs if shape_of(nodes[o]) is not None]
                if not outs:
                    continue
                taps.append((r.path, None, outs[0]))
            else:
                taps.append((r.path, io[0], io[1]))
        flops = {r.path: sum(node_flops(nodes[n]) for n in r.nodes) for r in chosen}
        total = sum(node_flops(n) for n in gm.graph.nodes)

        watch = [n for _, i, o in taps for n in (i, o) if n is not None]
        ctx.progress(f"temporal_redundancy: recording {len(taps)} regions over the calibration run")
        calls, values = record_values(gm, watch, ctx.calibration)
        if calls < 2:
            raise PassError("temporal_redundancy needs at least 2 consecutive calls in the calibration run, "
                            f"got {calls}")
        recs = []
        for path, i_node, o_node in taps:
            outs = values[o_node.name]
            o_l1, o_cos, r_l1, r_cos = [math.nan], [math.nan], [], []
            res = None
            if i_node is not None:
                res = [o - i for o, i in zip(outs, values[i_node.name])]
                r_l1, r_cos = [math.nan], [math.nan]
            for k in range(1, calls):
                same = outs[k].shape == outs[k - 1].shape
                o_l1.append(_rel_l1(outs[k], outs[k - 1]) if same else math.nan)
                o_cos.append(_cos(outs[k], outs[k - 1]) if same else math.nan)
                if res is not None:
                    r_l1.append(_rel_l1(res[k], res[k - 1]) if same else math.nan)
                    r_cos.append(_cos(res[k], res[k - 1]) if same else math.nan)
            recs.append(RegionRedundancy(path, int(flops[path]), tuple(o_l1), tuple(o_cos), tuple(r_l1), tuple(r_cos)))
        prof = RedundancyProfile(gname, calls, int(total), tuple(recs))
        ctx.log.info("temporal_redundancy: %d regions over %d calls", len(recs), calls)
        return prof
