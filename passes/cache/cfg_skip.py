"""Drop the unconditional half of a classifier-free-guidance batch once the two
halves agree (Adaptive Guidance, "Adaptive Guidance: Training-free Acceleration
of Conditional Diffusion Models").

Before:  eps = model(x, t, y) on the doubled batch [cond; uncond]     every step
After:   `both`:      eps = model(x, t, y); agreement = cos(eps[:B], eps[B:])
         `cond_only`: e = model(x[:B], t[:B], y[:B]); eps = [e; e]
Each call of a graph G becomes a latch Select over `G.both` and `G.cond_only`:
the latch runs `both` until `agreement` >= `threshold` (from call
`warmup` on), then `cond_only` for the rest of the request: the sampler's CFG
combine then gives the conditional prediction, as the method prescribes. The
halves stay separate rows, so no state is shared between them.

Needs a graph captured with a dynamic batch dimension (the half batch is a
different shape; a static capture bakes the batch into its reshapes).
It goes before block caches (they then cache `G.both` and `G.cond_only`, each
with its own state); numeric variants (timestep buckets) share one latch.
Reads: nothing. Writes: GuidancePlan; per graph G, graphs `G.both` and
`G.cond_only` and a latch Select in place of each call of G.
Invariant: threshold > 1 never latches (outputs exactly the uncached ones).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch

from pared.ir import meta
from pared.ir.errors import PassError
from pared.ir.plan import Call, Latch, Select
from pared.ir.program import Graph, Program
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, Record, RewritePass, check_range, register_pass
from pared.passes.cache.common import graph_flops, graphs_to_cache

_aten = torch.ops.aten


def _node(gm, target, args, by):
    n = gm.graph.call_function(target, args)
    n.meta[meta.CREATED_BY] = by
    return n


def _halves(gm, x, by):
    """Slices x[:n/2] and x[n/2:] along dim 0 (symbolic n: ONNX Slice, not a Split sequence)."""
    n = _node(gm, _aten.sym_size.int, (x, 0), by)
    h = _node(gm, operator.floordiv, (n, 2), by)
    return _node(gm, _aten.slice.Tensor, (x, 0, 0, h), by), _node(gm, _aten.slice.Tensor, (x, 0, h, n), by)


def with_agreement(graph: Graph, by: str) -> Graph:
    """`graph` plus an output: the cosine between the two halves (dim 0) of output 0, shape [1]."""
    gm = graph.copy_module()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    outs = list(out.args[0])
    with gm.graph.inserting_before(out):
        a, b = _halves(gm, outs[0], by)
        dot = _node(gm, _aten.sum.default, (_node(gm, _aten.mul.Tensor, (a, b), by),), by)
        na = _node(gm, _aten.sum.default, (_node(gm, _aten.mul.Tensor, (a, a), by),), by)
        nb = _node(gm, _aten.sum.default, (_node(gm, _aten.mul.Tensor, (b, b), by),), by)
        den = _node(gm, _aten.add.Tensor, (_node(gm, _aten.sqrt.default, (_node(gm, _aten.mul.Tensor, (na, nb), by),), by),
                                          1e-12), by)
        cos = _node(gm, _aten.reshape.default, (_node(gm, _aten.div.Tensor, (dot, den), by), [1]), by)
    out.args = (tuple(outs + [cos]),)
    gm.graph.lint()
    gm.recompile()
    return graph.with_module(gm, output_names=graph.output_names + ("cfg.agreement",))


def conditional_half(graph: Graph, by: str) -> Graph:
    """`graph` run on the first half of every input (dim 0), each output repeated twice."""
    gm = graph.copy_module()
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    last = phs[-1]
    for ph in phs:
        with gm.graph.inserting_after(last):
            n = _node(gm, _aten.sym_size.int, (ph, 0), by)
        with gm.graph.inserting_after(n):
            h = _node(gm, operator.floordiv, (n, 2), by)
        with gm.graph.inserting_after(h):
            first = _node(gm, _aten.slice.Tensor, (ph, 0, 0, h), by)
        ph.replace_all_uses_with(first, delete_user_cb=lambda u, n=n, f=first: u is not n and u is not f)
        last = first
    out = next(n for n in gm.graph.nodes if n.op == "output")
    with gm.graph.inserting_before(out):
        doubled = [_node(gm, _aten.cat.default, ([o, o], 0), by) for o in out.args[0]]
    out.args = (tuple(doubled),)
    gm.graph.lint()
    gm.recompile()
    return graph.with_module(gm)


@register_pass("cfg_skip")
class SkipUnconditionalBranch(RewritePass):
    """Adaptive Guidance (see module docstring)."""

    #: capture the model with a dynamic batch dimension for this pass (harnesses read it)
    capture_needs = frozenset({"dynamic_batch"})

    @dataclass(frozen=True, kw_only=True)
    class Options:
        threshold: float = 0.99   # cosine between the cond and uncond predictions that ends guidance (> 1: never)
        warmup: int = 5           # the first calls always run both halves

        def __post_init__(self):
            check_range("cfg_skip", "threshold", self.threshold, lo=-1, hi=2)
            check_range("cfg_skip", "warmup", self.warmup, lo=0)

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        names = graphs_to_cache(program, self.name, lambda g, other: (
            "cfg_skip measures the agreement of the model's two CFG halves, which a cache variant need not "
            f"output. Run cfg_skip before {other}"))
        if not names:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={})
        for gname in names:
            src = program.graphs[gname]
            missing = [n for n, d in zip(src.input_names, src.dynamic_dims) if not any(i == 0 for i, _ in d)]
            if missing:
                raise PassError(f"pass 'cfg_skip' needs the batch dimension (dim 0) of every input to be dynamic; "
                                f"inputs {missing} were captured static (graph {gname!r}). Capture with "
                                "dynamic_shapes, e.g. ({0: Dim('batch')}, ...) for each input")
            if any(e.shape[0] % 2 for e in src.example_inputs):
                raise PassError("pass 'cfg_skip': the example batch must be even (conditional rows, then "
                                "unconditional)")
        if o.threshold > 1:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={})
        new, flops = program, []
        for gname in names:
            src = program.graphs[gname]
            both, half = with_agreement(src, self.name), conditional_half(src, self.name)
            # numeric variants of one graph (timestep buckets) share one latch
            key = f"{self.name}.{program.origin(gname)}"
            agreement = f"{key}.agreement"
            latch = Latch(compute="both", then="cond_only", signal=agreement, threshold=o.threshold, warmup=o.warmup)

            def node(c: Call, graph_of) -> Select:
                return Select(latch, (("both", Call(graph_of("both"), c.inputs, c.outputs + (agreement,), c.device)),
                                      ("cond_only", Call(graph_of("cond_only"), c.inputs, c.outputs, c.device))), key)
            new = new.expand(gname, {"both": both, "cond_only": half}, node, by=self.name)
            flops += [(f"{gname}.both", graph_flops(both)), (f"{gname}.cond_only", graph_flops(half))]
        rec = GuidancePlan(o.threshold, o.warmup, tuple(names), tuple(flops))
        new = new.replace(records={**new.records, "GuidancePlan": rec})
        ctx.log.info("cfg_skip: latch at cosine >= %g after %d calls, %d graph(s)", o.threshold, o.warmup, len(names))
        return PassResult(new, modified=True, stats={"graphs": 2 * len(names)})


@dataclass(frozen=True)
class GuidancePlan(Record):
    """What cfg_skip decided: the latch threshold and warm-up, and the graphs it split."""
    threshold: float
    warmup: int
    graphs: tuple[str, ...]
    flops: tuple[tuple[str, int], ...]    # variant graph -> estimated FLOPs per call
