"""Choose per-layer precision from measured sensitivity under a weight-byte or a
measured-latency budget, then emit the quantizers (HAWQ-V3, "HAWQ-V3: Dyadic
Neural Network Quantization", Yao et al., ICML 2021: an exact integer program over
per-layer bit choices under a size or latency budget; MixDQ, "MixDQ:
Memory-Efficient Few-Step Text-to-Image Diffusion Models with Metric-Decoupled
Mixed Precision Quantization", Zhao et al., ECCV 2024: per-layer sensitivity
measured by quantizing one layer at a time; HAQ, "HAQ: Hardware-Aware Automated
Quantization with Mixed Precision", Wang et al., CVPR 2019: latency measured on
the hardware rather than inferred from bits).

Before:  every linear layer float32
After:   each layer i in a format f_i from `formats` (default w4, w8a8, fp32: 4, 8, 32 bits):
           w4   -> weight-only block-wise int4 (quantize_weights_int4's rewrite; MatMulNBits in ORT)
           w8a8 -> static W8A8 (the quantize_linears pass; QGemm in ORT)
           w8   -> weight-only block-wise int8 (the same rewrite at 8 bits; MatMulNBits bits=8),
                   opt-in: W8A8's per-tensor activation error where the layer is sensitive
                   at weight-only-int8 bytes, at float speed (measured: benchmarks/quant_mixed.py)
           fp32 -> unchanged

Deciding: with s_if = rel_l2² of the final output when only layer i is quantized
to f (SensitivityProfile; quantization noise of independent layers adds in
power, so the summed s_if predicts the whole model's rel_l2²) and c_if its cost,
minimize sum_i s_if subject to sum_i c_if <= budget. The cost is one of:
  weight_bytes: F  c_if = the layer's weight bytes in f; the budget F x the fp32
                   bytes of the linear layers' weights (the bytes the choice can
                   change; embeddings and norms are not counted).
  latency: F       c_if = the layer's measured latency in f on the target
                   (LatencyProfile from the `latency` analysis: a one-layer model
                   per shape and format, lowered by pared's own rewrites and
                   backend, its per-call overhead subtracted) in integer units of
                   1 ns, or of ceil(fp32 total / resolution) ns for a total above
                   resolution ns, each rounded up; the budget F x the layers'
                   summed fp32 latency in those units (so F = 1 always admits
                   all-fp32, and the choice's latency stays within the budget). A
                   format slower than fp32 for a layer costs more and errs more,
                   so it is never chosen.
The two are exclusive (one DP, one budget); with a LatencyProfile present a
weight_bytes plan still reports its predicted latency. Solved exactly by dynamic
programming over the layers on the budget in units of the costs' gcd, or, past
`resolution` units, of ceil(budget / resolution) with each c_if rounded up to
whole units: a solution of the discrete problem always fits the real budget, and
it is the exact optimum whenever the units divide the costs (always when the
budget is <= resolution bytes or ns). A budget below the cheapest choice (e.g.
`latency: 0.5` where no format runs faster than half of fp32) is refused with
the fraction the cheapest choice reaches; nothing falls back silently.
With `target` (e.g. {cosine: 0.995}) the pass searches the budget instead: it
solves the DP at a grid of budgets up to the given cap (default: all fp32) on
the `objective` (weight_bytes, or latency: bisect on the latency budget),
applies the distinct solutions and measures them on the calibration run
(bisection by the objective's cost; with a search `width` w, rounds of w
solutions, each a trial on the context's executor, ctx.trials), and keeps the
cheapest that meets the target.

Doing: the weight-only layers are rewritten first (no calibration), then
quantize_linears runs with every layer not chosen for w8a8 excluded, so it
calibrates its activation scales on the graph as it will run.

Reads: SensitivityProfile (run `quant_sensitivity` first, with the same
formats, block sizes and symmetric), LatencyProfile (run `latency` first, with
the same formats and block sizes; required for `latency:` / `objective:
latency`, optional otherwise), calibration. Writes: a MixedPrecisionPlan record
(per layer: format, bits, bytes, predicted error, latency; the budget, the
predicted and measured error of the whole choice, the predicted bytes and latency
fractions, the search probes), the LatencyProfile it used, plus quantize_linears'
QuantPlan for the w8a8 layers. Invariant: the chosen cost <= the budget; the
torch graph computes what the ORT artifact computes (see those passes).
"""
from __future__ import annotations

import itertools
import math
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from pared.analysis.latency import LatencyProfile
from pared.analysis.quant_sensitivity import SensitivityProfile, compare_outputs, replay
from pared.analysis.search import trials_of
from pared.ir.errors import OptionError, PassError
from pared.ir.formats import FORMATS, LinearSpec
from pared.ir.goal import Goal
from pared.ir.patterns import find_sites
from pared.ir.program import Program
from pared.ir.transform import (PRESERVE_ALL, PassContext, PassResult, Record, RewritePass, check_block_size,
                              check_range, record_of, register_pass)
from pared.passes.quant.common import quantized_weight_bytes, weight_only_bytes
from pared.passes.quant.quantize_linears import QuantizeLinears
from pared.passes.quant.convert import apply
from pared.passes.quant import quantize_weights_int4  # noqa: F401  (registers the weight-only converter)

#: the metrics option 'target' (a Goal, ir/goal.py) can name: what compare_outputs measures
TARGET_METRICS = ("cosine", "cosine_mean", "agreement", "sqnr_db", "rel_l2")
#: formats: name -> weight bits
FORMAT_BITS = {name: FORMATS[name].weight_bits for name in ("w4", "w8", "w8a8", "fp32")}
#: budgets (as fractions of the cap above the smallest feasible one) tried by the target search
SEARCH_POINTS = 48
#: what a budget can count (each is also the option that gives that budget)
OBJECTIVES = ("weight_bytes", "latency")


@dataclass(frozen=True)
class LayerBits:
    layer: str
    format: str                    # w4, w8, w8a8 or fp32
    bits: int                      # its weight bits: 4, 8 or 32
    bytes: int                     # weight bytes at those bits
    fp32_bytes: int
    predicted_rel_l2: float        # this layer alone at those bits (SensitivityProfile)
    latency_s: float | None = None       # its measured latency in that format (LatencyProfile cost; None: none)
    fp32_latency_s: float | None = None  # ... in fp32


@dataclass(frozen=True)
class MixedPrecisionPlan(Record):
    """What mixed_precision decided and what it measured."""
    solver: str                    # "dp"
    unit_bytes: int                # the DP's byte unit (costs rounded up to it); 0: solved on latency
    fp32_bytes: int                # the linear layers' weights in fp32
    budget_bytes: int              # the byte budget solved for (the chosen one, after a search); fp32_bytes
    #                                when solved on latency (no byte cap)
    bytes: int                     # weight bytes of the choice
    predicted_rel_l2: float        # sqrt(sum of per-layer rel_l2^2)
    measured: Mapping[str, float]  # the choice on the calibration run: rel_l2, sqnr_db, cosine(_mean), agreement
    target: tuple[tuple[str, float], ...]   # the fidelity goal (empty: budget only)
    target_met: bool | None        # None without a target
    layers: tuple[LayerBits, ...]
    probes: tuple[tuple[float, int, float, float], ...] = field(default=())  # search: (budget fraction of the
    #                                   objective, bytes, predicted rel_l2, measured target metric)
    objective: str = "weight_bytes"    # what the budget counted: weight_bytes or latency
    unit_ns: int = 0                   # the DP's latency unit in ns (objective latency; costs rounded up to it)
    fp32_latency_s: float | None = None    # the linear layers' summed latency in fp32 (None: no LatencyProfile)
    latency_s: float | None = None     # predicted: the summed latency of the choice
    budget_latency_s: float | None = None  # the latency budget solved for (objective latency)

    @property
    def fraction(self) -> float:
        """Weight bytes of the choice over fp32."""
        return self.bytes / self.fp32_bytes

    @property
    def latency_fraction(self) -> float | None:
        """Predicted summed layer latency of the choice over fp32 (None without a LatencyProfile)."""
        if self.latency_s is None or not self.fp32_latency_s:
            return None
        return self.latency_s / self.fp32_latency_s


def allocate(costs: list[list[int]], errors: list[list[float]], budget: int,
             resolution: int = 1 << 16) -> tuple[list[int], int]:
    """The choice (one option index per layer) minimizing the summed error with the
    summed cost within `budget`: DP over layers on the budget counted in cost units
    (costs are non-negative integers: bytes, or nanoseconds of latency).
    The unit is the costs' greatest common divisor when the budget holds at most
    `resolution` of them (then the DP is exact); otherwise ceil(budget / resolution),
    with costs rounded up to whole units (the choice still fits the budget; it is
    exact when the units divide the costs). Ties go to the smaller cost.

    Returns:
        (option index per layer, cost unit)
    Raises:
        ValueError: when no choice fits the budget.
    """
    g = 0
    for c in itertools.chain.from_iterable(costs):
        g = math.gcd(g, int(c))
    unit = g if g and int(budget) // g <= resolution else max(1, -(-int(budget) // int(resolution)))
    cap = int(budget) // unit
    inf = math.inf
    best = np.full(cap + 1, inf)          # best[u]: least error using exactly u units
    best[0] = 0.0
    picks = []
    for cs, es in zip(costs, errors):
        nxt = np.full(cap + 1, inf)
        pick = np.full(cap + 1, -1, dtype=np.int8)
        for j, (c, e) in enumerate(zip(cs, es)):
            cu = -(-int(c) // unit)
            if cu > cap:
                continue
            cand = np.full(cap + 1, inf)
            cand[cu:] = best[:cap + 1 - cu] + e
            better = cand < nxt
            nxt[better] = cand[better]
            pick[better] = j
        best = nxt
        picks.append(pick)
    if not np.isfinite(best).any():
        raise ValueError(f"no choice fits a budget of {budget} (the smallest needs "
                         f"{sum(min(c) for c in costs)})")
    u = int(np.flatnonzero(best == best[np.isfinite(best)].min())[0])
    choice = []
    for i in range(len(costs) - 1, -1, -1):
        j = int(picks[i][u])
        choice.append(j)
        u -= -(-int(costs[i][j]) // unit)
    return choice[::-1], unit


def _as_target(value: Any) -> Goal | None:
    return Goal.parse(value, "pass 'mixed_precision': option 'target'", TARGET_METRICS)


def meets(measured: Mapping[str, float], target: Goal | None) -> bool:
    return target is None or target.met(measured)


@register_pass("mixed_precision")
class MixedPrecision(RewritePass):
    """Per-layer formats (w4 / w8a8 / fp32, opt-in w8) under a weight-byte or latency budget (see module
    docstring)."""

    requires = (SensitivityProfile,)

    @dataclass(frozen=True, kw_only=True)
    class Options:
        weight_bytes: float | None = None    # budget: fraction of the linear layers' fp32 weight bytes
        latency: float | None = None         # budget: fraction of the linear layers' summed fp32 latency
        #                                      (LatencyProfile: run `latency` first); excludes weight_bytes
        target: Any = None                   # fidelity goal on the calibration run, e.g. {cosine: 0.995}: search
        objective: str | None = None         # what `target` searches over: weight_bytes or latency (default:
        #                                      the budget given; weight_bytes with target alone)
        formats: tuple[str, ...] = ("w4", "w8a8", "fp32")  # allowed: w4, w8a8, fp32 (4, 8, 32 bits) and w8
        block_size: int = 32                 # w4 block size (as the SensitivityProfile's)
        w8_block_size: int = 128             # w8 block size (as the SensitivityProfile's)
        symmetric: bool = True               # weight-only scheme (as the SensitivityProfile's)
        resolution: int = 1 << 16            # most DP budget units (beyond: costs rounded up to coarser units)

        def __post_init__(self):
            if self.weight_bytes is None and self.latency is None and self.target is None:
                raise OptionError("pass 'mixed_precision': give option 'weight_bytes' (a budget, e.g. 0.3 of the "
                                  "fp32 weight bytes) or option 'latency' (e.g. 0.6 of the fp32 layers' measured "
                                  "latency), option 'target' (e.g. {cosine: 0.995}), or a budget and a target")
            if self.weight_bytes is not None and self.latency is not None:
                raise OptionError("pass 'mixed_precision': options 'weight_bytes' and 'latency' are two budgets "
                                  "for the one DP; give one of them (the other is then reported, not bounded)")
            if self.weight_bytes is not None:
                check_range("mixed_precision", "weight_bytes", self.weight_bytes, lo=0.0, hi=1.0, lo_open=True)
            if self.latency is not None:
                check_range("mixed_precision", "latency", self.latency, lo=0.0, hi=1.0, lo_open=True)
            objective = self.objective
            if objective is not None and objective not in OBJECTIVES:
                raise OptionError(f"pass 'mixed_precision': option 'objective' takes one of {list(OBJECTIVES)}, "
                                  f"got {objective!r}")
            given = "latency" if self.latency is not None else "weight_bytes" if self.weight_bytes is not None \
                else None
            if objective is not None and given is not None and objective != given:
                raise OptionError(f"pass 'mixed_precision': option 'objective' {objective!r} disagrees with the "
                                  f"budget given (option '{given}'); drop 'objective' or give the '{objective}' "
                                  "budget instead")
            object.__setattr__(self, "objective", objective or given or "weight_bytes")
            for opt in ("block_size", "w8_block_size"):
                check_block_size("mixed_precision", opt, getattr(self, opt))
            formats = tuple(self.formats)
            if not formats or any(f not in FORMAT_BITS for f in formats):
                raise OptionError(f"pass 'mixed_precision': option 'formats' takes values from "
                                  f"{list(FORMAT_BITS)}, got {list(formats)}")
            check_range("mixed_precision", "resolution", self.resolution, lo=16)
            object.__setattr__(self, "formats", formats)
            object.__setattr__(self, "target", _as_target(self.target))

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        prof: SensitivityProfile = ctx.require(SensitivityProfile, self.name, program)
        mine = (o.block_size, o.w8_block_size, o.symmetric)
        if (prof.block_size, prof.w8_block_size, prof.symmetric) != mine and ({"w4", "w8"} & set(o.formats)):
            raise PassError(f"pass 'mixed_precision': the SensitivityProfile measured weight-only formats with "
                            f"block_size {prof.block_size}, w8_block_size {prof.w8_block_size}, symmetric "
                            f"{prof.symmetric}, but this pass emits block_size {o.block_size}, w8_block_size "
                            f"{o.w8_block_size}, symmetric {o.symmetric}; give quant_sensitivity the same options")
        if prof.graph not in program.graphs or len(program.graphs) != 1:
            made = program.variant_makers()
            raise PassError(f"pass 'mixed_precision' allocates bits from the per-layer errors quant_sensitivity "
                            f"measured on graph {prof.graph!r}; this program runs graphs {list(program.graphs)}"
                            f"{' made by ' + ', '.join(made) if made else ''}, whose calls that measurement does "
                            "not cover. Run quant_sensitivity and mixed_precision before cache passes")
        gm = program.graphs[prof.graph].module
        present = {s.region for s in find_sites(gm, batched=not any(program.graphs[prof.graph].dynamic_dims))}
        layers = [lay for lay in prof.layers if lay.layer in present]
        if not layers:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL,
                              stats={f: 0 for f in FORMAT_BITS})
        unmeasured = [f for f in o.formats if f != "fp32" and not any(f in lay.formats for lay in layers)]
        if unmeasured:
            raise PassError(f"pass 'mixed_precision': option 'formats' allows {unmeasured}, which the "
                            f"SensitivityProfile did not measure; run quant_sensitivity with formats "
                            f"{[f for f in o.formats if f != 'fp32']}")
        by_latency = o.objective == "latency"
        lat = ctx.require(LatencyProfile, self.name, program) if by_latency else record_of(program, LatencyProfile)
        times = self._latencies(lat, prof, layers, required=by_latency)     # layer -> format -> seconds
        options = [[f for f in o.formats if (f == "fp32" or f in lay.formats) and (times is None or f in
                                                                                     times[lay.layer])]
                   for lay in layers]
        unit_ns, resolution = 0, o.resolution
        if by_latency:
            # integer costs in units of unit_ns (1 ns, or coarser so the fp32 total stays within resolution
            # units), each rounded up: the choice's latency stays within the budget, and the all-fp32 choice
            # meets a budget of 1.0 exactly (the DP below then runs on the costs' gcd, exact)
            ns = {lay.layer: {f: int(round(t * 1e9)) for f, t in times[lay.layer].items()} for lay in layers}
            unit_ns = max(1, -(-sum(ns[lay.layer]["fp32"] for lay in layers) // o.resolution))
            units = {k: {f: -(-v // unit_ns) for f, v in d.items()} for k, d in ns.items()}
            cost_of = lambda lay, f: units[lay.layer][f]                    # noqa: E731
            resolution = o.resolution + len(layers)
        else:
            cost_of = self._cost
        costs = [[cost_of(lay, f) for f in opts] for lay, opts in zip(layers, options)]
        errors = [[lay.error(f) ** 2 for f in opts] for lay, opts in zip(layers, options)]
        fp32 = sum(lay.fp32_bytes for lay in layers)
        full = sum(cost_of(lay, "fp32") for lay in layers)                 # the objective at all fp32
        frac = o.latency if by_latency else o.weight_bytes
        cap = int(full * (frac if frac is not None else 1.0))
        least = sum(min(c) for c in costs)
        if least > cap:
            what = (f"the fp32 layers' summed latency measured on {lat.target} ({lat.threads} thread(s))"
                    if by_latency else "the fp32 weight bytes")
            raise PassError(f"pass 'mixed_precision': option '{o.objective}' {frac} is below what any choice of "
                            f"{list(o.formats)} reaches ({least / full:.4f} of {what}); raise it or allow "
                            f"{'faster formats' if by_latency else 'fewer bits'}")

        def solve(budget: int) -> tuple[dict[str, str], int]:
            choice, unit = allocate(costs, errors, budget, resolution)
            return {lay.layer: opts[j] for lay, opts, j in zip(layers, options, choice)}, unit

        def total(fmt_of: Mapping[str, str]) -> int:
            return sum(cost_of(lay, fmt_of[lay.layer]) for lay in layers)

        ref = None
        probes: list[tuple[float, int, float, float]] = []
        if not o.target:
            fmt_of, unit = solve(cap)
            new = self._apply(program, prof.graph, fmt_of, ctx)
            met, budget = None, cap
        else:
            ref = replay(gm, ctx.calibration)
            # distinct DP solutions from the smallest feasible budget up to the cap, by the objective's cost
            sols: dict[tuple, tuple[int, int]] = {}
            for f in np.linspace(0.0, 1.0, SEARCH_POINTS + 1):
                budget = int(least + f * (cap - least))
                fmt_of, unit = solve(budget)
                key = tuple(fmt_of[lay.layer] for lay in layers)
                sols.setdefault(key, (budget, unit))
            order = sorted(sols, key=lambda k: (total(dict(zip([x.layer for x in layers], k))), -sols[k][0]))
            metric = o.target.terms[0][0]
            names = [x.layer for x in layers]
            # what a trial needs of the context (the executor may send it to another process)
            tctx = PassContext(calibration=ctx.calibration, target=ctx.target, logger=ctx.log)
            trials = trials_of(ctx)
            run = trials.bind(_measure_choice, (self, program, prof.graph, names, tctx, ref))
            tried: dict[int, dict] = {}

            def said(choice: tuple, m: Mapping[str, float]) -> None:
                ctx.progress(f"mixed_precision: {dict(Counter(choice))} -> {metric} {m[metric]:.5g}")

            def probe(idx: list[int]) -> None:
                """Measure a round of solutions (indices into order) through the executor."""
                new = [i for i in idx if i not in tried]
                for i, m in zip(new, run([order[i] for i in new], said)):
                    tried[i] = m
                    b = dict(zip(names, order[i]))
                    probes.append((sols[order[i]][0] / full if full else 1.0, self._bytes(layers, b),
                                   _predicted(layers, b), m[metric]))
                    ctx.log.debug("mixed_precision: %s budget %.4f -> %d bytes, predicted rel L2 %.4g, %s %.5g",
                                  o.objective, *probes[-1][:3], metric, m[metric])

            lo, hi, w = 0, len(order) - 1, trials.width
            probe([hi])
            if not meets(tried[hi], o.target):
                pick = hi
                ctx.log.warning("mixed_precision: target %s not met even at the largest budget (%.3f of fp32 %s); "
                                "keeping that choice", o.target.to_json(), cap / full if full else 1.0, o.objective)
            else:
                # the first solution (by the objective's cost) that meets the target: rounds of `width`
                # solutions evenly spaced in [lo, hi) (width 1: bisection's (lo + hi) // 2)
                while lo < hi:
                    idx = sorted({lo + (hi - lo) * j // (w + 1) for j in range(1, w + 1)}) if hi - lo > w \
                        else list(range(lo, hi))
                    probe(idx)
                    hi = min([i for i in idx if meets(tried[i], o.target)], default=hi)
                    lo = max([i + 1 for i in idx if i < hi and not meets(tried[i], o.target)], default=lo)
                pick = lo
            probe([pick])
            fmt_of = dict(zip(names, order[pick]))
            budget, unit = sols[order[pick]]
            new, measured = self._apply(program, prof.graph, fmt_of, tctx), tried[pick]
            met = meets(measured, o.target)
        if ref is None:
            ref = replay(gm, ctx.calibration)
            measured = compare_outputs(ref, replay(new.graphs[prof.graph].module, ctx.calibration))
        chosen = tuple(LayerBits(lay.layer, fmt_of[lay.layer], FORMAT_BITS[fmt_of[lay.layer]],
                                 self._cost(lay, fmt_of[lay.layer]), lay.fp32_bytes, lay.error(fmt_of[lay.layer]),
                                 times[lay.layer][fmt_of[lay.layer]] if times else None,
                                 times[lay.layer]["fp32"] if times else None)
                       for lay in layers)
        nbytes = sum(x.bytes for x in chosen)
        lat_fields = {}
        if times:
            lat_fields = {"fp32_latency_s": sum(x.fp32_latency_s for x in chosen),
                          "latency_s": sum(x.latency_s for x in chosen)}
        if by_latency:
            lat_fields.update(objective="latency", unit_ns=unit_ns * unit, budget_latency_s=budget * unit_ns * 1e-9)
        plan = MixedPrecisionPlan("dp", 0 if by_latency else unit, fp32, fp32 if by_latency else budget, nbytes,
                                  _predicted(layers, fmt_of), {k: float(v) for k, v in measured.items()},
                                  o.target.terms if o.target else (),
                                  met, chosen, tuple(probes), **lat_fields)
        counts = {f: sum(x.format == f for x in chosen) for f in FORMAT_BITS}
        lf = plan.latency_fraction
        ctx.log.info("mixed_precision: %s layers; weights %.3f of fp32%s; %s budget %.3f; rel L2 predicted %.4g, "
                     "measured %.4g; cosine %.5f", counts, nbytes / fp32,
                     f", layer latency {lf:.3f} of fp32 (predicted)" if lf is not None else "", o.objective,
                     budget / full if full else 1.0, plan.predicted_rel_l2, measured["rel_l2"], measured["cosine"])
        if counts["fp32"] == len(chosen):
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats=counts)
        records = {**new.records, "MixedPrecisionPlan": plan}
        if lat is not None:
            records["LatencyProfile"] = lat
        new = new.replace(records=records)
        stats = {**counts, "weight_bytes_permille": round(1000 * nbytes / fp32), "probes": len(probes)}
        if lf is not None:
            stats["latency_permille"] = round(1000 * lf)
        # the latency table times each layer in each format on its own: converting some layers leaves those
        # timings true, so it stays (the table the budget was solved on); the sensitivity profile does not
        return PassResult(new, modified=True, preserved=(LatencyProfile,), stats=stats)

    def _latencies(self, lat: LatencyProfile | None, prof: SensitivityProfile, layers,
                   required: bool) -> dict[str, dict[str, float]] | None:
        """layer -> format -> seconds it adds (LatencyProfile costs), for every layer and allowed
        format the profile measured; None when there is no profile, or (not `required`) when
        it does not cover the layers.

        Raises:
            PassError: (when `required`) the profile measured another graph, other block
                sizes, not every layer, or not a format the SensitivityProfile measured.
        """
        o = self.options
        if lat is None:
            return None
        problem = None
        have = {x.layer: x for x in lat.layers}
        missing = [lay.layer for lay in layers if lay.layer not in have]
        unmeasured = sorted({f for lay in layers if lay.layer in have for f in lay.formats
                             if f in o.formats and f not in have[lay.layer].formats})
        if lat.graph != prof.graph:
            problem = f"the LatencyProfile measured graph '{lat.graph}', the SensitivityProfile '{prof.graph}'"
        elif (lat.block_size, lat.w8_block_size, lat.symmetric) != (o.block_size, o.w8_block_size, o.symmetric) \
                and ({"w4", "w8"} & set(o.formats)):
            problem = (f"the LatencyProfile timed weight-only formats with block_size {lat.block_size}, "
                       f"w8_block_size {lat.w8_block_size}, symmetric {lat.symmetric}, but this pass emits "
                       f"block_size {o.block_size}, w8_block_size {o.w8_block_size}, symmetric {o.symmetric}; "
                       "give latency the same options")
        elif missing:
            problem = (f"the LatencyProfile has no entry for layers {missing[:4]}"
                       f"{f' (+{len(missing) - 4})' if len(missing) > 4 else ''}; run 'latency' on this program")
        elif unmeasured:
            problem = (f"option 'formats' allows {unmeasured}, which the LatencyProfile did not time; run "
                       f"latency with formats {[f for f in o.formats if f != 'fp32']}")
        if problem:
            if required:
                raise PassError(f"pass 'mixed_precision': {problem}")
            return None
        return {lay.layer: {f: have[lay.layer].cost(f) for f in have[lay.layer].formats} for lay in layers}

    def _cost(self, lay, fmt: str) -> int:
        """Weight bytes of a layer in format `fmt`."""
        o = self.options
        k, n = lay.in_features, lay.out_features
        if fmt in ("w4", "w8"):
            return weight_only_bytes(k, n, FORMAT_BITS[fmt], o.block_size if fmt == "w4" else o.w8_block_size,
                                     o.symmetric)
        return quantized_weight_bytes(k, n, FORMAT_BITS[fmt])

    def _bytes(self, layers, formats: Mapping[str, str]) -> int:
        return sum(self._cost(lay, formats[lay.layer]) for lay in layers)

    def _apply(self, program: Program, gname: str, fmt_of: Mapping[str, str], ctx: PassContext) -> Program:
        """The program with the chosen quantizers: weight-only layers rewritten, then
        quantize_linears on the layers chosen for w8a8."""
        o = self.options
        g = program.graphs[gname]
        sites = find_sites(g.module, batched=not any(g.dynamic_dims))
        # the weight-only layers: one decision each, converted together
        block = {"w4": o.block_size, "w8": o.w8_block_size}
        specs = {s.out: LinearSpec(fmt_of[s.region], self.name, s.region, block_size=block[fmt_of[s.region]],
                                   symmetric=o.symmetric) for s in sites if fmt_of.get(s.region) in block}
        if specs:
            g, _ = apply(g, specs, ctx.target, self.name)
        new = program.with_graph(gname, g)
        eight = {r for r, f in fmt_of.items() if f == "w8a8"}
        if eight:
            keep = sorted({s.region for s in sites if fmt_of.get(s.region, "fp32") == "fp32"})
            res = QuantizeLinears(exclude=tuple(keep))(new, ctx)
            got = {lq.region for lq in res.program.records["QuantPlan"].layers} if res.modified else set()
            if got != eight:
                raise PassError(f"pass 'mixed_precision': quantize_linears quantized {sorted(got ^ eight)[:4]} "
                                "other than chosen (a layer's region also names other layers); exclude them from "
                                "quant_sensitivity")
            new = res.program
        return new


def _measure_choice(shared: tuple, choice: tuple[str, ...]) -> dict[str, float]:
    """One trial of the target search: the program with one format per layer (in the order of
    `names`), measured against the float run on the calibration (module level: an executor
    sends it to other processes)."""
    pass_, program, gname, names, ctx, ref = shared
    prog = pass_._apply(program, gname, dict(zip(names, choice)), ctx)
    return {k: float(v) for k, v in compare_outputs(ref, replay(prog.graphs[gname].module, ctx.calibration)).items()}


def _predicted(layers, fmt_of: Mapping[str, str]) -> float:
    return math.sqrt(sum(lay.error(fmt_of[lay.layer]) ** 2 for lay in layers))
