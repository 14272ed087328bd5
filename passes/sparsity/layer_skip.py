"""Skip the transformer blocks that change their tokens least (EfficientVLA's layer pruning,
"EfficientVLA: Training-Free Acceleration and Compression for Vision-Language-Action Models":
remove the layers of lowest importance I(l) = 1 - mean cos(x_l, x_{l+1}), not necessarily
consecutive ones).

Before:  ... -> x_l -> block_l -> x_{l+1} -> ...
After:   ... -> x_l -----------------> ...          (every reader of x_{l+1} reads x_l)

Which blocks: the LayerRedundancyProfile (analysis/layer_redundancy.py, computed on demand)
ranks them by I(l), averaged over the graphs it measured (tokens x calls weighted). Give one of
    skip: k            the k lowest (k counts the blocks skipped by an earlier run too: a
                       second run with the same k finds nothing more)
    layers: [paths]    these blocks
    target: {goal}     the most blocks, taken lowest I first, whose removal still meets the goal
                       on the calibration run (a Goal, ir/goal.py: agreement, cosine, cosine_mean,
                       rel_l2, sqnr_db, psnr_db against the unskipped run's outputs); trials stop
                       at the first k that misses it (measured against the program given)
The same blocks are skipped in every graph that has them (the variants of a cache or bucket
pass alike: a block inside a cached span leaves the span shorter in the variant that computes
it, which is the same as caching the skipped model). A block that hands another value out of
itself (besides its output) is refused, naming the reader. The rewrite only re-wires uses and
removes the dead block, so it lowers anywhere.

Reads: LayerRedundancyProfile, calibration (with `target`). Writes: a LayerSkipDecisions record
(blocks skipped with their I(l), FLOPs per graph before and after, the target's trials).
Invariant: each graph computes what the eager model computes with those blocks replaced by
the identity on their primary input; with nothing to skip the program comes back unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pared.analysis.cost import graph_flops
from pared.analysis.layer_redundancy import LayerRedundancyProfile
from pared.analysis.metrics import compare_outputs
from pared.analysis.recorder import replay
from pared.analysis.redundancy import primary_io
from pared.ir.errors import OptionError, PassError
from pared.ir.goal import Goal
from pared.ir.program import Program
from pared.ir.rewrite import eliminate_dead_code
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, Record, RewritePass, register_pass

_NAME = "layer_skip"
#: the metrics option 'target' can name (what analysis.metrics.compare_outputs measures)
TARGET_METRICS = ("agreement", "cosine", "cosine_mean", "rel_l2", "sqnr_db", "psnr_db")


@dataclass(frozen=True)
class SkippedBlock:
    block: str
    importance: float                   # I(l), averaged over the graphs measured


@dataclass(frozen=True)
class LayerSkipDecisions(Record):
    blocks: tuple[SkippedBlock, ...]
    flops: tuple[tuple[str, int, int], ...]           # (graph, before, after)
    target: tuple[tuple[str, float], ...] = ()
    trials: tuple[tuple[int, tuple[tuple[str, float], ...]], ...] = ()   # (k, measured metrics)


@register_pass(_NAME)
class LayerSkip(RewritePass):
    """Remove the blocks of lowest I(l) (see module docstring)."""

    requires = (LayerRedundancyProfile,)

    @dataclass(frozen=True, kw_only=True)
    class Options:
        skip: int | None = None                 # how many blocks, lowest I(l) first
        layers: tuple[str, ...] | None = None   # these blocks (region paths, e.g. blocks.3)
        target: Any = None                      # a goal on the calibration run, e.g. {agreement: 0.99}
        max_skip: int | None = None             # with target: try at most this many

        def __post_init__(self):
            given = [k for k in ("skip", "layers", "target") if getattr(self, k) is not None]
            if len(given) != 1:
                raise OptionError(f"pass '{_NAME}': give exactly one of options 'skip' (how many blocks), "
                                  f"'layers' (which) or 'target' (a goal like {{agreement: 0.99}}), got "
                                  f"{given or 'none'}")
            if self.skip is not None and self.skip < 0:
                raise OptionError(f"pass '{_NAME}': option 'skip' must be in [0, inf], got {self.skip}")
            if self.max_skip is not None and (self.target is None or self.max_skip < 1):
                raise OptionError(f"pass '{_NAME}': option 'max_skip' goes with 'target' and must be >= 1, "
                                  f"got {self.max_skip}")
            if self.layers is not None:
                layers = (self.layers,) if isinstance(self.layers, str) else tuple(self.layers)
                if not layers or not all(isinstance(p, str) and p for p in layers):
                    raise OptionError(f"pass '{_NAME}': option 'layers' takes block paths like [blocks.3], "
                                      f"got {self.layers!r}")
                object.__setattr__(self, "layers", layers)
            object.__setattr__(self, "target", Goal.parse(self.target, f"pass '{_NAME}': option 'target'",
                                                          TARGET_METRICS))

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        prof: LayerRedundancyProfile = ctx.require(LayerRedundancyProfile, self.name, program)
        ranked = _ranked(prof)
        known = [b for b, _ in ranked]
        prior = program.records.get("LayerSkipDecisions")
        gone = [b.block for b in prior.blocks] if prior is not None else []
        if o.layers is not None:
            unknown = [p for p in o.layers if p not in known and p not in gone]
            if unknown:
                raise OptionError(f"pass '{_NAME}': option 'layers': {unknown[0]!r} is not a measured block; "
                                  f"the blocks are {known}")
            chosen = [b for b in known if b in o.layers]
        elif o.skip is not None:
            # `skip` counts the blocks the model goes without, those skipped before included
            if o.skip > len(known) + len(gone):
                raise OptionError(f"pass '{_NAME}': option 'skip' asks for {o.skip} blocks; the model has "
                                  f"{len(known) + len(gone)} ({sorted(known + gone)})")
            chosen = known[:max(0, o.skip - len(gone))]
        else:
            chosen, trials = self._search(program, ctx, known)
        if not chosen:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"skipped": 0})
        new = _skip(program, chosen, prof)
        before, after = _flops(program), _flops(new)
        imp = dict(ranked)
        rec = LayerSkipDecisions((prior.blocks if prior is not None else ()) + tuple(SkippedBlock(b, imp[b])
                                                                                     for b in chosen),
                                 tuple((g, before[g], after[g]) for g in sorted(after)),
                                 o.target.terms if o.target else (),
                                 trials if o.target else ())
        ctx.log.info("%s: skipped %s (I %s); FLOPs %s", _NAME, chosen, [round(imp[b], 4) for b in chosen],
                     {g: round(after[g] / before[g], 3) for g in after if before[g]})
        new = new.replace(records={**new.records, "LayerSkipDecisions": rec})
        return PassResult(new, modified=True, stats={"skipped": len(chosen)})

    def _search(self, program: Program, ctx: PassContext, known: list[str]) -> tuple[list[str], tuple]:
        o = self.options
        if ctx.calibration is None:
            raise PassError(f"pass '{_NAME}': option 'target' needs a calibration run to measure the goal on")
        prof: LayerRedundancyProfile = ctx.require(LayerRedundancyProfile, self.name, program)
        ref = replay(program, ctx.calibration)
        chosen: list[str] = []
        trials = []
        for k in range(1, min(len(known), o.max_skip or len(known)) + 1):
            measured = compare_outputs(ref, replay(_skip(program, known[:k], prof), ctx.calibration))
            trials.append((k, tuple((m, round(float(measured[m]), 6)) for m in o.target.metrics)))
            ctx.progress(f"{_NAME}: skipping {k} block(s): " + ", ".join(f"{m} {v:.4g}" for m, v in trials[-1][1]))
            if not o.target.met(measured):
                break
            chosen = known[:k]
        return chosen, tuple(trials)


def _ranked(prof: LayerRedundancyProfile) -> list[tuple[str, float]]:
    """(block, I) lowest first; I averaged over the measured graphs, weighted by tokens x calls."""
    acc: dict[str, list[float]] = {}
    order: list[str] = []
    for g in prof.graphs:
        for b in g.blocks:
            w = b.tokens * max(1, len(b.calls))
            a = acc.setdefault(b.block, [0.0, 0.0])
            a[0] += b.importance * w
            a[1] += w
            if b.block not in order:
                order.append(b.block)
    imp = {b: s / w for b, (s, w) in acc.items() if w}
    return sorted(((b, imp[b]) for b in order), key=lambda t: t[1])


def _skip(program: Program, blocks: list[str], prof: LayerRedundancyProfile) -> Program:
    """Every graph with those blocks, each block's output replaced by its primary input."""
    graphs = dict(program.graphs)
    for name, graph in program.graphs.items():
        regions = program.regions(name)
        todo = [b for b in blocks if b in regions]
        if not todo:
            continue
        gm = graph.copy_module()
        nodes = {n.name: n for n in gm.graph.nodes}
        # a skipped block's output -> what now stands for it: a block whose input is the output of
        # one skipped before (adjacent blocks, any order) must pass that one's input through, or
        # the earlier block comes back to life
        alias: dict = {}
        for b in todo:
            io = primary_io(gm, regions[b])
            if io is None:
                raise PassError(f"pass '{_NAME}': block {b!r} of graph {name!r} has no single input of its "
                                "output's shape to pass through")
            inp, out = nodes[io[0].name], nodes[io[1].name]
            others = [o for o in regions[b].outputs if o != out.name]
            if others:
                reader = next(iter(nodes[others[0]].users), None)
                raise PassError(f"pass '{_NAME}': block {b!r} of graph {name!r} also hands {others[0]!r} to "
                                f"{reader.name if reader is not None else 'the graph output'} outside it; skipping it "
                                "would leave that reader without a value")
            while inp in alias:
                inp = alias[inp]
            out.replace_all_uses_with(inp)
            alias[out] = inp
        eliminate_dead_code(gm)
        gm.recompile()
        graphs[name] = graph.with_module(gm)
    return program.replace(graphs=graphs)


def _flops(program: Program) -> dict[str, int]:
    return {name: graph_flops(g.module) for name, g in program.graphs.items()}
