"""Skip the block stack while the calibrated residual-magnitude ratios say the
step changes little (MagCache, "MagCache: Fast Video Generation with
Magnitude-Aware Cache").

Before:  h = blocks(x)                                     at every step
After:   a step table: `full` steps run the blocks and store state.blocks = h - x;
         `reuse` steps compute h = x + state.blocks
Calibration: on the calibration run, gamma_t = mean_tokens ||r_t|| / mean_tokens ||r_{t-1}||
for the span's residual r. Decision (per step, after the first `retention` steps):
accumulate ratio *= gamma_t and err += |1 - ratio|; reuse while err <= threshold
and at most `max_skip` steps in a row, else compute and reset. The decisions use
only the calibrated table, so the plan is static.

Every graph the Plan calls is cached; the ratios are recorded through the whole
Program (numeric variants of one graph, such as timestep buckets, share one
sequence and one table).

Reads: the calibration run. Writes: CachePlan (with the ratios); per graph G,
graphs `G.full` and `G.reuse` and a table Select in place of each call of G. Invariant: threshold 0 reuses nothing (no-op).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

import torch

from pared.analysis.recorder import record
from pared.analysis.redundancy import RedundancyProfile, block_regions
from pared.ir.program import Program
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, RewritePass, check_range, register_pass
from pared.passes.cache.common import (CachePlan, cache_record, check_goal, graph_flops, graphs_to_cache, make_span,
                                       search_threshold, variant_program, with_search)
from pared.passes.cache.interval_cache import resolve_range


def magnitude_ratios(residuals: Sequence[np.ndarray]) -> list[float]:
    """gamma_t for t >= 1 (gamma_0 = 1): ratio of the mean per-token L2 norm of
    consecutive residuals [B, ..., C] (the last dim is the feature)."""
    norms = [float(np.mean(np.linalg.norm(r.reshape(-1, r.shape[-1]), axis=-1))) for r in residuals]
    return [1.0] + [n / p if p > 0 else 1.0 for p, n in zip(norms, norms[1:])]


def magcache_schedule(ratios: Sequence[float], threshold: float, max_skip: int, retention: int) -> tuple[str, ...]:
    """The step -> variant table MagCache's rule gives for these ratios."""
    out, acc_ratio, acc_err, skipped = [], 1.0, 0.0, 0
    for t, g in enumerate(ratios):
        if t < retention:
            out.append("full")
            continue
        acc_ratio *= g
        acc_err += abs(1.0 - acc_ratio)
        if acc_err <= threshold and skipped < max_skip:
            out.append("reuse")
            skipped += 1
        else:
            out.append("full")
            acc_ratio, acc_err, skipped = 1.0, 0.0, 0
    return tuple(out)


@register_pass("magnitude_cache")
class CacheByMagnitude(RewritePass):
    """MagCache (see module docstring)."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        threshold: float = 0.06        # tau: accumulated error allowed while reusing
        target: dict | None = None     # instead of threshold: {psnr_db: X} or {speedup: X}, searched on the calibration run
        #                                (both: a Pareto search, the search's trials and seed)
        max_skip: int = 3              # K: reuses in a row at most
        retention: float = 0.2         # fraction of the first steps that always compute
        first: int | None = 0          # first cached block (default: all blocks)
        last: int | None = -1          # last cached block, inclusive
        regions: str | None = None     # the blocks (pattern); default: the repeated blocks

        def __post_init__(self):
            check_range("magnitude_cache", "threshold", self.threshold, lo=0)
            check_range("magnitude_cache", "max_skip", self.max_skip, lo=0)
            check_range("magnitude_cache", "retention", self.retention, lo=0, hi=1)
            check_goal("magnitude_cache", self.target)

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        names = graphs_to_cache(program, self.name)
        if (o.threshold == 0 and o.target is None) or o.max_skip == 0 or not names:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"reuse_steps": 0})
        spans = {}
        for gname in names:
            blocks = block_regions(program, o.regions, gname)
            f, l_ = resolve_range(len(blocks), o.first, o.last, self.name)
            spans[gname] = make_span(program.graphs[gname].module, "blocks", blocks[f:l_ + 1], self.name)
        ctx.progress("magnitude_cache: calibrating residual magnitude ratios")
        # the span's input and output at every call, from whichever graph ran it; numeric
        # variants of one graph (timestep buckets) share one sequence and one table
        seen: dict[tuple[str, int], dict[str, np.ndarray]] = {}

        def keep(tap, value):
            seen.setdefault((program.origin(tap.graph), tap.call), {})[tap.node] = \
                value.detach().to(torch.float32).numpy().copy()
        trace = record(program, ctx.calibration, {g: (s.input, s.output) for g, s in spans.items()}, keep)
        calls = len(trace)
        retention = int(round(o.retention * calls))
        ratios = {}
        for origin in dict.fromkeys(program.origin(g) for g in names):
            span = next(s for g, s in spans.items() if program.origin(g) == origin)
            at = sorted(c for (og, c) in seen if og == origin)
            res = [seen[(origin, c)][span.output] - seen[(origin, c)][span.input] for c in at]
            ratios[origin] = (at, magnitude_ratios(res))

        def table_of(origin: str, th: float) -> tuple[str, ...]:
            at, r = ratios[origin]
            chosen = dict(zip(at, magcache_schedule(r, th, o.max_skip, retention)))
            return tuple(chosen.get(c, "full") for c in range(calls))

        def build(th: float) -> Program:
            new = program
            for gname in names:
                origin = program.origin(gname)
                table = table_of(origin, th)
                if "reuse" not in table:
                    continue
                new = variant_program(new, gname, [spans[gname]], [("reuse", ["blocks"])], table, "full", self.name)
                flops = tuple((f"{gname}.{v}", graph_flops(new.graphs[f"{gname}.{v}"])) for v in ("full", "reuse"))
                rec = CachePlan("magnitude_cache", (spans[gname],), (("reuse", ("blocks",)),), table, "full", flops,
                                tuple(round(x, 6) for x in ratios[origin][1]), threshold=th, graphs=(gname,))
                new = new.replace(records=cache_record(new, rec))
            return new

        th, points, front = o.threshold, (), ()
        if o.target is not None:
            th, points, front = search_threshold(self.name, build, program, ctx.calibration, o.target, 1e-3, 4.0,
                                                 progress=ctx.progress, trials=ctx.trials)
        new = build(th)
        if new is program:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"reuse_steps": 0})
        if points:
            new = with_search(new, points, front)
        table = new.records["CachePlan"].schedule
        ctx.log.info("magnitude_cache: %d of %d steps reuse", table.count("reuse"), calls)
        return PassResult(new, modified=True, preserved=(RedundancyProfile,),
                          stats={"reuse_steps": table.count("reuse"), "cached_blocks": len(spans[names[0]].blocks),
                                 "steps": calls, "graphs": len(names)})
