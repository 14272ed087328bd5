"""Reuse the deviation of a block range across steps, rear blocks early and
front blocks late (Δ-DiT, "Δ-DiT: A Training-Free Acceleration Method
Tailored for Diffusion Transformers").

Before:  h = blocks(x)                                             at every step
After:   full step:       h = blocks(x); state.delta_front, state.delta_rear = deviations
         early (i < b):   h = blocks[rear](front(x) ...) replaced by  front(x) + state.delta_rear
         late  (i >= b):  blocks[front] replaced by  x + state.delta_front, rear blocks run
A full step runs every `interval` steps (and the first `warmup`); Δ-DiT's
reasoning: early steps shape the outline, which the front blocks produce, so the
rear (detail) blocks are cached; after the boundary step b the roles swap.

Reads: RedundancyProfile (optional: the number of steps). Writes: CachePlan;
per graph G the Plan calls, graphs `G.full`, `G.reuse_rear`, `G.reuse_front`
and a table Select in place of each call of G. Invariant: interval 1
gives the uncached outputs exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

from pared.analysis.redundancy import RedundancyProfile, block_regions
from pared.ir.errors import OptionError
from pared.ir.program import Program
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, RewritePass, check_range, register_pass
from pared.passes.cache.common import (CachePlan, cache_record, graph_flops, graphs_to_cache, make_span, refreshes,
                                       variant_program)
from pared.passes.cache.interval_cache import calls_of


@register_pass("delta_cache")
class CacheBlockDeltas(RewritePass):
    """Δ-DiT Δ-Cache (see module docstring)."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        interval: int = 3            # N: a full step every N steps
        boundary: float = 0.5        # fraction of the steps after which the front blocks are cached
        cached_blocks: int | None = None   # blocks per span (default: half the blocks, rounded down)
        warmup: int = 1              # the first steps always compute
        regions: str | None = None   # the blocks (pattern); default: the repeated blocks
        steps: int | None = None     # steps per request; default: the calibration run's

        def __post_init__(self):
            check_range("delta_cache", "interval", self.interval, lo=1)
            check_range("delta_cache", "boundary", self.boundary, lo=0, hi=1)
            check_range("delta_cache", "warmup", self.warmup, lo=1)
            if self.cached_blocks is not None:
                check_range("delta_cache", "cached_blocks", self.cached_blocks, lo=1)

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        names = graphs_to_cache(program, self.name)
        steps = calls_of(ctx, o.steps, self.name, program)
        b = round(o.boundary * steps)
        table = tuple("full" if refreshes(i, o.interval, o.warmup)
                      else ("reuse_rear" if i < b else "reuse_front") for i in range(steps))
        if all(v == "full" for v in table) or not names:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"reuse_steps": 0})
        new = program
        for gname in names:
            blocks = block_regions(program, o.regions, gname)
            k = o.cached_blocks if o.cached_blocks is not None else len(blocks) // 2
            if not 1 <= k <= len(blocks):
                raise OptionError(f"pass 'delta_cache' option 'cached_blocks': {k} is not in [1, {len(blocks)}] "
                                  f"(the model has {len(blocks)} blocks)")
            gm = program.graphs[gname].module
            front = make_span(gm, "delta_front", blocks[:k], self.name)
            rear = make_span(gm, "delta_rear", blocks[len(blocks) - k:], self.name)
            used = [v for v in ("reuse_rear", "reuse_front") if v in table]
            spans = [s for s, v in ((front, "reuse_front"), (rear, "reuse_rear")) if v in used]
            reuse = [(v, ["delta_rear" if v == "reuse_rear" else "delta_front"]) for v in used]
            new = variant_program(new, gname, spans, reuse, table, "full", self.name)
            flops = tuple((f"{gname}.{v}", graph_flops(new.graphs[f"{gname}.{v}"])) for v in ["full", *used])
            rec = CachePlan("delta_cache", tuple(spans), tuple((v, tuple(n)) for v, n in reuse), table, "full", flops,
                            graphs=(gname,))
            new = new.replace(records=cache_record(new, rec))
        n_reuse = sum(v != "full" for v in table)
        ctx.log.info("delta_cache: %d blocks per span, boundary step %d, %d of %d steps reuse", k, b, n_reuse, steps)
        return PassResult(new, modified=True, preserved=(RedundancyProfile,),
                          stats={"reuse_steps": n_reuse, "cached_blocks": k, "boundary_step": b, "steps": steps,
                                 "graphs": len(names)})
