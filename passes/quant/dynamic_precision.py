"""Switch the activation precision of a robot policy per control step by how the robot
moves (DyQ-VLA, "DyQ-VLA: Temporal-Dynamic-Aware Quantization for Embodied
Vision-Language-Action Models", 2026): coarse motion runs at few activation bits, fine
manipulation at more, over one stored set of int8 weights.

Before:  y = addmm(b, x, W^T)                                   every linear, float
After:   graphs G.a<b> for each width b in `bits`:
           y = QGemm(clamp(x, grid_b); s_x(b), Wq, s_w)         the same int8 Wq, s_w in every variant
         each call of G:  Select(motion by in:<input> -> G.a<b>)  one key: every graph of a call agrees

Each linear's activation range is calibrated once (min-max over the calibration run,
quantize_linears' static INT8). Variant `a<b>` puts that range on a grid of 2^b levels:
s_x = (hi - lo) / (2^b - 1), codes 0 .. 2^b - 1, x clamped to the grid first; ORT runs every
variant on the same u8s8 integer kernels (QGemm / MatMulIntegerToFloat), so below 8 bits
the gain is memory (codes of b bits) and not time on a CPU. The weights are quantize_linears'
int8 per-output-channel codes, one tensor shared by the variants (the ORT artifact stores them
once). The widest width DyQ-VLA uses, 16 (fp16 activations), has no kernel on ONNX Runtime's CPU
provider: a float level would need a second (float) copy of the weights, or a DequantizeLinear
into a float matmul, which the lowering check refuses as slower than fp32; so `bits` here are
widths in 2..8 (the finest 8).

The selector (ir/selectors/motion.py) reads kinematic proxies from the state input at each
policy call: end-effector speed (the `position` indices against their `previous` copy, or the
previous call's), gripper change, jerk; levels are speed bins, a large gripper change or jerk
forces the finest level, and a coarser level is taken only after `dwell` calls in a row. The
speed edges are quantiles of the calibration run's speeds: `shares` of its observations per
level, finest first (DyQ-VLA's thresholds are not published); the gripper threshold is the
`gripper_quantile` of its gripper changes.

Reads: the calibration run (a list of input tuples: the observations' states calibrate the
edges; the run calibrates the activation ranges). Writes: a DynamicPrecisionDecisions record,
graphs `G.a<b>` in place of each called graph with linears, a keyed motion Select per call.
Invariant: variant a8 computes quantize_linears' static INT8 (minmax) rewrite exactly; a<b>
differs only in its activation grids.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np

from pared.ir.errors import OptionError, PassError, PlanError
from pared.ir.plan import Call, Select
from pared.ir.program import Graph, Program, param_bytes
from pared.ir.regions import match
from pared.ir.rewrite import attr_targets, share_equal_constants
from pared.ir.selectors.motion import Motion, first_rows, speed_edges
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, Record, RewritePass, check_range, register_pass
from pared.passes.quant.common import LayerQuant, int8_weight_qmax, weight_format
from pared.passes.quant.convert import apply
from pared.passes.quant.quantize_linears import PLAIN_INT8, decide, find_sites, observe_ranges, spec_of



@dataclass(frozen=True)
class PrecisionLevel:
    """One precision variant: its width, how often the calibration run asked for it, and what
    one call of it holds in the quantized linears' activations."""
    label: str                       # "a8", the variant graphs' suffix and the select's case
    bits: int
    calibration_share: float         # share of calibration observations whose proxies ask for this level
    activation_bytes: int            # one call: the quantized linears' inputs at `bits` per element


@dataclass(frozen=True)
class DynamicPrecisionDecisions(Record):
    """What dynamic_precision decided."""
    levels: tuple[PrecisionLevel, ...]      # finest first
    input: str                               # the program input holding the state
    position: tuple[int, ...]
    previous: tuple[int, ...]
    gripper: tuple[int, ...]
    edges: tuple[float, ...]                 # speed edges (ascending) between the levels
    gripper_threshold: float | None
    jerk_threshold: float | None
    dwell: int
    weights: str                             # the one weight format the levels share
    layers: tuple[LayerQuant, ...]           # every quantized layer, with the finest level's scale
    weight_bytes: int                        # the quantized layers' int8 codes and scales (stored once)
    float_weight_bytes: int                  # the same layers in fp32
    other_param_bytes: int                   # the parameters left float (embeddings, norms, excluded layers)
    activation_elements: int                 # one call: elements entering the quantized linears
    calibration_speeds: tuple[float, float, float] = (0.0, 0.0, 0.0)  # min, median, max of the calibration
    excluded: tuple[str, ...] = ()

    def memory_ratio(self, shares: dict[str, float] | None = None) -> float:
        """(weights + the quantized linears' input activations) over the same in fp32, with the
        levels used in `shares` (label -> share of calls; default: the calibration's)."""
        shares = shares or {lv.label: lv.calibration_share for lv in self.levels}
        act = sum(shares.get(lv.label, 0.0) * lv.activation_bytes for lv in self.levels)
        total = sum(shares.get(lv.label, 0.0) for lv in self.levels) or 1.0
        quant = self.weight_bytes + self.other_param_bytes + act / total
        return quant / (self.float_weight_bytes + self.other_param_bytes + 4 * self.activation_elements)


@register_pass("dynamic_precision")
class SwitchPrecisionByMotion(RewritePass):
    """Activation bit-width chosen per control step by motion (see module docstring)."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        bits: tuple[int, ...] = (8, 4)           # activation widths of the variants, finest first (2..8)
        input: str = "state"                     # the program input holding the robot state
        position: tuple[int, ...] = ()           # state indices of the end-effector position (required)
        previous: tuple[int, ...] = ()           # the same position one tick earlier (else: the previous call's)
        gripper: tuple[int, ...] = ()            # (current, previous) state indices of the gripper opening
        shares: tuple[float, ...] | None = None  # calibration share per level by speed, finest first (equal)
        gripper_quantile: float | None = 0.9     # a gripper change above this quantile forces the finest level
        jerk: float | None = None                # a jerk above this (state units) forces the finest level
        dwell: int = 2                           # calls a coarser level must be asked for before it is taken
        exclude: tuple[str, ...] | str = ()      # region patterns whose linear layers stay float

        def __post_init__(self):
            for name in ("bits", "position", "previous", "gripper"):
                v = getattr(self, name)
                object.__setattr__(self, name, (v,) if isinstance(v, int) else tuple(v))
            object.__setattr__(self, "exclude", (self.exclude,) if isinstance(self.exclude, str)
                               else tuple(self.exclude))
            b = self.bits
            if not b or any(isinstance(x, bool) or not isinstance(x, int) or not 2 <= x <= 8 for x in b) \
                    or list(b) != sorted(set(b), reverse=True):
                raise OptionError(f"pass 'dynamic_precision': option 'bits' must be distinct widths in 2..8, "
                                  f"finest first (e.g. [8, 4, 2]), got {list(b)}; 16-bit (float) activations "
                                  "have no kernel over int8 weights on the CPU target")
            if not self.position:
                raise OptionError("pass 'dynamic_precision': option 'position' is required: the state indices "
                                  "of the end-effector position (e.g. [0, 1, 2]), whose speed picks the level")
            if self.shares is not None:
                s = tuple(float(x) for x in self.shares)
                object.__setattr__(self, "shares", s)
                if len(s) != len(b) or any(x <= 0 for x in s) or abs(sum(s) - 1.0) > 1e-6:
                    raise OptionError(f"pass 'dynamic_precision': option 'shares' needs {len(b)} positive "
                                      f"shares (one per width) summing to 1, got {list(s)}")
            if self.gripper_quantile is not None:
                check_range("dynamic_precision", "gripper_quantile", self.gripper_quantile, lo=0.0, hi=1.0)
            if self.jerk is not None:
                check_range("dynamic_precision", "jerk", self.jerk, lo=0.0)
            check_range("dynamic_precision", "dwell", self.dwell, lo=1)
            try:   # the selector's own checks, with placeholder edges
                Motion("in:" + self.input, tuple(f"a{x}" for x in b), self.position, tuple(range(len(b) - 1)),
                       self.previous, self.gripper, 0.0 if self.gripper else None, None, self.dwell)
            except PlanError as e:
                raise OptionError(f"pass 'dynamic_precision': {e}") from None

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        names = program.called_graphs()
        if names and all(program.graphs[n].made_by(self.name) for n in names):
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"quantized": 0})
        if o.input not in program.plan.inputs:
            raise OptionError(f"pass 'dynamic_precision': option 'input' names {o.input!r}, which is not a program "
                              f"input (inputs: {list(program.plan.inputs)})")
        sites_by = {n: find_sites(program.graphs[n].module, batched=not any(program.graphs[n].dynamic_dims))
                    for n in names}
        excluded = sorted({s.region for ss in sites_by.values() for s in ss
                           if any(match(p, r) for p in o.exclude for r in s.regions)})
        todo = {n: [s for s in ss if s.region not in excluded] for n, ss in sites_by.items()}
        todo = {n: ss for n, ss in todo.items() if ss}
        if not todo:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL,
                              stats={"quantized": 0, "excluded": len(excluded)})
        calib = ctx.calibration
        if calib is None or callable(calib):
            raise PassError("pass 'dynamic_precision' calibrates its speed edges on the states of the calibration "
                            "observations: pass calibration= a list of input tuples (demonstration observations)")
        motion = self._motion(program, calib)

        group_of = {n: gi for gi, grp in enumerate(program.weight_groups()) for n in grp}
        _, observed = observe_ranges(program, {n: [s.x for s in ss] for n, ss in todo.items()}, group_of, calib,
                                     "minmax", 99.99, self.name, False)
        qmax = int8_weight_qmax(ctx.target)
        labels = tuple(f"a{b}" for b in o.bits)
        variants: dict[str, dict[str, Graph]] = {}
        layers: list[LayerQuant] = []
        layers_of: dict[str, list[LayerQuant]] = {}
        elements = 0
        seen: set = set()
        for n, sites in todo.items():
            src = program.graphs[n]
            decided = decide(src.module, sites, {s.x: observed[(group_of[n], s.x)] for s in sites}, PLAIN_INT8, ctx)
            base = {d.site.out: spec_of(d, self.name, qmax) for d in decided}
            nodes = {x.name: x for x in src.module.graph.nodes}
            for d in decided:
                if (group_of[n], d.site.weight) not in seen:
                    seen.add((group_of[n], d.site.weight))
                    elements += int(np.prod(tuple(nodes[d.site.x].meta["val"].shape)))
            variants[n] = {}
            for lab, b in zip(labels, o.bits):
                specs = {k: dataclasses.replace(v, act_bits=b) for k, v in base.items()}
                variants[n][lab], done = apply(src, specs, ctx.target, self.name)
                if lab == labels[0]:
                    layers += done
                    layers_of[n] = list(done)
        share_equal_constants([(g.module, attr_targets(g.module) - attr_targets(program.graphs[n].module))
                               for n, vs in variants.items() for g in vs.values()])

        new = program
        for n, vs in variants.items():
            def node(c: Call, graph_of, vs=vs) -> Select:
                return Select(motion, tuple((lab, Call(graph_of(lab), c.inputs, c.outputs, c.device))
                                            for lab in vs), self.name)
            new = new.expand(n, vs, node, by=self.name, numeric=True)

        props = _calibration_proposals(motion, _states(program, calib, o.input))
        once = {(group_of[n], lq.weight): lq for n, lqs in layers_of.items() for lq in lqs}   # each weight once
        wbytes = sum(lq.in_features * lq.out_features + 4 * lq.out_features for lq in once.values())
        fbytes = sum(4 * lq.in_features * lq.out_features for lq in once.values())
        other = param_bytes(program) - fbytes        # everything but the quantized layers' float weights
        speeds = [s for s, _, _ in props["proxies"] if s is not None]
        levels = tuple(PrecisionLevel(lab, b, props["shares"][i], elements * b // 8)
                       for i, (lab, b) in enumerate(zip(labels, o.bits)))
        record = DynamicPrecisionDecisions(
            levels, o.input, o.position, o.previous, o.gripper, motion.edges, motion.gripper_threshold,
            motion.jerk_threshold, o.dwell, weight_format(qmax) + ", shared by the levels", tuple(layers), wbytes,
            fbytes, other, elements,
            (float(min(speeds)), float(np.median(speeds)), float(max(speeds))) if speeds else (0.0, 0.0, 0.0),
            tuple(excluded))
        new = new.with_record(record)
        ratio = record.memory_ratio()
        ctx.log.info("dynamic_precision: %d linear layers int8 in %d graph(s), activation widths %s by speed edges "
                     "%s (calibration shares %s); weights + linear inputs %.1f%% of fp32", len(once), len(todo),
                     list(o.bits), [round(e, 4) for e in motion.edges],
                     [round(s, 3) for s in props["shares"]], 100 * ratio)
        return PassResult(new, modified=True, stats={
            "quantized": len(once), "excluded": len(excluded), "levels": len(labels), "graphs": len(todo),
            "variants": sum(len(vs) for vs in variants.values())})

    def _motion(self, program: Program, calib) -> Motion:
        """The selector, its speed edges and gripper threshold from the calibration states."""
        o = self.options
        states = _states(program, calib, o.input)
        probe = Motion("in:" + o.input, ("x",), o.position, (), o.previous, o.gripper, None, None, 1)
        proxies = probe.proxies_over(states)
        shares = o.shares or tuple(1.0 / len(o.bits) for _ in o.bits)
        try:
            edges = speed_edges([p[0] for p in proxies], shares, "pass 'dynamic_precision'")
        except PlanError as e:
            raise PassError(str(e)) from None
        grip = None
        if o.gripper and o.gripper_quantile is not None:
            g = np.asarray([p[1] for p in proxies], dtype=np.float64)
            grip = float(np.quantile(g, o.gripper_quantile))
        return Motion("in:" + o.input, tuple(f"a{b}" for b in o.bits), o.position, edges, o.previous, o.gripper,
                      grip, o.jerk, o.dwell)


def _states(program: Program, calib, name: str) -> list[np.ndarray]:
    """The first row of input `name` of each calibration observation."""
    at = list(program.plan.inputs).index(name)
    return first_rows(obs[at] for obs in calib)


def _calibration_proposals(motion: Motion, states: list[np.ndarray]) -> dict[str, Any]:
    """The level the proxies ask for at each calibration observation (no hysteresis), and the
    share of observations per level."""
    proxies = motion.proxies_over(states)
    want = [motion.propose(*p) for p in proxies]
    k = len(motion.cases)
    return {"proxies": proxies, "shares": tuple(want.count(i) / max(len(want), 1) for i in range(k))}
