"""The placement cost model: per candidate cut of a graph, the time on each device of the
part before and after it, and the bytes crossing it (Neurosurgeon, "Neurosurgeon:
Collaborative Intelligence Between the Cloud and Mobile Edge", Kang et al., ASPLOS 2017:
T_j = sum_{i<=j} TM_i + D_j / B + sum_{i>j} TC_i over a chain of layers).

The graph is cut at every candidate (ir/cuts.py: region boundaries, inside blocks too);
the pieces between consecutive candidates are the segments. For a device this host can
run (its own target, or a Deployment's emulation of a slower one), every segment is
lowered with the device's backend and timed (all segments in the same rounds,
alternating, medians; a one-op model gives the per-call overhead, which a part pays
once, not per segment; an emulated device's times are the host's times its slowdown). The
overhead is timed one call at a time right after a call of the whole graph, as a part runs in
a plan: on this host a one-op call took 7 µs back to back and about 100 µs right after the VLA's
whole graph, and a split pays it twice.
The whole graph is timed beside them; the segments timed alone sum to less or more than it
(fusions across a cut, cache effects, a run call's cost per input and output), so they are
scaled to sum to the whole graph's time less one call's overhead, and the unscaled sum's
error is recorded.

Compression (fp16, int8 across the cut) adds codec nodes. With `compressions` named, they are
timed too, not priced by the regression: per compression, the encoder and the decoder of one
float value (the largest cut's), less a call's overhead, per value; and the input cut's encoder
as the partition builds it. That encoder is a graph call of its own on the program's inputs, so
its cost includes a call with every input and output. (On the VLA, the regression priced that
encoder near the one-op model's 7 µs; timed on this host it took 0.14 ms, which decided the
cut at 1000 Mbit/s.) A device not run here takes the measured rate, scaled by the memory
bandwidths.

For a device it cannot run, each segment's time is estimated by a roofline regression
fitted on the measured device's segments (Neurosurgeon fits per-layer-type regressions
on the device; here one linear model over op classes):

    t = a * matmul_flops / P + b * other_flops / P + c * bytes / B + d * ops * 1e9 / P

(P, B: the device's peak FLOP/s and memory bandwidth from its Target; non-negative least
squares), fitted on the first device measured here, or, when no device of the deployment runs
here, on this host itself (device `host`: the `cpu` target at one thread, its nominal
peak). So a device with twice the peak runs the matmuls in half the time at the same
efficiency as this host; the per-op cost (dispatch, small kernels) is taken to scale with
the peak too, which holds between CPUs and overstates a GPU's (its launch cost is fixed).
The fit's leave-one-out error over the measured segments, and its whole-graph error, are
in the record. Where both a measurement and an estimate
exist, both are kept: the estimate's error against the measurement is reported.

Reads: the graph's example inputs, the Deployment, `ctx.measure` (a Profiler). Writes:
PlacementCost (a record).
"""
from __future__ import annotations

import dataclasses
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.fx as fx

from pared.analysis.cost import node_flops, _FREE
from pared.analysis.latency import _alternate
from pared.ir import cuts as _cuts
from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError, TargetError
from pared.ir.program import Graph, Program, get_attr
from pared.ir.target import NAMED, Deployment, Link, get_deployment
from pared.ir.transform import Analysis, PassContext, Record, check_range, register_pass

#: the device name of this host when the cost model measures it only to fit the regression
HOST = "host"
#: calls of the overhead model (and of the input cut's encoder) timed one at a time after the whole graph
COLD_CALLS = 15

def _anywhere(*patterns: str) -> tuple[str, ...]:
    """Each pattern at the top level and under any module."""
    return tuple(q for p in patterns for q in (p, "**." + p))


#: where a partition may cut by default: after top-level modules and patch / position embeddings,
#: after each block of a block stack (pared's and timm's `blocks`, diffusers' `transformer_blocks`,
#: transformers' `layers` / `layer`), after its attention and after its MLP expansion (RoboECC cuts
#: inside blocks too)
DEFAULT_AT = ("*", *_anywhere("patch_embed", "pos_embed", "blocks.*", "blocks.*.attn", "blocks.*.mlp.fc1",
                               "transformer_blocks.*", "transformer_blocks.*.attn1", "transformer_blocks.*.ff.net.0",
                               "layers.*", "layer.*"))

_MATMUL = {"mm", "addmm", "bmm", "matmul", "baddbmm", "convolution", "conv2d", "conv1d", "linear",
           "_scaled_dot_product_flash_attention_for_cpu", "scaled_dot_product_attention",
           "_scaled_dot_product_flash_attention"}


@dataclass(frozen=True)
class CutCost:
    name: str
    position: int
    live: tuple[str, ...]
    nbytes: int
    float_bytes: int

    def cut(self) -> _cuts.Cut:
        return _cuts.Cut(self.name, self.position, self.live, self.nbytes, self.float_bytes)


@dataclass(frozen=True)
class SegmentFeatures:
    matmul_flops: int
    other_flops: int
    bytes: int          # outputs written and read once each, plus parameters read
    ops: int            # compute nodes that are not views


@dataclass(frozen=True)
class DeviceCost:
    device: str
    peak_flops: float
    mem_bandwidth: float
    measured: bool                          # segment times measured here (else estimated)
    segment_s: tuple[float, ...]            # per segment: the time used (measured when measured)
    estimate_s: tuple[float, ...]           # per segment: the regression's estimate
    overhead_s: float                       # per part: one runtime call's fixed cost (timed after another graph)
    whole_s: float | None = None            # the whole graph, measured (None: not measured)
    sum_error: float | None = None          # |sum of segments timed alone + overhead - whole| / whole (measured
    #                                         only; segment_s is scaled to remove it)
    estimate_error: float | None = None     # |estimated whole - measured whole| / measured (measured only)
    # the codecs, timed (empty: not timed; the regression prices them): "fp16.send" -> seconds per
    # float value encoded inside a part (recv: decoded), and compression -> seconds of the input
    # cut's encoder, a graph call of its own on the program's inputs
    codec_s: dict = dataclasses.field(default_factory=dict)
    input_encode_s: dict = dataclasses.field(default_factory=dict)


@dataclass(frozen=True)
class PlacementCost(Record):
    graph: str
    cuts: tuple[CutCost, ...]               # in position order; first `input`, last `output`
    segments: tuple[SegmentFeatures, ...]   # between consecutive cuts (len(cuts) - 1)
    devices: tuple[DeviceCost, ...]
    coefficients: tuple[float, ...]         # a, b, c, d of the regression (see module docstring)
    fit_device: str                         # the device whose measurements it was fitted on
    loo_error: float                        # median |error| / time of a segment left out of the fit
    output_bytes: int                       # the graph's outputs (what returns to the caller)
    rounds: int = 0

    def device(self, name: str) -> DeviceCost:
        for d in self.devices:
            if d.device == name:
                return d
        raise KeyError(f"no device {name!r} in the PlacementCost; it has {[d.device for d in self.devices]}")

    def index(self, cut: str) -> int:
        for i, c in enumerate(self.cuts):
            if c.name == cut:
                return i
        raise KeyError(f"no cut {cut!r}; cuts are {[c.name for c in self.cuts]}")

    def before_s(self, device: str, k: int) -> float:
        """Time on `device` of the part before cut k (0 for the `input` cut)."""
        d = self.device(device)
        return sum(d.segment_s[:k]) + d.overhead_s if k > 0 else 0.0

    def after_s(self, device: str, k: int) -> float:
        """Time on `device` of the part after cut k (0 for the `output` cut)."""
        d = self.device(device)
        return sum(d.segment_s[k:]) + d.overhead_s if k < len(self.cuts) - 1 else 0.0

    def codec_s(self, device: str, k: int, compression: str, side: str) -> float:
        """Estimated seconds on `device` to encode (side "send") or decode ("recv") cut k's float
        values as `compression`: the regression applied to the codec's ops (fp16: a cast each
        way; int8: |x|, max, scale, divide, round, clamp, cast to send; a cast and a multiply to
        receive)."""
        c = self.cuts[k]
        # len(live): an upper bound on the float values, each costing its ops
        return self.codec_values_s(device, compression, side, c.float_bytes // 4, len(c.live))

    def codec_values_s(self, device: str, compression: str, side: str, n: int, values: int) -> float:
        """Seconds on `device` to encode (or decode) `values` float32 values of `n` elements in all
        as `compression`: the codec's timed rate per element where the model timed it, else the
        regression applied to its ops (see codec_s)."""
        if compression == "none" or not n:
            return 0.0
        d = self.device(device)
        if f"{compression}.{side}" in d.codec_s:
            return d.codec_s[f"{compression}.{side}"] * n
        ops = {("fp16", "send"): 1, ("fp16", "recv"): 1, ("int8", "send"): 9, ("int8", "recv"): 2}[(compression, side)]
        _, b, cb, dd = self.coefficients
        flops = n * ops
        nbytes = 2 * 4 * n * ops
        return b * flops / d.peak_flops + cb * nbytes / d.mem_bandwidth + dd * values * ops * 1e9 / d.peak_flops

    def latency(self, k: int, first: str, second: str, link: Link, compression: str = "none") -> float:
        """End-to-end seconds of one call cut at k: the first part on `first` (and the encoding
        of the crossing values), the cut's values over `link`, the second part on `second` (and
        the decoding), its outputs back over `link` (no transfer at the `output` cut; at the
        `input` cut the inputs cross)."""
        last = len(self.cuts) - 1
        t = self.before_s(first, k) + self.after_s(second, k)
        if k < last:
            t += link.transfer_s(self.cuts[k].cut().bytes_as(compression)) + link.transfer_s(self.output_bytes)
            t += self.codec_s(second, k, compression, "recv")
            if k == 0 and compression != "none" and self.cuts[k].float_bytes:
                # the encoder is a graph call of its own on the first device: timed, or one call's
                # overhead plus the codec's price
                enc = self.device(first).input_encode_s
                t += enc[compression] if compression in enc else (
                    self.device(first).overhead_s + self.codec_s(first, k, compression, "send"))
            else:
                t += self.codec_s(first, k, compression, "send")
        return t


def segment_features(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> SegmentFeatures:
    mm = other = nbytes = ops = 0
    seen: set[str] = set()
    for n in nodes:
        name = getattr(n.target, "__name__", str(n.target)).split(".")[0]
        if name in _FREE:
            continue
        f = node_flops(n)
        if name in _MATMUL:
            mm += f
        else:
            other += f
        ops += 1
        tm = n.meta.get("tensor_meta")
        if tm is not None and hasattr(tm, "shape"):
            nbytes += 2 * math.prod(int(s) for s in tm.shape) * torch.empty((), dtype=tm.dtype).element_size()
        for a in n.all_input_nodes:
            if a.op == "get_attr" and str(a.target) not in seen:
                seen.add(str(a.target))
                t = get_attr(gm, str(a.target))
                if isinstance(t, torch.Tensor):
                    nbytes += t.numel() * t.element_size()
    return SegmentFeatures(mm, other, nbytes, ops)


def _design(feats: Sequence[SegmentFeatures], peak: float, bw: float) -> np.ndarray:
    return np.array([[f.matmul_flops / peak, f.other_flops / peak, f.bytes / bw, f.ops * 1e9 / peak]
                     for f in feats], float)


def _fit(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    from scipy.optimize import nnls
    scale = x.max(axis=0)
    scale[scale == 0] = 1.0
    coef, _ = nnls(x / scale, y)
    return coef / scale


class _Times2(torch.nn.Module):
    def forward(self, x):
        return x * 2.0


def _segment_graph(gm: fx.GraphModule, nodes: list[fx.Node], p0: int, p1: int) -> fx.GraphModule:
    ins = _cuts.live_at(gm, p0)
    outs = _cuts.live_at(gm, p1)
    return _cuts._extract(gm, ins, nodes[p0:p1], tuple(outs))


def cut_features(program: Program, graph: str, at: Sequence[str], where: str = "placement_cost"):
    """(a copy of the graph's module with shapes recorded, its candidate cuts, its compute nodes,
    the segments' features, the outputs' bytes).

    Raises:
        PassError: a graph with dynamic dimensions (a cut's transfer size must be static).
    """
    g = program.graphs[graph]
    if any(g.dynamic_dims):
        raise PassError(f"pass '{where}': graph {graph!r} has dynamic dimensions; a cut's transfer size must be "
                        "static: capture it with static shapes")
    gm = g.copy_module()
    _cuts.propagate_shapes(gm, g.example_inputs)
    cands = _cuts.candidate_cuts(gm, at)
    nodes = _cuts.compute_nodes(gm)
    feats = [segment_features(gm, nodes[a.position:b.position]) for a, b in zip(cands, cands[1:])]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    out_bytes = sum(_cuts.value_bytes(a)[0] for a in out_node.all_input_nodes)
    return gm, cands, nodes, feats, out_bytes


def modeled_cost(program: Program, graph: str, deployment: Deployment, devices: Sequence[str],
                 at: Sequence[str] = ("**",), coefficients: Sequence[float] = (1.0, 1.0, 1.0, 0.0),
                 overhead_s: float = 0.0) -> PlacementCost:
    """A PlacementCost from the roofline alone, nothing measured: each segment's time on each
    device is the regression with the given coefficients (default: FLOPs at peak plus bytes at
    bandwidth). Deterministic: for tests, and for a first look where no device runs here."""
    _, cands, _, feats, out_bytes = cut_features(program, graph, at)
    coef = np.array(coefficients, float)
    out = []
    for dev in devices:
        t = deployment.device(dev)
        est = tuple(max(float(v), 0.0) for v in _design(feats, t.peak_flops, t.mem_bandwidth) @ coef)
        out.append(DeviceCost(dev, t.peak_flops, t.mem_bandwidth, False, est, est, overhead_s))
    return PlacementCost(graph, tuple(CutCost(c.name, c.position, c.live, c.nbytes, c.float_bytes) for c in cands),
                         tuple(feats), tuple(out), tuple(float(c) for c in coef), "", float("nan"), out_bytes, 0)


def placement_cost(program: Program, graph: str, deployment: Deployment, devices: Sequence[str],
                   ctx: PassContext, at: Sequence[str] = ("**",), repeats: int = 10, min_time: float = 2.0,
                   where: str = "placement_cost", compressions: Sequence[str] = ()) -> PlacementCost:
    """Measure and model the cuts of `graph` on `devices` (see module docstring).

    Raises:
        OptionError: an unknown graph or device. PassError: no device runs here (nothing to
            fit the regression on), no measurement service, a segment that does not lower.
    """
    if graph not in program.graphs:
        raise OptionError(f"pass '{where}': no graph {graph!r}; the program has {list(program.graphs)}")
    for d in devices:
        deployment.device(d)
    measured = [d for d in devices if deployment.runs_here(d)]
    if not measured:   # fit the regression on this host itself, and estimate every device from it
        host = dataclasses.replace(NAMED["cpu"], name="host", threads=1)
        deployment = dataclasses.replace(deployment, devices={**deployment.devices, HOST: host})
        measured = [HOST]
        devices = [*devices, HOST]
    if ctx.measure is None:
        raise PassError(f"pass '{where}' times the graph's segments and needs a measurement service in the "
                        "context (pared.optimize injects one)")
    g = program.graphs[graph]
    gm, cands, nodes, feats, out_bytes = cut_features(program, graph, at, where)
    ctx.progress(f"{where}: {len(cands)} candidate cuts of {graph!r}, {len(feats)} segments; timing on "
                 f"{', '.join(measured)}")
    # segment example inputs: the live values at each cut, computed by running the chain
    vals: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for ph, x in zip([n for n in gm.graph.nodes if n.op == "placeholder"], g.example_inputs):
            vals[ph.name] = x
        seg_modules = []
        for a, b in zip(cands, cands[1:]):
            seg = _segment_graph(gm, nodes, a.position, b.position)
            outs = seg(*[vals[n] for n in a.live])
            for name, v in zip(b.live, outs):
                vals[name] = v
            seg_modules.append(seg)
    codecs = _codec_graphs(gm, g, cands, compressions, where)
    codec_n = _codec_values(cands)
    # one set of runners per host setup: devices emulated on the same target and thread count
    # share their measurements (each scaled by its own slowdown)
    setup_of: dict[str, tuple[str, int]] = {}
    for dev in measured:
        t = deployment.host_target(dev)
        threads = deployment.device(dev).threads if dev in deployment.emulated else t.threads
        setup_of[dev] = (t.backend, t.provider, repr(t.tvm_target), threads or 1)
    runners: dict[Any, Callable[[], Any]] = {}
    with tempfile.TemporaryDirectory(prefix="pared-placement-") as tmp:
        for setup in dict.fromkeys(setup_of.values()):
            dev = next(d for d, s in setup_of.items() if s == setup)
            target = dataclasses.replace(deployment.host_target(dev), threads=setup[-1])

            def lower(prog: Program, label: str) -> Callable[[], Any]:
                try:
                    return ctx.measure.runner(prog, target, tempfile.mkdtemp(dir=tmp))
                except Exception as e:
                    raise PassError(f"pass '{where}': {label} of graph {graph!r} did not lower for device "
                                    f"'{dev}' ({target.name}): {type(e).__name__}: "
                                    f"{str(e).splitlines()[0] if str(e) else ''}") from e
            for i, (seg, a, b) in enumerate(zip(seg_modules, cands, cands[1:])):
                sg = Graph(seg, tuple(f"x{j}" for j in range(len(a.live))), tuple(f"y{j}" for j in range(len(b.live))),
                           tuple(vals[n] for n in a.live))
                runners[(setup, i)] = lower(Program.single(sg), f"segment {a.name} .. {b.name}")
            runners[(setup, "whole")] = lower(Program.single(g), "the whole graph")
            small = g.example_inputs[0] if g.example_inputs[0].is_floating_point() else torch.zeros(1)
            runners[(setup, "overhead")] = lower(capture(_Times2().eval(), (small.float(),)), "the overhead model")
            for key, cg in codecs.items():
                runners[(setup, key)] = lower(Program.single(cg), f"the {key[1]} codec" if key[0] == "codec" else
                                              f"the input cut's {key[1]} encoder")
        timed, rounds = _alternate(runners, repeats, min_time)
        # a call's fixed cost as a plan pays it: one call right after the whole graph ran (its
        # caches cold), not one of many back to back, which the rounds above time
        cold: dict[Any, float] = {}
        for setup in dict.fromkeys(setup_of.values()):
            keys = ["overhead", *(k for k in codecs if k[0] == "input")]
            ts: dict[Any, list[float]] = {k: [] for k in keys}
            for _ in range(max(repeats, COLD_CALLS)):
                for k in keys:
                    runners[(setup, "whole")]()
                    t0 = time.perf_counter()
                    runners[(setup, k)]()
                    ts[k].append(time.perf_counter() - t0)
            cold.update({(setup, k): statistics.median(v) for k, v in ts.items()})
    med = {(d, k): timed[(setup_of[d], k)] for d in measured
           for k in [*range(len(feats)), "whole", "overhead", *codecs]}
    call = {(d, k): cold[(setup_of[d], k)] for d in measured for k in ["overhead", *codecs] if (setup_of[d], k) in cold}
    ref = measured[0]
    slow = {d: deployment.slowdown(d) for d in measured}
    raw = {d: [max(med[(d, i)] - med[(d, "overhead")], 0.0) * slow[d] for i in range(len(feats))]
           for d in measured}
    # the segments, timed alone, miss what runs between them in the whole graph (and pay a run
    # call each with more inputs and outputs than the overhead model): scale them to sum to the
    # whole graph's time less one call's overhead; the unscaled sum's error is recorded
    seg_s = {}
    for d in measured:
        total = sum(raw[d])
        want = max(med[(d, "whole")] - call[(d, "overhead")], 0.0) * slow[d]
        seg_s[d] = [v * want / total for v in raw[d]] if total > 0 else raw[d]
    ref_dev = deployment.device(ref)
    x_ref = _design(feats, ref_dev.peak_flops, ref_dev.mem_bandwidth)
    y_ref = np.array(seg_s[ref])
    coef = _fit(x_ref, y_ref)
    loo = []
    for i in range(len(feats)):
        keep = [j for j in range(len(feats)) if j != i]
        if len(keep) >= 4 and y_ref[i] > 0:
            c = _fit(x_ref[keep], y_ref[keep])
            loo.append(abs(float(x_ref[i] @ c) - y_ref[i]) / y_ref[i])
    out = []
    for dev in devices:
        t = deployment.device(dev)
        est = [max(float(v), 0.0) for v in _design(feats, t.peak_flops, t.mem_bandwidth) @ coef]
        if dev in measured:
            over = call[(dev, "overhead")] * slow[dev]
            whole = med[(dev, "whole")] * slow[dev]
            per_value = {k[1]: max(med[(dev, k)] - med[(dev, "overhead")], 0.0) * slow[dev] / codec_n
                         for k in codecs if k[0] == "codec"}
            encode = {k[1]: call[(dev, k)] * slow[dev] for k in codecs if k[0] == "input"}
            out.append(DeviceCost(dev, t.peak_flops, t.mem_bandwidth, True, tuple(seg_s[dev]), tuple(est), over,
                                  whole, abs(sum(raw[dev]) + over - whole) / whole,
                                  abs(sum(est) + over - whole) / whole, per_value, encode))
        else:
            over = call[(ref, "overhead")] * slow[ref]
            # a codec moves memory: the measured device's rate, scaled by the memory bandwidths
            r = deployment.device(ref)
            per_value = {k[1]: max(med[(ref, k)] - med[(ref, "overhead")], 0.0) * slow[ref] / codec_n
                         * r.mem_bandwidth / t.mem_bandwidth for k in codecs if k[0] == "codec"}
            encode = {c: over + per_value[f"{c}.send"] * cands[0].float_bytes // 4
                      for c in compressions if f"{c}.send" in per_value}
            out.append(DeviceCost(dev, t.peak_flops, t.mem_bandwidth, False, tuple(est), tuple(est), over,
                                  codec_s=per_value, input_encode_s=encode))
    return PlacementCost(graph, tuple(CutCost(c.name, c.position, c.live, c.nbytes, c.float_bytes) for c in cands),
                         tuple(feats), tuple(out), tuple(float(c) for c in coef), ref,
                         float(np.median(loo)) if loo else float("nan"), out_bytes, rounds)


def _codec_values(cands: Sequence[_cuts.Cut]) -> int:
    """Elements of the value the codecs are timed on: the largest float cut's (at least 4096, so
    the per-value rate is not the call's overhead over a few values)."""
    return max(4096, max(c.float_bytes // 4 for c in cands))


def _codec_graphs(gm: fx.GraphModule, g: Graph, cands: Sequence[_cuts.Cut], compressions: Sequence[str],
                  where: str) -> dict[tuple[str, str], Graph]:
    """What compression adds, as graphs to time: per compression, the encoder and decoder of one
    float value (key ("codec", "fp16.send")), and the input cut's encoder exactly as the
    partition builds it (key ("input", "fp16"): a call of its own, on the program's inputs)."""
    out: dict[tuple[str, str], Graph] = {}
    n = _codec_values(cands)
    for c in dict.fromkeys(compressions):
        if c not in _cuts.COMPRESSION:
            raise OptionError(f"pass '{where}': unknown compression {c!r}; known: {', '.join(_cuts.COMPRESSION)}")
        if c == "none":
            continue
        for side in ("send", "recv"):
            cg, names, ex = _cuts.codec_graph(c, side, n)
            outs = [a for a in next(x for x in cg.graph.nodes if x.op == "output").args[0]]
            out[("codec", f"{c}.{side}")] = Graph(cg, names, tuple(f"y{j}" for j in range(len(outs))), ex)
        if not cands[0].float_bytes:
            continue
        a, b, _ = _cuts.split(gm, 0)
        with torch.no_grad():
            crossing = list(a(*g.example_inputs))
        names = _cuts.compress(a, b, c, crossing)
        direct = _cuts.pass_through(a)
        _cuts.drop_outputs(a, set(direct))
        out[("input", c)] = Graph(a, g.input_names, tuple(x for i, x in enumerate(names) if i not in direct),
                                  g.example_inputs)
    return out


@register_pass("placement_cost")
class MeasurePlacement(Analysis):
    """The placement cost model of one graph on a deployment's devices (see module docstring)."""

    path_options = ("deployment",)

    record = PlacementCost

    @dataclass(frozen=True, kw_only=True)
    class Options:
        deployment: str | dict | None = None      # a deployment YAML file (or mapping): devices and links
        devices: tuple[str, ...] = ("edge", "cloud")
        graph: str | None = None                  # default: the first graph the plan calls
        at: tuple[str, ...] = DEFAULT_AT          # region patterns to cut after (ir/cuts.py)
        repeats: int = 10                         # timing rounds at least
        min_time: float = 2.0                     # ... and at least this long (s)
        compress: tuple[str, ...] = ()            # codecs to time (fp16, int8); else the regression prices them

        def __post_init__(self):
            if self.deployment is None:
                raise OptionError("pass 'placement_cost': option 'deployment' is required: a deployment file "
                                  "naming the devices and links (examples/targets/*.yaml)")
            for name in ("devices", "at", "compress"):
                v = getattr(self, name)
                object.__setattr__(self, name, (v,) if isinstance(v, str) else tuple(v))
            if not self.devices:
                raise OptionError("pass 'placement_cost': option 'devices' must name at least one device")
            check_range("placement_cost", "repeats", self.repeats, lo=3)
            check_range("placement_cost", "min_time", self.min_time, lo=0.0, hi=600.0)

    def analyze(self, program: Program, ctx: PassContext) -> PlacementCost:
        o = self.options
        try:
            dep = get_deployment(o.deployment)
            for d in o.devices:
                dep.device(d)
        except TargetError as e:
            raise OptionError(f"pass 'placement_cost' option 'deployment': {e}") from None
        graph = o.graph or program.called_graphs()[0]
        return placement_cost(program, graph, dep, o.devices, ctx, o.at, o.repeats, o.min_time,
                              compressions=o.compress)
