"""Quantization sensitivity: how much the model's final output moves when only one
linear layer is quantized, at each candidate format (the per-layer measurement of
MixDQ, "MixDQ: Memory-Efficient Few-Step Text-to-Image Diffusion Models with
Metric-Decoupled Mixed Precision Quantization", Zhao et al., ECCV 2024, and the
input to HAWQ-style allocation, "HAWQ-V3: Dyadic Neural Network Quantization",
Yao et al., ICML 2021, with measured output error in place of Hessian traces).

For each linear layer (the layers quantize_linears matches) and each candidate
format:
    w8a8: as quantize_linears emits it: uint8 per-tensor activation over the
          calibrated min-max range, int8 per-channel symmetric weight
    w4:   weight-only block-wise int4 as quantize_weights_int4 emits it
    w8:   weight-only block-wise int8 (blocks of w8_block_size), as mixed_precision
          emits it (MatMulNBits with bits=8 in ORT)
the layer alone is fake-quantized (its matmul reads the dequantized values; the
rest of the graph stays fp32) and the calibration run is replayed once. Recorded
against the fp32 outputs of the same run (all float outputs, concatenated; for a
loop calibration that returns its result, e.g. a sampler, that result):
    rel_l2 = |y_q - y| / |y|,  sqnr_db = -20 log10(rel_l2),
    cosine = the smallest cosine over output rows (per sample: first dim)
plus the layer's fp32 weight bytes, FLOPs per call (analysis/cost.py), the
bytes each candidate format takes, and its input's range over the calibration
run: overall, per call (for step-aware methods) and the outlier ratio max/median
of the per-channel absolute maxima (what SmoothQuant migrates).

Cost: one fp32 replay (ranges and references) plus one replay per (layer, format).
The int8 bias (int32 at scale s_x * s_w) is not simulated: its rounding is below
the activation's.

Layering: the candidate formats are the quantization passes', but their site
matcher (ir/patterns.py) and numerics (ir/quant.py) live in ir/, below both, so
this analysis measures exactly what the passes emit without importing them.

Reads: calibration. Writes: SensitivityProfile (a record; nothing on nodes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.fx as fx

from pared.analysis.cost import node_flops
from pared.analysis.metrics import compare_outputs  # noqa: F401  (re-exported)
from pared.analysis.recorder import output_rows, run_output
from pared.analysis.redundancy import observe_values
from pared.ir.errors import OptionError, PassError
from pared.ir.formats import FORMATS as QUANT_FORMATS
from pared.ir.patterns import find_sites
from pared.ir.program import Program, get_attr
from pared.ir.quant import (RangeObserver, dequantize_weight_blocks, fake_quant_activation, fake_quant_weight_int8,
                            int8_weight_qmax, quantize_weight_blocks, quantized_weight_bytes, weight_only_bytes)
from pared.ir.regions import match
from pared.ir.transform import Analysis, PassContext, Record, check_block_size, register_pass

_aten = torch.ops.aten
#: the candidate formats: name -> weight bits (the registry's, ir/formats.py, fp32 aside)
FORMATS = {name: f.weight_bits for name, f in QUANT_FORMATS.items() if name != "fp32"}


@dataclass(frozen=True)
class LayerSensitivity:
    layer: str                          # region (innermost module path); the layer's matmuls share it
    nodes: tuple[str, ...]              # its matmul node(s)
    in_features: int
    out_features: int
    flops: int                          # per call
    fp32_bytes: int                     # weight bytes in fp32
    formats: tuple[str, ...]            # candidates measured (a subset of the option `formats`)
    bytes: tuple[int, ...]              # weight bytes at each candidate
    rel_l2: tuple[float, ...]           # final-output relative L2 with only this layer at each candidate
    sqnr_db: tuple[float, ...]
    cosine: tuple[float, ...]           # smallest per-row cosine
    activation_range: tuple[float, float]           # input min / max over the calibration run
    activation_call_ranges: tuple[tuple[float, float], ...]  # per call (per step for iterative models)
    activation_outlier_ratio: float     # max / median of the per-channel |x| maxima

    def error(self, fmt: str) -> float:
        """rel_l2 in format `fmt` (0 for "fp32")."""
        if fmt == "fp32":
            return 0.0
        return self.rel_l2[self.formats.index(fmt)]


@dataclass(frozen=True)
class SensitivityProfile(Record):
    graph: str
    calls: int                          # calibration calls per replay
    block_size: int                     # the w4 candidate's block size
    symmetric: bool                     # the w4 / w8 candidates' scheme
    w8_block_size: int
    output_norm: float                  # |y| of the fp32 reference
    layers: tuple[LayerSensitivity, ...]
    skipped: tuple[tuple[str, str], ...] = ()   # (layer, why) for layers not measured

    def layer(self, name: str) -> LayerSensitivity:
        for lay in self.layers:
            if lay.layer == name:
                return lay
        raise KeyError(f"no layer {name!r} in the SensitivityProfile; it has {[x.layer for x in self.layers]}")


@register_pass("quant_sensitivity")
class QuantSensitivity(Analysis):
    """Per-layer output error when that layer alone is quantized (see module docstring)."""

    record = SensitivityProfile

    @dataclass(frozen=True, kw_only=True)
    class Options:
        formats: tuple[str, ...] = ("w8a8", "w4")  # candidates: w8a8 (quantize_linears), w4 / w8 (weight-only)
        block_size: int = 32                # the w4 candidate's block size
        w8_block_size: int = 128            # the w8 candidate's block size
        symmetric: bool = True              # the weight-only candidates' scheme
        layers: tuple[str, ...] | str = ("**",)  # region patterns of the layers to measure
        exclude: tuple[str, ...] | str = ()      # region patterns not to measure
        graph: str | None = None            # which graph (default: the first)

        def __post_init__(self):
            formats = tuple(self.formats)
            if not formats or any(f not in FORMATS for f in formats):
                raise OptionError(f"pass 'quant_sensitivity': option 'formats' takes candidates from "
                                  f"{list(FORMATS)} (W8A8; weight-only int4; weight-only int8), got {list(formats)}")
            for opt in ("block_size", "w8_block_size"):
                check_block_size("quant_sensitivity", opt, getattr(self, opt))
            object.__setattr__(self, "formats", formats)
            for f in ("layers", "exclude"):
                v = getattr(self, f)
                object.__setattr__(self, f, (v,) if isinstance(v, str) else tuple(v))

    def analyze(self, program: Program, ctx: PassContext) -> SensitivityProfile:
        o = self.options
        gname = o.graph or next(iter(program.graphs))
        if gname not in program.graphs:
            raise OptionError(f"pass 'quant_sensitivity' option 'graph': no graph {gname!r}; "
                              f"the program has {list(program.graphs)}")
        if ctx.calibration is None:
            raise PassError("pass 'quant_sensitivity' needs a calibration run: pass calibration= a list of input "
                            "tuples or a loop callable")
        g = program.graphs[gname]
        gm = g.module
        nodes = {n.name: n for n in gm.graph.nodes}
        skipped: list[tuple[str, str]] = []
        by_layer: dict[str, list] = {}
        for s in find_sites(gm, batched=not any(g.dynamic_dims)):
            regions = s.regions or (s.region,)
            if not any(match(p, r) for p in o.layers for r in regions) or \
                    any(match(p, r) for p in o.exclude for r in regions):
                continue
            by_layer.setdefault(s.region, []).append(s)
        if not by_layer:
            raise PassError(f"pass 'quant_sensitivity': no linear layer in graph '{gname}' matches layers "
                            f"{list(o.layers)} (exclude {list(o.exclude)})")
        xs = sorted({s.x for sites in by_layer.values() for s in sites})
        observed = {x: RangeObserver("minmax", 100.0, channels=True) for x in xs}
        calls = observe_values(gm, [nodes[x] for x in xs], ctx.calibration, lambda name, v: observed[name].observe(v))
        ref = replay(gm, ctx.calibration)
        qmax = int8_weight_qmax(ctx.target)         # w8a8 as quantize_linears will emit it for this target
        ctx.progress(f"quant_sensitivity: {len(by_layer)} layers x {len(o.formats)} formats")
        out = []
        for layer, sites in by_layer.items():
            s0 = sites[0]
            w = get_attr(gm, s0.weight).detach()
            w_kn = w.t() if s0.transposed else w
            k, n = int(w_kn.shape[0]), int(w_kn.shape[1])
            rng = observed[s0.x].range()
            if rng is None:
                skipped.append((layer, "input never observed in calibration"))
                continue
            fmts, nbytes, errs = [], [], []
            for fmt in o.formats:
                bs = o.w8_block_size if fmt == "w8" else o.block_size
                if fmt != "w8a8" and k % bs:
                    skipped.append((layer, f"{fmt}: input dim {k} not a multiple of block_size {bs}"))
                    continue
                if fmt == "w8a8":
                    patches = {s.node: (_kn(lambda w: fake_quant_weight_int8(w, qmax), gm, s), observed[s.x].range())
                               for s in sites}
                    nbytes.append(quantized_weight_bytes(k, n, 8))
                else:
                    def weight_only(w_kn, bs=bs, bits=FORMATS[fmt]):
                        q, sc, z = quantize_weight_blocks(w_kn.t(), bs, o.symmetric, bits)
                        return dequantize_weight_blocks(q, sc, z, (w_kn.shape[1], w_kn.shape[0]), bits).t()
                    patches = {s.node: (_kn(weight_only, gm, s), None) for s in sites}
                    nbytes.append(weight_only_bytes(k, n, FORMATS[fmt], bs, o.symmetric))
                got = replay(gm, ctx.calibration, patches)
                fmts.append(fmt)
                errs.append(compare_outputs(ref, got))
                ctx.log.debug("quant_sensitivity: %s at %s: rel L2 %.3g", layer, fmt, errs[-1]["rel_l2"])
            ch = observed[s0.x].channel_range()
            absmax = torch.maximum(ch[0].abs(), ch[1].abs())
            med = float(absmax.median())
            out.append(LayerSensitivity(
                layer, tuple(s.node for s in sites), k, n, int(sum(node_flops(nodes[s.node]) for s in sites)),
                4 * k * n, tuple(fmts), tuple(nbytes), tuple(e["rel_l2"] for e in errs),
                tuple(e["sqnr_db"] for e in errs), tuple(e["cosine"] for e in errs), (float(rng[0]), float(rng[1])),
                tuple(zip(observed[s0.x].lo, observed[s0.x].hi)),
                float(absmax.max()) / med if med > 0 else math.inf))
        ctx.log.info("quant_sensitivity: %d layers x %s over %d calls; most sensitive at %s: %s", len(out),
                     list(o.formats), calls, o.formats[0],
                     max(out, key=lambda x: x.rel_l2[0] if x.rel_l2 else 0.0).layer if out else "-")
        return SensitivityProfile(gname, calls, o.block_size, o.symmetric, o.w8_block_size,
                                  float(np.linalg.norm(ref)), tuple(out), tuple(skipped))


def _kn(fake: Callable[[torch.Tensor], torch.Tensor], gm: fx.GraphModule, s) -> torch.Tensor:
    """A layer's fake-quantized weight as [K, N] (what its matmul reads)."""
    w = get_attr(gm, s.weight).detach().to(torch.float32)
    return fake(w.t() if s.transposed else w).contiguous()


class _Patched(fx.Interpreter):
    """Runs a graph with some matmuls reading a replaced weight ([K, N]) and, when a
    range is given, their activation through uint8 fake-quant."""

    def __init__(self, gm: fx.GraphModule, patches: dict[str, tuple[torch.Tensor, Any]]):
        super().__init__(gm)
        self.patches = patches

    def run_node(self, n: fx.Node) -> Any:
        p = self.patches.get(n.name)
        if p is None:
            return super().run_node(n)
        w_kn, rng = p
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        args = list(args)
        xi, wi = (1, 2) if n.target is _aten.addmm.default else (0, 1)
        if rng is not None:
            args[xi] = fake_quant_activation(args[xi], *rng)
        args[wi] = w_kn if args[wi].dim() == 2 else w_kn.expand(args[wi].shape)
        return n.target(*args, **kwargs)


def replay(gm: fx.GraphModule, calibration: Any,
           patches: dict[str, tuple[torch.Tensor, Any]] | None = None) -> np.ndarray:
    """The calibration run's output as one float64 array [rows, features]: every call's
    float outputs (rows = each output's first dim, calls stacked), or, for a loop
    calibration that returns an array, that result. `patches` (matmul node -> (weight
    [K, N], activation range or None)) replaces layers while it runs."""
    outs: list[np.ndarray] = []

    def call(*args):
        flat = [a if isinstance(a, torch.Tensor) else torch.as_tensor(a) for a in args]
        with torch.no_grad():
            res = _Patched(gm, patches).run(*flat) if patches else gm(*flat)   # unpatched: the graph's own code
        res = res if isinstance(res, (tuple, list)) else (res,)
        outs.append(output_rows(res))
        return res[0] if len(res) == 1 else res

    return run_output(calibration, call, outs)

