"""Graph-editing helpers every rewrite shares.

    eliminate_dead_code(gm)                 fx dead-code elimination that also sees
                                            through torch.export's metadata checks
    splice(gm, fn, args, examples, by)      trace a torch function to aten ops and
                                            insert it into `gm`, reading `args`
    add_constant(gm, name, value, by, ...)  a new tensor constant (buffer + get_attr node)
    narrow_split_linears(gm, by)            a linear whose output is split, and only some of
                                            the pieces read, computes only those pieces
"""
from __future__ import annotations

import operator
from typing import Callable, Sequence

import torch
import torch.fx as fx

from . import meta
from .patterns import SAME_SHAPE, Site, find_sites
from .program import get_attr

#: checks torch.export leaves in a graph (dtype/device of a traced value). fx
#: treats them as impure, so plain dead-code elimination keeps them and every
#: value they read alive: a block cut out of a graph would still run up to each
#: check. They only restate what `node.meta["val"]` already records.
METADATA_ASSERTS = (torch.ops.aten._assert_tensor_metadata.default,)


def eliminate_dead_code(gm: fx.GraphModule) -> int:
    """Remove metadata checks and every node nothing reads. Returns the number
    of nodes removed (checks included)."""
    before = len(gm.graph.nodes)
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target in METADATA_ASSERTS:
            gm.graph.erase_node(n)
    gm.graph.eliminate_dead_code()
    return before - len(gm.graph.nodes)


def examples_of(nodes: Sequence[fx.Node]) -> list[torch.Tensor]:
    """Zero tensors shaped and typed like each node's value (`meta["val"]`): the tracing
    examples `splice` needs when fn's arguments are those nodes."""
    out = []
    for n in nodes:
        v = n.meta["val"]
        out.append(torch.zeros(tuple(int(d) for d in v.shape), dtype=v.dtype))
    return out


def splice(gm: fx.GraphModule, fn: Callable[..., object], args: Sequence[fx.Node],
           examples: Sequence[torch.Tensor], by: str, region: str | None = None) -> list[fx.Node]:
    """Insert `fn(*args)` into `gm` as aten ops, right after the last of `args`
    in graph order (so the results may replace any value computed later).

    `fn` is traced with `make_fx` on `examples` (tensors shaped like `args`: `examples_of(args)`), so
    it may use any torch code that traces without data-dependent control flow.
    Every inserted node is tagged `pared.created_by = by` (and `pared.ir.region = region`
    when given: the block the rewrite belongs to).

    Returns:
        the nodes holding fn's results (one per returned tensor, in order).
    Raises:
        ValueError: when fn creates tensor constants (pass them as arguments)
            or returns something other than tensors.
    """
    from torch.fx.experimental.proxy_tensor import make_fx
    sub = make_fx(fn, tracing_mode="fake")(*examples)
    consts = [n for n in sub.graph.nodes if n.op == "get_attr"]
    if consts:
        raise ValueError(f"splice: {getattr(fn, '__name__', fn)} creates tensor constants "
                         f"{[n.target for n in consts]}; pass them as arguments")
    phs = [n for n in sub.graph.nodes if n.op == "placeholder"]
    if len(phs) != len(args):
        raise ValueError(f"splice: {getattr(fn, '__name__', fn)} takes {len(phs)} tensors, given {len(args)}")
    env = dict(zip(phs, args))
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    last = max(args, key=lambda a: order[a])
    results = None
    with gm.graph.inserting_before(last.next):
        for n in sub.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                results = n.args[0]
                break
            new = gm.graph.node_copy(n, lambda x: env[x])
            new.meta[meta.CREATED_BY] = by
            if region is not None:
                new.meta[meta.REGION] = region
            env[n] = new
    leaves = results if isinstance(results, (tuple, list)) else [results]
    if not all(isinstance(x, fx.Node) for x in leaves):
        raise ValueError(f"splice: {getattr(fn, '__name__', fn)} must return tensors")
    return [env[x] for x in leaves]


def add_constant(gm: fx.GraphModule, target: str, value: torch.Tensor, by: str, *,
                 before: fx.Node | None = None, after: fx.Node | None = None) -> fx.Node:
    """Register `value` as buffer `target` of `gm` and return a get_attr node reading
    it, inserted before `before` (or after `after`), with its value and creator in
    the node's meta."""
    gm.register_buffer(target, value)
    where = gm.graph.inserting_before(before) if before is not None else gm.graph.inserting_after(after)
    with where:
        a = gm.graph.get_attr(target)
    a.meta["val"] = value
    a.meta[meta.CREATED_BY] = by
    return a


#: shape ops that may stand between a linear and the split of its features, as long as they keep
#: the feature dimension last and whole (adaLN's `ada(c).unsqueeze(1).chunk(6, -1)`)
_FEATURE_KEEPING = SAME_SHAPE | {torch.ops.aten.unsqueeze.default}


def _keeps_features(n: object) -> bool:
    if not (isinstance(n, fx.Node) and n.op == "call_function" and n.target in _FEATURE_KEEPING):
        return False
    src, out = n.args[0].meta.get("val"), n.meta.get("val")
    if src is None or out is None or src.dim() == 0 or out.dim() == 0 or src.shape[-1] != out.shape[-1]:
        return False
    if n.target == torch.ops.aten.unsqueeze.default:
        return n.args[1] % out.dim() != out.dim() - 1
    shape = list(n.args[1])
    return shape[-1] in (-1, src.shape[-1]) and -1 not in shape[:-1]


def _split_linear(nodes: dict[str, fx.Node], site: Site):
    """(matmul node, the shape ops after it, the split, its sizes, the piece indices read) when the
    linear `site` (an nn.Linear: [N, K] weight behind a transpose, a bias inside the addmm or none)
    is read only by a split of its features, through shape ops that keep the features last and
    whole, and only some pieces are read (each through getitem); else None."""
    mm = nodes[site.node]
    if not site.transposed or site.out != site.node or mm.target == torch.ops.aten.bmm.default:
        return None
    chain, cur = [], mm
    while len(cur.users) == 1:
        nxt = next(iter(cur.users))
        if not _keeps_features(nxt):
            break
        chain.append(nxt)
        cur = nxt
    split = next(iter(cur.users)) if len(cur.users) == 1 else None
    if split is None or split.op != "call_function" or split.target != torch.ops.aten.split_with_sizes.default:
        return None
    sizes = list(split.args[1])
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    val = cur.meta.get("val")
    if val is None or dim % val.dim() != val.dim() - 1 or sum(sizes) != int(val.shape[-1]):
        return None
    if any(u.op != "call_function" or u.target is not operator.getitem or not isinstance(u.args[1], int)
           for u in split.users):
        return None
    used = sorted({u.args[1] % len(sizes) for u in split.users})
    if len(used) == len(sizes) or not used:
        return None
    return mm, chain, split, sizes, used


def narrow_split_linears(gm: fx.GraphModule, by: str) -> int:
    """Where a linear layer's output (a `find_sites` layer: `addmm(bias, x, weight.T)` or
    `mm(x, weight.T)`, parameter weight and bias) is split along its features and only some
    pieces are read (e.g. adaLN's shift/scale/gate chunks of a block whose sub-block is no
    longer computed), compute only those pieces: a linear with
    the weight rows and bias entries of the read pieces, split into them. Shape ops between the
    linear and the split that keep the features last and whole (unsqueeze, view) are carried
    over. The values read are the same dot products. Dead-code elimination cannot do this (the
    product is one op). Returns the number of linears narrowed; the narrowed constants are new
    buffers (the old ones stay for any other reader)."""
    narrowed = 0
    nodes = {n.name: n for n in gm.graph.nodes}
    for site in find_sites(gm, batched=False):
        found = _split_linear(nodes, site)
        if found is None:
            continue
        mm, chain, split, sizes, used = found
        w = get_attr(gm, site.weight).detach()
        b = get_attr(gm, site.bias).detach() if site.bias is not None else None
        starts = [sum(sizes[:i]) for i in range(len(sizes))]
        rows = torch.cat([torch.arange(starts[i], starts[i] + sizes[i]) for i in used])
        width, new_sizes = len(rows), [sizes[i] for i in used]
        # named by the rows kept: variants of one graph narrowing the same linear to other pieces
        # hold constants of other names (whatever matches constants by name across variants)
        base = f"{mm.name}_narrowed_{'_'.join(map(str, used))}"
        wn = add_constant(gm, f"{base}_weight", w[rows].clone(), by, before=mm)
        bn = add_constant(gm, f"{base}_bias", b[rows].clone(), by, before=mm) if b is not None else None
        x = nodes[site.x]
        created = []
        with gm.graph.inserting_before(split):
            wt = gm.graph.call_function(torch.ops.aten.permute.default, (wn, [1, 0]))
            cur = (gm.graph.call_function(torch.ops.aten.addmm.default, (bn, x, wt)) if bn is not None
                   else gm.graph.call_function(torch.ops.aten.mm.default, (x, wt)))
            created += [(wt, None), (cur, mm)]
            for op in chain:
                args = list(op.args)
                args[0] = cur
                if op.target != torch.ops.aten.unsqueeze.default:
                    args[1] = list(args[1])[:-1] + [width]
                cur = gm.graph.call_function(op.target, tuple(args))
                created.append((cur, op))
            new_split = gm.graph.call_function(torch.ops.aten.split_with_sizes.default, (cur, new_sizes, -1))
        for n, like in created:
            old = like.meta.get("val") if like is not None else None
            if old is not None:
                n.meta["val"] = old.new_empty(tuple(old.shape[:-1]) + (width,))
            elif n is wt and mm.meta.get("val") is not None:
                n.meta["val"] = mm.meta["val"].new_empty((w.shape[1], width))
            n.meta[meta.CREATED_BY] = by
            if meta.REGION in mm.meta:
                n.meta[meta.REGION] = mm.meta[meta.REGION]
        if cur.meta.get("val") is not None:
            new_split.meta["val"] = [cur.meta["val"].new_empty(tuple(cur.meta["val"].shape[:-1]) + (s,))
                                     for s in new_sizes]
        new_split.meta[meta.CREATED_BY] = by
        for u in list(split.users):
            with gm.graph.inserting_before(u):
                g = gm.graph.call_function(operator.getitem, (new_split, used.index(u.args[1] % len(sizes))))
            g.meta.update(u.meta)
            g.meta[meta.CREATED_BY] = by
            u.replace_all_uses_with(g)
            gm.graph.erase_node(u)
        narrowed += 1
    if narrowed:
        eliminate_dead_code(gm)
    return narrowed


def attr_targets(gm: fx.GraphModule) -> set[str]:
    """The targets of a graph's get_attr nodes."""
    return {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}


def share_equal_constants(pairs: Sequence[tuple[fx.GraphModule, set[str]]]) -> int:
    """Make constants equal in dtype, shape and bytes the same tensor object across
    modules: variants of one graph quantized alike hold one copy of each weight.

    Args:
        pairs: (module, the targets on it to consider: those a pass just added).
    Returns:
        How many attributes now point at a tensor another module holds.
    """
    import hashlib
    seen: dict[tuple, torch.Tensor] = {}
    shared = 0
    for gm, targets in pairs:
        for t in sorted(targets):
            if "." in t:
                continue
            v = getattr(gm, t, None)
            if not isinstance(v, torch.Tensor):
                continue
            raw = v.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            key = (str(v.dtype), tuple(v.shape), hashlib.sha1(raw).hexdigest())
            first = seen.setdefault(key, v)
            if first is not v:
                setattr(gm, t, first)
                shared += 1
    return shared
