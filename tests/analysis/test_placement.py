"""analysis/placement.py: the cost model of a partition's cuts, measured on this host (ORT, one
thread) for the devices it runs or emulates, estimated by the fitted roofline for the others."""
from __future__ import annotations

import dataclasses
import functools
import math
import os

import pytest

from pared.analysis.placement import HOST, PlacementCost, modeled_cost, placement_cost
from pared.backends.measure import default_profiler
from pared.ir.capture import capture
from pared.ir.errors import PassError
from pared.ir.target import Link, get_deployment
from pared.ir.transform import PassContext
from pared.testing import tiny_patchnet

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EMULATED = os.path.join(ROOT, "examples", "targets", "deploy_emulated.yaml")
PI5_XEON = os.path.join(ROOT, "examples", "targets", "deploy_pi5_xeon.yaml")
AT = ("patch", "blocks.*", "blocks.*.mlp.0")


@functools.cache
def program():
    m, x = tiny_patchnet()
    return capture(m, x)


@functools.cache
def measured() -> PlacementCost:
    dep = get_deployment(EMULATED)
    # a CPU stated by its ISA is another machine: estimated, not measured here
    fast = dataclasses.replace(dep.device("cloud"), name="fast", peak_flops=8e11, mem_bandwidth=8e10,
                               arch="x86_64", isa=("avx2", "avx512f"))
    dep = dataclasses.replace(dep, devices={**dep.devices, "fast": fast})
    return placement_cost(program(), "main", dep, ("edge", "cloud", "fast"), PassContext(measure=default_profiler()),
                          AT, repeats=3, min_time=0.2, compressions=("none", "fp16", "int8"))


def test_record_shape_and_measured_devices():
    pc = measured()
    assert [c.name for c in pc.cuts][:2] == ["input", "after:patch#1"] and pc.cuts[-1].name == "output"
    assert len(pc.segments) == len(pc.cuts) - 1
    edge, cloud, fast = (pc.device(d) for d in ("edge", "cloud", "fast"))
    assert edge.measured and cloud.measured and not fast.measured
    assert pc.fit_device == "edge" and math.isfinite(pc.loo_error) and pc.rounds >= 3
    assert pc.output_bytes == 4 * 4
    for d in (edge, cloud):
        assert d.whole_s > 0 and d.sum_error is not None and d.estimate_error is not None
        # the segments are scaled to the whole graph's time less one call's overhead
        assert sum(d.segment_s) + d.overhead_s == pytest.approx(d.whole_s, rel=1e-9)


def test_an_emulated_device_is_the_host_slowed_down():
    """The edge (deploy_emulated.yaml: this host at one thread, 4x slower) and the cloud (this host at
    one thread) share one set of measurements: the edge's is 4 times the cloud's."""
    pc = measured()
    edge, cloud = pc.device("edge"), pc.device("cloud")
    for e, c in zip(edge.segment_s, cloud.segment_s):
        assert e == pytest.approx(4 * c, rel=1e-9)
    assert edge.overhead_s == pytest.approx(4 * cloud.overhead_s, rel=1e-9)


def test_an_unmeasured_device_is_estimated_from_its_peak():
    """fast has 4x the cloud's peak and bandwidth (16x the edge's): the regression fitted on the edge
    gives it a sixteenth of the edge's estimate, segment by segment."""
    pc = measured()
    fast, edge = pc.device("fast"), pc.device("edge")
    assert fast.segment_s == fast.estimate_s
    for f, e in zip(fast.estimate_s, edge.estimate_s):
        assert f == pytest.approx(e / 16, rel=1e-9, abs=1e-15)


def test_latency_is_neurosurgeons_sum():
    pc = measured()
    link = Link.mbit("w", 10, rtt_ms=4)
    k = pc.index("after:patch#1")
    want = (sum(pc.device("edge").segment_s[:k]) + pc.device("edge").overhead_s
            + link.transfer_s(pc.cuts[k].nbytes)
            + sum(pc.device("cloud").segment_s[k:]) + pc.device("cloud").overhead_s
            + link.transfer_s(pc.output_bytes))
    assert pc.latency(k, "edge", "cloud", link) == pytest.approx(want)
    last = len(pc.cuts) - 1
    assert pc.latency(last, "edge", "cloud", link) == pytest.approx(pc.before_s("edge", last))
    assert pc.latency(0, "edge", "cloud", link) == pytest.approx(
        pc.after_s("cloud", 0) + link.transfer_s(pc.cuts[0].nbytes) + link.transfer_s(pc.output_bytes))
    # compression sends fewer bytes and pays an encode / decode: the regression's estimate where the
    # codecs were not timed
    assert pc.codec_s("edge", k, "none", "send") == 0.0
    untimed = dataclasses.replace(pc, devices=tuple(dataclasses.replace(d, codec_s={}, input_encode_s={})
                                                    for d in pc.devices))
    assert untimed.codec_s("edge", k, "int8", "send") > untimed.codec_s("edge", k, "fp16", "send") > 0
    enc = untimed.codec_s("edge", 0, "fp16", "send") + untimed.device("edge").overhead_s
    assert untimed.latency(0, "edge", "cloud", link, "fp16") == pytest.approx(
        untimed.after_s("cloud", 0) + enc + untimed.codec_s("cloud", 0, "fp16", "recv")
        + link.transfer_s(pc.cuts[0].cut().bytes_as("fp16")) + link.transfer_s(pc.output_bytes))


def test_timed_codecs_price_compression():
    """With compressions to time, each measured device holds the codecs' seconds per float value
    (the emulated edge 4x the cloud's) and the input cut's encoder call; the latency uses them, and
    an unmeasured device takes the measured rate scaled by the memory bandwidths."""
    pc = measured()
    link = Link.mbit("w", 10, rtt_ms=4)
    edge, cloud, fast = (pc.device(d) for d in ("edge", "cloud", "fast"))
    keys = {"fp16.send", "fp16.recv", "int8.send", "int8.recv"}
    assert set(edge.codec_s) == set(cloud.codec_s) == set(fast.codec_s) == keys
    assert set(edge.input_encode_s) == {"fp16", "int8"}
    for key in keys:
        assert edge.codec_s[key] == pytest.approx(4 * cloud.codec_s[key], rel=1e-9)
        assert fast.codec_s[key] == pytest.approx(edge.codec_s[key] * edge.mem_bandwidth / fast.mem_bandwidth,
                                                  rel=1e-9)
    # the encoder is a call of its own: it costs at least about a call's overhead
    assert edge.input_encode_s["fp16"] > 0.5 * edge.overhead_s
    k = pc.index("after:patch#1")
    n = pc.cuts[k].float_bytes // 4
    assert pc.codec_s("edge", k, "fp16", "send") == pytest.approx(edge.codec_s["fp16.send"] * n)
    assert pc.latency(k, "edge", "cloud", link, "fp16") == pytest.approx(
        pc.before_s("edge", k) + pc.after_s("cloud", k) + pc.codec_s("edge", k, "fp16", "send")
        + pc.codec_s("cloud", k, "fp16", "recv") + link.transfer_s(pc.cuts[k].cut().bytes_as("fp16"))
        + link.transfer_s(pc.output_bytes))
    assert pc.latency(0, "edge", "cloud", link, "fp16") == pytest.approx(
        pc.after_s("cloud", 0) + edge.input_encode_s["fp16"] + pc.codec_s("cloud", 0, "fp16", "recv")
        + link.transfer_s(pc.cuts[0].cut().bytes_as("fp16")) + link.transfer_s(pc.output_bytes))
    # the record round-trips through JSON with them
    assert PlacementCost.from_json(pc.to_json()) == pc


def test_no_device_here_fits_on_the_host():
    """Neither a Raspberry Pi 5 nor a Xeon runs here: the host is measured to fit the regression and
    both are estimated from it."""
    pc = placement_cost(program(), "main", get_deployment(PI5_XEON), ("edge", "cloud"),
                        PassContext(measure=default_profiler()), AT, repeats=3, min_time=0.0)
    assert pc.fit_device == HOST and pc.device(HOST).measured
    assert not pc.device("edge").measured and not pc.device("cloud").measured
    # the Xeon's peak is 28x the Pi's: every segment estimated faster
    assert all(c < e for c, e in zip(pc.device("cloud").segment_s, pc.device("edge").segment_s) if e > 0)


def test_modeled_cost_is_deterministic_roofline():
    dep = get_deployment(EMULATED)
    a = modeled_cost(program(), "main", dep, ("edge", "cloud"), AT)
    b = modeled_cost(program(), "main", dep, ("edge", "cloud"), AT)
    assert a.to_json() == b.to_json()
    seg = a.segments[0]
    edge = dep.device("edge")
    assert a.device("edge").segment_s[0] == pytest.approx(
        (seg.matmul_flops + seg.other_flops) / edge.peak_flops + seg.bytes / edge.mem_bandwidth)


def test_errors_name_what_is_missing():
    dep = get_deployment(EMULATED)
    with pytest.raises(PassError, match="needs a measurement service"):
        placement_cost(program(), "main", dep, ("edge", "cloud"), PassContext(), AT)
    with pytest.raises(Exception, match="no graph 'nope'"):
        placement_cost(program(), "nope", dep, ("edge", "cloud"), PassContext(measure=default_profiler()), AT)
    from torch.export import Dim
    m, (x,) = tiny_patchnet(batch=2)
    dyn = capture(m, (x,), dynamic_shapes=({0: Dim("b", min=2, max=8)},))
    with pytest.raises(PassError, match="dynamic dimensions"):
        placement_cost(dyn, "main", dep, ("edge", "cloud"), PassContext(measure=default_profiler()), AT)


class _ColdAfterWhole:
    """A profiler whose one-op (overhead) runner costs 3 ms more on the first call after the whole
    graph ran, as a call whose caches the whole graph evicted: the model must take the fixed cost
    a plan pays (one cold call after the whole graph), not the back-to-back figure."""

    def __init__(self, whole):
        self.real, self.whole, self.cold = default_profiler(), whole, False

    def runner(self, program, target, workdir, fmt=None):
        import time
        fn = self.real.runner(program, target, workdir, fmt)
        g = next(iter(program.graphs.values()))
        ops = [n for n in g.copy_module().graph.nodes if n.op == "call_function"]
        if g is self.whole:
            def run():
                self.cold = True
                return fn()
        elif len(ops) == 1 and "mul" in str(ops[0].target):      # the overhead model (x * 2)
            def run():
                if self.cold:
                    time.sleep(0.003)
                self.cold = False
                return fn()
        else:
            def run():
                self.cold = False
                return fn()
        return run


def test_the_call_overhead_is_timed_cold_after_the_whole_graph():
    prog = program()
    dep = get_deployment(EMULATED)
    pc = placement_cost(prog, "main", dep, ("edge", "cloud"), PassContext(measure=_ColdAfterWhole(prog.main)),
                        AT, repeats=3, min_time=0.1)
    # timed back to back, the 3 ms would be paid once per chunk of calls: tens of microseconds a call
    assert pc.device("cloud").overhead_s >= 0.003
    assert pc.device("edge").overhead_s == pytest.approx(4 * pc.device("cloud").overhead_s, rel=1e-9)
