"""Recompute a block range every N steps and reuse its residual in between
(FORA, "FORA: Fast-Forward Caching in Diffusion Transformer Acceleration";
DeepCache, "DeepCache: Accelerating Diffusion Models for Free").

Before:  h = blocks[1:7](x)                              at every step
After:   step i in the table's `full` steps:  h = blocks[1:7](x); state.blocks = h - x
         otherwise (`reuse`):                 h = x + state.blocks
Static: the step -> variant table is fixed at compile time: `full` for the first
`warmup` steps and every `interval` steps after the last of them (FORA: steps 0, N, 2N, ...),
`reuse` otherwise.

Every graph the Plan calls is cached (each Call of graph G becomes a table Select
over `G.full` and `G.reuse`), so it composes after cfg_skip or timestep_quant.

Reads: RedundancyProfile (optional: the number of steps). Writes: CachePlan,
graphs `G.full` and `G.reuse` per graph G, a table Select per call of G. Invariant: interval 1 gives the
uncached outputs exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

from pared.analysis.redundancy import RedundancyProfile, block_regions
from pared.ir.errors import OptionError
from pared.ir.program import Program
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, RewritePass, check_range, record_of, register_pass
from pared.passes.cache.common import (CachePlan, cache_record, check_reuse, graph_flops, graphs_to_cache, refreshes,
                                       span_of, variant_program)


def resolve_range(n_blocks: int, first: int | None, last: int | None, pass_name: str) -> tuple[int, int]:
    """Block indices [first, last] (inclusive; negative counts from the end). By default the
    first and last blocks are left computed (FORA); a stack of fewer than 3 blocks is cached
    whole by default."""
    short = n_blocks < 3
    f = (0 if short else 1) if first is None else first
    l_ = (n_blocks - 1 if short else n_blocks - 2) if last is None else last
    f = f + n_blocks if f < 0 else f
    l_ = l_ + n_blocks if l_ < 0 else l_
    if not (0 <= f <= l_ < n_blocks):
        raise OptionError(f"pass '{pass_name}' options 'first'/'last': block range [{first}, {last}] is empty or "
                          f"outside the model's {n_blocks} blocks")
    return f, l_


def calls_of(ctx: PassContext, steps: int | None, pass_name: str, program: Program) -> int:
    """Steps per request: the option; else the iterations of the plan's steps loop (a sampler
    captured whole); else the calibration run's calls (RedundancyProfile)."""
    if steps:
        return steps
    stepped = program.plan.stepped_graphs()
    if stepped:
        return max(stepped.values())
    prof = record_of(program, RedundancyProfile)
    if prof is None:
        raise OptionError(f"pass '{pass_name}' option 'steps': give the number of steps per request, "
                          "or run temporal_redundancy first")
    return prof.calls


@register_pass("interval_cache")
class CacheBlocksEveryN(RewritePass):
    """Static FORA / DeepCache-style block caching (see module docstring)."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        interval: int = 3            # N: recompute every N-th step (1: never reuse)
        warmup: int = 1              # the first steps always compute
        first: int | None = None     # first cached block (default 1: keep the first block)
        last: int | None = None      # last cached block, inclusive (default -2: keep the last block)
        regions: str | None = None   # the blocks (pattern; several, comma-separated, in order); default: the
                                     # repeated blocks
        reuse: str = "residual"      # "output": cache the values the blocks hand on (DeepCache; any shapes)
        steps: int | None = None     # steps per request; default: the calibration run's

        def __post_init__(self):
            check_range("interval_cache", "interval", self.interval, lo=1)
            check_range("interval_cache", "warmup", self.warmup, lo=1)
            check_reuse("interval_cache", self.reuse)
            if self.steps is not None:
                check_range("interval_cache", "steps", self.steps, lo=1)

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        names = graphs_to_cache(program, self.name)
        steps = calls_of(ctx, o.steps, self.name, program)
        table = tuple("full" if refreshes(i, o.interval, o.warmup) else "reuse" for i in range(steps))
        if "reuse" not in table or not names:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"reuse_steps": 0})
        new = program
        for gname in names:
            blocks = block_regions(program, o.regions, gname)
            f, l_ = resolve_range(len(blocks), o.first, o.last, self.name)
            span = span_of(program.graphs[gname].module, "blocks", blocks[f:l_ + 1], self.name, o.reuse)
            new = variant_program(new, gname, [span], [("reuse", ["blocks"])], table, "full", self.name)
            flops = tuple((f"{gname}.{v}", graph_flops(new.graphs[f"{gname}.{v}"])) for v in ("full", "reuse"))
            rec = CachePlan("interval_cache", (span,), (("reuse", ("blocks",)),), table, "full", flops,
                            graphs=(gname,))
            new = new.replace(records=cache_record(new, rec))
        ctx.log.info("interval_cache: blocks %s..%s of %d graph(s), %d of %d steps reuse", span.blocks[0],
                     span.blocks[-1], len(names), table.count("reuse"), steps)
        return PassResult(new, modified=True, preserved=(RedundancyProfile,),
                          stats={"reuse_steps": table.count("reuse"), "cached_blocks": len(span.blocks),
                                 "steps": steps, "graphs": len(names)})
