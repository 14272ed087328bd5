"""Measured per-layer latency on the target, per candidate format: the latency
table a latency budget is solved against (HAQ, "HAQ: Hardware-Aware Automated
Quantization with Mixed Precision", Wang et al., CVPR 2019: direct latency
feedback from the hardware instead of proxies such as FLOPs or bytes; the budget
itself is solved exactly by mixed_precision, as HAWQ-V3 does for its latency
constraint, "HAWQ-V3: Dyadic Neural Network Quantization", Yao et al., ICML 2021).

For each linear layer (the layers quantize_linears matches, as quant_sensitivity
and mixed_precision enumerate them) the analysis builds a one-layer model at the
shape the layer sees in the calibration run, x [M, K] -> y [M, N] (M: the rows it
multiplies per call, the mode over the calls; the layer's own weight and bias),
rewrites it into each candidate format with pared's own quantization rewrites,
lowers it with the target's backend and times it:
    fp32: unchanged
    w8a8: quantize_linears (static, calibrated on the timing input); QGemm in ORT
    w4:   weight-only block-wise int4 (quantize_weights_int4's rewrite); MatMulNBits
    w8:   weight-only block-wise int8 (the same rewrite at 8 bits); MatMulNBits bits=8
so each format runs the kernel it runs in the full artifact. A one-graph model
`x * 2` at the same input shape is timed with them: the per-call cost (the
runtime's run call, input binding, a tiny kernel) that a layer inside a whole
model does not pay on its own. Every round calls each model once (a chunk of
calls lasting >= CHUNK_S), every shape's models in the same rounds, in rotating
order, for at least `repeats` rounds and `min_time` seconds; the medians are
recorded. The target's session settings hold (ORT: spinning off; see
backends/onnxruntime/runtime.py), with `threads` intra-op threads (1 by default).

Layers of one shape (in, out, rows, bias) share one measurement: a transformer
repeats a handful of shapes over its blocks, so a 36-layer MiniLM lowers 3 shapes
x formats models, not 108.

What it predicts: the sum over layers of latency - overhead (clamped at 0) is
the part of the model's latency the format choice can change; mixed_precision
solves its `latency` budget on it. A one-layer model runs with cold caches for
its weights only as far as the full model does; fusions across layers (none for
these kernels in ORT) are not seen. The batched form (bmm on a non-contiguous
3-D input) is timed as its 2-D equivalent: what quantize_linears and the
weight-only rewrite turn it into, but in fp32 it stays a batched MatMul over an
expanded weight in the full model (measured on vit_mnist, 1 thread: 0.64 ms
against the 2-D Gemm's 0.42 ms), so its fp32 latency is underestimated.

Layering: the analysis builds the one-layer models from ir/ alone (the layers
are ir.patterns.find_sites'); rewriting them into a format, lowering and loading
them is the measurement service's job (`ctx.measure`, a Profiler: ir/measure.py,
implemented by backends/measure.py with pared's own quantization rewrites and
the backend's runtime), so it times exactly what the passes emit and the
artifact runs without importing passes or backends.

Reads: calibration (the shapes; without one, the example inputs' shapes), the
target (ctx.target; the `cpu` target when there is none), the profiler
(ctx.measure; pared.optimize injects one). Writes: LatencyProfile (a record;
nothing on nodes).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.fx as fx

from pared.analysis.redundancy import observe_values
from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.measure import LINEAR_FORMATS, LinearFormat, Profiler
from pared.ir.patterns import find_sites
from pared.ir.program import Program, get_attr
from pared.ir.target import Target, get_target
from pared.ir.transform import Analysis, PassContext, Record, check_block_size, check_range, register_pass

#: the candidate formats (fp32 is always measured): name -> weight bits (the registry's, ir/formats.py)
FORMATS = {name: bits for name, bits in LINEAR_FORMATS.items() if name != "fp32"}
#: a timed chunk of calls lasts at least this long (s): timer resolution and call jitter amortized
CHUNK_S = 2e-3
#: untimed rounds before the timed ones
WARMUP = 2


@dataclass(frozen=True)
class LayerLatency:
    layer: str                          # region (innermost module path), as in SensitivityProfile
    nodes: tuple[str, ...]              # its matmul node(s)
    in_features: int                    # K
    out_features: int                   # N
    tokens: int                         # M: rows per call in the calibration run (the mode over calls)
    bias: bool
    formats: tuple[str, ...]            # "fp32" first, then the candidates measured for this layer
    latency_s: tuple[float, ...]        # median seconds per call of the one-layer model, per format
    overhead_s: float                   # median seconds per call of `x * 2` at the same input shape

    def latency(self, fmt: str) -> float:
        """The one-layer model's median seconds per call in `fmt` (overhead included)."""
        return self.latency_s[self.formats.index(fmt)]

    def cost(self, fmt: str) -> float:
        """Seconds this layer adds to a whole model in `fmt`: latency - overhead, at least 0."""
        return max(self.latency(fmt) - self.overhead_s, 0.0)

    @property
    def shape(self) -> tuple[int, int, int, bool]:
        return self.in_features, self.out_features, self.tokens, self.bias


@dataclass(frozen=True)
class LatencyProfile(Record):
    graph: str
    target: str                         # the target's name
    backend: str                        # onnxruntime | tvm
    threads: int                        # intra-op threads the models ran with (0: the runtime's default)
    repeats: int                        # timed rounds run (each runs every shape in every format)
    block_size: int                     # the w4 candidate's block size
    w8_block_size: int                  # the w8 candidate's block size
    symmetric: bool                     # the weight-only candidates' scheme
    shapes: int                         # distinct (in, out, tokens, bias) shapes measured
    layers: tuple[LayerLatency, ...]
    skipped: tuple[tuple[str, str], ...] = ()   # (layer, why) for formats or layers not measured

    def layer(self, name: str) -> LayerLatency:
        for lay in self.layers:
            if lay.layer == name:
                return lay
        raise KeyError(f"no layer {name!r} in the LatencyProfile; it has {[x.layer for x in self.layers]}")


class _Times2(torch.nn.Module):
    """The per-call overhead model: one cheap elementwise op at the layer's input shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2.0


@register_pass("latency")
class Latency(Analysis):
    """Per-layer latency on the target in each candidate format (see module docstring)."""

    record = LatencyProfile

    @dataclass(frozen=True, kw_only=True)
    class Options:
        formats: tuple[str, ...] = ("w8a8", "w4")  # candidates besides fp32: w8a8, w4, w8 (as quant_sensitivity)
        block_size: int = 32                # the w4 candidate's block size
        w8_block_size: int = 128            # the w8 candidate's block size
        symmetric: bool = True              # the weight-only candidates' scheme
        threads: int = 1                    # intra-op threads while timing (0: the target's setting)
        repeats: int = 15                   # timed rounds at least (medians over them)
        min_time: float = 3.0               # ... and more until the rounds have run this long (s): a burst of
        #                                     load on a shared machine then covers a minority of them
        graph: str | None = None            # which graph (default: the first)

        def __post_init__(self):
            formats = tuple(self.formats)
            if any(f not in FORMATS for f in formats):
                raise OptionError(f"pass 'latency': option 'formats' takes candidates from {list(FORMATS)} "
                                  f"(fp32 is always measured), got {list(formats)}")
            for opt in ("block_size", "w8_block_size"):
                check_block_size("latency", opt, getattr(self, opt))
            check_range("latency", "threads", self.threads, lo=0)
            check_range("latency", "repeats", self.repeats, lo=3)
            check_range("latency", "min_time", self.min_time, lo=0.0, hi=600.0)
            object.__setattr__(self, "formats", tuple(dict.fromkeys(formats)))

    def analyze(self, program: Program, ctx: PassContext) -> LatencyProfile:
        o = self.options
        gname = o.graph or next(iter(program.graphs))
        if gname not in program.graphs:
            raise OptionError(f"pass 'latency' option 'graph': no graph {gname!r}; "
                              f"the program has {list(program.graphs)}")
        g = program.graphs[gname]
        gm = g.module
        if ctx.measure is None:
            raise PassError("pass 'latency' times one-layer models on the target and needs a measurement service "
                            "in the context: build it with PassContext(..., measure=pared.backends.measure."
                            "default_profiler()) (pared.optimize injects one)")
        target = ctx.target if ctx.target is not None else get_target("cpu")   # the default target
        if o.threads:
            target = dataclasses.replace(target, threads=o.threads)
        by_layer: dict[str, list] = {}
        for s in find_sites(gm, batched=not any(g.dynamic_dims)):
            by_layer.setdefault(s.region, []).append(s)
        if not by_layer:
            raise PassError(f"pass 'latency': no linear layer in graph '{gname}' to measure")
        rows = _calibration_rows(gm, [s.x for sites in by_layer.values() for s in sites], ctx.calibration)
        skipped: list[tuple[str, str]] = []
        shape_of: dict[str, tuple[int, int, int, bool]] = {}
        for layer, sites in by_layer.items():
            s0 = sites[0]
            w = get_attr(gm, s0.weight)
            k, n = (int(w.shape[1]), int(w.shape[0])) if s0.transposed else (int(w.shape[0]), int(w.shape[1]))
            shape_of[layer] = (k, n, rows[s0.x], s0.bias is not None)
        shapes = list(dict.fromkeys(shape_of.values()))
        ctx.progress(f"latency: {len(by_layer)} layers, {len(shapes)} shapes x {1 + len(o.formats)} formats "
                     f"on {target.name}")
        fmts_of: dict[tuple, list[str]] = {}
        runners: dict[tuple, Callable[[], Any]] = {}
        with tempfile.TemporaryDirectory(prefix="pared-latency-") as tmp:
            for shape in shapes:
                s0 = by_layer[next(layer for layer, sh in shape_of.items() if sh == shape)][0]
                w = get_attr(gm, s0.weight).detach().to(torch.float32)
                b = get_attr(gm, s0.bias).detach().to(torch.float32) if s0.bias is not None else None
                fmts_of[shape] = ["fp32"]
                for f in o.formats:
                    bs = o.w8_block_size if f == "w8" else o.block_size
                    if f != "w8a8" and shape[0] % bs:
                        skipped += [(layer, f"{f}: input dim {shape[0]} not a multiple of block_size {bs}")
                                    for layer, sh in shape_of.items() if sh == shape]
                        continue
                    fmts_of[shape].append(f)
                for name, run in self._lower(ctx.measure, w if s0.transposed else w.t(), b, shape, fmts_of[shape],
                                             target, tmp).items():
                    runners[(shape, name)] = run
            # every shape and format in the same rounds: a change of load while timing moves them alike
            med, rounds = _alternate(runners, o.repeats, o.min_time)
        measured: dict[tuple, tuple[tuple[str, ...], tuple[float, ...], float]] = {}
        for shape, fmts in fmts_of.items():
            measured[shape] = (tuple(fmts), tuple(med[(shape, f)] for f in fmts), med[(shape, "overhead")])
            ctx.log.debug("latency: [%d x %d, %d rows, bias %s]: %s; overhead %.3g ms", *shape,
                          {f: round(med[(shape, f)] * 1e3, 4) for f in fmts}, med[(shape, "overhead")] * 1e3)
        out = tuple(LayerLatency(layer, tuple(s.node for s in by_layer[layer]), *shape_of[layer][:2],
                                 shape_of[layer][2], shape_of[layer][3], *measured[shape_of[layer]])
                    for layer in by_layer)
        fp32 = sum(x.cost("fp32") for x in out)
        best = {f: sum(x.cost(f if f in x.formats else "fp32") for x in out) for f in o.formats}
        ctx.log.info("latency: %d layers (%d shapes) on %s, %d thread(s): fp32 %.3f ms summed%s", len(out),
                     len(shapes), target.name, o.threads, fp32 * 1e3,
                     "".join(f"; all {f} {v / fp32:.2f}x" for f, v in best.items() if fp32 > 0))
        return LatencyProfile(gname, target.name, target.backend, o.threads, rounds,
                              o.block_size, o.w8_block_size, o.symmetric, len(shapes), out, tuple(skipped))

    def _lower(self, profiler: Profiler, w_nk: torch.Tensor, bias: torch.Tensor | None,
               shape: tuple[int, int, int, bool], formats: list[str], target: Target,
               tmp: str) -> dict[str, Callable[[], Any]]:
        """Have `profiler` lower the one-layer model in each format, and the overhead model, into `tmp`.
        Returns format (and "overhead") -> a callable running it once on a fixed input.

        Raises:
            PassError: a model that did not lower, naming its shape, format and the target.
        """
        o = self.options
        k, n, m, has_bias = shape
        x = torch.randn(m, k, generator=torch.Generator().manual_seed(0))
        lin = torch.nn.Linear(k, n, bias=has_bias).eval()
        with torch.no_grad():
            lin.weight.copy_(w_nk)
            if has_bias:
                lin.bias.copy_(bias)
        base = capture(lin, (x,))
        models = {f: (base, LinearFormat(f, o.w8_block_size if f == "w8" else o.block_size, o.symmetric))
                  for f in formats}
        models["overhead"] = (capture(_Times2().eval(), (x,)), None)
        runners = {}
        for name, (prog, fmt) in models.items():
            try:
                runners[name] = profiler.runner(prog, target, tempfile.mkdtemp(dir=tmp), fmt)
            except Exception as e:
                raise PassError(f"pass 'latency': the one-layer model [{k} -> {n}, {m} rows] in format "
                                f"'{name}' did not lower for target '{target.name}': "
                                f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        return runners


def _calibration_rows(gm: fx.GraphModule, xs: list[str], calibration: Any) -> dict[str, int]:
    """Rows each input node multiplies per call (all dims but the last): the mode over
    the calibration calls, larger on a tie; the example shape without calibration."""
    nodes = {n.name: n for n in gm.graph.nodes}
    seen: dict[str, Counter] = {x: Counter() for x in xs}
    if calibration is not None:
        observe_values(gm, [nodes[x] for x in dict.fromkeys(xs)], calibration,
                       lambda name, v: seen[name].update([math.prod(v.shape[:-1])]))
    rows = {}
    for x in xs:
        if seen[x]:
            rows[x] = max(seen[x].items(), key=lambda kv: (kv[1], kv[0]))[0]
        else:
            shp = nodes[x].meta["val"].shape
            rows[x] = math.prod(int(d) if isinstance(d, int) else 1 for d in shp[:-1])
    return rows


def _alternate(runners: Mapping[Any, Callable[[], Any]], repeats: int,
               min_time: float = 0.0) -> tuple[dict[Any, float], int]:
    """Median seconds per call of each runner: every round runs each once (a chunk of
    calls lasting >= CHUNK_S), in rotating order, after WARMUP untimed rounds; at least
    `repeats` rounds, more until they have run `min_time` s (at most 20 x repeats).
    Returns (runner -> median s per call, timed rounds)."""
    names = list(runners)
    number = {}
    for name in names:
        runners[name]()
        t0 = time.perf_counter()
        runners[name]()
        number[name] = max(1, math.ceil(CHUNK_S / max(time.perf_counter() - t0, 1e-7)))
    times: dict[Any, list[float]] = {name: [] for name in names}
    r, start = 0, None
    while r < WARMUP + repeats or (time.perf_counter() - start < min_time and r < WARMUP + 20 * repeats):
        if r == WARMUP:
            start = time.perf_counter()
        order = names[r % len(names):] + names[:r % len(names)]
        for name in order:
            fn, k = runners[name], number[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            if r >= WARMUP:
                times[name].append((time.perf_counter() - t0) / k)
        r += 1
    return {name: statistics.median(v) for name, v in times.items()}, r - WARMUP
