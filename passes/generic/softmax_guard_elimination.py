"""Replace a guarded ("safe") softmax by a plain one where no softmax row can be all -inf.

torch decomposes scaled_dot_product_attention (and aten._safe_softmax) into a
softmax plus a guard for fully masked rows: rows whose scores are all -inf get
zeros instead of NaN. The guard reads and writes every attention score (ONNX:
Equal, Not, ReduceMax/Cast, Not, Where), about a tenth of an INT8 encoder's time.

Before:  s = aten._softmax(x, -1); e = aten.eq(x, -inf); a = aten.any(aten.logical_not(e), -1, True)
         y = aten.where(aten.logical_not(a), aten.full_like(s, 0), s)
         (or y = aten._safe_softmax(x, -1))
After:   y = aten._softmax(x, -1)            # where x provably has no all -inf row
Reads: nothing. Writes: `pared.ir.created_by` on the softmax nodes it creates
(for _safe_softmax); no records.
Invariant: outputs are unchanged bit for bit on every input the analysis covers.
The proof is a forward "may be non-finite" analysis over the graph, on a
three-point lattice: finite < row_safe (may hold -inf, never a whole softmax row,
by the `assume_mask_keeps_a_key` contract) < unknown. Integer and bool values,
parameters and buffers whose values are finite, and finite literals are finite;
ops on an allow-list (linear algebra, add/sub/mul, views, casts, norms, gelu/silu/
tanh, embedding, softmax, where over finite branches...) keep finiteness, as do x^k for
a natural k, sqrt of a value nonnegative by construction, and rsqrt of one at least a
literal eps > 0 (RMSNorm's rsqrt(mean(x^2) + eps)); a literal inf/nan (masked_fill/full/where/scalar_tensor with -inf), log, division
by a tensor and any op not on the list make a value unknown, except that a value
computed from constants alone (a timestep embedding's exp(arange)) is evaluated
and checked when small. Overflow of finite arithmetic
(a matmul reaching inf) is not modelled: such a row would be NaN with or without
the guard unless every score overflowed to -inf.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from pared.ir import meta
from pared.ir.program import Program, get_attr
from pared.ir.rewrite import eliminate_dead_code
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, RewritePass, register_pass

_aten = torch.ops.aten

FINITE, ROW_SAFE, UNKNOWN = 0, 1, 2

#: ops whose result is finite when every tensor and scalar input is (same lattice
#: value as the worst input, since they move or combine values without creating
#: inf from finite ones, overflow aside). Packets: every overload counts.
_KEEP = {
    # views, layout and copies
    "view", "reshape", "_unsafe_view", "permute", "transpose", "t", "expand", "expand_as", "unsqueeze", "squeeze",
    "slice", "select", "alias", "clone", "contiguous", "detach", "lift_fresh_copy", "_to_copy", "to", "type_as",
    "flatten", "unflatten", "cat", "stack", "split", "split_with_sizes", "chunk", "unbind", "narrow", "repeat",
    "index", "index_select", "gather", "embedding", "roll", "flip", "pixel_shuffle", "pixel_unshuffle",
    "constant_pad_nd", "pad", "dropout", "native_dropout", "_assert_tensor_metadata",
    # arithmetic and linear algebra
    "add", "sub", "rsub", "mul", "neg", "abs", "mm", "bmm", "addmm", "baddbmm", "matmul", "linear", "einsum",
    "convolution", "conv2d", "conv1d", "sum", "mean", "amax", "amin", "max", "min", "clamp", "clamp_min",
    "clamp_max", "relu", "gelu", "silu", "tanh", "sigmoid", "hardtanh", "hardswish", "hardsigmoid", "erf",
    "sin", "cos", "native_layer_norm", "layer_norm", "native_group_norm", "group_norm",
    "_native_batch_norm_legit_no_training", "avg_pool2d", "max_pool2d", "max_pool2d_with_indices",
    "adaptive_avg_pool2d", "upsample_nearest2d", "upsample_bilinear2d", "_softmax", "softmax", "_safe_softmax", "where",
    "masked_fill", "fill", "full_like", "zeros_like", "ones_like", "scalar_tensor", "full", "zeros", "ones",
    "arange", "new_zeros", "new_ones", "new_full",
}
#: ops whose values come from their (finite) scalar arguments, not from their tensor input
_FACTORY_LIKE = {"full_like", "zeros_like", "ones_like", "new_zeros", "new_ones", "new_full"}
#: ops that carry a row_safe value through unchanged (shape moves, copies, adding a finite tensor)
_ROW_SAFE_THROUGH = {
    "view", "reshape", "_unsafe_view", "permute", "transpose", "expand", "unsqueeze", "squeeze", "alias",
    "clone", "contiguous", "detach", "_to_copy", "to", "type_as", "add", "_assert_tensor_metadata",
}
_GETITEM = operator.getitem


@dataclass(frozen=True)
class _Fact:
    level: int
    why: str = ""   # the first node that made the value non-finite (for stats and debug logs)


@register_pass("softmax_guard_elimination")
class EliminateSoftmaxGuards(RewritePass):
    """Drop the fully-masked-row guard of softmaxes whose rows provably hold a finite value."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        # float graph inputs are taken as finite: the guard only matters for -inf masks,
        # which models build inside the graph (masked_fill / where with -inf)
        assume_finite_inputs: bool = True
        # a -inf mask built as where(mask, finite, -inf) (or masked_fill) keeps at least one
        # key per softmax row (true for tokenizer attention masks: [CLS] is always kept). Off
        # by default: with it, an all-padding row gives NaN where the guard gave zeros
        assume_mask_keeps_a_key: bool = False

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        new_graphs = {}
        stats = {"simplified": 0, "kept_inf_constant": 0, "kept_unknown_op": 0, "kept_float_input": 0}
        for name, g in program.graphs.items():
            guards = _find_guards(g.module)
            if not guards:
                new_graphs[name] = g
                continue
            facts = _analyze(g.module, self.options)
            proven = []
            for out_name, x_name in guards:
                fact = facts[x_name]
                if fact.level in (FINITE, ROW_SAFE):
                    proven.append(out_name)
                    continue
                key = "kept_float_input" if fact.why.startswith("input") else (
                    "kept_inf_constant" if fact.why.startswith("non-finite constant") else "kept_unknown_op")
                stats[key] += 1
                ctx.log.debug("softmax_guard_elimination: %s/%s keeps its guard: scores %s may be all -inf (%s)",
                              name, out_name, x_name, fact.why)
            if not proven:
                new_graphs[name] = g
                continue
            gm = g.copy_module()
            by_name = {n.name: n for n in gm.graph.nodes}
            for out_name in proven:
                _replace(gm, by_name[out_name], self.name)
            eliminate_dead_code(gm)
            gm.recompile()
            stats["simplified"] += len(proven)
            new_graphs[name] = g.with_module(gm)
        kept = stats["kept_inf_constant"] + stats["kept_unknown_op"] + stats["kept_float_input"]
        ctx.log.info("softmax_guard_elimination: %d guard(s) removed, %d kept", stats["simplified"], kept)
        if stats["simplified"] == 0:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats=stats)
        return PassResult(program.replace(graphs=new_graphs), modified=True, stats=stats)


# -- finding the guards --------------------------------------------------------
def _is(node: object, *targets: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _dim(dim: int, node: fx.Node) -> int:
    val = node.meta.get("val")
    rank = val.dim() if isinstance(val, torch.Tensor) else None
    return dim % rank if rank and dim < 0 else dim


def _zero_fill(node: object) -> bool:
    if _is(node, _aten.full_like.default):
        return node.args[1] == 0
    if _is(node, _aten.zeros_like.default):
        return True
    return _is(node, _aten.scalar_tensor.default) and node.args[0] == 0


def _guard_of(where: fx.Node) -> str | None:
    """For y = where(all_neg_inf(x, dim), 0, _softmax(x, dim)), the name of x; else None."""
    if not _is(where, _aten.where.self) or len(where.args) != 3:
        return None
    cond, zero, sm = where.args
    if not _zero_fill(zero) or not _is(sm, _aten._softmax.default):
        return None
    x, dim = sm.args[0], sm.args[1]
    # cond = not(any(not(eq(x, -inf)), dim, keepdim))   (torch's _safe_softmax decomposition)
    # or     all(eq(x, -inf), dim, keepdim)
    if _is(cond, _aten.logical_not.default) and _is(cond.args[0], _aten.any.dim, _aten.any.dims):
        red = cond.args[0]
        inner = red.args[0]
        if not _is(inner, _aten.logical_not.default):
            return None
        eq = inner.args[0]
    elif _is(cond, _aten.all.dim, _aten.all.dims):
        red = cond
        eq = red.args[0]
    else:
        return None
    if not _is(eq, _aten.eq.Scalar) or eq.args[0] is not x or eq.args[1] != -math.inf:
        return None
    rdim = red.args[1] if len(red.args) > 1 else red.kwargs.get("dim")
    rdims = tuple(rdim) if isinstance(rdim, (list, tuple)) else (rdim,)
    if len(rdims) != 1 or _dim(rdims[0], x) != _dim(dim, x):
        return None
    return x.name


def _find_guards(gm: fx.GraphModule) -> list[tuple[str, str]]:
    """(guarded output node, softmax input node) for every guarded softmax in `gm`."""
    out = []
    for n in gm.graph.nodes:
        if _is(n, _aten._safe_softmax.default):
            if len(n.args) < 3 or n.args[2] is None:
                out.append((n.name, n.args[0].name))
            continue
        x = _guard_of(n)
        if x is not None:
            out.append((n.name, x))
    return out


def _replace(gm: fx.GraphModule, node: fx.Node, by: str) -> None:
    if _is(node, _aten._safe_softmax.default):
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(_aten._softmax.default, (node.args[0], node.args[1], False))
        new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")})
        new.meta[meta.CREATED_BY] = by
        node.replace_all_uses_with(new)
    else:
        node.replace_all_uses_with(node.args[2])  # the plain _softmax the guard wrapped


# -- the analysis --------------------------------------------------------------
def _packet(node: fx.Node) -> str:
    t = node.target
    if hasattr(t, "_overloadpacket"):
        return t._overloadpacket.__name__
    return getattr(t, "__name__", str(t))


def _not_float(node: fx.Node) -> bool:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return not val.dtype.is_floating_point and not val.dtype.is_complex
    if isinstance(val, (tuple, list)) and val and all(isinstance(v, torch.Tensor) for v in val):
        return all(not v.dtype.is_floating_point and not v.dtype.is_complex for v in val)
    # a symbolic size (aten.sym_size of a dynamic dim) is an integer too
    return isinstance(val, (bool, int, torch.SymInt, torch.SymBool))


def _scalars_finite(node: fx.Node) -> bool:
    def ok(a: object) -> bool:
        if isinstance(a, float):
            return math.isfinite(a)
        if isinstance(a, (list, tuple)):
            return all(ok(x) for x in a)
        return True
    return ok(node.args) and ok(tuple(node.kwargs.values()))


#: a value computed from constants alone, by an op off the allow-list, is evaluated and
#: checked when it holds at most this many elements (a timestep embedding's frequencies)
CONST_EVAL_NUMEL = 1 << 20


def _analyze(gm: fx.GraphModule, opts: "EliminateSoftmaxGuards.Options") -> dict[str, _Fact]:
    facts: dict[str, _Fact] = {}
    const: set[str] = set()          # nodes that read no graph input: their values can be computed here
    values: dict[str, object] = {}
    for n in gm.graph.nodes:
        if n.op == "output":
            continue
        if n.op == "get_attr" or (n.op == "call_function" and not n.is_impure()
                                   and all(a.name in const for a in n.all_input_nodes)):
            const.add(n.name)
        fact = _transfer(gm, n, facts, opts)
        if fact.level == UNKNOWN and n.name in const and n.op == "call_function":
            fact = _evaluate_const(gm, n, values, fact)
        facts[n.name] = fact
    return facts


def _evaluate_const(gm: fx.GraphModule, n: fx.Node, values: dict[str, object], fact: _Fact) -> _Fact:
    """The fact of a constant-only node from its computed value (`fact` when too large or not computable)."""
    val = n.meta.get("val")
    if not isinstance(val, torch.Tensor) or val.numel() > CONST_EVAL_NUMEL:
        return fact

    def value(a: fx.Node) -> object:
        if a.name not in values:
            if a.op == "get_attr":
                values[a.name] = get_attr(gm, str(a.target))
            else:
                args = fx.node.map_arg(a.args, value)
                kwargs = fx.node.map_arg(a.kwargs, value)
                with torch.no_grad():
                    values[a.name] = a.target(*args, **kwargs)
        return values[a.name]
    try:
        v = value(n)
    except Exception:  # an op that does not run eagerly here: keep the conservative answer
        return fact
    if isinstance(v, torch.Tensor) and (not v.is_floating_point() or bool(torch.isfinite(v).all())):
        return _Fact(FINITE)
    return fact


def _transfer(gm: fx.GraphModule, n: fx.Node, facts: dict[str, _Fact],
              opts: "EliminateSoftmaxGuards.Options") -> _Fact:
    # integer and bool values cannot hold inf, whatever produced them
    if n.op != "get_attr" and _not_float(n):
        return _Fact(FINITE)
    if n.op == "placeholder":
        return _Fact(FINITE) if opts.assume_finite_inputs else _Fact(UNKNOWN, f"input {n.name}")
    if n.op == "get_attr":
        v = get_attr(gm, str(n.target))
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            return _Fact(UNKNOWN, f"non-finite constant {n.name}")
        return _Fact(FINITE)
    if n.op != "call_function":
        return _Fact(UNKNOWN, f"unknown op {n.format_node()}")
    ins = [facts[a.name] for a in n.all_input_nodes]
    worst = max(ins, key=lambda f: f.level, default=_Fact(FINITE))
    if n.target is _GETITEM:
        return worst
    name = _packet(n)
    if not _scalars_finite(n):
        # a literal inf: a -inf mask is row_safe under the contract when it only
        # fills the positions a bool mask selects and the other branch is finite
        if opts.assume_mask_keeps_a_key and worst.level == FINITE and _mask_fill(n):
            return _Fact(ROW_SAFE, f"-inf mask {n.name}")
        return _Fact(UNKNOWN, f"non-finite constant {n.name}")
    if name == "div" and len(ins) == 1 and n.args[0] is not None and isinstance(n.args[1], (int, float)) \
            and n.args[1] != 0:
        # division by a finite nonzero literal is a multiplication by its inverse
        return worst if worst.level != ROW_SAFE or n.args[1] > 0 else _Fact(UNKNOWN, worst.why)
    if name == "pow" and worst.level == FINITE and len(ins) == 1 and n.args[0] is not None and \
            _natural(n.args[1]):
        # x^k for a natural k is repeated multiplication (RMSNorm's x^2)
        return _Fact(FINITE)
    if name in ("rsqrt", "sqrt") and worst.level == FINITE and len(ins) == 1 and \
            (_at_least_eps(n.args[0]) if name == "rsqrt" else _nonnegative(n.args[0])):
        # RMSNorm's x * rsqrt(mean(x^2) + eps): 1 / sqrt of a value >= eps > 0 is finite
        return _Fact(FINITE)
    if name not in _KEEP:
        return _Fact(UNKNOWN, f"unknown op {n.format_node()}")
    if name in _FACTORY_LIKE:
        return _Fact(FINITE)  # reads only the shape of its input; its scalars are finite
    if worst.level == FINITE:
        return _Fact(FINITE)
    if worst.level == ROW_SAFE:
        if name == "where" and len(n.args) == 3:
            # where(cond, a, b) with a -inf literal branch and a finite other branch
            a, b = (facts[x.name] if isinstance(x, fx.Node) else _Fact(FINITE) for x in n.args[1:])
            if max(a.level, b.level) == ROW_SAFE and _is_mask_cond(n.args[0]):
                return _Fact(ROW_SAFE, worst.why)
        if name in _ROW_SAFE_THROUGH and not (name == "add" and sum(f.level == ROW_SAFE for f in ins) > 1):
            return worst
        if name in ("mul", "div") and len(ins) == 1 and isinstance(n.args[1], (int, float)) and n.args[1] > 0:
            return worst
        if name in ("_softmax", "softmax", "_safe_softmax"):
            return _Fact(FINITE)  # some key per row is finite: every probability is
    return _Fact(UNKNOWN, worst.why)


def _natural(k: object) -> bool:
    """Whether `k` is a literal integer >= 0 (an int, or a float with an integer value)."""
    return isinstance(k, (int, float)) and not isinstance(k, bool) and math.isfinite(k) and \
        float(k).is_integer() and k >= 0


def _nonnegative(v: object) -> bool:
    """Whether `v` is >= 0 by construction: x^k for an even integer k, |x|, x * x, or a
    sum / mean of such values (what RMSNorm's variance is built from)."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return v >= 0
    if not isinstance(v, fx.Node) or v.op != "call_function":
        return False
    name = _packet(v)
    if name == "pow" and len(v.args) == 2 and _natural(v.args[1]):
        return int(v.args[1]) % 2 == 0
    if name == "abs":
        return True
    if name == "mul" and len(v.args) == 2:
        return v.args[0] is v.args[1] or all(_nonnegative(a) for a in v.args)
    if name in ("mean", "sum", "_to_copy", "clone", "alias", "view", "_unsafe_view", "expand") and v.args:
        return _nonnegative(v.args[0])
    if name == "add" and len(v.args) == 2:
        return all(_nonnegative(a) for a in v.args)
    return False


def _at_least_eps(v: object) -> bool:
    """Whether `v` is >= some literal c > 0 by construction: a nonnegative value plus c."""
    if not isinstance(v, fx.Node) or v.op != "call_function" or _packet(v) != "add" or len(v.args) != 2:
        return False
    a, b = v.args
    val = v.meta.get("val")
    dtype = val.dtype if isinstance(val, torch.Tensor) else torch.float32

    def lit(x: object) -> bool:       # > 0 also once rounded to the sum's dtype (no underflow to 0)
        return isinstance(x, (int, float)) and not isinstance(x, bool) and x > 0 and \
            bool(torch.tensor(x, dtype=dtype) > 0)
    return (lit(b) and _nonnegative(a)) or (lit(a) and _nonnegative(b))


def _is_mask_cond(c: object) -> bool:
    return isinstance(c, fx.Node) and _not_float(c)


def _mask_fill(n: fx.Node) -> bool:
    """where(bool_mask, finite, -inf) / where(bool_mask, -inf, finite) / masked_fill(x, bool_mask, -inf)
    / scalar_tensor(-inf) feeding such a where: the -inf only lands where a bool mask says."""
    name = _packet(n)
    if name == "scalar_tensor":
        return all(_is(u, _aten.where.self) and u.args[0] is not n for u in n.users)
    if name == "masked_fill" and len(n.args) == 3:
        return n.args[2] == -math.inf
    if name == "where" and len(n.args) == 3:
        return isinstance(n.args[0], fx.Node) and _not_float(n.args[0])
    return False
