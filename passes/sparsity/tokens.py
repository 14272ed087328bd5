"""The token axis through a captured graph: the machinery the token passes share (token_merge,
token_prune; sparse_attention reads constants with it).

A transformer's blocks are found as the outermost module holding one attention softmax
(`find_blocks`); a block's residual adds (`residual_add`, `second_residual`) are where tokens
can be merged or dropped. From a seed value ([batch, tokens, ...]) `follow_tokens` follows the
token axis through every later op: which dims of each value carry the token count (TOK) and
the batch (BATCH) as symbolic atoms (`Atoms`), the reads of single tokens after the blocks, and
the values from before the seed that later ops combine with the token axis (`Atoms.conflicts`,
an attention mask over the old count). An op not known to act per token raises `NotPerToken`,
naming the node. After a pass splices its rewrite in (`splice_in`, tagging the new nodes with
the pass and the block's region), `finish` re-sizes every view / reshape / expand downstream
for the new token count (`resize`; conflicts go to the pass's handler), drops the dead nodes,
recomputes every value's shape (`revalue`) and checks that the graph's outputs kept theirs.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from pared.ir import meta
from pared.ir.errors import OptionError, PassError
from pared.ir.program import Graph, Program, get_attr
from pared.ir.regions import match, node_module_path
from pared.ir.rewrite import eliminate_dead_code, splice

_aten = torch.ops.aten
#: the symbolic atoms of a dim: the token count (changes at each merge) and the batch
TOK, BATCH = "N", "B"


def graph_names(program: Program, patterns: Sequence[str], who: str) -> list[str]:
    """The graphs a token pass rewrites: those the plan calls (every graph without a plan)
    matching option `graphs`' patterns (all when none); a pattern matching nothing is an error."""
    names = program.called_graphs() or list(program.graphs)
    for pat in patterns:
        if not any(match(pat, n) for n in names):
            raise OptionError(f"pass '{who}': option 'graphs': {pat!r} matches none of the program's graphs {names}")
    return [n for n in names if any(match(p, n) for p in patterns)] if patterns else names


# -- the token axis through the graph ----------------------------------------------------------
class NotPerToken(Exception):
    """An op reads the token axis in a way token merging would change the meaning (or shape) of."""

    def __init__(self, node: fx.Node, why: str):
        super().__init__(f"{why} ({node.format_node()})")
        self.node = node


class _Multi(tuple):
    """The dims of each output of a multi-output op (native_layer_norm, max.dim, split, ...)."""


def _shape(v: Any) -> tuple[int, ...] | None:
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def val_shape(n: Any) -> tuple[int, ...] | None:
    return _shape(n.meta.get("val")) if isinstance(n, fx.Node) else None


def _ints(size: int) -> tuple:
    return () if size == 1 else (int(size),)


def packet(node: fx.Node) -> str:
    t = node.target
    if t is operator.getitem:
        return "getitem"
    name = getattr(getattr(t, "overloadpacket", None), "__name__", None) or getattr(t, "__name__", str(t))
    return name.split(".")[-1]


def namespace(node: fx.Node) -> str:
    return getattr(node.target, "namespace", "aten")


#: ops that act per element (with numpy broadcasting): per token wherever the token axis sits;
#: softmax over the key axis is attention's own normalization
_ELEMENTWISE = {
    "add", "sub", "rsub", "mul", "div", "neg", "abs", "exp", "log", "sqrt", "rsqrt", "pow", "reciprocal", "square",
    "gelu", "relu", "silu", "tanh", "sigmoid", "erf", "sin", "cos", "hardtanh", "hardswish", "hardsigmoid",
    "leaky_relu", "elu", "mish", "softplus", "clamp", "clamp_min", "clamp_max", "maximum", "minimum", "round",
    "clone", "contiguous", "alias", "detach", "_to_copy", "to", "type_as", "lift_fresh_copy", "dropout",
    "where", "masked_fill", "eq", "ne", "lt", "le", "gt", "ge", "logical_not", "logical_and", "logical_or",
    "bitwise_not", "full_like", "zeros_like", "ones_like", "empty_like", "fill",
    "_softmax", "softmax", "_safe_softmax", "_log_softmax", "log_softmax",
    # quantize_linears' per-tensor / per-channel quantizers (per element, scales fixed)
    "quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel", "dequantize_per_channel",
}
VIEWS = {"view", "reshape", "_unsafe_view"}
#: reductions: (position of dim, position of keepdim) in args
_REDUCE = {"sum": (1, 2), "mean": (1, 2), "amax": (1, 2), "amin": (1, 2), "any": (1, 2), "all": (1, 2),
           "max": (1, 2), "min": (1, 2), "argmax": (1, 2), "argmin": (1, 2), "var": (1, None),
           "linalg_vector_norm": (2, 3), "logsumexp": (1, 2)}
#: pared's row-wise layers ([..., K] -> [..., N], per row): quantize_linears' dynamic mode
ROWWISE = {("pared_quant", "dynamic_linear")}
SOFTMAX = {_aten._softmax.default, _aten._safe_softmax.default, _aten.softmax.int}


@dataclass
class Atoms:
    """Which dims of each value carry the token axis (propagated from the first block's input).

    dims[node]: per dim a tuple of atoms whose product is the dim's size: TOK (the token count),
    BATCH, or an int; () for a size-1 dim. Only values that carry TOK are listed.
    conflicts[node]: an elementwise op that combines a token-axis value with a fixed tensor
    spanning that axis (an attention mask over the old token count).
    reads[node]: the highest token index a select / leading slice reads (it must stay in place).
    """
    n0: int
    b0: int
    dims: dict
    conflicts: dict
    reads: dict

    def size(self, dim: tuple, n: int) -> int:
        return math.prod(n if a == TOK else self.b0 if a == BATCH else a for a in dim)

    def sizes(self, node: fx.Node, n: int) -> list[int]:
        return [self.size(d, n) for d in self.dims[node]]


def follow_tokens(gm: fx.GraphModule, seed: fx.Node, n0: int, b0: int, at: Atoms | None = None,
                   within: set | None = None) -> Atoms:
    """Propagate the token axis of `seed` ([batch, tokens, channels]) through the graph (only
    through the nodes `within`, when given; into `at`, when given).

    Raises:
        NotPerToken: an op that reads the token axis other than per token.
    """
    x_shape = val_shape(seed)
    if at is None:
        at = Atoms(n0, b0, {}, {}, {})
    at.dims[seed] = ((BATCH,), (TOK,), _ints(x_shape[2]))
    started = False
    for node in gm.graph.nodes:
        if node is seed:
            started = True
            continue
        if not started or node.op != "call_function" or within is not None and node not in within:
            continue
        if not any(a in at.dims for a in node.all_input_nodes):
            continue
        out = _rule(node, at)
        if out is not None and (isinstance(out, _Multi) or any(TOK in d for d in out)):
            at.dims[node] = out
    return at


def has_tok(dims: Any) -> bool:
    return dims is not None and not isinstance(dims, _Multi) and any(TOK in d for d in dims)


def _dims_of(a: Any, at: Atoms) -> tuple | None:
    """The dims of a tensor argument: its atoms, or plain ints for a value without the token axis."""
    if a in at.dims:
        d = at.dims[a]
        return None if isinstance(d, _Multi) else d
    s = val_shape(a)
    return None if s is None else tuple(_ints(x) for x in s)


def _rule(node: fx.Node, at: Atoms) -> Any:
    """The dims of `node`'s value(s), given its inputs' (see follow_tokens)."""
    name, ns = packet(node), namespace(node)
    out_shape = val_shape(node)
    args = node.args
    x = args[0] if args else None
    xd = at.dims.get(x) if isinstance(x, fx.Node) else None
    if name == "getitem":
        multi = at.dims.get(x)
        return multi[args[1]] if isinstance(multi, _Multi) else None
    if ns == "aten" and name in _ELEMENTWISE or ns == "quantized_decomposed" and name in _ELEMENTWISE:
        return _broadcast(node, out_shape, at)
    if (ns, name) in ROWWISE:
        _no_tok(node, xd[-1:], "a row-wise layer over the token axis")
        return xd[:-1] + (_ints(out_shape[-1]),)
    if name in VIEWS:
        got = _view(list(xd), out_shape, at)
        if got is None:
            raise NotPerToken(node, "a reshape that splits or reorders the token axis")
        return got
    if name == "permute":
        perm = [p % len(xd) for p in args[1]]
        return tuple(xd[p] for p in perm)
    if name == "transpose":
        d0, d1 = args[1] % len(xd), args[2] % len(xd)
        dims = list(xd)
        dims[d0], dims[d1] = dims[d1], dims[d0]
        return tuple(dims)
    if name == "t":
        return tuple(reversed(xd))
    if name == "unsqueeze":
        d = args[1] % (len(xd) + 1)
        return xd[:d] + ((),) + xd[d:]
    if name == "squeeze":
        in_shape = val_shape(x)
        ds = range(len(xd)) if len(args) < 2 else ([args[1]] if isinstance(args[1], int) else args[1])
        drop = {d % len(xd) for d in ds if in_shape[d % len(xd)] == 1}
        return tuple(d for i, d in enumerate(xd) if i not in drop)
    if name == "expand":
        in_shape = val_shape(x)
        lead = len(out_shape) - len(in_shape)
        return tuple(xd[j - lead] if j >= lead and in_shape[j - lead] == s else _ints(s)
                     for j, s in enumerate(out_shape))
    if name in ("mm", "addmm", "bmm", "baddbmm"):
        return _matmul(node, name, at)
    if name == "native_layer_norm":
        k = len(args[1])
        _no_tok(node, xd[-k:], "a normalization over the token axis")
        stat = xd[:-k] + ((),) * k
        return _Multi((xd, stat, stat))
    if name in _REDUCE:
        return _reduce(node, name, xd, at)
    if name == "select":
        d = args[1] % len(xd)
        if TOK in xd[d]:
            if xd[d] != (TOK,):
                raise NotPerToken(node, f"selects token {args[2]} of a reshaped token axis")
            at.reads[node] = args[2]         # negative: from the end (checked by the pass)
        return xd[:d] + xd[d + 1:]
    if name == "slice":
        d = (args[1] if len(args) > 1 else 0) % len(xd)
        if TOK not in xd[d]:
            return xd[:d] + (_ints(out_shape[d]),) + xd[d + 1:]
        start = args[2] if len(args) > 2 and args[2] is not None else 0
        end = args[3] if len(args) > 3 and args[3] is not None else at.n0
        step = args[4] if len(args) > 4 else 1
        if xd[d] != (TOK,) or step != 1 or start < 0 or end < 0:
            raise NotPerToken(node, "a strided or negative slice of the token axis")
        if start == 0 and end >= at.n0:
            return xd
        if start != 0:
            raise NotPerToken(node, f"a slice that drops the first {start} token(s) (slices of merged tokens "
                               "are not supported yet)")
        at.reads[node] = end - 1
        return xd[:d] + (_ints(out_shape[d]),) + xd[d + 1:]
    if name == "unbind":
        d = (args[1] if len(args) > 1 else 0) % len(xd)
        _no_tok(node, [xd[d]], "unbinds the token axis")
        rest = xd[:d] + xd[d + 1:]
        return _Multi(rest for _ in node.meta["val"])
    if name in ("split", "split_with_sizes"):
        d = (args[2] if len(args) > 2 else 0) % len(xd)
        _no_tok(node, [xd[d]], "splits the token axis")
        return _Multi(xd[:d] + (_ints(_shape(v)[d]),) + xd[d + 1:] for v in node.meta["val"])
    if name == "cat":
        parts = args[0]
        d = (args[1] if len(args) > 1 else 0) % len(out_shape)
        dims = [at.dims.get(p) for p in parts]
        if any(p is None or isinstance(p, _Multi) for p in dims):
            raise NotPerToken(node, "concatenates token-axis values with other values")
        _no_tok(node, [p[d] for p in dims], "concatenates along the token axis")
        first = dims[0]
        if any(p[:d] + p[d + 1:] != first[:d] + first[d + 1:] for p in dims):
            raise NotPerToken(node, "concatenates values whose token axes differ")
        return first[:d] + (_ints(out_shape[d]),) + first[d + 1:]
    raise NotPerToken(node, f"{ns}.{name} on the token axis is not known to act per token")


def _no_tok(node: fx.Node, dims: Sequence[tuple], what: str) -> None:
    if any(TOK in d for d in dims):
        raise NotPerToken(node, what)


def _broadcast(node: fx.Node, out_shape: tuple[int, ...], at: Atoms) -> tuple:
    tensors = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)
               and isinstance(a.meta.get("val"), torch.Tensor)]
    out = []
    for i in range(1, len(out_shape) + 1):
        size = out_shape[-i]
        carried, fixed = [], []
        for t in tensors:
            s = val_shape(t)
            if len(s) < i or s[-i] != size:
                continue
            d = at.dims.get(t)
            if d is not None and not isinstance(d, _Multi):
                if size > 1 or d[-i]:          # a size-1 dim only counts where it is the batch (of 1)
                    carried.append(d[-i])
            elif size > 1:
                fixed.append(t)
        if carried:
            if any(c != carried[0] for c in carried):
                raise NotPerToken(node, "combines values whose token axes differ")
            if fixed and TOK in carried[0]:
                at.conflicts.setdefault(node, fixed[0])
            out.append(carried[0])
        else:
            out.append(_ints(size))
    return tuple(reversed(out))


def _view(atoms_by_dim: list, out_shape: tuple[int, ...], at: Atoms) -> tuple | None:
    """The dims of a row-major reshape: the atoms regrouped in order; ints may split, the token
    count and the batch may not (None)."""
    atoms = [a for d in atoms_by_dim for a in d]
    val = lambda a: at.n0 if a == TOK else at.b0 if a == BATCH else a  # noqa: E731
    out, i = [], 0
    for size in out_shape:
        group, prod = [], 1
        if size == 1 and i < len(atoms) and val(atoms[i]) == 1:     # a batch of 1 keeps its name
            group.append(atoms[i])
            i += 1
        while prod < size:
            if i >= len(atoms):
                return None
            a = atoms[i]
            if size % (prod * val(a)) == 0:
                group.append(a)
                prod *= val(a)
                i += 1
            elif isinstance(a, int) and size % prod == 0 and a % (size // prod) == 0:
                need = size // prod
                group.append(need)
                atoms[i] = a // need
                prod = size
            else:
                return None
        if prod != size:
            return None
        out.append(tuple(group))
    return tuple(out) if i == len(atoms) else None


def _matmul(node: fx.Node, name: str, at: Atoms) -> tuple:
    args = node.args[1:3] if name in ("addmm", "baddbmm") else node.args[:2]
    if name in ("addmm", "baddbmm") and has_tok(at.dims.get(node.args[0])):
        raise NotPerToken(node, "a matmul whose bias carries the token axis")
    a, b = (_dims_of(x, at) for x in args)
    if (TOK in a[-1]) != (TOK in b[-2]):
        raise NotPerToken(node, "a matmul that contracts the token axis with another")
    if len(a) == 2:
        return (a[0], b[1])
    batch = a[0] if TOK in a[0] or BATCH in a[0] or not (TOK in b[0] or BATCH in b[0]) else b[0]
    return (batch, a[1], b[2])


def _reduce(node: fx.Node, name: str, xd: tuple, at: Atoms) -> Any:
    dpos, kpos = _REDUCE[name]
    args = node.args
    dims = args[dpos] if len(args) > dpos else node.kwargs.get("dim")
    keep = (args[kpos] if kpos is not None and len(args) > kpos else node.kwargs.get("keepdim", False))
    if dims is None:
        dims = range(len(xd))
    elif isinstance(dims, int):
        dims = [dims]
    red = {d % len(xd) for d in dims}
    out = tuple(() if i in red else d for i, d in enumerate(xd)) if keep else \
        tuple(d for i, d in enumerate(xd) if i not in red)
    return _Multi((out, out)) if name in ("max", "min") and isinstance(node.meta.get("val"), (tuple, list)) else out


# -- finding the blocks -----------------------------------------------------------------------
@dataclass
class Block:
    path: str
    softmax: fx.Node
    residual: fx.Node | None = None   # the residual add the merge follows
    keys: fx.Node | None = None       # the scores bmm's second operand, [batch*heads, d, tokens]
    heads: int = 1


def find_blocks(gm: fx.GraphModule, name: str, who: str, strict: bool = True) -> list[Block]:
    """The blocks: per attention softmax, the outermost module holding it and no other. With
    strict=False a softmax without one (a block called several times in an unrolled loop) is
    not a block; with strict=True it is refused."""
    softmaxes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SOFTMAX]
    counts: dict[str, int] = {}
    stacks = {}
    for s in softmaxes:
        stacks[s] = [p for p, _ in node_module_path(s)]
        for p in stacks[s]:
            counts[p] = counts.get(p, 0) + 1
    blocks = []
    for s in softmaxes:
        outer = next((p for p in stacks[s] if counts[p] == 1), None)
        if outer is None and not strict:
            continue
        if outer is None:
            raise PassError(f"pass '{who}': graph '{name}': the softmax {s.format_node()} is not inside a "
                            "module of its own (a transformer block); capture a model whose blocks are modules")
        blocks.append(Block(outer, s))
    return blocks


def in_region(node: fx.Node, path: str) -> bool:
    return any(p == path for p, _ in node_module_path(node))


def descendants(node: fx.Node) -> set:
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        for u in n.users:
            if u not in seen:
                seen.add(u)
                todo.append(u)
    return seen


def residual_add(gm: fx.GraphModule, blk: Block, x_shape: tuple | None = None) -> tuple[fx.Node, fx.Node] | None:
    """(the block's first residual add after its softmax, its input operand), or None."""
    desc = descendants(blk.softmax)
    after = False
    for n in gm.graph.nodes:
        if n is blk.softmax:
            after = True
            continue
        if not after or n.op != "call_function" or n.target is not _aten.add.Tensor or not in_region(n, blk.path):
            continue
        a, b = n.args[:2]
        if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
            continue
        shape = val_shape(n)
        if shape is None or len(shape) != 3 or (x_shape is not None and shape != x_shape):
            continue
        if (a in desc) != (b in desc) and val_shape(a) == shape and val_shape(b) == shape:
            return n, (b if a in desc else a)
    return None


def _has_placeholder_ancestor(node: fx.Node, memo: dict) -> bool:
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in memo:
            if memo[n]:
                memo[node] = True
                return True
            continue
        if n.op == "placeholder":
            memo[node] = True
            return True
        for a in n.all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    memo[node] = False
    return False


def detect_protect(x0: fx.Node) -> tuple[int, str]:
    """Leading tokens concatenated from parameters ([CLS], distillation tokens) in front of the
    first block's input, found back through same-shape ops (position embedding, dropout)."""
    shape = val_shape(x0)
    memo: dict = {}
    n = x0
    for _ in range(64):
        if n.op != "call_function":
            break
        if n.target is _aten.cat.default and ((n.args[1] if len(n.args) > 1 else 0) % 3) == 1:
            k, names = 0, []
            for part in n.args[0]:
                if _has_placeholder_ancestor(part, memo):
                    break
                k += val_shape(part)[1]
                names.append(part.name)
            how = f"detected: {k} leading token(s) from parameters ({', '.join(names)})" if k else \
                "detected: no leading parameter tokens"
            return k, how
        same = [a for a in n.all_input_nodes if val_shape(a) == shape and _has_placeholder_ancestor(a, memo)]
        if len(same) != 1:
            break
        n = same[0]
    return 0, "detected: no leading parameter tokens"


def check_reads_outside(at: Atoms, start: int, end: int, dropped: int, who: str, graph: str, range_name: str,
                        why: str) -> None:
    """Reads of single tokens after the re-sized blocks (`at.reads`) must read the prefix before
    `start` or the suffix from `end`, the rows every re-sized block keeps (token_prune drops
    candidates from [start, end), token_reuse computes only some of them); a positive index into
    the suffix moves down by the `dropped` tokens no longer in front of it.

    Raises:
        OptionError: naming option 'tokens', the graph and the node; `range_name` and `why` say
            what the range is to the pass.
    """
    for node, idx in at.reads.items():
        is_select = packet(node) == "select"
        pos = idx + at.n0 if idx < 0 else idx
        if start <= pos < end or not is_select and pos >= start:
            what = f"token {idx}" if is_select else f"tokens up to {idx}"
            raise OptionError(f"pass '{who}': option 'tokens': graph '{graph}' reads {what} after the blocks "
                              f"({node.format_node()}), inside {range_name} [{start}, {end}) {why}")
        if is_select and idx >= end:
            node.args = (node.args[0], node.args[1], idx - dropped) + tuple(node.args[3:])


def splice_in(gm: fx.GraphModule, fn: Any, args: list, examples: list, region: str, by: str) -> tuple[set, list]:
    before = set(gm.graph.nodes)
    results = splice(gm, fn, args, examples, by, region)
    return set(gm.graph.nodes) - before, results


def resize(gm: fx.GraphModule, at: Atoms, result_count: dict, name: str, who: str,
            conflict: Any = None) -> None:
    """Re-size every view / reshape / expand downstream of a merge for its block's token count,
    and drop constant-zero masks over the old count (or hand them to `conflict(gm, node, fixed)`,
    token_prune's gather)."""
    count: dict[fx.Node, int] = {}
    for node in list(gm.graph.nodes):
        if node in result_count:
            count[node] = result_count[node]
            continue
        if node.meta.get(meta.CREATED_BY) == who or node not in at.dims:
            continue
        cs = {count[a] for a in node.all_input_nodes if a in count}
        if len(cs) > 1:
            raise PassError(f"pass '{who}': graph '{name}': {node.format_node()} combines values of "
                            f"{sorted(cs)} tokens")
        c = cs.pop() if cs else at.n0
        count[node] = c
        if c == at.n0:
            continue
        if node in at.conflicts:
            if conflict is None:
                raise PassError(f"pass '{who}': graph '{name}': {node.format_node()} combines a value from before "
                                f"the site ({at.conflicts[node].name}) with the re-sized token axis")
            conflict(gm, node, at.conflicts[node], at, name)
            continue
        name_ = packet(node)
        if name_ in VIEWS or name_ == "expand":
            node.args = (node.args[0], at.sizes(node, c)) + tuple(node.args[2:])


def constant_value(gm: fx.GraphModule, node: fx.Node) -> torch.Tensor | None:
    """The value of a node computed from parameters and literals alone (None: it reads an input)."""
    order, seen, todo = [], set(), [node]
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "placeholder":
            return None
        order.append(n)
        todo.extend(n.all_input_nodes)
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    env: dict = {}
    with torch.no_grad():
        for n in sorted(order, key=pos.__getitem__):
            if n.op == "get_attr":
                env[n] = get_attr(gm, str(n.target))
            elif n.op == "call_function":
                args, kwargs = fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
                env[n] = n.target(*args, **kwargs)
            else:
                return None
    v = env[node]
    return v if isinstance(v, torch.Tensor) else None


def revalue(gm: fx.GraphModule, inputs: Sequence[torch.Tensor], name: str, who: str) -> None:
    """Recompute every node's `val` (fake tensors) after the re-sizing."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    env: dict = {}
    it = iter(inputs)
    consts: dict[int, Any] = {}
    for n in gm.graph.nodes:
        if n.op == "placeholder":
            env[n] = mode.from_tensor(next(it))
        elif n.op == "get_attr":
            t = get_attr(gm, str(n.target))
            if isinstance(t, torch.Tensor):
                t = consts.setdefault(id(t), mode.from_tensor(t))
            env[n] = t
        elif n.op == "call_function":
            args, kwargs = fx.node.map_arg((n.args, n.kwargs), env.__getitem__)
            try:
                with mode:
                    out = n.target(*args, **kwargs)
            except Exception as e:  # torch raises many types for a shape mismatch
                raise PassError(f"pass '{who}': graph '{name}': after re-sizing for the new token counts, "
                                f"{n.format_node()} fails: {type(e).__name__}: {str(e).splitlines()[0][:300]}") from e
            env[n] = out
            n.meta["val"] = out


def ancestors(node: fx.Node) -> set:
    seen, todo = set(), [node]
    while todo:
        for a in todo.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                todo.append(a)
    return seen


def reaches(src: fx.Node, dst: fx.Node, within: set, avoid: fx.Node) -> bool:
    seen, todo = {src}, [src]
    while todo:
        for u in todo.pop().users:
            if u is dst:
                return True
            if u in within and u is not avoid and u not in seen:
                seen.add(u)
                todo.append(u)
    return False


def second_residual(gm: fx.GraphModule, blk: Block, first: fx.Node, x_shape: tuple) -> tuple[fx.Node, fx.Node] | None:
    """The block's residual add after `first` (h + mlp(h)): (the add, its branch operand)."""
    desc = descendants(first)
    after = False
    for n in gm.graph.nodes:
        if n is first:
            after = True
            continue
        if not after or n.op != "call_function" or n.target is not _aten.add.Tensor or not in_region(n, blk.path):
            continue
        a, b = n.args[:2]
        if val_shape(n) == x_shape and first in (a, b) and isinstance(a, fx.Node) and isinstance(b, fx.Node):
            other = b if a is first else a
            if other in desc and val_shape(other) == x_shape:
                return n, other
    return None


def finish(gm: fx.GraphModule, g: Graph, at: Any, result_count: dict, name: str, who: str,
            conflict: Any = None) -> Graph:
    """Re-size every value after the merges, drop the dead nodes, recompute the shapes and
    check that the graph's outputs kept theirs (the rewrite is internal to the blocks)."""
    resize(gm, at, result_count, name, who, conflict)
    eliminate_dead_code(gm)
    gm.recompile()
    revalue(gm, g.example_inputs, name, who)
    new_graph = g.with_module(gm)
    outs = new_graph.run(*g.example_inputs)
    old_out = next(n for n in g.module.graph.nodes if n.op == "output").args[0]
    for nm, got, want in zip(g.output_names, outs, (o_.meta.get("val") for o_ in old_out)):
        if _shape(got) != _shape(want):
            raise PassError(f"pass '{who}': graph '{name}': output {nm!r} changed shape "
                            f"{_shape(want)} -> {_shape(got)} (internal)")
    return new_graph
