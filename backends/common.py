"""Helpers shared by the backends' lowering code (torch side)."""
from __future__ import annotations

import logging
import re
from typing import Any, Sequence

import numpy as np
import torch

from pared.ir.program import Graph

log = logging.getLogger("pared.backends")


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def io_spec(graph: Graph) -> tuple[list[dict], list[dict]]:
    """Manifest entries for a graph's inputs and outputs: name, dtype, shape (a str for a dynamic dim)."""
    inputs = []
    for name, ex, dims in zip(graph.input_names, graph.example_inputs, graph.dynamic_dims):
        dyn = dict(dims)
        inputs.append({"name": name, "dtype": dtype_name(ex),
                       "shape": [dyn.get(i, int(s)) for i, s in enumerate(ex.shape)],
                       "example_shape": [int(s) for s in ex.shape]})
    outs = graph.run(*graph.example_inputs)
    outputs = [{"name": n, "dtype": dtype_name(o), "shape": [int(s) for s in o.shape]}
               for n, o in zip(graph.output_names, outs)]
    return inputs, outputs


def dynamic_shapes_for(graph: Graph) -> tuple | None:
    """torch.export dynamic_shapes for re-tracing a captured graph, or None if static."""
    if not any(graph.dynamic_dims):
        return None
    dims: dict[str, Any] = {}
    spec = []
    for d in graph.dynamic_dims:
        spec.append({i: dims.setdefault(sym, torch.export.Dim.AUTO) for i, sym in d} or None)
    return tuple(spec)


def retrace(graph: Graph) -> "torch.export.ExportedProgram":
    """The graph as an ExportedProgram (what both exporters take)."""
    with torch.no_grad():
        return torch.export.export(graph.module, tuple(graph.example_inputs),
                                   dynamic_shapes=dynamic_shapes_for(graph), strict=False)


def decomposed_ops(ep: "torch.export.ExportedProgram", table: Any) -> list[str]:
    """The ops of `ep`'s graphs (subgraphs included) that the decomposition table `table` would
    rewrite. Where there are none, `ep.run_decompositions(table)` retraces the whole program
    (a functionalizing trace, about half of an ONNX export's time) only to give back the same
    ops: pared's graphs are decomposed to core ATen when captured (ir/capture.py), so the
    backends skip it then (ONNX Runtime: export_onnx; TVM: from_exported_program)."""
    found = set()
    for m in ep.graph_module.modules():
        if isinstance(m, torch.fx.GraphModule):
            for n in m.graph.nodes:
                if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload) and n.target in table:
                    found.add(str(n.target))
    return sorted(found)


def _nested_graphs(ep: "torch.export.ExportedProgram") -> bool:
    """Whether `ep` has nested graphs (control flow): a translator may edit their subgraphs in
    place, and a copy of the top graph would still share them, so such a program is retraced."""
    return any(isinstance(m, torch.fx.GraphModule) for _, m in ep.graph_module.named_children())


def needs_retrace(ep: "torch.export.ExportedProgram", table: Any) -> bool:
    """Whether a backend must decompose `ep` with `table` (a retrace) before translating it: when
    an op of it is in the table (`decomposed_ops`), or it has nested graphs."""
    return _nested_graphs(ep) or bool(decomposed_ops(ep, table))


def _squeeze_dims(graph: "torch.fx.Graph", node: "torch.fx.Node") -> bool:
    """Rewrite `aten.squeeze.dims(x, dims)` in place as torch's own decomposition of it
    (torch._refs.squeeze) gives on a static shape: the dims of size 1, canonicalized, as one
    `prims.squeeze(x, [d])` per dim from the last, or `prims.view_of(x)` where none is of size 1.
    False (nothing changed) where a squeezed dim's size is symbolic or x has no dims."""
    if len(node.args) != 2 or node.kwargs:
        return False
    x, dims = node.args
    val = x.meta.get("val") if isinstance(x, torch.fx.Node) else None
    if not isinstance(val, torch.Tensor) or val.dim() == 0:
        return False
    dims = [dims] if isinstance(dims, int) else list(dims)
    sizes = [val.shape[d % val.dim()] for d in dims]
    if not all(isinstance(s, int) for s in sizes):
        return False
    keep = sorted({d % val.dim() for d, s in zip(dims, sizes) if s == 1}, reverse=True)
    steps = [(torch.ops.prims.squeeze.default, ([d],)) for d in keep] or [(torch.ops.prims.view_of.default, ())]
    cur, cur_val = x, val
    with graph.inserting_before(node):
        for op, extra in steps:
            new = graph.call_function(op, (cur, *extra))
            new.meta = {k: v for k, v in node.meta.items() if k != "tensor_meta"}    # the last one's shape
            new.meta["val"] = op(cur_val, *extra)
            cur, cur_val = new, new.meta["val"]
    name = node.name
    node.replace_all_uses_with(cur)
    graph.erase_node(node)
    # the last node takes the replaced one's name (no other node can hold it: fx never reuses a
    # name), so the exported value keeps the name of the program's node, as the retrace names it
    cur.name = name
    graph._graph_namespace._rename_object(cur, name)
    return True


#: ops a backend's decomposition table may list that pared rewrites node by node, as that table's
#: decomposition would, instead of retracing the whole program for them (`local_decomposition`):
#: op -> rewrite(graph, node), False where it cannot (then the program is retraced)
LOCAL_DECOMPOSITIONS = {torch.ops.aten.squeeze.dims: _squeeze_dims}


def local_decomposition(ep: "torch.export.ExportedProgram", table: Any) -> "torch.fx.GraphModule | None":
    """A copy of `ep`'s graph module with the ops of `table` in it rewritten node by node
    (LOCAL_DECOMPOSITIONS), as `ep.run_decompositions(table)` would give them, without the
    retrace; None where the program needs the retrace: nested graphs, an op of `table` with no
    local rewrite, or a rewrite that cannot apply (a symbolic size). The program handed in is
    not changed (its graph is copied first)."""
    import copy
    if _nested_graphs(ep) or any(op not in {str(k) for k in LOCAL_DECOMPOSITIONS} for op in decomposed_ops(ep, table)):
        return None
    graph = copy.deepcopy(ep.graph)
    for node in list(graph.nodes):
        rewrite = LOCAL_DECOMPOSITIONS.get(node.target) if node.op == "call_function" else None
        if rewrite is not None and node.target in table and not rewrite(graph, node):
            return None
    graph.lint()
    return torch.fx.GraphModule(ep.graph_module, graph)


#: outputs whose RMS is below this are compared in absolute terms (rel L2 against this RMS): an
#: output that is zero up to float noise (a difference of two equal computations) has no scale
#: of its own; on an AVX2-only CPU expert_cache's drift outputs came out 5e-8 in torch and 7e-7 in
#: ORT, a "relative" error of 15
RMS_FLOOR = 1e-2


def compare(expected: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> dict:
    """Worst max-abs and relative-L2 error over outputs (relative to the norm of the output's
    finite values, or to an RMS of RMS_FLOOR for outputs smaller than that). Equal infinities
    agree; a NaN or an infinity where the other side differs is an error of inf."""
    worst_abs = 0.0
    worst_rel = 0.0
    for e, g in zip(expected, got):
        e = np.asarray(e, dtype=np.float64)
        g = np.asarray(g, dtype=np.float64)
        if e.shape != g.shape:
            return {"max_abs": float("inf"), "rel_l2": float("inf"), "shape_mismatch": [list(e.shape), list(g.shape)]}
        if e.size == 0:
            continue
        # equal values (equal infinities: a -inf attention mask) differ by 0; a NaN or an
        # infinity on one side only differs by inf (e - g would be NaN, which max() ignores)
        with np.errstate(invalid="ignore"):
            same = (e == g) | (np.isnan(e) & np.isnan(g))
            diff = np.where(same, 0.0, np.abs(e - g))
        diff = np.where(np.isnan(diff), np.inf, diff)
        worst_abs = max(worst_abs, float(np.max(diff)))
        finite = np.isfinite(e)
        denom = max(float(np.linalg.norm(e[finite])), RMS_FLOOR * float(np.sqrt(e.size)))
        err = float(np.linalg.norm(diff)) if np.all(np.isfinite(diff)) else float("inf")
        worst_rel = max(worst_rel, err / denom)
    return {"max_abs": worst_abs, "rel_l2": worst_rel}


def to_numpy(ts: Sequence[torch.Tensor]) -> list[np.ndarray]:
    return [t.detach().cpu().numpy() for t in ts]


#: a quantizer of the backend may round an element one step away from the reference where float
#: noise upstream (another summation order, another sin/cos) moves it across a rounding boundary:
#: measured up to 0.08% of a quantizer's elements (dit_mnist's first quantizer, behind the
#: timestep sinusoid); more than this share, or any element more than one step away, is a real
#: difference (a rounding rule off by half a step moves about half of them; saturation, many steps)
CODE_FLIP_SHARE = 1e-2


def _forced_ops() -> tuple[Any, Any]:
    """(quantized_decomposed.quantize_per_tensor, pared_quant.dynamic_linear or None)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)
    ns = getattr(torch.ops, "pared_quant", None)
    dyn = ns.dynamic_linear.default if ns is not None and hasattr(ns, "dynamic_linear") else None
    return torch.ops.quantized_decomposed.quantize_per_tensor.default, dyn


def forced_reference(gm: "torch.fx.GraphModule", inputs: Sequence[torch.Tensor],
                     backend_values: "dict[str, np.ndarray] | None" = None) -> tuple[tuple[torch.Tensor, ...], dict]:
    """Run `gm` (the graph as exported: `retrace(graph).module()`, whose node names the exported
    file's values carry) as the backends compute it, following the backend's own quantized values.

    Activation quantizers round as ONNX QuantizeLinear does, q = clamp(round_half_even(x / s)
    + z) with x / s an IEEE float32 division (torch's quantize_per_tensor rounds x * (1 / s)).
    Where `backend_values` holds a quantizer's codes (by fx node name), or a dynamic layer's
    input, the run compares its own value with the backend's and then continues with the
    backend's: a value float noise moved across a rounding boundary does not send the two runs
    apart, so what is left to compare is tight, and every difference is accounted for.

    Returns:
        (outputs, {"forced": values taken from the backend, "elements": quantized elements compared,
         "flips": elements one step apart, "worst_step": the largest |difference| in steps,
         "worst_node": the node it was at, "flip_share": the largest share of flipped elements at one node,
         "worst_input_rel_l2": the largest rel L2 of a dynamic layer's input})
    """
    import torch.fx as fx

    qpt, dyn = _forced_ops()
    forced = dict(backend_values or {})
    stats = {"forced": 0, "elements": 0, "flips": 0, "worst_step": 0, "worst_node": "", "flip_share": 0.0,
             "worst_input_rel_l2": 0.0}

    class _Interp(fx.Interpreter):
        def run_node(self, n):
            if n.op == "call_function" and n.target is qpt and not n.kwargs:
                x, scale, zp, qmin, qmax, dtype = self.map_nodes_to_values(n.args, n)
                q = torch.round(x.to(torch.float32) / torch.tensor(float(scale), dtype=torch.float32)) + int(zp)
                q = torch.clamp(q, qmin, qmax).to(dtype)
                theirs = forced.get(n.name)
                if theirs is None or tuple(theirs.shape) != tuple(q.shape):
                    return q
                step = (q.to(torch.int32) - torch.from_numpy(np.asarray(theirs)).to(torch.int32)).abs()
                flips, worst = int((step > 0).sum()), int(step.max()) if step.numel() else 0
                stats["forced"] += 1
                stats["elements"] += int(step.numel())
                stats["flips"] += flips
                stats["flip_share"] = max(stats["flip_share"], flips / max(step.numel(), 1))
                if worst > stats["worst_step"]:
                    stats["worst_step"], stats["worst_node"] = worst, n.name
                return torch.from_numpy(np.asarray(theirs).copy()).to(dtype)
            if dyn is not None and n.op == "call_function" and n.target is dyn:
                args = list(self.map_nodes_to_values(n.args, n))
                src = n.args[0].name if isinstance(n.args[0], fx.Node) else None
                theirs = forced.get(src) if src else None
                if theirs is not None and tuple(theirs.shape) == tuple(args[0].shape):
                    t = torch.from_numpy(np.asarray(theirs).copy())
                    denom = float(args[0].norm()) or 1.0
                    stats["worst_input_rel_l2"] = max(stats["worst_input_rel_l2"],
                                                      float((args[0] - t).norm()) / denom)
                    stats["forced"] += 1
                    args[0] = t
                return dyn(*args)
            return super().run_node(n)

    with torch.no_grad():
        out = _Interp(gm).run(*inputs)
    import torch.utils._pytree as pytree
    return tuple(pytree.tree_leaves(out)), stats


def forced_values(gm: "torch.fx.GraphModule") -> list[str]:
    """The fx node names `forced_reference` can take from a backend: each activation quantizer's
    codes and each dynamic layer's input."""
    import torch.fx as fx
    qpt, dyn = _forced_ops()
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target is qpt:
            out.append(n.name)
        elif dyn is not None and n.op == "call_function" and n.target is dyn and isinstance(n.args[0], fx.Node):
            out.append(n.args[0].name)
    return out


def with_forced_outputs(graph: Graph) -> tuple[Graph, list[str]]:
    """A copy of `graph` that also outputs the values forced_reference takes from a backend
    (forced_values: quantizer codes, dynamic layers' inputs), for backends whose compiled
    module cannot be asked for an intermediate value; returns it and those node names, in
    the order of the extra outputs."""
    gm = graph.copy_module()
    names = forced_values(gm)
    nodes = {n.name: n for n in gm.graph.nodes}
    out = next(n for n in gm.graph.nodes if n.op == "output")
    outs = out.args[0]
    outs = tuple(outs) if isinstance(outs, (tuple, list)) else (outs,)
    out.args = (outs + tuple(nodes[n] for n in names),)
    gm.recompile()
    return graph.with_module(gm, output_names=tuple(graph.output_names) + tuple(f"forced.{n}" for n in names)), names


def judge_forced(gm: "torch.fx.GraphModule", inputs: Sequence[torch.Tensor], theirs: dict, outputs: list,
                 shipped: list, quantized_values: int, limit: float) -> dict:
    """The lowering check of a quantized graph, for either backend: the fx graph run by
    forced_reference on the backend's own values `theirs` (by fx node name), compared with the
    backend's `outputs` of the build that exposed them, and those with the `shipped` build's.

    Returns:
        compare()'s figures, "check_vs_shipped", "codes" (forced_reference's statistics and
        `quantized_values`, how many values could be forced); rel_l2 = inf and "why" when a
        code is more than one step off, more than CODE_FLIP_SHARE of one quantizer's codes are
        off, a dynamic layer's input or the two builds differ by more than `limit`.
    """
    expected, stats = forced_reference(gm, inputs, theirs)
    err = compare(to_numpy(expected), outputs)
    err["check_vs_shipped"] = compare(outputs, shipped)["rel_l2"]
    err["codes"] = dict(stats, quantized_values=quantized_values)
    if stats["worst_step"] > 1 or stats["flip_share"] > CODE_FLIP_SHARE:
        err["why"] = (f"quantizer '{stats['worst_node']}' is {stats['worst_step']} steps from the reference "
                      f"({stats['flip_share']:.2%} of its elements differ at worst)")
    elif stats["worst_input_rel_l2"] > limit:
        err["why"] = f"a dynamic layer's input differs by rel L2 {stats['worst_input_rel_l2']:.3g}"
    elif err["check_vs_shipped"] > limit:
        err["why"] = (f"the build that also outputs the quantized values differs from the one that ships by "
                      f"rel L2 {err['check_vs_shipped']:.3g}")
    if "why" in err:
        err["rel_l2"] = float("inf")
    return err



# -- export failures -----------------------------------------------------------------------
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_TRANSLATING = re.compile(r"Error when translating node %(?P<node>[\w.]+)\s*:.*?target=(?P<target>[\w.:]+)", re.S)
_NO_FUNCTION = re.compile(r"No ONNX function found for <OpOverload\(op='(?P<op>[\w.:]+)', overload='(?P<ov>\w+)'\)>")


def plain(text: str) -> str:
    """`text` without terminal colour codes."""
    return _ANSI.sub("", text)


def where_in_model(graph: Graph, node_name: str | None, op: str | None) -> str:
    """Where a node of the captured graph comes from, for messages: its module path and the
    module's class with the file and line of its forward ("in blocks.0.attn (Attention.forward,
    attention.py:88)"); found by node name, else by op; "" when the captured graph has neither."""
    import inspect

    from pared.ir import meta
    nodes = list(graph.module.graph.nodes)
    node = next((n for n in nodes if node_name and n.name == node_name), None)
    if node is None and op:
        node = next((n for n in nodes if n.op == "call_function" and (
            str(n.target) in (op, f"{op}.default") or str(n.target).endswith(f".{op}"))), None)
    if node is None:
        return ""
    stack = node.meta.get(meta.TORCH_NN_MODULE_STACK) or {}
    if not stack:
        return f"node '{node.name}' of the captured graph, at the model's top level"
    path, cls = list(stack.values())[-1]
    if isinstance(cls, str):                    # "package.module.Class": the class, where importable
        import sys
        mod, _, qual = cls.rpartition(".")
        found = sys.modules.get(mod)
        cls = getattr(found, qual, cls) if found is not None else cls
    cls_name = getattr(cls, "__qualname__", None) or str(cls).rsplit(".", 1)[-1].strip("'>")
    src = ""
    if isinstance(cls, type) and hasattr(cls, "forward"):
        try:
            fn = inspect.unwrap(cls.forward)
            src = f", {inspect.getsourcefile(fn)}:{inspect.getsourcelines(fn)[1]}"
        except (OSError, TypeError):
            src = ""
    path = path.replace("L['self'].", "").replace("L__self__.", "") or "the model"
    return f"node '{node.name}' of the captured graph, in module '{path}' ({cls_name}.forward{src})"


def export_failure(e: BaseException, graph: Graph, name: str, exporter: str = "ONNX") -> str:
    """What went wrong when an exporter failed on graph `name`, as one message: the op the
    exporter has no translation for, the node, where in the user's model it comes from, and what
    to try; otherwise the exporter's own first line (colour codes removed)."""
    chain, c = [], e
    while c is not None and len(chain) < 12:
        chain.append(plain(str(c)))
        c = c.__cause__ or c.__context__
    text = "\n".join(chain)
    m_node, m_op = _TRANSLATING.search(text), _NO_FUNCTION.search(text)
    op = f"{m_op['op']}.{m_op['ov']}" if m_op else (m_node["target"] if m_node else None)
    node = m_node["node"] if m_node else None
    if op:
        where = where_in_model(graph, node, op)
        where = f"; it is {where}" if where else (
            f"; node '{node}' is not in the captured graph: the exporter's own decompositions made it" if node else "")
        return (f"graph '{name}': the {exporter} exporter has no translation for op '{op}'{where}. pared has none "
                f"either; express that computation with other torch ops, or try target 'tvm-cpu'")
    first = next((ln.strip() for ln in chain[0].splitlines() if ln.strip()), "")
    return (f"graph '{name}': {exporter} export failed: {type(e).__name__}: {first[:400]} (no single op named; "
            f"the cause chain follows this error); try target 'tvm-cpu'")
