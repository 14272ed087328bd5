"""Graph-editing helpers every rewrite shares.

    eliminate_dead_code(gm)                 fx dead-code elimination that also sees
                                            through torch.export's metadata checks
    splice(gm, fn, args, examples, by)      trace a torch function to aten ops and
                                            insert it into `gm`, reading `args`
    add_constant(gm, name, value, by, ...)  a new tensor constant (buffer + get_attr node)
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.fx as fx

from . import meta

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
