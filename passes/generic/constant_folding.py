"""Fold subgraphs that depend only on parameters and constants into new constants.

Before:  w = get_attr[log_scale]; s = aten.exp(w); y = aten.mul(x, s)
After:   c = get_attr[_folded_0]               # exp(log_scale), computed once
         y = aten.mul(x, c)
Reads: nothing. Writes: `pared.generic.folded_from` on each new get_attr node
(the targets it was computed from); the new constants are buffers of the new
graph module, the old parameters stay shared and untouched.
Invariant: outputs are unchanged up to float rounding of the folded ops. A fold
whose result is larger than its inputs (an expand, a broadcast) is skipped
beyond `max_bytes`, since it would bloat the artifact. Views of a single
parameter (transpose, reshape) are left alone: backends fuse them and folding
would duplicate the weight. Quantize/dequantize ops (quantize_linears) are never
folded: they are what the backend turns into integer kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from pared.ir import meta
from pared.ir.program import Program, get_attr
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, RewritePass, check_range, register_pass

_aten = torch.ops.aten
_VIEWS = {
    _aten.permute.default, _aten.t.default, _aten.transpose.int, _aten.view.default, _aten.reshape.default,
    _aten.unsqueeze.default, _aten.squeeze.dim, _aten.squeeze.dims, _aten.expand.default, _aten.slice.Tensor,
    _aten.select.int, _aten.alias.default, _aten._unsafe_view.default,
}


@register_pass("constant_folding")
class FoldConstants(RewritePass):
    @dataclass(frozen=True, kw_only=True)
    class Options:
        max_bytes: int = 64 << 20  # skip a fold whose result is larger than this and than its inputs

        def __post_init__(self):
            check_range("constant_folding", "max_bytes", self.max_bytes, lo=0)

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        new_graphs = {}
        folded_total = 0
        for name, g in program.graphs.items():
            roots = _foldable_roots(g.module, self.options.max_bytes)
            if not roots:
                new_graphs[name] = g
                continue
            gm = g.copy_module()
            by_name = {n.name: n for n in gm.graph.nodes}
            values: dict[str, torch.Tensor] = {}
            counter = _next_index(gm)
            for root_name in roots:
                node = by_name[root_name]
                value = _evaluate(gm, node, values)
                attr = f"_folded_{counter}"
                counter += 1
                gm.register_buffer(attr, value.detach().clone())
                with gm.graph.inserting_before(node):
                    new = gm.graph.get_attr(attr)
                new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")})
                new.meta[meta.FOLDED_FROM] = tuple(sorted(_param_sources(node)))
                new.meta[meta.CREATED_BY] = self.name
                node.replace_all_uses_with(new)
            gm.graph.eliminate_dead_code()
            gm.recompile()
            folded_total += len(roots)
            new_graphs[name] = g.with_module(gm)
        if folded_total == 0:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"folded": 0})
        return PassResult(program.replace(graphs=new_graphs), modified=True, stats={"folded": folded_total})


def _is_const(node: fx.Node, const: set[str]) -> bool:
    if node.op == "get_attr":
        return True
    if node.op != "call_function" or node.is_impure():
        return False
    # a quantizer's dequantize of int8 weights is what the backend fuses into an
    # integer kernel; folding it would turn the layer back into float weights
    if str(node.target).startswith("quantized_decomposed."):
        return False
    if not all(a.name in const for a in node.all_input_nodes):
        return False
    # factory ops with no tensor inputs (zeros, arange) are cheap and shape-carrying: leave them
    return bool(node.all_input_nodes)


def _nbytes(node: fx.Node) -> int:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return val.numel() * val.element_size()
    return 0


def _foldable_roots(gm: fx.GraphModule, max_bytes: int) -> list[str]:
    """Names of constant nodes used by non-constant ones: the values to materialize."""
    const: set[str] = set()
    for n in gm.graph.nodes:
        if _is_const(n, const):
            const.add(n.name)
    roots = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.name not in const:
            continue
        if not any(u.name not in const for u in n.users):
            continue
        if _only_views_of_one_param(n):
            continue
        val = n.meta.get("val")
        if not isinstance(val, torch.Tensor):
            continue
        size = _nbytes(n)
        src = sum(_nbytes(a) for a in n.all_input_nodes)
        if size > max_bytes and size > src:
            continue
        roots.append(n.name)
    return roots


def _only_views_of_one_param(n: fx.Node) -> bool:
    while n.op == "call_function":
        if n.target not in _VIEWS or len(n.all_input_nodes) != 1:
            return False
        n = n.all_input_nodes[0]
    return n.op == "get_attr"


def _evaluate(gm: fx.GraphModule, node: fx.Node, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    if node.name in cache:
        return cache[node.name]
    if node.op == "get_attr":
        v = get_attr(gm, str(node.target))
    else:
        env = {a.name: _evaluate(gm, a, cache) for a in node.all_input_nodes}
        args = fx.node.map_arg(node.args, lambda a: env[a.name])
        kwargs = fx.node.map_arg(node.kwargs, lambda a: env[a.name])
        with torch.no_grad():
            v = node.target(*args, **kwargs)
    cache[node.name] = v
    return v


def _param_sources(node: fx.Node) -> set[str]:
    if node.op == "get_attr":
        return {str(node.target)}
    out: set[str] = set()
    for a in node.all_input_nodes:
        out |= _param_sources(a)
    return out


def _next_index(gm: fx.GraphModule) -> int:
    i = 0
    while hasattr(gm, f"_folded_{i}"):
        i += 1
    return i
