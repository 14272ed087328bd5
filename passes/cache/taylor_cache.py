"""Forecast a block range's residual from its last two computed values instead
of reusing it unchanged (TaylorSeer, "From Reusing to Forecasting:
Accelerating Diffusion Models with TaylorSeers"), first order.

Before:  h = blocks[1:7](x)                                         at every step
After:   full step k:   h = blocks[1:7](x); r = h - x
                        state.delta = r - state.last; state.last = r
         forecast step: h = x + state.last + c * state.delta
where c = (steps since the last full step) / (steps between the last two full
steps) is a per-step value of the plan (`step:taylor_cache.coef`), an input of one `forecast`
graph rather than a constant baked per step. Full steps: the first `warmup`
(at least 2, to have a difference) and every `interval`-th after.

Every graph the Plan calls is cached; numeric variants of one graph (timestep
buckets) share `last` and `delta`, so a forecast may follow a full step of
another bucket.

Reads: RedundancyProfile (optional: the number of steps). Writes: CachePlan;
per graph G, graphs `G.full0`, `G.full`, `G.forecast` and a table Select in
place of each call of G; the step value `taylor_cache.coef`. Invariant:
interval 1 gives the uncached outputs exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pared.analysis.redundancy import RedundancyProfile, block_regions
from pared.ir import meta
from pared.ir.plan import Call, Select, StateBuffer, Table
from pared.ir.program import Graph, Program
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, RewritePass, check_range, register_pass
from pared.passes.cache.common import (CachePlan, cache_record, check_reuse, emit_residuals, graph_flops, graphs_to_cache,
                                       refreshes, reuse_spans, span_of, state_name)
from pared.passes.cache.interval_cache import calls_of, resolve_range


def _add_input(gm, name: str, like):
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(last):
        ph = gm.graph.placeholder(name)
    ph.meta["val"] = like.meta.get("val") if hasattr(like, "meta") else None
    return ph


def _full_with_delta(full0: Graph, examples_last: list[torch.Tensor], by: str) -> Graph:
    """full0 (whose last m outputs are the span streams' residuals r) plus m inputs
    `last` and outputs (r..., r - last ...)."""
    m = len(examples_last)
    gm = full0.copy_module()
    out = next(n for n in gm.graph.nodes if n.op == "output")
    outs = list(out.args[0])
    deltas = []
    for j, r in enumerate(outs[len(outs) - m:]):
        ph = _add_input(gm, f"cache_last{_sfx(j)}", r)
        with gm.graph.inserting_before(out):
            d = gm.graph.call_function(torch.ops.aten.sub.Tensor, (r, ph))
        d.meta[meta.CREATED_BY] = by
        deltas.append(d)
    out.args = (tuple(outs + deltas),)
    gm.graph.lint()
    gm.recompile()
    return full0.with_module(gm, input_names=full0.input_names + tuple(f"cache.last{_sfx(j)}" for j in range(m)),
                             output_names=full0.output_names + tuple(f"cache.delta{_sfx(j)}" for j in range(m)),
                             example_inputs=tuple(full0.example_inputs) + tuple(examples_last),
                             dynamic_dims=tuple(full0.dynamic_dims) + ((),) * m if any(full0.dynamic_dims) else ())


def _sfx(j: int) -> str:
    """The suffix of span stream j's names (the primary stream has none; see Span.pairs)."""
    return f"_s{j}" if j else ""


def _forecast(reuse: Graph, examples_delta: list[torch.Tensor], by: str) -> Graph:
    """reuse (whose last m inputs are the cached residuals) with each residual replaced by
    last + coef * delta (m + 1 more inputs: the deltas, then coef)."""
    m = len(examples_delta)
    gm = reuse.copy_module()
    phs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    lasts = phs[len(phs) - m:]
    deltas = [_add_input(gm, f"cache_delta{_sfx(j)}", last) for j, last in enumerate(lasts)]
    coef = _add_input(gm, "coef", lasts[0])
    coef.meta.pop("val", None)
    for last, delta in zip(lasts, deltas):
        users = list(last.users)
        first_user = next(n for n in gm.graph.nodes if n in users)
        with gm.graph.inserting_before(first_user):
            scaled = gm.graph.call_function(torch.ops.aten.mul.Tensor, (delta, coef))
            pred = gm.graph.call_function(torch.ops.aten.add.Tensor, (last, scaled))
        for n in (scaled, pred):
            n.meta[meta.CREATED_BY] = by
        for u in users:
            u.replace_input_with(last, pred)
    gm.graph.lint()
    gm.recompile()
    return reuse.with_module(gm, input_names=reuse.input_names + tuple(f"cache.delta{_sfx(j)}" for j in range(m)) +
                             ("coef",),
                             example_inputs=tuple(reuse.example_inputs) + tuple(examples_delta) + (torch.ones(1),),
                             dynamic_dims=tuple(reuse.dynamic_dims) + ((),) * (m + 1) if any(reuse.dynamic_dims)
                             else ())


def taylor_table(steps: int, interval: int, warmup: int) -> tuple[tuple[str, ...], tuple[float, ...]]:
    """The variant and the forecast coefficient per step."""
    table, coefs, fulls = [], [], []
    for i in range(steps):
        if refreshes(i, interval, warmup):
            table.append("full0" if i == 0 else "full")
            coefs.append(0.0)
            fulls.append(i)
        else:
            table.append("forecast")
            coefs.append((i - fulls[-1]) / (fulls[-1] - fulls[-2]))
    return tuple(table), tuple(coefs)


@register_pass("taylor_cache")
class ForecastBlocks(RewritePass):
    """TaylorSeer, first order (see module docstring)."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        interval: int = 3            # N: a full step every N steps
        warmup: int = 2              # the first steps always compute (>= 2: a forecast needs a difference)
        first: int | None = None     # first cached block (default 1)
        last: int | None = None      # last cached block, inclusive (default -2)
        regions: str | None = None   # the blocks (pattern; several, comma-separated, in order); default: the
                                     # repeated blocks
        reuse: str = "residual"      # "output": cache the values the blocks hand on (DeepCache; any shapes)
        steps: int | None = None     # steps per request; default: the calibration run's

        def __post_init__(self):
            check_range("taylor_cache", "interval", self.interval, lo=1)
            check_range("taylor_cache", "warmup", self.warmup, lo=2)
            check_reuse("taylor_cache", self.reuse)

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        names = graphs_to_cache(program, self.name)
        steps = calls_of(ctx, o.steps, self.name, program)
        table, coefs = taylor_table(steps, o.interval, o.warmup)
        if "forecast" not in table or not names:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"forecast_steps": 0})
        new = program
        coef = f"step:{self.name}.coef"
        for gname in names:
            blocks = block_regions(program, o.regions, gname)
            f, l_ = resolve_range(len(blocks), o.first, o.last, self.name)
            src = program.graphs[gname]
            span = span_of(src.module, "blocks", blocks[f:l_ + 1], self.name, o.reuse)
            full0 = emit_residuals(src, [span], self.name)
            m = len(span.pairs())
            with torch.no_grad():
                rs = [v.detach().clone() for v in full0.run(*full0.example_inputs)[-m:]]
            # an example `last` unlike r: with last == r the delta output is ~0 and the
            # backend check compares rounding noise
            zeros = [torch.zeros_like(r) for r in rs]
            full = _full_with_delta(full0, zeros, self.name)
            forecast = _forecast(reuse_spans(src, [span], rs, self.name), zeros, self.name)
            last, delta = ([f"state:{state_name(program, self.name, gname, x + _sfx(j))}" for j in range(m)]
                           for x in ("last", "delta"))
            last, delta = tuple(last), tuple(delta)

            def node(c: Call, graph_of) -> Select:
                return Select(Table(table, "full"), (
                    ("full0", Call(graph_of("full0"), c.inputs, c.outputs + last, c.device)),
                    ("full", Call(graph_of("full"), c.inputs + last, c.outputs + last + delta, c.device)),
                    ("forecast", Call(graph_of("forecast"), c.inputs + last + delta + (coef,), c.outputs, c.device)),
                ))
            variants = {"full0": full0, "full": full, "forecast": forecast}
            new = new.expand(gname, variants, node, by=self.name, state=tuple(StateBuffer(x[6:]) for x in last + delta),
                             step_values=((coef[5:], coefs),))
            flops = tuple((f"{gname}.{v}", graph_flops(g)) for v, g in variants.items())
            rec = CachePlan("taylor_cache", (span,), (("forecast", ("blocks",)),), table, "full", flops, coefs,
                            graphs=(gname,))
            new = new.replace(records=cache_record(new, rec))
        n = table.count("forecast")
        ctx.log.info("taylor_cache: blocks %s..%s of %d graph(s), %d of %d steps forecast", span.blocks[0],
                     span.blocks[-1], len(names), n, steps)
        return PassResult(new, modified=True, preserved=(RedundancyProfile,),
                          stats={"forecast_steps": n, "cached_blocks": len(span.blocks), "steps": steps,
                                 "graphs": len(names)})
