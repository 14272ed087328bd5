"""DADS (analysis/dads.py): the DAG min-cut against every split enumerated, its per-node times
against the cost model's segments, and the cuts in graph order it must not beat."""
from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest

from pared.analysis.dads import dads_cut, node_times
from pared.analysis.placement import modeled_cost
from pared.ir import cuts
from pared.ir.capture import capture
from pared.ir.regions import node_module_path
from pared.ir.target import Deployment, Link
from pared.testing import SLOW_EDGE_FAST_CLOUD, tiny_patchnet, two_branch_net

MBIT = 1e6 / 8
DEP = Deployment.from_json(SLOW_EDGE_FAST_CLOUD)


@functools.cache
def prepared(which: str = "branches"):
    m, x = two_branch_net() if which == "branches" else tiny_patchnet()
    prog = capture(m, x)
    at = ("**",) if which == "branches" else ("patch", "blocks.*", "blocks.*.mlp.0")
    cost = modeled_cost(prog, "main", DEP, ("edge", "cloud"), at, overhead_s=2e-4)
    gm = prog.main.copy_module()
    cuts.propagate_shapes(gm, prog.main.example_inputs)
    return cost, gm


def _closed_sets(gm):
    """Every first side a split can have: sets of compute nodes closed under inputs, neither empty
    nor everything, with the graph's outputs on the second side."""
    nodes = cuts.compute_nodes(gm)
    compute = set(nodes)
    out = next(n for n in gm.graph.nodes if n.op == "output")
    outputs = {a for a in out.all_input_nodes if a in compute}
    for mask in itertools.product((False, True), repeat=len(nodes)):
        side = {n for n, m in zip(nodes, mask) if m}
        if not side or len(side) == len(nodes) or side & outputs:
            continue
        if all(a in side for n in side for a in n.all_input_nodes if a in compute):
            yield side


def _latency(cost, gm, side, link, compression="none"):
    """A split's modeled latency computed directly: both sides' node times and overheads, what
    crosses (live_of) over the link, the outputs back."""
    nodes = cuts.compute_nodes(gm)
    t1, t2 = node_times(cost, gm, nodes, "edge"), node_times(cost, gm, nodes, "cloud")
    inside = np.array([n in side for n in nodes])
    nbytes = sum(cuts.value_bytes(v)[0] for v in cuts.live_of(gm, side))
    return (t1[inside].sum() + t2[~inside].sum() + 2 * 2e-4 + link.transfer_s(nbytes)
            + link.transfer_s(cost.output_bytes))


def test_node_times_sum_to_the_segments_of_the_cost_model():
    cost, gm = prepared("patchnet")
    nodes = cuts.compute_nodes(gm)
    for dev in ("edge", "cloud"):
        t = node_times(cost, gm, nodes, dev)
        d = cost.device(dev)
        assert (t >= 0).all()
        for s, (a, b) in enumerate(zip(cost.cuts, cost.cuts[1:])):
            assert t[a.position:b.position].sum() == pytest.approx(d.segment_s[s], rel=1e-9, abs=1e-15)


@pytest.mark.parametrize("mbit", [0.5, 1, 3])
def test_min_cut_is_the_least_latency_over_every_split(mbit):
    """The min-cut's split has the least modeled latency of all 2^n node sets that are splits
    (enumerated), and its own latency is what that set costs."""
    cost, gm = prepared()
    link = Link("x", bandwidth=mbit * MBIT, rtt=0.001)
    dc = dads_cut(cost, gm, "edge", "cloud", link)
    assert dc is not None
    side = cuts.first_set(gm, dc.position, dc.moved)
    best = min(_latency(cost, gm, s, link) for s in _closed_sets(gm))
    assert dc.latency(link, cost.output_bytes) == pytest.approx(_latency(cost, gm, side, link), rel=1e-9)
    assert dc.latency(link, cost.output_bytes) == pytest.approx(best, rel=1e-9)


def test_on_a_slow_link_it_runs_both_reductions_first_which_no_cut_in_graph_order_does():
    cost, gm = prepared()
    link = Link("x", bandwidth=1 * MBIT, rtt=0.001)
    dc = dads_cut(cost, gm, "edge", "cloud", link)
    side = cuts.first_set(gm, dc.position, dc.moved)
    by_module = {node_module_path(n)[0][0] for n in side if node_module_path(n)}
    assert by_module == {"red_a", "red_b"}
    assert dc.moved and dc.nbytes == 2 * 64 * 4           # the two reduced values cross, not x
    chain = min(cost.latency(k, "edge", "cloud", link) for k in range(len(cost.cuts)))
    assert dc.latency(link, cost.output_bytes) < 0.6 * chain
    # the split runs: its parts compose to the graph
    import torch
    x = torch.randn(1, 4096, generator=torch.Generator().manual_seed(1))
    a, b, live = cuts.split(gm, dc.position, dc.moved)
    assert tuple(live) == dc.live
    with torch.no_grad():
        torch.testing.assert_close(b(*a(x))[0], gm(x)[0])


def test_fp16_across_halves_the_bytes_and_adds_the_codecs():
    cost, gm = prepared()
    link = Link("x", bandwidth=1 * MBIT, rtt=0.001)
    plain = dads_cut(cost, gm, "edge", "cloud", link)
    half = dads_cut(cost, gm, "edge", "cloud", link, "fp16")
    assert half.nbytes == plain.nbytes // 2 and half.label.endswith("_fp16")
    # the codecs are priced as the chain model prices them (here untimed: the regression on their
    # ops), per float value crossing: the same price a cut in graph order with these values pays
    n = sum(cuts.value_bytes(v)[1] for v in cuts.live_of(gm, cuts.first_set(gm, half.position, half.moved))) // 4
    want = (cost.codec_values_s("edge", "fp16", "send", n, len(half.live))
            + cost.codec_values_s("cloud", "fp16", "recv", n, len(half.live)))
    assert half.codec_s == pytest.approx(want, rel=1e-12) and half.codec_s > 0 and plain.codec_s == 0
    with pytest.raises(ValueError, match="unknown compression 'bf16'"):
        dads_cut(cost, gm, "edge", "cloud", link, "bf16")


def test_a_fast_link_sends_everything_and_dads_has_nothing_to_add():
    """At 1000 Mbit/s the input to the cloud is best: every node on the second side, not a split."""
    cost, gm = prepared()
    assert dads_cut(cost, gm, "edge", "cloud", Link("x", bandwidth=1000 * MBIT, rtt=0.001)) is None
