"""Adaptive reuse of the middle blocks' residual, decided per step by how much
the first blocks' residual changed (FirstBlockCache / DBCache in cache-dit and
diffusers; TeaCache, "Timestep Embedding Tells: It's Time to Cache for Video
Diffusion Model").

Before:  h = blocks(x)                                  at every step
After:   probe:    h_f = blocks[:F](x); signal = h_f - x
         compute:  h_m = blocks[F:n-B](h_f); state.mid = h_m - h_f; h = blocks[n-B:](h_m)
         reuse:    h = blocks[n-B:](h_f + state.mid)
Each call of a graph G becomes `G.probe`, then a rule Select between
`G.compute` and `G.reuse`: the rule picks `reuse` while the accumulated
relative L1 change of `signal` since the last computed step stays below
`threshold`, after `warmup` steps and for at most `max_consecutive` steps in a
row; otherwise `compute`.

Every graph the Plan calls is cached (after cfg_skip: `both` and `cond_only`,
each with its own rule and state).

Reads: nothing required. Writes: CachePlan; per graph G, graphs `G.probe`,
`G.compute`, `G.reuse` and the probe + rule Select in place of each call of G. Invariant: threshold 0 gives the uncached outputs exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from pared.analysis.redundancy import RedundancyProfile, block_regions
from pared.ir.errors import OptionError
from pared.ir.plan import Call, Rule, Select, Seq, StateBuffer
from pared.ir.program import Program
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, RewritePass, check_range, register_pass
from pared.passes.cache.common import (CachePlan, cache_record, check_goal, emit_residuals, first_blocks_probe,
                                       graph_flops, graphs_to_cache, make_span, replace_with_input, reuse_spans,
                                       search_threshold, state_name, with_search)


@register_pass("residual_cache")
class CacheResidualAdaptively(RewritePass):
    """FirstBlockCache / TeaCache-style adaptive caching (see module docstring)."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        threshold: float = 0.1        # reuse while the accumulated rel-L1 change stays below this (0: never)
        target: dict | None = None    # instead of threshold: {psnr_db: X} or {speedup: X}, searched on the calibration run
        #                               (both: a Pareto search, the search's trials and seed)
        front: int = 1                # F: blocks that always run and give the signal
        back: int = 0                 # B: tail blocks that always run
        warmup: int = 2               # the first calls always compute
        max_consecutive: int = 0      # cap on reuses in a row (0: none)
        accumulate: bool = True       # sum the change over consecutive reuses (TeaCache)
        regions: str | None = None    # the blocks (pattern); default: the repeated blocks

        def __post_init__(self):
            check_range("residual_cache", "threshold", self.threshold, lo=0)
            check_range("residual_cache", "front", self.front, lo=1)
            check_range("residual_cache", "back", self.back, lo=0)
            check_range("residual_cache", "warmup", self.warmup, lo=1)
            check_range("residual_cache", "max_consecutive", self.max_consecutive, lo=0)
            check_goal("residual_cache", self.target)

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        names = graphs_to_cache(program, self.name)
        if not names or (o.target is None and o.threshold == 0):
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"cached_blocks": 0})
        if o.target is not None:
            th, points, front = search_threshold(self.name, lambda th: self._build(program, names, th)[0], program,
                                                 ctx.calibration, o.target, 1e-3, 2.0, progress=ctx.progress,
                                                 trials=ctx.trials)
            new, stats = self._build(program, names, th)
            return PassResult(with_search(new, points, front), modified=True, preserved=(RedundancyProfile,),
                              stats=stats)
        new, stats = self._build(program, names, o.threshold)
        ctx.log.info("residual_cache: probe %d block(s), cache %d, tail %d, threshold %g, %d graph(s)", o.front,
                     stats["cached_blocks"], o.back, o.threshold, len(names))
        return PassResult(new, modified=True, preserved=(RedundancyProfile,), stats=stats)

    def _build(self, program: Program, names: list[str], threshold: float) -> tuple[Program, dict]:
        new = program
        for gname in names:
            new, n_cached = self._build_one(new, program, gname, threshold)
        o = self.options
        return new, {"cached_blocks": n_cached, "front": o.front, "back": o.back, "graphs": len(names)}

    def _build_one(self, new: Program, program: Program, gname: str, threshold: float) -> tuple[Program, int]:
        o = self.options
        blocks = block_regions(program, o.regions, gname)
        n = len(blocks)
        if o.front + o.back >= n:
            raise OptionError(f"pass 'residual_cache' options 'front'/'back': {o.front} + {o.back} blocks leave "
                              f"none of the model's {n} blocks to cache")
        src = program.graphs[gname]
        # one stream: the probe hands the compute and reuse variants the primary hidden state only
        mid = make_span(src.module, "mid", blocks[o.front:n - o.back], self.name, streams=False)
        probe, h_f = first_blocks_probe(src, blocks, o.front, self.name)
        with torch.no_grad():
            sig, hid = probe.run(*probe.example_inputs)
        full = emit_residuals(src, [mid], self.name)
        compute = replace_with_input(full, h_f, "hidden", hid.detach().clone(), self.name)
        with torch.no_grad():
            res = compute.run(*compute.example_inputs)[-1]
        reuse = replace_with_input(reuse_spans(src, [mid], [res.detach().clone()], self.name), h_f, "hidden",
                                   hid.detach().clone(), self.name)
        state = f"state:{state_name(program, self.name, gname, 'mid')}"
        # numeric variants of one graph (timestep buckets) share the rule's history: one signal name, one key
        origin = f"{self.name}.{program.origin(gname)}"
        signal, hidden = f"{origin}.signal", f"{origin}.hidden"
        rule = Rule(signal=signal, compute="compute", reuse="reuse", threshold=threshold, metric="rel_l1",
                    accumulate=o.accumulate, warmup=o.warmup, max_consecutive=o.max_consecutive)

        def node(c: Call, graph_of) -> Seq:
            # reuse_spans appended the cache input before `hidden`: bind in that order
            return Seq((Call(graph_of("probe"), c.inputs, (signal, hidden), c.device), Select(rule, (
                ("compute", Call(graph_of("compute"), c.inputs + (hidden,), c.outputs + (state,), c.device)),
                ("reuse", Call(graph_of("reuse"), c.inputs + (state, hidden), c.outputs, c.device))), origin)))
        variants = {"probe": probe, "compute": compute, "reuse": reuse}
        new = new.expand(gname, variants, node, by=self.name, state=(StateBuffer(state[6:]),))
        flops = tuple((f"{gname}.{v}", graph_flops(g)) for v, g in variants.items())
        rec = CachePlan("residual_cache", (mid,), (("reuse", ("mid",)),), (), "compute", flops, threshold=threshold,
                        graphs=(gname,))
        return new.replace(records=cache_record(new, rec)), len(mid.blocks)
