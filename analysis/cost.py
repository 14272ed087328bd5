"""Per-region FLOPs and parameter bytes of a graph, from the shapes on its nodes.

Matmuls and convolutions count 2·M·N·K multiply-adds; other ops count one
FLOP per output element; views count none. A coarse estimate for `pared
inspect`, and the FLOP counts the placement cost model (analysis/placement.py)
regresses measured segment times on.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.fx as fx

from pared.ir.program import Program, get_attr
from pared.ir.regions import node_module_path
from pared.ir.transform import Analysis, PassContext, Record, register_pass

_aten = torch.ops.aten
_FREE = {"view", "reshape", "_unsafe_view", "permute", "t", "transpose", "unsqueeze", "squeeze", "expand",
         "slice", "select", "alias", "clone", "getitem", "sym_size", "detach", "contiguous"}


@dataclass(frozen=True)
class RegionCost:
    path: str
    flops: int
    param_bytes: int


@dataclass(frozen=True)
class CostProfile(Record):
    graph: str
    total_flops: int
    param_bytes: int
    param_count: int
    regions: tuple[RegionCost, ...]   # every region, outer before inner

    def region(self, path: str) -> RegionCost:
        for r in self.regions:
            if r.path == path:
                return r
        raise KeyError(path)


def _shape(v) -> tuple[int, ...] | None:
    if isinstance(v, torch.Tensor):
        try:
            return tuple(int(s) for s in v.shape)
        except TypeError:  # symbolic dims: use the hint-free estimate
            return tuple(s if isinstance(s, int) else 1 for s in v.shape)
    return None


def node_flops(node: fx.Node) -> int:
    """Estimated FLOPs of one call_function node."""
    if node.op != "call_function":
        return 0
    name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    out = node.meta.get("val")
    out_shape = _shape(out[0] if isinstance(out, (tuple, list)) and out else out)
    if name in _FREE or out_shape is None:
        return 0
    ins = [_shape(a.meta.get("val")) for a in node.all_input_nodes]
    if name in ("mm", "addmm", "bmm", "matmul", "baddbmm"):
        a = ins[-2] if name in ("addmm", "baddbmm") else ins[0]
        if a:
            return 2 * math.prod(out_shape) * a[-1]
    if name in ("convolution", "conv2d", "conv1d"):
        w = ins[1]
        if w:
            return 2 * math.prod(out_shape) * math.prod(w[1:])
    if name in ("_scaled_dot_product_flash_attention_for_cpu", "scaled_dot_product_attention",
                "_scaled_dot_product_flash_attention"):
        q, k = ins[0], ins[1]
        if q and k:
            return 4 * math.prod(q[:-1]) * k[-2] * q[-1]
    return math.prod(out_shape)


@register_pass("cost")
class EstimateCost(Analysis):
    record = CostProfile

    def analyze(self, program: Program, ctx: PassContext) -> CostProfile:
        name = next(iter(program.graphs))
        return profile_graph(program.graphs[name].module, name)


def profile_graph(gm: fx.GraphModule, name: str = "main") -> CostProfile:
    flops: dict[str, int] = {}
    pbytes: dict[str, int] = {}
    seen_params: dict[str, torch.Tensor] = {}
    total = 0
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            t = get_attr(gm, str(n.target))
            if isinstance(t, torch.Tensor):
                seen_params[str(n.target)] = t
            continue
        f = node_flops(n)
        total += f
        for path, _ in node_module_path(n):
            flops[path] = flops.get(path, 0) + f
            for a in n.all_input_nodes:
                if a.op == "get_attr":
                    t = get_attr(gm, str(a.target))
                    pbytes[path] = pbytes.get(path, 0) + t.numel() * t.element_size()
    regions = tuple(RegionCost(p, flops[p], pbytes.get(p, 0))
                    for p in sorted(flops, key=lambda p: (p.count("."), p)))
    return CostProfile(name, total, sum(t.numel() * t.element_size() for t in seen_params.values()),
                       sum(t.numel() for t in seen_params.values()), regions)


def graph_flops(gm: fx.GraphModule) -> int:
    """Estimated FLOPs of one call of a graph (the sum of node_flops)."""
    return int(sum(node_flops(n) for n in gm.graph.nodes))


def graphs_flops(program: Program) -> dict[str, int]:
    """FLOPs of one call of each graph of a Program."""
    return {name: graph_flops(g.module) for name, g in program.graphs.items()}


def trace_flops(program: Program, graph_trace: list[tuple[str, ...]]) -> int:
    """FLOPs the plan spent over the calls of one request, given the graphs run at
    each call (`PlanRunner.graph_trace`: a probe counts beside the variant it chose)."""
    per = graphs_flops(program)
    return int(sum(per[g] for graphs in graph_trace for g in graphs))
