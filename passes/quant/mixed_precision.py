"""Choose per-layer precision from measured sensitivity under a weight-byte budget,
then emit the quantizers (HAWQ-V3, "HAWQ-V3: Dyadic Neural Network Quantization",
Yao et al., ICML 2021: an exact integer program over per-layer bit choices under
a size budget; MixDQ, "MixDQ: Memory-Efficient Few-Step Text-to-Image Diffusion
Models with Metric-Decoupled Mixed Precision Quantization", Zhao et al., ECCV
2024: per-layer sensitivity measured by quantizing one layer at a time).

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
power, so the summed s_if predicts the whole model's rel_l2²) and c_if its weight
bytes, minimize sum_i s_if subject to sum_i c_if <= budget. Solved exactly by
dynamic programming over the layers on the byte budget in units of
ceil(budget / resolution) bytes, each c_ib rounded up to whole units: a solution
of the discrete problem always fits the real budget, and it is the exact optimum
whenever the units divide the costs (always when budget <= resolution bytes).
The budget is `weight_bytes` (a fraction of the fp32 bytes of the linear layers'
weights: the bytes the choice can change; embeddings and norms are not counted).
With `target` (e.g. {cosine: 0.995}) the pass searches the budget instead: it
solves the DP at a grid of budgets up to `weight_bytes` (default: all fp32),
applies the distinct solutions and measures them on the calibration run
(bisection by bytes), and keeps the smallest that meets the target.

Doing: the weight-only layers are rewritten first (no calibration), then
quantize_linears runs with every layer not chosen for w8a8 excluded, so it
calibrates its activation scales on the graph as it will run.

Reads: SensitivityProfile (run `quant_sensitivity` first, with the same
formats, block sizes and symmetric), calibration. Writes: a MixedPrecisionPlan
record (per layer: format, bits, bytes, predicted error; the budget, the
predicted and measured error of the whole choice, the search probes), plus
quantize_linears' QuantPlan for the w8a8 layers. Invariant: weight bytes <= the budget; the
torch graph computes what the ORT artifact computes (see those passes).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from pared.analysis.quant_sensitivity import SensitivityProfile, compare_outputs, replay
from pared.ir.errors import OptionError, PassError
from pared.ir.program import Program
from pared.ir.transform import PassContext, PassResult, Record, RewritePass, check_range, register_pass
from pared.passes.quant.common import quantized_weight_bytes, weight_only_bytes
from pared.passes.quant.quantize_linears import QuantizeLinears, _find_sites
from pared.passes.quant.quantize_weights_int4 import quantize_sites_weight_only

#: target metrics: name -> True when larger is better
TARGET_METRICS = {"cosine": True, "cosine_mean": True, "agreement": True, "sqnr_db": True, "rel_l2": False}
#: formats: name -> weight bits
FORMAT_BITS = {"w4": 4, "w8": 8, "w8a8": 8, "fp32": 32}
#: budgets (as fractions of the cap above the smallest feasible one) tried by the target search
SEARCH_POINTS = 48


@dataclass(frozen=True)
class LayerBits:
    layer: str
    format: str                    # w4, w8, w8a8 or fp32
    bits: int                      # its weight bits: 4, 8 or 32
    bytes: int                     # weight bytes at those bits
    fp32_bytes: int
    predicted_rel_l2: float        # this layer alone at those bits (SensitivityProfile)


@dataclass(frozen=True)
class MixedPrecisionPlan(Record):
    """What mixed_precision decided and what it measured."""
    solver: str                    # "dp"
    unit_bytes: int                # the DP's byte unit (costs rounded up to it)
    fp32_bytes: int                # the linear layers' weights in fp32
    budget_bytes: int              # the budget solved for (the chosen one, after a search)
    bytes: int                     # weight bytes of the choice
    predicted_rel_l2: float        # sqrt(sum of per-layer rel_l2^2)
    measured: Mapping[str, float]  # the choice on the calibration run: rel_l2, sqnr_db, cosine(_mean), agreement
    target: tuple[tuple[str, float], ...]   # the fidelity goal (empty: budget only)
    target_met: bool | None        # None without a target
    layers: tuple[LayerBits, ...]
    probes: tuple[tuple[float, int, float, float], ...] = field(default=())  # search: (budget fraction, bytes,
    #                                                          predicted rel_l2, measured target metric)

    @property
    def fraction(self) -> float:
        return self.bytes / self.fp32_bytes


def allocate(costs: list[list[int]], errors: list[list[float]], budget: int,
             resolution: int = 1 << 16) -> tuple[list[int], int]:
    """The choice (one option index per layer) minimizing the summed error with the
    summed cost within `budget`: DP over layers on the budget counted in byte units.
    The unit is the costs' greatest common divisor when the budget holds at most
    `resolution` of them (then the DP is exact); otherwise ceil(budget / resolution),
    with costs rounded up to whole units (the choice still fits the budget; it is
    exact when the units divide the costs). Ties go to fewer bytes.

    Returns:
        (option index per layer, byte unit)
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
        raise ValueError(f"no choice fits a budget of {budget} bytes (the smallest needs "
                         f"{sum(min(c) for c in costs)})")
    u = int(np.flatnonzero(best == best[np.isfinite(best)].min())[0])
    choice = []
    for i in range(len(costs) - 1, -1, -1):
        j = int(picks[i][u])
        choice.append(j)
        u -= -(-int(costs[i][j]) // unit)
    return choice[::-1], unit


def _as_target(value: Any) -> tuple[tuple[str, float], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping) or not value:
        raise OptionError("pass 'mixed_precision': option 'target' takes a mapping like {cosine: 0.995}, "
                          f"got {value!r}")
    out = []
    for k, v in value.items():
        if k not in TARGET_METRICS:
            import difflib
            close = difflib.get_close_matches(str(k), list(TARGET_METRICS), n=1)
            raise OptionError(f"pass 'mixed_precision': option 'target': unknown metric {k!r}"
                              + (f"; did you mean '{close[0]}'?" if close else
                                 f"; known: {', '.join(TARGET_METRICS)}"))
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise OptionError(f"pass 'mixed_precision': option 'target': {k} expects a number, got {v!r}")
        out.append((str(k), float(v)))
    return tuple(out)


def meets(measured: Mapping[str, float], target: tuple[tuple[str, float], ...]) -> bool:
    return all(measured[k] >= v if TARGET_METRICS[k] else measured[k] <= v for k, v in target)


@register_pass("mixed_precision")
class MixedPrecision(RewritePass):
    """Per-layer formats (w4 / w8a8 / fp32, opt-in w8) under a weight-byte budget (see module docstring)."""

    requires = (SensitivityProfile,)

    @dataclass(frozen=True, kw_only=True)
    class Options:
        weight_bytes: float | None = None    # budget: fraction of the linear layers' fp32 weight bytes
        target: Any = None                   # fidelity goal on the calibration run, e.g. {cosine: 0.995}: search
        formats: tuple[str, ...] = ("w4", "w8a8", "fp32")  # allowed: w4, w8a8, fp32 (4, 8, 32 bits) and w8
        block_size: int = 32                 # w4 block size (as the SensitivityProfile's)
        w8_block_size: int = 128             # w8 block size (as the SensitivityProfile's)
        symmetric: bool = True               # weight-only scheme (as the SensitivityProfile's)
        resolution: int = 1 << 16            # most DP budget units (beyond: costs rounded up to budget / resolution)

        def __post_init__(self):
            if self.weight_bytes is None and self.target is None:
                raise OptionError("pass 'mixed_precision': give option 'weight_bytes' (a budget, e.g. 0.3 of the "
                                  "fp32 weight bytes), option 'target' (e.g. {cosine: 0.995}), or both")
            if self.weight_bytes is not None:
                check_range("mixed_precision", "weight_bytes", self.weight_bytes, lo=0.0, hi=1.0, lo_open=True)
            formats = tuple(self.formats)
            if not formats or any(f not in FORMAT_BITS for f in formats):
                raise OptionError(f"pass 'mixed_precision': option 'formats' takes values from "
                                  f"{list(FORMAT_BITS)}, got {list(formats)}")
            check_range("mixed_precision", "resolution", self.resolution, lo=16)
            object.__setattr__(self, "formats", formats)
            object.__setattr__(self, "target", _as_target(self.target))

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        prof: SensitivityProfile = ctx.require(SensitivityProfile, self.name)
        mine = (o.block_size, o.w8_block_size, o.symmetric)
        if (prof.block_size, prof.w8_block_size, prof.symmetric) != mine and ({"w4", "w8"} & set(o.formats)):
            raise PassError(f"pass 'mixed_precision': the SensitivityProfile measured weight-only formats with "
                            f"block_size {prof.block_size}, w8_block_size {prof.w8_block_size}, symmetric "
                            f"{prof.symmetric}, but this pass emits block_size {o.block_size}, w8_block_size "
                            f"{o.w8_block_size}, symmetric {o.symmetric}; give quant_sensitivity the same options")
        if prof.graph not in program.graphs or len(program.graphs) != 1:
            raise PassError(f"pass 'mixed_precision' quantizes a single-graph program (the one the "
                            f"SensitivityProfile measured); this one has graphs {list(program.graphs)}")
        gm = program.graphs[prof.graph].module
        present = {s.region for s in _find_sites(gm, batched=not any(program.graphs[prof.graph].dynamic_dims))}
        layers = [lay for lay in prof.layers if lay.layer in present]
        if not layers:
            return PassResult(program, modified=False, preserved=tuple(ctx.records),
                              stats={f: 0 for f in FORMAT_BITS})
        unmeasured = [f for f in o.formats if f != "fp32" and not any(f in lay.formats for lay in layers)]
        if unmeasured:
            raise PassError(f"pass 'mixed_precision': option 'formats' allows {unmeasured}, which the "
                            f"SensitivityProfile did not measure; run quant_sensitivity with formats "
                            f"{[f for f in o.formats if f != 'fp32']}")
        options = [[f for f in o.formats if f == "fp32" or f in lay.formats] for lay in layers]
        costs = [[self._cost(lay, f) for f in opts] for lay, opts in zip(layers, options)]
        errors = [[lay.error(f) ** 2 for f in opts] for lay, opts in zip(layers, options)]
        fp32 = sum(lay.fp32_bytes for lay in layers)
        cap = int(fp32 * (o.weight_bytes if o.weight_bytes is not None else 1.0))
        least = sum(min(c) for c in costs)
        if least > cap:
            raise PassError(f"pass 'mixed_precision': option 'weight_bytes' {o.weight_bytes} is below what any "
                            f"choice of {list(o.formats)} reaches ({least / fp32:.4f} of the fp32 weight bytes); "
                            "raise it or allow fewer bits")

        def solve(budget: int) -> tuple[dict[str, str], int]:
            choice, unit = allocate(costs, errors, budget, o.resolution)
            return {lay.layer: opts[j] for lay, opts, j in zip(layers, options, choice)}, unit

        ref = None
        probes: list[tuple[float, int, float, float]] = []
        if not o.target:
            fmt_of, unit = solve(cap)
            new = self._apply(program, prof.graph, fmt_of, ctx)
            met, budget = None, cap
        else:
            ref = replay(gm, ctx.calibration)
            # distinct DP solutions from the smallest feasible budget up to the cap, by bytes
            sols: dict[tuple, tuple[int, int]] = {}
            for f in np.linspace(0.0, 1.0, SEARCH_POINTS + 1):
                budget = int(least + f * (cap - least))
                fmt_of, unit = solve(budget)
                key = tuple(fmt_of[lay.layer] for lay in layers)
                sols.setdefault(key, (budget, unit))
            order = sorted(sols, key=lambda k: (self._bytes(layers, dict(zip([x.layer for x in layers], k))),
                                                -sols[k][0]))
            metric = o.target[0][0]
            tried: dict[int, tuple[Program, dict]] = {}

            def probe(i: int) -> bool:
                if i not in tried:
                    b = dict(zip([x.layer for x in layers], order[i]))
                    prog = self._apply(program, prof.graph, b, ctx)
                    m = compare_outputs(ref, replay(prog.graphs[prof.graph].module, ctx.calibration))
                    tried[i] = (prog, m)
                    probes.append((sols[order[i]][0] / fp32, self._bytes(layers, b), _predicted(layers, b),
                                   m[metric]))
                    ctx.log.debug("mixed_precision: budget %.4f -> %d bytes, predicted rel L2 %.4g, %s %.5g",
                                  *probes[-1][:3], metric, m[metric])
                return meets(tried[i][1], o.target)

            lo, hi = 0, len(order) - 1
            if not probe(hi):
                pick = hi
                ctx.log.warning("mixed_precision: target %s not met even at the largest budget (%.3f of fp32); "
                                "keeping that choice", dict(o.target), cap / fp32)
            else:
                while lo < hi:                   # first solution (by bytes) that meets the target
                    mid = (lo + hi) // 2
                    if probe(mid):
                        hi = mid
                    else:
                        lo = mid + 1
                pick = lo
            probe(pick)
            fmt_of = dict(zip([x.layer for x in layers], order[pick]))
            budget, unit = sols[order[pick]]
            new, measured = tried[pick][0], tried[pick][1]
            met = meets(measured, o.target)
        if ref is None:
            ref = replay(gm, ctx.calibration)
            measured = compare_outputs(ref, replay(new.graphs[prof.graph].module, ctx.calibration))
        chosen = tuple(LayerBits(lay.layer, fmt_of[lay.layer], FORMAT_BITS[fmt_of[lay.layer]],
                                 self._cost(lay, fmt_of[lay.layer]), lay.fp32_bytes, lay.error(fmt_of[lay.layer]))
                       for lay in layers)
        total = sum(x.bytes for x in chosen)
        plan = MixedPrecisionPlan("dp", unit, fp32, budget, total, _predicted(layers, fmt_of),
                                  {k: float(v) for k, v in measured.items()}, o.target, met, chosen, tuple(probes))
        counts = {f: sum(x.format == f for x in chosen) for f in FORMAT_BITS}
        ctx.log.info("mixed_precision: %s layers; weights %.3f of fp32 (budget %.3f); rel L2 predicted %.4g, "
                     "measured %.4g; cosine %.5f", counts, total / fp32, budget / fp32, plan.predicted_rel_l2,
                     measured["rel_l2"], measured["cosine"])
        if counts["fp32"] == len(chosen):
            return PassResult(program, modified=False, preserved=tuple(ctx.records), stats=counts)
        new = new.replace(records={**new.records, "MixedPrecisionPlan": plan})
        return PassResult(new, modified=True, stats={**counts, "weight_bytes_permille": round(1000 * total / fp32),
                                                     "probes": len(probes)})

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
        sites = _find_sites(g.module, batched=not any(g.dynamic_dims))
        for fmt, bs in (("w4", o.block_size), ("w8", o.w8_block_size)):
            todo = [s for s in _find_sites(g.module, batched=not any(g.dynamic_dims)) if fmt_of.get(s.region) == fmt]
            if todo:
                g, _ = quantize_sites_weight_only(g, todo, bs, o.symmetric, self.name, FORMAT_BITS[fmt])
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


def _predicted(layers, fmt_of: Mapping[str, str]) -> float:
    return math.sqrt(sum(lay.error(fmt_of[lay.layer]) ** 2 for lay in layers))
