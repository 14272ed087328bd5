"""Zero the small inputs of linear layers, with thresholds calibrated to a target sparsity (TEAL,
"Training-Free Activation Sparsity in Large Language Models", Liu et al., ICLR 2025; WINA, "WINA:
Weight Informed Neuron Activation for Accelerating Large Language Model Inference", Chen et al.).

Before:  y = x @ Wᵀ + b
After:   y = (x * (|x| > t)) @ Wᵀ + b                   method teal: t = the sparsity-quantile of |x|
         y = (x * (|x| * c > s)) @ Wᵀ + b               method wina: c_i = ||W[:, i]||_2, s the
                                                         sparsity-quantile of |x_i| * c_i
Thresholds come from the ActivationSparsityProfile (analysis/activation_sparsity.py, computed on
demand on the calibration run). Option `allocation`:
  uniform  every chosen layer at option `sparsity` (TEAL's uniform allocation)
  greedy   TEAL's greedy allocation: each layer gets its own sparsity on a grid (option `step`, up
           to `max_sparsity`) so that the FLOPs-weighted mean is `sparsity`; starting from all
           dense, each step raises the layer whose next grid level adds the least squared error
           per FLOP saved. The error of a layer at a level is measured on the calibration run: the
           relative L2 of the program's outputs with that layer alone masked there, against the
           dense program's (one replay per layer and level; TEAL measures block outputs and
           re-measures after each step; here squared errors are taken as additive across layers,
           as independent errors add in quadrature). A layer called several times in one graph (an
           unrolled decoding loop) is one choice: all its calls get its sparsity.
Inputs a layer shares (q, k, v reading one normed x) get one mask each, as TEAL masks each
projection.

What it saves: the mask is elementwise, so a dense matmul still does all of its work; the
saving is real only where a kernel skips the zeroed columns of W (TEAL's GEMV at batch 1, seq 1).
Neither ONNX Runtime's nor TVM's CPU matmuls do, so here the pass records the FLOPs a skipping
kernel would spend (ideal) beside the graph's own (which grow by the masks): masks-only, said
honestly in its record. Lowering: abs, mul, gt, a cast and a multiply: anywhere.

Reads: ActivationSparsityProfile (greedy: with thresholds at every grid level; the pass runs the
analysis at them when the profile lacks them), calibration (greedy). Writes:
ActivationSparsityDecisions (per layer: threshold,
sparsity measured on the calibration run, ideal FLOPs per call), `pared.ir.created_by` and
`pared.ir.region` on the inserted nodes. Invariant: each graph computes what the eager model
computes with the same thresholds applied to each chosen layer's input (a forward pre-hook);
sparsity 0 layers are left as they are; a layer masked already is not masked again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from pared.analysis.activation_sparsity import ActivationSparsityProfile, column_norms
from pared.analysis.metrics import compare_outputs
from pared.analysis.recorder import replay
from pared.analysis.cost import node_flops
from pared.ir import meta
from pared.ir.errors import OptionError, PassError
from pared.ir.patterns import find_sites
from pared.ir.program import Program
from pared.ir.regions import match
from pared.ir.rewrite import add_constant, splice
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, Record, RewritePass, check_range, register_pass

_NAME = "sparsify_activations"
METHODS = ("teal", "wina")
ALLOCATIONS = ("uniform", "greedy")


@dataclass(frozen=True)
class MaskedLinear:
    graph: str
    layer: str                  # region path
    node: str                   # the matmul
    threshold: float            # on |x| (teal) or |x| * ||W[:, i]|| (wina)
    calibrated_sparsity: float  # the fraction the threshold zeroes on the calibration run (the profile's)
    flops: int                  # the dense matmul's, one call
    ideal_flops: int            # what a kernel skipping the zeroed columns would spend: (1 - sparsity) * flops


@dataclass(frozen=True)
class ActivationSparsityDecisions(Record):
    method: str
    sparsity: float             # the target (greedy: the FLOPs-weighted mean over the chosen layers)
    lowering: str               # "masks-only": the dense matmuls still run every column
    layers: tuple[MaskedLinear, ...]
    allocation: str = "uniform"
    #: greedy: (layer, its matmul FLOPs, rel_l2 of the outputs with it alone at each grid level, 0 first)
    errors: tuple[tuple[str, int, tuple[float, ...]], ...] = ()

    @property
    def ideal_flops_ratio(self) -> float:
        dense = sum(x.flops for x in self.layers)
        return sum(x.ideal_flops for x in self.layers) / dense if dense else 1.0


@register_pass(_NAME)
class SparsifyActivations(RewritePass):
    """Mask each chosen linear's small inputs at a calibrated threshold (see module docstring)."""

    requires = (ActivationSparsityProfile,)

    @dataclass(frozen=True, kw_only=True)
    class Options:
        sparsity: float = 0.5                   # target fraction of each layer's inputs zeroed; one of the
                                                # profile's sparsities (the on-demand profile has 0.25, 0.4, 0.5)
        method: str = "teal"                    # teal (|x|) or wina (|x| * ||W[:, i]||_2)
        layers: tuple[str, ...] = ("**",)       # region patterns of the linear layers masked
        exclude: tuple[str, ...] = ()           # region patterns left dense
        graphs: tuple[str, ...] = ()            # graph name patterns (default: every graph the profile measured)
        allocation: str = "uniform"             # uniform (every layer at `sparsity`) | greedy (TEAL: per layer,
                                                # FLOPs-weighted mean `sparsity`, from measured errors)
        step: float = 0.1                       # greedy: the grid of per-layer sparsities
        max_sparsity: float = 0.9               # greedy: no layer beyond this

        def __post_init__(self):
            check_range(_NAME, "sparsity", self.sparsity, lo=0.0, hi=1.0, hi_open=True)
            if self.allocation not in ALLOCATIONS:
                raise OptionError(f"pass '{_NAME}': option 'allocation' must be one of {list(ALLOCATIONS)}, got "
                                  f"{self.allocation!r}")
            check_range(_NAME, "step", self.step, lo=0.0, hi=0.5, lo_open=True)
            check_range(_NAME, "max_sparsity", self.max_sparsity, lo=0.0, hi=1.0, lo_open=True, hi_open=True)
            if self.allocation == "greedy" and self.sparsity > self.max_sparsity:
                raise OptionError(f"pass '{_NAME}': option 'sparsity' ({self.sparsity}) exceeds 'max_sparsity' "
                                  f"({self.max_sparsity}): no allocation reaches it")
            if self.method not in METHODS:
                raise OptionError(f"pass '{_NAME}': option 'method' must be one of {list(METHODS)}, got "
                                  f"{self.method!r}")
            for f in ("layers", "exclude", "graphs"):
                v = getattr(self, f)
                object.__setattr__(self, f, (v,) if isinstance(v, str) else tuple(v))

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        if o.sparsity == 0:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"masked": 0})
        prof: ActivationSparsityProfile = ctx.require(ActivationSparsityProfile, self.name, program)
        errors: tuple = ()
        if o.allocation == "uniform":
            if not any(abs(o.sparsity - p) < 1e-9 for p in prof.sparsities):
                raise OptionError(f"pass '{_NAME}': option 'sparsity' {o.sparsity} has no threshold in the "
                                  f"ActivationSparsityProfile (it has {list(prof.sparsities)}); run "
                                  f"'activation_sparsity: {{sparsities: [{o.sparsity}]}}' before it")
            k = min(range(len(prof.sparsities)), key=lambda i: abs(prof.sparsities[i] - o.sparsity))
            chosen = [(gp, lin, k) for gp, lin in _chosen(program, prof, o)]
        else:
            chosen, prof, errors = _greedy(program, ctx, prof, o)
        new_graphs, done = _apply(program, prof, chosen, o.method)
        if not done:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"masked": 0})
        prior = program.records.get("ActivationSparsityDecisions")
        rec = ActivationSparsityDecisions(o.method, o.sparsity, "masks-only",
                                          (prior.layers if prior is not None else ()) + tuple(done), o.allocation,
                                          errors)
        ctx.log.info("%s: %s masks on %d linear inputs at sparsity %.2f (%s); ideal matmul FLOPs %.2fx of dense "
                     "(masks-only here: the dense matmuls still run)", _NAME, o.method, len(done), o.sparsity,
                     o.allocation, rec.ideal_flops_ratio)
        new = program.replace(graphs=new_graphs, records={**program.records, "ActivationSparsityDecisions": rec})
        return PassResult(new, modified=True, stats={"masked": len(done),
                                                     "ideal_flops_ratio": round(rec.ideal_flops_ratio, 4)})


def _chosen(program: Program, prof: ActivationSparsityProfile, o: Any) -> list:
    """(graph profile, linear) for every layer the options choose, in the profile's order."""
    graphs = [g for g in prof.graphs if not o.graphs or any(match(p, g.graph) for p in o.graphs)]
    if o.graphs and not graphs:
        raise OptionError(f"pass '{_NAME}': option 'graphs' {list(o.graphs)} matches none of the graphs the "
                          f"profile measured ({[g.graph for g in prof.graphs]})")
    return [(gp, lin) for gp in graphs if gp.graph in program.graphs for lin in gp.linears
            if any(match(p, lin.layer) for p in o.layers) and not any(match(p, lin.layer) for p in o.exclude)]


def _apply(program: Program, prof: ActivationSparsityProfile, chosen: list, method: str) -> tuple[dict, list]:
    """Mask each chosen (graph profile, linear, index of its sparsity in the profile) at that
    sparsity's threshold."""
    new_graphs = dict(program.graphs)
    done: list[MaskedLinear] = []
    by_graph: dict[str, list] = {}
    for gp, lin, k in chosen:
        if k is not None and prof.sparsities[k] > 0:                 # None: left dense
            by_graph.setdefault(gp.graph, []).append((lin, k))
    for gname, todo in by_graph.items():
        g = program.graphs[gname]
        gm = g.copy_module()
        sites = {s.node: s for s in find_sites(gm)}
        nodes = {n.name: n for n in gm.graph.nodes}
        masked_here = 0
        for lin, k in todo:
            site, mm = sites.get(lin.node), nodes.get(lin.node)
            if site is None or mm is None:
                raise PassError(f"pass '{_NAME}': graph '{gname}': the profile's linear {lin.layer} "
                                f"({lin.node}) is not in the graph any more; run activation_sparsity again")
            x = nodes[site.x]
            if x.meta.get(meta.CREATED_BY) == _NAME:
                continue                                  # masked already
            t = (lin.abs_x if method == "teal" else lin.wina).thresholds[k]
            args, ex = [x], [torch.zeros(tuple(x.meta["val"].shape))]
            if method == "wina":
                c = column_norms(gm, site)
                target = f"_sparsify_colnorm_{mm.name}"
                args.append(add_constant(gm, target, c, _NAME, before=mm))
                ex.append(c)
            (y,) = splice(gm, _mask_fn(t, method), args, ex, _NAME, lin.layer)
            mm.replace_input_with(x, y)
            flops = node_flops(mm)
            done.append(MaskedLinear(gname, lin.layer, lin.node, float(t), float(prof.sparsities[k]), flops,
                                     int(round(flops * (1 - prof.sparsities[k])))))
            masked_here += 1
        if masked_here:
            gm.recompile()
            new_graphs[gname] = g.with_module(gm)
    return new_graphs, done


def _greedy(program: Program, ctx: PassContext, prof: ActivationSparsityProfile, o: Any) -> tuple:
    """TEAL's greedy allocation on measured per-layer errors (see module docstring)."""
    if ctx.calibration is None:
        raise PassError(f"pass '{_NAME}': allocation 'greedy' needs a calibration run to measure errors on")
    n = int(round(o.max_sparsity / o.step))
    grid = tuple(round(i * o.step, 6) for i in range(1, n + 1))
    if not all(any(abs(g - p) < 1e-9 for p in prof.sparsities) for g in grid):
        from pared.analysis.activation_sparsity import ActivationSparsity
        ctx.progress(f"{_NAME}: profiling thresholds at sparsities {list(grid)}")
        res = ActivationSparsity(sparsities=tuple(sorted(set(grid) | set(prof.sparsities))))(program, ctx)
        prof = res.program.records["ActivationSparsityProfile"]
    idx = [None] + [min(range(len(prof.sparsities)), key=lambda i: abs(prof.sparsities[i] - g)) for g in grid]
    sites = _chosen(program, prof, o)
    if not sites:
        raise OptionError(f"pass '{_NAME}': options 'layers' {list(o.layers)} / 'exclude' {list(o.exclude)} choose "
                          "no linear layer the profile measured")
    groups: dict[str, list] = {}            # a layer called several times (an unrolled loop) is one choice
    for gp, lin in sites:
        groups.setdefault(lin.layer, []).append((gp, lin))
    layers = list(groups)
    weights = [sum(_layer_flops(program, groups[lay])) for lay in layers]
    ref = replay(program, ctx.calibration)
    err = [[0.0] * (n + 1) for _ in layers]
    for i, lay in enumerate(layers):
        for j in range(1, n + 1):
            masked, _ = _apply(program, prof, [(gp, lin, idx[j]) for gp, lin in groups[lay]], o.method)
            err[i][j] = float(compare_outputs(ref, replay(program.replace(graphs=masked), ctx.calibration))["rel_l2"])
        ctx.progress(f"{_NAME}: measured {lay} at {n} sparsities (rel_l2 up to {err[i][n]:.3g})")
    level = [0] * len(layers)
    total = sum(weights)
    while sum(w * level[i] * o.step for i, w in enumerate(weights)) / total < o.sparsity - 1e-9:
        best = min((i for i in range(len(layers)) if level[i] < n),
                   key=lambda i: ((err[i][level[i] + 1] ** 2 - err[i][level[i]] ** 2) / weights[i], i))
        level[best] += 1
    chosen = [(gp, lin, idx[level[i]]) for i, lay in enumerate(layers) for gp, lin in groups[lay]]
    errors = tuple((lay, int(weights[i]), tuple(round(e, 6) for e in err[i])) for i, lay in enumerate(layers))
    return chosen, prof, errors


def _layer_flops(program: Program, layers: list) -> list[float]:
    """The matmul FLOPs of each (graph profile, linear), one call."""
    nodes = {g: {n.name: n for n in program.graphs[g].module.graph.nodes} for g in {gp.graph for gp, _ in layers}}
    return [float(max(node_flops(nodes[gp.graph][lin.node]), 1)) if lin.node in nodes[gp.graph] else 1.0
            for gp, lin in layers]


def _mask_fn(t: float, method: str) -> Any:
    if method == "teal":
        def mask(x: torch.Tensor) -> torch.Tensor:
            return x * (x.abs() > t).to(x.dtype)
    else:
        def mask(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:      # type: ignore[misc]
            return x * ((x.abs() * c) > t).to(x.dtype)
    return mask
