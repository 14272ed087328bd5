"""Quantize linear layers to static INT8 that ONNX Runtime runs with integer
kernels (post-training static quantization, "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference", Jacob et al., CVPR 2018).

Before:  y = aten.addmm(b, x, permute(W, [1, 0]))                       float32
After:   xq = quantize_per_tensor(x, s_x, z_x, 0, 255, uint8)            calibrated s_x, z_x
         xd = dequantize_per_tensor(xq, s_x, z_x, 0, 255, uint8)
         wd = dequantize_per_channel(Wq [K, N] int8, s_w [N], 0, axis=1)  constant, transposed
         bd = dequantize_per_channel(bq [N] int32, s_x * s_w, 0, axis=0)  constant
         y = aten.addmm(bd, xd, wd)             (aten.mm without a bias)
With `smooth: a` (SmoothQuant, "SmoothQuant: Accurate and Efficient Post-Training
Quantization for Large Language Models", Xiao et al., ICML 2023) the layers that
read one activation share per-input-channel factors s = max|x|^a / max|W|^(1-a):
x is multiplied by 1/s (a float Mul before the QuantizeLinear) and the weight rows
by s before they are quantized, so outlier channels stop setting the single
activation scale. The batched form torch.export writes for a Linear on a non-contiguous 3-D input,
bmm(x, expand(W^T)) -> view -> add(b), becomes the same on x flattened to 2-D.
Lowered with dynamo ONNX export the quantizers become QuantizeLinear /
DequantizeLinear, and ORT's QDQ fusion (extended level) turns each node unit
into QGemm (addmm) or MatMulIntegerToFloat (mm): int8 weights, u8 activations,
int32 accumulation. The TVM backend matches the same node units and lowers each
to relax.quantize + an int8 x int8 -> int32 matmul (backends/tvm/quant.py).
Activation ranges come from min-max, per-call percentiles, or `method: entropy`
(the KL-optimal clipping threshold of a histogram over the calibration run).

With `outliers: k` (the mixed-precision decomposition of LLM.int8(), "LLM.int8():
8-bit Matrix Multiplication for Transformers at Scale", Dettmers et al., NeurIPS
2022, with the channels fixed at calibration) the k input channels with the largest
calibrated |x| of each activation bypass the integer matmul:
         xs = x * m                      m: 1 / s, and 0 on the k channels (no Mul unsmoothed)
         y  = addmm(bd, dq(q(xs)), wd)   the k rows of Wq are 0
              + mm(index_select(x, -1, idx), W[idx])   float, [M, k] x [k, N]
so a few outlier channels no longer set the activation scale, nor (smoothed) the
weights' per-channel scales. Without smoothing no mask is needed: the outlier
channels may saturate in q(x), but their int8 weight rows are 0 (an elementwise Mul
over [M, K] per layer saved). ORT runs the extra part as Gather -> MatMul -> Add,
k / K of the layer's work.
`overrides` sets `smooth`, `outliers` and `keep_8bit` per layer by region pattern (first match
wins), e.g. no smoothing for attention's output projection and outlier channels for
the FFN output projections (measured on MiniLM: examples/pipelines/minilm_int8.yaml);
layers that read one activation must agree, since they share its factors.

Why the bias is int32 behind a DequantizeLinear: with a float bias, ORT's
basic-level MatMulAddFusion merges MatMul + Add into a float Gemm before the
QDQ fusion runs, nothing fuses, and the fake-quant graph ran at 0.53x fp32 (issue
5). An int32 bias with scale s_x * s_w is the form the QGemm selector takes.
Measured on MiniLM (1 thread, alternating rounds): int32 bias -> 35 QGemm, 1.80x
ORT fp32; float bias -> 36 float Gemm, 0.83x; float bias with MatMulAddFusion
disabled in the session -> MatMulIntegerToFloat, 1.93x. The int32 bias is kept:
7% less, but fast in any ORT session, with no session option to carry. The
weight is stored transposed ([K, N], per-channel axis 1) so the DequantizeLinear
feeds the Gemm directly: a Transpose in between also stops the fusion; zero
points are explicit (all 0) because ORT's QDQ selectors skip a DequantizeLinear
without one (measured: no QGemm formed). Only the
linear layers' inputs are quantized (not attention matmuls, softmax or the
attention-mask add): that traded 4% speed for 4x less error (issue 5).

With `mode: dynamic` no activation scale is calibrated: each layer becomes one
`pared_quant.dynamic_linear(x, Wq [K, N] int8, s_w [N], b)` op whose activation
scale and zero point come from the range of x at every call (ONNX
DynamicQuantizeLinear's rule: [min(x, 0), max(x, 0)] on the uint8 grid). The ORT
backend exports it as DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul(s_x * s_w)
-> Add(b), which ORT fuses into DynamicQuantizeMatMul (the form its own
quantize_dynamic writes); the TVM backend as an int8 x int8 -> int32 matmul. The
bias stays float (s_x is only known at run time), and no calibration run is needed.

Reads: the calibration run (ctx.calibration; static mode only). Writes: a QuantPlan record (per
layer: calibrated range, scales, bits, smoothing factors' range, the outlier channels' indices;
their total is the pass's stat `outlier_channels`), int8/int32 constants on the new graph module,
`pared.ir.region` on the inserted nodes (the layer's region).
Invariant: on the torch side the rewritten graph computes what the integer
kernels compute, up to values on a rounding boundary (torch rounds x * (1/s), ORT
x / s), which the backends' check counts rather than tolerates (it follows ORT's own
codes: backends.common.forced_reference); layers matched by `exclude` stay float.
`keep_8bit: true` keeps a layer's weights at 8 bits where the target takes 7: codes in
[-127, 127] stored as uint8 around zero point 128, which ORT runs with its U8U8 kernels,
exact on every CPU and ~25% slower than U8S8 on AVX2 (benchmarks/int8_schemes.py); the
layers that carry most of the error (MiniLM's FFN output projections) buy back their
precision there (examples/pipelines/minilm_int8.yaml).
Int8 weight codes lie in [-qmax, qmax] with qmax from the target (ctx.target; the host's
`cpu` without one): 127, or 63 where ORT's x86 u8s8 kernels sum pairs of products in 16
bits (no VNNI / AMX) and full-range weights would saturate them (ir.isa, issue 22). Run it after
constant_folding (which would fold the weights' DequantizeLinear back into float constants).

Every graph the Plan calls is quantized. After a cache pass (or cfg_skip) the variants of one
graph share their weights (`Program.weight_groups`): the calibration run goes through the whole
Program, a layer's activation range is observed over every call of every variant that runs it,
so each layer gets one decision in every variant, and the int8 constants the variants get are
one tensor each (`ir.rewrite.share_equal_constants`); the QuantPlan lists each layer once.

Shared: `find_sites` / `Site` (the layer matcher, ir.patterns), `decide` (ranges, smoothing and
outlier channels per layer) and the rewrite helpers are what the other quantization
passes build on, and what the quant_sensitivity and latency analyses quantize with,
so that they measure exactly the layers and numerics the passes produce.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Literal, Mapping

import numpy as np
import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.fx as fx

from pared.analysis.recorder import record
from pared.ir import meta
from pared.ir.errors import OptionError, PassError
from pared.ir.formats import LinearSpec
from pared.ir.patterns import Site, find_sites  # noqa: F401  (the layer matcher; re-exported)
from pared.ir.program import Graph, Program, get_attr
from pared.ir.regions import match
from pared.ir.rewrite import add_constant, attr_targets, eliminate_dead_code, share_equal_constants, splice
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, RewritePass, check_range, register_pass
from pared.passes.quant.convert import apply, keep_decision, register_converter
from pared.passes.quant.common import (INT32_MAX, INT32_MIN, QMAX_S8, QMAX_U8, QMIN_U8, LayerQuant, QuantPlan,
                                       RangeObserver, activation_qparams, int8_weight_qmax, quantize_bias,
                                       quantize_weight, smooth_factors, weight_format)

_aten = torch.ops.aten
_qd = torch.ops.quantized_decomposed
#: the transposes torch.export leaves between a Linear's [N, K] weight and its matmul
_TRANSPOSES = {_aten.permute.default, _aten.t.default, _aten.transpose.int}
#: the pass's registry name: the float matmuls it inserts for outlier channels carry it as created_by
_NAME = "quantize_linears"
#: what one entry of the option `overrides` may set
_OVERRIDE_KEYS = ("layers", "smooth", "outliers", "keep_8bit")


@dataclass(frozen=True)
class LayerOverride:
    """One entry of the option `overrides`: settings for the layers matching `layers`."""
    layers: tuple[str, ...]          # region patterns (ir.regions syntax)
    smooth: float | None = None      # SmoothQuant alpha for these layers (None: off), when `set_smooth`
    set_smooth: bool = False         # the entry sets `smooth` (else the pass-wide value holds)
    outliers: int | None = None      # outlier channels for these layers (None: the pass-wide value)
    keep_8bit: bool | None = None    # 8-bit weights where the target takes 7 (None: the pass-wide value)

    def matches(self, regions: tuple[str, ...]) -> bool:
        return any(match(p, r) for p in self.layers for r in regions)


def _override(entry: Any, i: int) -> LayerOverride:
    """One `overrides` entry, checked (OptionError names the entry and the key)."""
    where = f"pass 'quantize_linears': option 'overrides' entry {i}"
    if isinstance(entry, LayerOverride):
        return entry
    if not isinstance(entry, Mapping):
        raise OptionError(f"{where}: expected a mapping like {{layers: 'encoder.*.fc2', smooth: null, "
                          f"outliers: 16}}, got {type(entry).__name__} {entry!r}")
    for key in entry:
        if key not in _OVERRIDE_KEYS:
            close = difflib.get_close_matches(str(key), _OVERRIDE_KEYS, n=1)
            raise OptionError(f"{where}: unknown key '{key}'" + (f"; did you mean '{close[0]}'?" if close else
                                                                f"; known: {', '.join(_OVERRIDE_KEYS)}"))
    layers = entry.get("layers")
    layers = (layers,) if isinstance(layers, str) else layers
    if not isinstance(layers, (tuple, list)) or not layers or not all(isinstance(p, str) and p for p in layers):
        raise OptionError(f"{where}: 'layers' must be a region pattern or a non-empty list of them, "
                          f"got {entry.get('layers')!r}")
    smooth = entry.get("smooth")
    if smooth is not None:
        if isinstance(smooth, bool) or not isinstance(smooth, (int, float)):
            raise OptionError(f"{where}: 'smooth' expects a float in [0, 1] or null, got {smooth!r}")
        check_range("quantize_linears", f"overrides[{i}].smooth", smooth, lo=0.0, hi=1.0)
        smooth = float(smooth)
    outliers = entry.get("outliers")
    if outliers is not None:
        if isinstance(outliers, bool) or not isinstance(outliers, int):
            raise OptionError(f"{where}: 'outliers' expects an int >= 0, got {outliers!r}")
        check_range("quantize_linears", f"overrides[{i}].outliers", outliers, lo=0)
    keep = entry.get("keep_8bit")
    if keep is not None and not isinstance(keep, bool):
        raise OptionError(f"{where}: 'keep_8bit' expects true or false, got {keep!r}")
    return LayerOverride(tuple(layers), smooth, "smooth" in entry, outliers, keep)


@register_pass("quantize_linears")
class QuantizeLinears(RewritePass):
    """Static INT8 for linear layers (see module docstring)."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        # how activation ranges are calibrated (static mode): extremes, per-call percentiles, or the
        # KL-optimal clipping threshold of the calibration histogram (TensorRT's entropy calibration)
        method: Literal["minmax", "percentile", "entropy"] = "minmax"
        percentile: float = 99.99        # percentile method: keep this share of values (per side) in range
        exclude: tuple[str, ...] | str = ()  # region patterns whose linear layers stay float (ir.regions syntax)
        mode: Literal["static", "dynamic"] = "static"  # static: calibrated activation scales; dynamic: per call
        smooth: float | None = None      # SmoothQuant migration strength alpha in [0, 1]; None: off
        # also the activation x activation matmuls (attention's q.k^T and attn.v): static uint8 x int8
        # QDQ on both operands, calibrated like the linear inputs (static mode only)
        matmuls: bool = False
        # per activation, this many input channels (largest calibrated |x|) bypass the int8 matmul and
        # run as a small float matmul added to its result (LLM.int8()-style); static mode, minmax
        outliers: int = 0
        # per-layer `smooth` / `outliers`, first match wins: [{layers: pattern(s), smooth: a | null,
        # outliers: k}]; a key left out keeps the pass-wide value
        overrides: tuple[Mapping[str, Any], ...] = ()
        # where the target takes 7-bit int8 weights (ORT's u8s8 kernels would saturate: no VNNI / AMX),
        # keep 8 bits, stored uint8 around 128 for ORT's exact U8U8 kernels (slower); no-op elsewhere
        keep_8bit: bool = False

        def __post_init__(self):
            check_range("quantize_linears", "percentile", self.percentile, lo=50.0, hi=100.0, lo_open=True)
            if self.smooth is not None:
                check_range("quantize_linears", "smooth", self.smooth, lo=0.0, hi=1.0)
                if self.method != "minmax":
                    raise OptionError("pass 'quantize_linears': option 'smooth' needs method 'minmax' (the "
                                      "smoothed range is derived from per-channel extremes); got method "
                                      f"'{self.method}'")
            if self.mode == "dynamic" and self.smooth is not None:
                raise OptionError("pass 'quantize_linears': option 'smooth' needs mode 'static' (its factors come "
                                  "from calibrated per-channel ranges; mode 'dynamic' calibrates nothing)")
            if self.mode == "dynamic" and (self.keep_8bit or any(
                    isinstance(e, Mapping) and e.get("keep_8bit") for e in self.overrides)):
                raise OptionError("pass 'quantize_linears': option 'keep_8bit' needs mode 'static' (the dynamic "
                                  "layers' int8 weights feed DynamicQuantizeMatMul as they are)")
            if self.mode == "dynamic" and self.matmuls:
                raise OptionError("pass 'quantize_linears': option 'matmuls' needs mode 'static' (the attention "
                                  "matmuls' two operands get calibrated scales)")
            check_range("quantize_linears", "outliers", self.outliers, lo=0)
            overrides = tuple(_override(e, i) for i, e in enumerate(self.overrides))
            object.__setattr__(self, "overrides", overrides)
            per_channel = [("outliers", self.outliers > 0)] + \
                [(f"overrides[{i}]", (e.set_smooth and e.smooth is not None) or bool(e.outliers))
                 for i, e in enumerate(overrides)]
            for what, used in per_channel:
                if used and self.mode == "dynamic":
                    raise OptionError(f"pass 'quantize_linears': option '{what}' needs mode 'static' (outlier "
                                      "channels and smoothing factors come from calibrated per-channel ranges)")
                if used and self.method != "minmax":
                    raise OptionError(f"pass 'quantize_linears': option '{what}' needs method 'minmax' (the "
                                      f"range left after smoothing or removing outlier channels is derived from "
                                      f"per-channel extremes); got method '{self.method}'")
            # one pattern, or a YAML list, becomes a tuple (options are immutable)
            object.__setattr__(self, "exclude", (self.exclude,) if isinstance(self.exclude, str)
                               else tuple(self.exclude))

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        names = program.called_graphs()
        sites_by_graph = {name: find_sites(program.graphs[name].module,
                                           batched=not any(program.graphs[name].dynamic_dims)) for name in names}
        excluded = sorted({s.region for sites in sites_by_graph.values() for s in sites if _excluded(s, o.exclude)})
        todo = {name: [s for s in sites if not _excluded(s, o.exclude)] for name, sites in sites_by_graph.items()}
        if not any(todo.values()):
            return PassResult(program, modified=False, preserved=PRESERVE_ALL,
                              stats={"quantized": 0, "excluded": len(excluded)})
        # variants of one graph (a cache pass's, cfg_skip's) share their weights: one group. A layer's
        # activation range is observed over every call of every graph of its group that runs it (the
        # calibration run goes through the whole Program), so it gets one decision in every variant.
        group_of = {name: gi for gi, grp in enumerate(program.weight_groups()) for name in grp}
        new_graphs = dict(program.graphs)
        layers: list[LayerQuant] = []
        calls = n_outliers = 0
        qmax = int8_weight_qmax(ctx.target)
        counted: set[tuple[int, str]] = set()

        def _once(done: list[LayerQuant], name: str) -> list[LayerQuant]:
            # a layer quantized in several variants of a group is one layer (one weight)
            fresh = [lq for lq in done if (group_of[name], lq.weight) not in counted]
            counted.update((group_of[name], lq.weight) for lq in fresh)
            return fresh
        if o.mode == "dynamic":
            for name, sites in todo.items():
                if sites:
                    specs = {st.out: LinearSpec("w8a8", self.name, st.region, dynamic=True, weight_qmax=qmax)
                             for st in sites}
                    new_graphs[name], done = apply(program.graphs[name], specs, ctx.target, self.name)
                    layers += _once(done, name)
        else:
            channels = any(alpha is not None or k for sites in todo.values() for alpha, k in
                           (_settings(s, o) for s in sites))
            calls, observed = observe_ranges(program, {n: [s.x for s in sites] for n, sites in todo.items() if sites},
                                       group_of, ctx.calibration, o.method, o.percentile, self.name, channels)
            for name, sites in todo.items():
                if not sites:
                    continue
                src = program.graphs[name]
                seen = {s.x: observed[(group_of[name], s.x)] for s in sites}
                decided = decide(src.module, sites, seen, o, ctx)
                specs = {d.site.out: spec_of(d, self.name, qmax, _keeps_8bit(d.site, o)) for d in decided}
                new_graphs[name], done = apply(src, specs, ctx.target, self.name)
                fresh = _once(done, name)
                n_outliers += sum(len(d.outliers) for d in decided if d.outliers is not None
                                  and any(lq.node == d.site.node for lq in fresh))
                layers += fresh
        n_matmuls = 0
        if o.matmuls and o.mode == "static" and layers:
            mid = program.replace(graphs=new_graphs)
            mm_sites = {name: _find_matmul_sites(new_graphs[name].module, {s.node for s in sites_by_graph[name]})
                        for name in names}
            operands = {name: sorted({x for site in ms for x in site[1:]}) for name, ms in mm_sites.items() if ms}
            if operands:
                mm_calls, mm_obs = observe_ranges(mid, operands, group_of, ctx.calibration, o.method, o.percentile,
                                            self.name, False)
                calls += mm_calls
                mm_done: set = set()
                for name, ms in mm_sites.items():
                    if ms:
                        seen = {x: mm_obs[(group_of[name], x)] for x in operands[name]}
                        new_graphs[name], _ = _rewrite_matmuls(new_graphs[name], ms, seen, self.name, ctx, qmax)
                        mm_done |= {(group_of[name], m[0]) for m in ms if seen[m[1]].range() is not None
                                    and seen[m[2]].range() is not None}
                n_matmuls = len(mm_done)
        if not layers:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL,
                              stats={"quantized": 0, "excluded": len(excluded)})
        shared = share_equal_constants([(new_graphs[n].module, attr_targets(new_graphs[n].module)
                                         - attr_targets(program.graphs[n].module)) for n in names])
        dynamic = o.mode == "dynamic"
        plan = QuantPlan("quantize_linears", o.mode, "none (run time)" if dynamic else o.method,
                         o.percentile if o.method == "percentile" and not dynamic else None,
                         "uint8 asymmetric per-tensor" + (", scale per call" if dynamic else ""),
                         weight_format(qmax), tuple(layers),
                         excluded=tuple(excluded), calls=calls, smooth=o.smooth, weight_qmax=qmax)
        new = program.replace(graphs=new_graphs, records={**program.records, "QuantPlan": plan})
        for lq in layers:
            ctx.log.debug("quantize_linears: %s (%s) [%d -> %d] x in [%.4g, %.4g] s_x %.4g z_x %d", lq.node,
                          lq.region, lq.in_features, lq.out_features, *lq.activation_range, lq.activation_scale,
                          lq.activation_zero_point)
        wbytes = sum(lq.in_features * lq.out_features for lq in layers)
        ctx.log.info("quantize_linears: %d linear layers to int8 (%s, %d calibration calls) in %d graph(s), "
                     "%d excluded, %.1f MB of weights -> %.1f MB", len(layers),
                     "dynamic activation scales" if dynamic else f"{o.method} calibration", calls,
                     sum(1 for v in todo.values() if v), len(excluded), wbytes * 4 / 1e6, wbytes / 1e6)
        stats = {"quantized": len(layers), "excluded": len(excluded), "bias_int32": sum(lq.bias for lq in layers),
                 "calibration_calls": calls}
        if len(names) > 1:
            stats.update(graphs=sum(1 for v in todo.values() if v), shared_constants=shared)
        if o.outliers or o.overrides:
            stats["outlier_channels"] = n_outliers
        if o.matmuls:
            stats["matmuls"] = n_matmuls
        return PassResult(new, modified=True, stats=stats)


#: plain static INT8 (minmax, no smoothing or outliers): the per-layer settings timestep_quant and
#: dynamic_precision hand to `decide`
PLAIN_INT8 = QuantizeLinears.Options()


def observe_ranges(program: Program, taps: dict[str, list[str]], group_of: dict[str, int], calibration, method: str,
             percentile: float, by: str, channels: bool) -> tuple[int, dict]:
    """Run the calibration through `program` and reduce each tapped node's values to a
    RangeObserver shared by the graphs of one weight group: (calls, (group, node) -> observer)."""
    if calibration is None:
        raise PassError(f"pass '{by}' needs a calibration run to set activation scales: pass calibration= a "
                        "list of input tuples (a few representative batches) or a loop callable")
    watch = {(group_of[g], x): RangeObserver(method, percentile, channels) for g, xs in taps.items() for x in xs}
    trace = record(program, calibration, taps, lambda tap, v: watch[(group_of[tap.graph], tap.node)].observe(v))
    return len(trace), watch


@dataclass(frozen=True)
class _Decision:
    """What is decided for one layer before the graph is touched."""
    site: Site
    lo: float                        # activation range to quantize (after smoothing)
    hi: float
    group: str                       # the activation's source node: layers reading it share `smooth`
    smooth: torch.Tensor | None      # SmoothQuant factors s [K] (x / s, W rows * s), or None
    outliers: torch.Tensor | None = None  # int64 [k] input channels run in float (option `outliers`), or None


def spec_of(d: _Decision, by: str, qmax: int, keep_8bit: bool = False) -> LinearSpec:
    """The static w8a8 decision for one layer, as its annotation: codes in [-qmax, qmax], or with
    `keep_8bit` where qmax < 127, full-range codes stored uint8 (ORT's exact U8U8 kernels)."""
    u8 = keep_8bit and qmax < QMAX_S8
    return LinearSpec("w8a8", by, d.site.region, act_range=(float(d.lo), float(d.hi)),
                      weight_qmax=QMAX_S8 if u8 else qmax, u8_weights=u8,
                      smooth=None if d.smooth is None else tuple(float(v) for v in d.smooth.tolist()),
                      smooth_group=None if d.smooth is None else d.group,
                      outliers=None if d.outliers is None else tuple(int(i) for i in d.outliers.tolist()))


def _keeps_8bit(site: Site, o: "QuantizeLinears.Options") -> bool:
    """`keep_8bit` for one layer: the first matching override's, else the pass-wide option."""
    for ov in o.overrides:
        if ov.matches(site.regions):
            return o.keep_8bit if ov.keep_8bit is None else ov.keep_8bit
    return o.keep_8bit


def _settings(site: Site, o: "QuantizeLinears.Options") -> tuple[float | None, int]:
    """(SmoothQuant alpha, outlier channels) for one layer: the first matching override, else the pass-wide
    options."""
    alpha, k = o.smooth, o.outliers
    for ov in o.overrides:
        if ov.matches(site.regions):
            if ov.set_smooth:
                alpha = ov.smooth
            if ov.outliers is not None:
                k = ov.outliers
            break
    return alpha, k


def decide(gm: fx.GraphModule, sites: list[Site], observed: dict, o: "QuantizeLinears.Options",
            ctx: PassContext) -> list[_Decision]:
    """Ranges (and SmoothQuant factors, outlier channels) per layer from the calibration observations.

    Raises:
        PassError: when layers reading one activation get different settings from `overrides`, or
            `outliers` leaves no channel for the int8 matmul.
    """
    nodes = {n.name: n for n in gm.graph.nodes}
    groups: dict[str, list[Site]] = {}
    for s in sites:
        groups.setdefault(_through(nodes[s.x], _SAME_SHAPE).name, []).append(s)
    out = []
    for group, members in groups.items():
        seen = [s for s in members if observed[s.x].range() is not None]
        for s in members:
            if s not in seen:
                ctx.log.debug("quantize_linears: %s: input never observed in calibration; left float", s.node)
        if not seen:
            continue
        settings = {_settings(s, o) for s in seen}
        if len(settings) > 1:
            raise PassError(f"pass 'quantize_linears': layers {[s.region for s in seen]} read one activation "
                            f"({nodes[group].format_node()}) and so share its smoothing factors and outlier "
                            f"channels, but option 'overrides' gives them different (smooth, outliers): "
                            f"{sorted(settings, key=str)}; give them one setting")
        ((alpha, k),) = settings
        if alpha is None and not k:
            out += [_Decision(s, *observed[s.x].range(), group, None) for s in seen]
            continue
        ch_lo, ch_hi = observed[seen[0].x].channel_range()
        x_abs = torch.maximum(ch_lo.abs(), ch_hi.abs())
        idx = None
        if k:
            if k >= x_abs.numel():
                raise PassError(f"pass 'quantize_linears': option 'outliers' ({k}) leaves none of the "
                                f"{x_abs.numel()} input channels of {[s.region for s in seen]} to the int8 "
                                f"matmul; use fewer, or exclude the layers")
            # the k largest |x| channels, in channel order (ties: the lower channel)
            idx = torch.sort(torch.topk(x_abs, k, sorted=True).indices).values.to(torch.int64)
            x_abs = x_abs.clone()
            x_abs[idx] = 0.0            # their range no longer counts: smooth_factors gives them 1
        if alpha is not None:
            w_abs = torch.stack([_weight_kn(gm, s).abs().amax(dim=1) for s in seen]).amax(dim=0)
            factors = smooth_factors(x_abs, w_abs, alpha)
        else:
            factors = None
        lo_ch, hi_ch = (ch_lo, ch_hi) if factors is None else (ch_lo / factors, ch_hi / factors)
        if idx is not None:
            keep = torch.ones_like(ch_lo, dtype=torch.bool)
            keep[idx] = False
            lo_ch, hi_ch = lo_ch[keep], hi_ch[keep]
            ctx.log.debug("quantize_linears: %s: input channels %s (|x| up to %.4g) run in float", group,
                          idx.tolist(), float(torch.maximum(ch_lo.abs(), ch_hi.abs()).max()))
        lo, hi = float(lo_ch.min()), float(hi_ch.max())
        out += [_Decision(s, lo, hi, group, factors, idx) for s in seen]
    return out


def _weight_kn(gm: fx.GraphModule, s: Site) -> torch.Tensor:
    """The float weight of a layer as [K, N] (input channels first)."""
    w = get_attr(gm, s.weight).detach()
    return w.t() if s.transposed else w


def _excluded(site: Site, patterns: tuple[str, ...]) -> bool:
    return any(match(p, r) for p in patterns for r in site.regions)


def _param(n: object) -> fx.Node | None:
    return n if isinstance(n, fx.Node) and n.op == "get_attr" else None


def _float_tensor(n: fx.Node) -> torch.Tensor | None:
    v = n.meta.get("val")
    return v if isinstance(v, torch.Tensor) and v.dtype == torch.float32 else None


_SAME_SHAPE = {_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default}
_EXPANDS = {_aten.expand.default}


def _through(n: object, ops: set) -> object:
    """`n` with the shape-only ops in `ops` above it skipped (when they keep its shape
    or only add the batch dim a bmm broadcasts over)."""
    while isinstance(n, fx.Node) and n.op == "call_function" and n.target in ops:
        n = n.args[0]
    return n


def _qdq_linear(scale: float, zero_point: int, has_bias: bool, out_shape: tuple[int, ...] | None,
                smooth: bool, outliers: bool = False, u8_weights: bool = False, act_bits: int = 8):
    """The quantized layer as a torch function (traced into the graph by splice). `smooth`: the
    first constant multiplies x (1 / s, 0 on the outlier channels); `outliers`: the last two are
    the outlier channels' indices [k] and float weight rows [k, N], whose float matmul is added
    to the result. `act_bits` below 8: x is clamped to the 2^act_bits codes' range first (ONNX
    QuantizeLinear saturates to the dtype's range only), so its codes lie in 0 .. 2^act_bits - 1."""
    top = (1 << act_bits) - 1
    def linear(x, *consts):
        xs = x
        if smooth:
            inv_s, *consts = consts
            xs = _aten.mul.Tensor(x, inv_s)
        if not outliers:
            return linear_nd(xs, *consts)
        *consts, idx, w_out = consts
        xo = _aten.index_select.default(x, -1, idx)            # the outlier channels, before the Mul
        y = linear_nd(xs, *consts)
        if out_shape is not None:
            xo = xo.reshape(-1, xo.shape[-1])
            return _aten.add.Tensor(y, _aten.mm.default(xo, w_out).view(out_shape))
        return _aten.add.Tensor(y, _aten.mm.default(xo, w_out))

    def linear_nd(x, wq, ws, wz, *bias):
        if out_shape is not None:
            # x is often a non-contiguous view (heads merged back): copy, as the bmm's own expand did
            flat = _aten.clone.default(x, memory_format=torch.contiguous_format).view(-1, x.shape[-1])
            return linear2d(flat, wq, ws, wz, *bias).view(out_shape)
        return linear2d(x, wq, ws, wz, *bias)

    def linear2d(x, wq, ws, wz, *bias):
        if top < QMAX_U8:
            x = _aten.clamp.default(x, float(np.float32(-zero_point * scale)),
                                    float(np.float32((top - zero_point) * scale)))
        xq = _qd.quantize_per_tensor.default(x, scale, zero_point, QMIN_U8, QMAX_U8, torch.uint8)
        xd = _qd.dequantize_per_tensor.default(xq, scale, zero_point, QMIN_U8, QMAX_U8, torch.uint8)
        if u8_weights:
            wd = _qd.dequantize_per_channel.default(wq, ws, wz, 1, 0, 255, torch.uint8)
        else:
            wd = _qd.dequantize_per_channel.default(wq, ws, wz, 1, -QMAX_S8, QMAX_S8, torch.int8)
        if has_bias:
            bq, bs, bz = bias
            bd = _qd.dequantize_per_channel.default(bq, bs, bz, 0, INT32_MIN, INT32_MAX, torch.int32)
            return _aten.addmm.default(bd, xd, wd)
        return _aten.mm.default(xd, wd)
    return linear


@register_converter("w8a8")
def convert_static(src: Graph, items: list[tuple[str, LinearSpec, Site]], by: str) -> tuple[Graph, list[LayerQuant]]:
    """The static w8a8 decisions `items` of one graph (convert's converter): int8 weight codes in
    [-weight_qmax, weight_qmax]; with `u8_weights` codes in [-127, 127] stored as uint8 around zero
    point 128, which ORT runs with its U8U8 kernels, exact on every CPU (slower than U8S8;
    benchmarks/int8_schemes.py)."""
    gm = src.copy_module()
    nodes = {n.name: n for n in gm.graph.nodes}
    done = []
    index = next_index(gm)
    last_ph = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    smooth_attr: dict[str, fx.Node] = {}      # group -> get_attr of 1 / s, shared by the group's layers
    replaced: dict[str, fx.Node] = {}         # a rewritten layer's output node -> its replacement
    for _, spec, s in items:
        d = _Decision(s, *spec.act_range, spec.smooth_group or "",
                      None if spec.smooth is None else torch.tensor(spec.smooth, dtype=torch.float32),
                      None if spec.outliers is None else torch.tensor(spec.outliers, dtype=torch.int64))
        # a layer that reads another layer's output (a t-MLP feeding adaLN) reads its replacement
        node, x = nodes[s.out], nodes[s.x]
        x = replaced.get(x.name, x)
        w = w_float = _weight_kn(gm, s)
        if d.smooth is not None:
            w = w * d.smooth[:, None]
        if d.outliers is not None:
            w = w.clone()
            w[d.outliers] = 0.0        # those channels go through the float matmul, not the int8 one
        u8 = spec.u8_weights
        wq, ws = quantize_weight(w, spec.weight_qmax)     # [K, N] int8, [N] scales
        scale, zp = activation_qparams(d.lo, d.hi, spec.act_bits)
        # explicit zero points (all 0): ORT's QDQ selectors skip a DequantizeLinear without one
        consts = {"w": wq, "ws": ws, "wz": torch.zeros(ws.shape, dtype=torch.int8)}
        if u8:
            consts["w"] = (wq.to(torch.int16) + 128).to(torch.uint8).contiguous()
            # int32 zero points in the graph (uint8 - uint8 would wrap around in torch); the exporter
            # writes them in the codes' dtype, as DequantizeLinear wants
            consts["wz"] = torch.full(ws.shape, 128, dtype=torch.int32)
        if s.bias is not None:
            consts["b"], consts["bs"] = quantize_bias(get_attr(gm, s.bias), scale, ws)
            consts["bz"] = torch.zeros(ws.shape, dtype=torch.int32)
        attrs = []
        if d.smooth is not None:
            if d.group not in smooth_attr:
                target = f"_quant_{index}_smooth"
                inv = 1.0 / d.smooth
                if d.outliers is not None:
                    inv = inv.clone()
                    inv[d.outliers] = 0.0
                gm.register_buffer(target, inv.to(torch.float32).contiguous())
                with gm.graph.inserting_after(last_ph):
                    a = gm.graph.get_attr(target)
                a.meta["val"] = getattr(gm, target)
                a.meta[meta.CREATED_BY] = by
                smooth_attr[d.group] = a
            attrs.append(smooth_attr[d.group])
        if d.outliers is not None:     # their indices and float weight rows [k, N]
            consts["oi"] = d.outliers.contiguous()
            consts["ow"] = w_float[d.outliers].to(torch.float32).contiguous()
        layer_attrs = []
        for key, value in consts.items():
            layer_attrs.append(add_constant(gm, f"_quant_{index}_{key}", value, by, before=node))
        attrs += layer_attrs
        index += 1
        xval = x.meta["val"]
        examples = [torch.zeros(tuple(int(d) for d in xval.shape), dtype=torch.float32)] + \
            [getattr(gm, str(a.target)) for a in attrs]
        fn = _qdq_linear(scale, zp, s.bias is not None, s.out_shape, d.smooth is not None,
                         d.outliers is not None, u8, spec.act_bits)
        (y,) = splice(gm, fn, [x] + attrs, examples, by)
        for new in created_between(layer_attrs[0], y):
            new.meta[meta.REGION] = s.region
        node.replace_all_uses_with(y)
        keep_decision(y, spec)
        replaced[node.name] = y
        k, n_out = wq.shape
        smooth_range = None if d.smooth is None else (float(d.smooth.min()), float(d.smooth.max()))
        done.append(LayerQuant(s.node, s.region, s.weight, int(k), int(n_out), (min(d.lo, 0.0), max(d.hi, 0.0)),
                               scale, zp, (float(ws.min()), float(ws.max())), s.bias is not None, smooth_range,
                               activation_bits=spec.act_bits,
                               outlier_channels=() if d.outliers is None else tuple(int(i) for i in d.outliers),
                               weight_storage="uint8" if u8 else "int8"))
    eliminate_dead_code(gm)
    gm.graph.lint()
    # a fresh module holds only what the graph still reads: the float weights go
    gm = fx.GraphModule(gm, gm.graph, gm.__class__.__name__)
    return src.with_module(gm), done


@torch.library.custom_op("pared_quant::dynamic_linear", mutates_args=())
def dynamic_linear(x: torch.Tensor, wq: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32 times int8 weights Wq [K, N] (scales w_scale [N]) with the
    activation quantized per call as ONNX DynamicQuantizeLinear does: s_x =
    (max(x, 0) - min(x, 0)) / 255, z_x = round(-min(x, 0) / s_x), xq = clamp(round(x / s_x)
    + z_x, 0, 255), rounding half to even; then y = ((xq - z_x) @ Wq) * s_x * w_scale + bias,
    the integer sum exact (float64 holds K * 255 * 127)."""
    lo = torch.clamp(x.amin(), max=0.0)
    hi = torch.clamp(x.amax(), min=0.0)
    scale = ((hi - lo) / float(QMAX_U8 - QMIN_U8)).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    zp = torch.clamp(torch.round(-lo / scale), QMIN_U8, QMAX_U8)
    xq = torch.clamp(torch.round(x / scale) + zp, QMIN_U8, QMAX_U8)
    acc = (xq - zp).to(torch.float64) @ wq.to(torch.float64)
    y = acc.to(torch.float32) * (scale * w_scale)
    return y if bias is None else y + bias


@dynamic_linear.register_fake
def _(x, wq, w_scale, bias=None):
    return x.new_empty((*x.shape[:-1], wq.shape[1]))


def _dynamic_linear_fn(has_bias: bool, out_shape: tuple[int, ...] | None):
    """A dynamic-mode layer as a torch function (traced into the graph by splice)."""
    def linear(x, wq, ws, *bias):
        if out_shape is not None:
            flat = _aten.clone.default(x, memory_format=torch.contiguous_format).view(-1, x.shape[-1])
            return torch.ops.pared_quant.dynamic_linear.default(flat, wq, ws, *bias).view(out_shape)
        return torch.ops.pared_quant.dynamic_linear.default(x, wq, ws, *bias)
    return linear


@register_converter("w8a8_dynamic")
def convert_dynamic(src: Graph, items: list[tuple[str, LinearSpec, Site]], by: str) -> tuple[Graph, list[LayerQuant]]:
    """The dynamic w8a8 decisions `items` (convert's converter): each layer one
    pared_quant.dynamic_linear op, int8 weights in [-weight_qmax, weight_qmax], float bias, no
    calibration."""
    gm = src.copy_module()
    nodes = {n.name: n for n in gm.graph.nodes}
    done = []
    index = next_index(gm)
    replaced: dict[str, fx.Node] = {}
    for _, spec, s in items:
        node, x = nodes[s.out], nodes[s.x]
        x = replaced.get(x.name, x)
        wq, ws = quantize_weight(_weight_kn(gm, s), spec.weight_qmax)
        consts = {"w": wq, "ws": ws}
        if s.bias is not None:
            consts["bf"] = get_attr(gm, s.bias).detach().to(torch.float32).contiguous()
        attrs = [add_constant(gm, f"_quant_{index}_{key}", value, by, before=node) for key, value in consts.items()]
        index += 1
        examples = [torch.zeros(tuple(int(d) for d in x.meta["val"].shape), dtype=torch.float32)] + \
            [getattr(gm, str(a.target)) for a in attrs]
        (y,) = splice(gm, _dynamic_linear_fn(s.bias is not None, s.out_shape), [x] + attrs, examples, by)
        for new in created_between(attrs[0], y):
            new.meta[meta.REGION] = s.region
        node.replace_all_uses_with(y)
        keep_decision(y, spec)
        replaced[node.name] = y
        k, n_out = wq.shape
        done.append(LayerQuant(s.node, s.region, s.weight, int(k), int(n_out), (0.0, 0.0), 0.0, 0,
                               (float(ws.min()), float(ws.max())), False))
    eliminate_dead_code(gm)
    gm.graph.lint()
    gm = fx.GraphModule(gm, gm.graph, gm.__class__.__name__)
    return src.with_module(gm), done


# -- activation x activation matmuls (option `matmuls`) ------------------------
#
#   Before:  y = aten.bmm(a, b)                          a, b: computed activations
#   After:   y = aten.bmm(dq(q(a, s_a, z_a, uint8)), dq(q(b, s_b, 0, int8)))
#   a (attention probabilities or queries) is uint8 asymmetric, b (keys^T or values)
#   int8 symmetric (in [-qmax, qmax], as weights: b is the s8 side of the u8s8 kernel),
#   both per-tensor with calibrated ranges; ORT's QDQ fusion turns the
#   node unit into an integer matmul (MatMulIntegerToFloat), which int8_check verifies.

def _find_matmul_sites(gm: fx.GraphModule, linear_mms: set[str]) -> list[tuple[str, str, str]]:
    """(bmm / matmul node, a, b) for each float matmul whose two operands are both computed
    activations (no parameter behind views/expands), the linear layers' bmm left out."""
    out = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target not in (_aten.bmm.default, _aten.matmul.default) or \
                n.name in linear_mms or n.kwargs:
            continue
        a, b = n.args[:2]
        if not all(isinstance(v, fx.Node) and _float_tensor(v) is not None for v in (a, b)):
            continue
        if any(_param(_through(v, _SAME_SHAPE | _EXPANDS | _TRANSPOSES | {_aten.clone.default})) is not None
               for v in (a, b)):
            continue
        if any(str(getattr(v, "target", "")).startswith("quantized_decomposed.") for v in (a, b)):
            continue   # already quantized (a second run)
        out.append((n.name, a.name, b.name))
    return out


def _qdq_act(scale: float, zero_point: int, signed: bool, qmax: int = QMAX_S8):
    def qdq(x):
        if signed:
            if qmax < QMAX_S8:
                # ONNX QuantizeLinear saturates to the whole int8 range: a value past the calibrated
                # range would reach |q| > qmax there, so the 7-bit bound is a Clip before it
                x = _aten.clamp.default(x, -qmax * scale, qmax * scale)
            q = _qd.quantize_per_tensor.default(x, scale, 0, -qmax, qmax, torch.int8)
            return _qd.dequantize_per_tensor.default(q, scale, 0, -qmax, qmax, torch.int8)
        q = _qd.quantize_per_tensor.default(x, scale, zero_point, QMIN_U8, QMAX_U8, torch.uint8)
        return _qd.dequantize_per_tensor.default(q, scale, zero_point, QMIN_U8, QMAX_U8, torch.uint8)
    return qdq


def _rewrite_matmuls(src: Graph, sites: list[tuple[str, str, str]], observed: dict, by: str,
                     ctx: PassContext, qmax: int = QMAX_S8) -> tuple[Graph, int]:
    gm = src.copy_module()
    nodes = {n.name: n for n in gm.graph.nodes}
    done = 0
    for mm_name, a_name, b_name in sites:
        ra, rb = observed[a_name].range(), observed[b_name].range()
        if ra is None or rb is None:
            ctx.log.debug("quantize_linears: matmul %s: an operand never observed in calibration; left float",
                          mm_name)
            continue
        mm = nodes[mm_name]
        for name, (lo, hi), signed in ((a_name, ra, False), (b_name, rb, True)):
            x = nodes[name]
            if signed:
                amax = max(abs(float(lo)), abs(float(hi)))
                scale, zp = (amax / qmax if amax > 0 else 1.0), 0
            else:
                scale, zp = activation_qparams(lo, hi)
            example = torch.zeros(tuple(int(d) for d in x.meta["val"].shape), dtype=torch.float32)
            (y,) = splice(gm, _qdq_act(scale, zp, signed, qmax), [x], [example], by)
            region = mm.meta.get(meta.REGION)
            if region is not None:
                for new in created_between(x.next, y):
                    new.meta[meta.REGION] = region
            mm.replace_input_with(x, y)
            ctx.log.debug("quantize_linears: matmul %s operand %s in [%.4g, %.4g] -> %s scale %.4g", mm_name, name,
                          lo, hi, "int8" if signed else "uint8", scale)
        done += 1
    gm.graph.lint()
    gm.recompile()
    return src.with_module(gm), done


def created_between(first: fx.Node, last: fx.Node) -> list[fx.Node]:
    """The nodes from `first` to `last` inclusive, in graph order (what one rewrite inserted)."""
    out, n = [], first
    while n is not last:
        out.append(n)
        n = n.next
    return out + [last]


def next_index(gm: fx.GraphModule) -> int:
    """The first free i of the `_quant_<i>_*` constants on `gm` (timestep_quant's variants count from it)."""
    i = 0
    while hasattr(gm, f"_quant_{i}_w"):
        i += 1
    return i
