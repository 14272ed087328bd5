"""Graph patterns passes and analyses match alike: the linear-layer matcher.

    Site         one matched linear layer, by node name
    find_sites   every linear layer of a graph whose weight is a 2-D float parameter

The quantization passes rewrite the layers find_sites returns, and the analyses
that measure them (quant_sensitivity, latency) enumerate the same layers, so the
matcher lives here, below both.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from . import meta
from .regions import node_module_path, region_of

_aten = torch.ops.aten
#: the transposes torch.export leaves between a Linear's [N, K] weight and its matmul
TRANSPOSES = frozenset({_aten.permute.default, _aten.t.default, _aten.transpose.int})
#: shape-only ops that keep a tensor's shape (or only restore it)
SAME_SHAPE = frozenset({_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default})
#: the expand a bmm's broadcast weight goes through
EXPANDS = frozenset({_aten.expand.default})
#: nodes created by these passes are not layers: quantize_linears' float matmuls for
#: outlier channels (they carry its name under meta.CREATED_BY)
NOT_LAYERS_CREATED_BY = ("quantize_linears",)


@dataclass(frozen=True)
class Site:
    """A matched linear layer, by node name."""
    node: str            # the matmul (addmm / mm / bmm)
    out: str             # the node whose value the quantized layer replaces (the matmul, or its bias add)
    x: str               # its float activation input ([M, K], or [B, S, K] for a batched matmul)
    weight: str          # get_attr target of the float weight
    bias: str | None     # get_attr target of the float bias [N]
    transposed: bool     # the weight is [N, K] behind a transpose (nn.Linear) rather than [K, N]
    out_shape: tuple[int, ...] | None  # a batched matmul's output shape (None: 2-D)
    region: str
    regions: tuple[str, ...]  # every module path on its stack, outermost first


def param_node(n: object) -> fx.Node | None:
    """`n` when it is a get_attr node (a parameter or buffer), else None."""
    return n if isinstance(n, fx.Node) and n.op == "get_attr" else None


def float_value(n: fx.Node) -> torch.Tensor | None:
    """The float32 example value torch.export recorded for `n` (None: another dtype or none)."""
    v = n.meta.get("val")
    return v if isinstance(v, torch.Tensor) and v.dtype == torch.float32 else None


def through(n: object, ops: frozenset | set) -> object:
    """`n` with the shape-only ops in `ops` above it skipped (when they keep its shape
    or only add the batch dim a bmm broadcasts over)."""
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in ops:
        n = n.args[0]
    return n


def find_sites(gm: fx.GraphModule, batched: bool = True) -> list[Site]:
    """Every linear layer whose weight is a 2-D float parameter (behind a transpose,
    as nn.Linear exports, or used directly as [K, N]):
        addmm(b, x, W^T) and mm(x, W^T)                          x: [M, K]
        bmm(x, expand(W^T)) (-> view) (+ b)                      x: [B, S, K]
    the batched form is what a Linear on a non-contiguous 3-D input exports to; it is
    matched only when `batched` (static shapes: its rewrite restores the output shape).
    The float matmuls quantize_linears inserts for outlier channels are not layers: skipped.

    Args:
        gm: the graph to search.
        batched: also match the batched (bmm) form.

    Returns:
        The layers in graph order.
    """
    sites = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.kwargs or n.meta.get(meta.CREATED_BY) in NOT_LAYERS_CREATED_BY:
            continue
        if n.target is _aten.addmm.default:
            bias, x, w = n.args[:3]
        elif n.target is _aten.mm.default:
            bias, (x, w) = None, n.args[:2]
        elif n.target is _aten.bmm.default and batched:
            bias, x, w = None, through(n.args[0], SAME_SHAPE), through(n.args[1], SAME_SHAPE | EXPANDS)
        else:
            continue
        rank = 3 if n.target is _aten.bmm.default else 2
        if not isinstance(x, fx.Node) or param_node(x) is not None or float_value(x) is None or \
                x.meta["val"].dim() != rank:
            continue
        transposed = False
        if isinstance(w, fx.Node) and w.op == "call_function" and w.target in TRANSPOSES:
            dims = w.args[1:] if w.target is not _aten.t.default else ((1, 0),)
            if w.target is _aten.permute.default and list(dims[0]) != [1, 0]:
                continue
            w, transposed = w.args[0], True
        wp = param_node(w)
        if wp is None or float_value(wp) is None or wp.meta["val"].dim() != 2:
            continue
        n_out = int(wp.meta["val"].shape[0 if transposed else 1])
        out, out_shape = n, None
        if rank == 3:
            out_shape = tuple(int(d) for d in n.meta["val"].shape)
            out, bias = _bias_add(n, n_out)
        bp = None
        if bias is not None:
            bp = param_node(bias)
            bv = float_value(bp) if bp is not None else None
            if bv is None or tuple(bv.shape) != (n_out,):
                continue           # a broadcast or computed bias: not the form QGemm takes
        stack = node_module_path(n)
        sites.append(Site(n.name, out.name, x.name, str(wp.target), str(bp.target) if bp is not None else None,
                          transposed, out_shape, region_of(n), tuple(p for p, _ in stack)))
    return sites


def _bias_add(mm: fx.Node, n_out: int) -> tuple[fx.Node, fx.Node | None]:
    """(the node the layer ends at, its bias parameter): `mm -> view -> add(., b[N])`, or (mm, None)."""
    view = next(iter(mm.users)) if len(mm.users) == 1 else None
    if view is None or view.op != "call_function" or view.target not in SAME_SHAPE or len(view.users) != 1:
        return mm, None
    add = next(iter(view.users))
    if add.op != "call_function" or add.target is not _aten.add.Tensor or len(add.args) != 2 or add.kwargs:
        return mm, None
    other = add.args[1] if add.args[0] is view else add.args[0]
    p = param_node(other)
    if p is None or float_value(p) is None or tuple(p.meta["val"].shape) != (n_out,) or \
            tuple(add.meta["val"].shape) != tuple(view.meta["val"].shape):
        return mm, None
    return add, p
