"""The `partition` pass: the cut per bandwidth from the cost model, the Plan it builds (a
bandwidth select over cases of Calls on two devices and Transfers between them), the parts
against the eager model, and the artifact run torch-free over an emulated link.

Most tests give the program a modeled PlacementCost (analysis.placement.modeled_cost: the
roofline, nothing timed), so the cuts chosen are deterministic; one test measures."""
from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch

from pared.analysis.placement import PlacementCost, modeled_cost
from pared.backends.measure import default_profiler
from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.plan import Call, Seq, Transfer, iter_nodes
from pared.ir.selectors.bandwidth import Bandwidth
from pared.ir.target import Deployment, Link
from pared.ir.transform import PassContext
from pared.passes.partition.partition import MBIT, Partition, PartitionPlan
from pared.testing import (SLOW_EDGE_FAST_CLOUD, assert_close_to_eager, run_pass_checked, run_torch_free,
                           save_program, tiny_patchnet)

DEP = SLOW_EDGE_FAST_CLOUD
AT = ("patch", "blocks.*", "blocks.*.mlp.0")
SWEEP = [1, 3, 10, 30, 100, 1000]


@functools.cache
def fixture():
    m, x = tiny_patchnet()
    prog = capture(m, x)
    cost = modeled_cost(prog, "main", Deployment.from_json(DEP), ("edge", "cloud"), AT)
    return m, x, prog.with_record(cost, "main")


@functools.cache
def partitioned(cases: str = "winners", compress: tuple = ("none", "fp16")):
    m, x, prog = fixture()
    res = run_pass_checked(Partition(deployment=DEP, at=list(AT), mbit=SWEEP, cases=cases, compress=list(compress)),
                           prog, PassContext())
    return res


def test_sweep_picks_the_modeled_argmin_and_bands_meet_where_latencies_cross():
    res = partitioned()
    cost = res.program.records.of(PlacementCost, "main")
    pp = res.program.records.of(PartitionPlan, "main")
    # edge alone; cut after the patch embedding, fp16 across; the image to the cloud in fp16; then as it is
    assert pp.bands == ("first", "k1_fp16", "second_fp16", "second")
    assert [p.chosen for p in pp.sweep] == ["first", "k1_fp16", "k1_fp16", "second_fp16", "second_fp16", "second"]
    case = {c.label: c for c in pp.cases}
    assert case["k1_fp16"].cut == "after:patch#1" and case["k1_fp16"].bytes == 16 * 32 * 2
    index = {c.name: i for i, c in enumerate(cost.cuts)}

    def lat(label, mbit):
        c = case[label]
        k, comp = index[c.cut], c.compression
        return cost.latency(k, "edge", "cloud", Link("x", bandwidth=mbit * MBIT, rtt=0.001), comp)
    for p in pp.sweep:   # nothing the model knows beats the choice
        lk = Link("x", bandwidth=p.mbit * MBIT, rtt=0.001)
        every = [cost.latency(k, "edge", "cloud", lk, comp) for k in range(len(cost.cuts))
                 for comp in ("none", "fp16")]
        assert p.latency_s == pytest.approx(min(every))
        assert p.first_only_s == pytest.approx(cost.latency(len(cost.cuts) - 1, "edge", "cloud", lk))
    for (a, b), edge in zip(zip(pp.bands, pp.bands[1:]), pp.edges_mbit):
        assert lat(a, edge) == pytest.approx(lat(b, edge), rel=1e-6)
        assert lat(a, edge * 0.9) < lat(b, edge * 0.9) and lat(b, edge * 1.1) < lat(a, edge * 1.1)


def test_plan_structure_devices_and_transfers():
    res = partitioned()
    prog = res.program
    assert set(prog.graphs) == {"main.whole", "main.k1_fp16_first", "main.k1_fp16_second",
                                "main.second_fp16_first", "main.second_fp16_second"}
    (sel,) = prog.plan.selects()
    assert isinstance(sel.selector, Bandwidth) and sel.selector.link == "link:wifi"
    assert sel.selector.cases == ("first", "k1_fp16", "second_fp16", "second")
    assert sel.selector.initial == 20 * MBIT
    cases = dict(sel.cases)
    assert cases["first"] == Call("main.whole", ("in:image",), prog.plan.outputs, "edge")
    cut = cases["k1_fp16"]
    assert isinstance(cut, Seq)
    calls = [n for n in iter_nodes(cut) if isinstance(n, Call)]
    moves = [n for n in iter_nodes(cut) if isinstance(n, Transfer)]
    assert [(c.graph, c.device) for c in calls] == [("main.k1_fp16_first", "edge"), ("main.k1_fp16_second", "cloud")]
    assert [(t.src, t.dst) for t in moves] == [("edge", "cloud"), ("cloud", "edge")]
    assert moves[-1].out == prog.plan.outputs[0]
    # the first part sends fp16, the second takes it
    first = prog.graphs["main.k1_fp16_first"]
    with torch.no_grad():
        sent = first.run(*first.example_inputs)
    assert [t.dtype for t in sent] == [torch.float16]
    # the cloud-only case moves the inputs over and the outputs back
    whole = [n for n in iter_nodes(cases["second"]) if isinstance(n, (Call, Transfer))]
    assert [type(n).__name__ for n in whole] == ["Transfer", "Call", "Transfer"]
    assert whole[1].device == "cloud"
    assert all(g.made_by("partition") for g in prog.graphs.values())


def test_every_case_computes_the_model():
    """cases: all puts every cut (and compression) in the artifact; each case's parts compose to the
    eager model: exactly without compression, within fp16 / int8 rounding with it."""
    m, x, _ = fixture()
    res = partitioned("all", ("none", "fp16", "int8"))
    pp = res.program.records.of(PartitionPlan, "main")
    assert len(pp.cases) == 1 + 6 * 3     # first; the input and 5 interior cuts x 3 compressions
    xs = (torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5)),)
    with torch.no_grad():
        ref = m(*xs)
    for case in pp.cases:
        if case.label in ("first", "second"):
            got = res.program.graphs["main.whole"].run(*xs)[0]
        else:
            a = res.program.graphs[f"main.{case.label}_first"]
            b = res.program.graphs[f"main.{case.label}_second"]
            got = b.run(*a.run(*xs))[0]
        bound = {"none": 1e-6, "fp16": 2e-3, "int8": 5e-2}[case.compression]
        assert_close_to_eager(ref, got, rel_l2=bound, what=f"case {case.label}")


def test_torch_side_plan_runs_the_initial_band():
    m, x, _ = fixture()
    res = partitioned()
    runner = res.program.runner()
    with torch.no_grad():
        out = runner([x[0]])[0]
    assert runner.trace == ["k1_fp16"]        # 20 Mbit/s, the link's nominal bandwidth
    assert_close_to_eager(m(x[0]), out, rel_l2=2e-3)


def test_artifact_follows_the_measured_bandwidth(tmp_path, monkeypatch):
    from pared.backends import executor as ex_mod
    from pared.backends.executor import Executor
    from pared.backends.link import EmulatedLink
    m, x, _ = fixture()
    res = partitioned()
    path = save_program(res.program, str(tmp_path / "a"), {"name": "cpu", "backend": "onnxruntime",
                                                          "provider": "CPUExecutionProvider"})
    waits = []
    monkeypatch.setattr(ex_mod, "wait", lambda s: waits.append(s))
    link = EmulatedLink(Link.mbit("wifi", 20, rtt_ms=1), sleep=False)
    exe = Executor(path, links={("edge", "cloud"): link}, emulate={"edge": 3.0})
    xs = x[0].numpy()
    with torch.no_grad():
        ref = m(x[0]).numpy()
    labels = []
    for mbit in [20] * 2 + [0.5] * 6 + [500] * 6:
        link.set_link(Link.mbit("wifi", mbit, rtt_ms=1))
        out = exe(xs)
        np.testing.assert_allclose(out, ref, rtol=0, atol=2e-3)
        labels.append(exe.trace[-1])
    # the window (5) averages the drop in before the cut moves back to the edge; at 500 Mbit/s the
    # image goes to the cloud once the average passes the next edge (21 Mbit/s + 10%)
    assert labels[:2] == ["k1_fp16", "k1_fp16"]
    assert "first" in labels[2:8] and labels[7] == "first"
    assert labels[-1] == "second_fp16"
    assert link.transfers > 0 and link.count > 0
    # the edge's calls were stretched 3x, the cloud's not: one wait per edge call (every case but
    # "second" runs a graph on the edge: second_fp16 casts the image there)
    edge_calls = sum(1 for lab in labels if lab != "second")
    assert len(waits) == edge_calls and all(w >= 0 for w in waits)
    # and without torch: the same artifact, link and answers
    code = f"""
import numpy as np
from pared.backends.executor import Executor
from pared.backends.link import EmulatedLink
from pared.ir.target import Link
link = EmulatedLink(Link.mbit("wifi", 0.5, rtt_ms=1), sleep=False)
exe = Executor({path!r}, links={{("edge", "cloud"): link}})
x = np.load({str(tmp_path / "x.npy")!r})
for _ in range(7):
    out = exe(x)
print(exe.trace, float(np.abs(out - np.load({str(tmp_path / "ref.npy")!r})).max()))
"""
    np.save(tmp_path / "x.npy", xs)
    np.save(tmp_path / "ref.npy", ref)
    got = run_torch_free(code)
    assert "'first']" in got and float(got.split()[-1]) < 2e-3


def test_noop_when_the_edge_alone_is_fastest():
    """A cloud no faster than the edge: every transfer only adds time, the program is left as it is."""
    m, x = tiny_patchnet()
    prog = capture(m, x)
    dep = {**DEP, "devices": {"edge": DEP["devices"]["edge"], "cloud": DEP["devices"]["edge"]}}
    prog = prog.with_record(modeled_cost(prog, "main", Deployment.from_json(dep), ("edge", "cloud"), AT), "main")
    res = Partition(deployment=dep, at=list(AT))(prog, PassContext())
    assert not res.modified and res.program is prog


def test_second_run_finds_nothing_to_do():
    res = partitioned()
    again = Partition(deployment=DEP, at=list(AT), mbit=SWEEP)(res.program, PassContext())
    assert not again.modified


@pytest.mark.parametrize("opts,msg", [
    ({}, "option 'deployment' is required"),
    ({"deployment": DEP, "compress": ["bf16"]}, "option 'compress' takes"),
    ({"deployment": DEP, "mbit": [0]}, "option 'mbit' must be bandwidths > 0"),
    ({"deployment": DEP, "first": "cloud"}, "options 'first' and 'second' name the same device"),
    ({"deployment": DEP, "cases": "some"}, "option 'cases' must be 'winners' or 'all'"),
    ({"deployment": DEP, "search": "greedy"}, "option 'search' must be one of \\['chain', 'dads'\\]"),
    ({"deployment": DEP, "hysteresis": 1.5}, "option 'hysteresis' must be in"),
    ({"deployment": DEP, "second": "gpu"}, "deployment 'test' has no device 'gpu'"),
    ({"deployment": "/nope.yaml"}, "deployment file /nope.yaml does not exist"),
    ({"deployment": DEP, "graph": "head"}, "the plan does not call 'head'"),
])
def test_bad_options(opts, msg):
    m, x, prog = fixture()
    with pytest.raises(OptionError, match=msg):
        Partition(**opts)(prog, PassContext())


def test_several_graphs_need_a_name_and_state_is_refused():
    from pared.testing import two_graph_program
    _, prog = two_graph_program()
    with pytest.raises(OptionError, match="calls 2 graphs .*name the one to split with option 'graph'"):
        Partition(deployment=DEP)(prog, PassContext())
    with pytest.raises(PassError, match="graph 'full' reads or writes carried state"):
        Partition(deployment=DEP, graph="full")(prog, PassContext())


def test_measured_end_to_end():
    """Without a cost record the pass measures one (deploy_emulated.yaml: both devices run here)."""
    import os
    m, x = tiny_patchnet()
    prog = capture(m, x)
    dep = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "targets", "deploy_emulated.yaml")
    res = Partition(deployment=dep, at=list(AT), repeats=3, min_time=0.0, mbit=[0.1, 10000],
                    cases="all")(prog, PassContext(measure=default_profiler()))
    cost = res.program.records.of(PlacementCost, "main")
    pp = res.program.records.of(PartitionPlan, "main")
    assert cost.device("edge").measured and cost.device("cloud").measured
    assert pp.sweep[0].chosen == "first"      # 0.1 Mbit/s: nothing is worth sending
    assert math.isfinite(pp.sweep[-1].latency_s)
    assert_close_to_eager(m(*x), res.program(*x), rel_l2=2e-3)


def test_an_input_that_crosses_as_it_is_skips_the_first_part():
    """A float input read only at the end (a policy's noise) crosses the input cut in fp16 through the
    first part's cast; an integer input crosses as it is, read by the Transfer from the program's
    input (a graph returning its own input is no ONNX graph)."""
    from torch import nn

    class Late(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(64, 64)
            self.emb = nn.Embedding(10, 64)

        def forward(self, x, ids):
            return self.f(torch.relu(self.f(x))) + self.emb(ids)

    torch.manual_seed(0)
    m = Late().eval()
    x = (torch.randn(8, 64), torch.randint(0, 10, (8,)))
    prog = capture(m, x)
    dep = {**DEP, "links": [{"between": ["edge", "cloud"], "name": "wifi", "mbit": 20, "rtt_ms": 1}]}
    prog = prog.with_record(modeled_cost(prog, "main", Deployment.from_json(dep), ("edge", "cloud"), ("f",)), "main")
    res = Partition(deployment=dep, at=["f"], mbit=[1000], cases="all")(prog, PassContext())
    first = res.program.graphs["main.second_fp16_first"]
    assert first.output_names == ("x_fp16",)          # ids do not go through it
    (sel,) = res.program.plan.selects()
    moves = [n for n in iter_nodes(dict(sel.cases)["second_fp16"]) if isinstance(n, Transfer)]
    assert moves[1].ref == "in:ids"
    with torch.no_grad():
        assert_close_to_eager(m(*x), res.program(*x), rel_l2=2e-3)


def test_a_pipeline_files_deployment_is_relative_to_the_file():
    import os
    from pared.pipeline import build_passes, load_pipeline
    path = os.path.join(os.path.dirname(__file__), "..", "..", "..", "examples", "pipelines", "vla_partition.yaml")
    (p,) = build_passes(load_pipeline(path))
    assert os.path.isabs(p.options.deployment) and os.path.exists(p.options.deployment)
    assert p.deployment().name == "emulated-edge-4x"


# -- the offload trigger (RAPID) --------------------------------------------------------------
class _StatePatchNet(torch.nn.Module):
    """TinyPatchNet with a robot state added to its pooled features (a policy's shape)."""

    def __init__(self):
        super().__init__()
        self.net = tiny_patchnet()[0]
        self.state = torch.nn.Linear(8, 32)

    def forward(self, image, state):
        x = self.net.patch(image).flatten(2).transpose(1, 2)
        for b in self.net.blocks:
            x = b(x)
        return self.net.head(x.mean(dim=1) + self.state(state))


def _trajectory(n, stop_at=None, seed=0):
    """States [x y z grip x' y' z' grip'] of a hand moving steadily, stopping dead at `stop_at`."""
    rng = np.random.default_rng(seed)
    p, out = np.zeros(3), []
    for i in range(n):
        v = np.zeros(3) if stop_at is not None and i >= stop_at else np.array([0.01, 0, 0])
        prev, p = p, p + v + rng.normal(0, 1e-4, 3)
        out.append(torch.tensor(np.concatenate([p, [1.0], prev, [1.0]])[None], dtype=torch.float32))
    return out


TRIGGER = {"position": [0, 1, 2], "previous": [4, 5, 6], "effort": [3], "effort_previous": [7],
           "window": 8, "smooth": 1, "hold": 1}


@functools.cache
def triggered(**extra):
    torch.manual_seed(0)
    m = _StatePatchNet().eval()
    x = (torch.randn(1, 3, 32, 32), _trajectory(1)[0])
    prog = capture(m, x)
    at = ("net.patch", "net.blocks.*", "net.blocks.*.mlp.0")
    prog = prog.with_record(modeled_cost(prog, "main", Deployment.from_json(DEP), ("edge", "cloud"), at), "main")
    calib = [(x[0], s) for s in _trajectory(200, seed=7)]
    opts = dict(deployment=DEP, at=list(at), mbit=SWEEP, trigger={**TRIGGER, **dict(extra)})
    res = run_pass_checked(Partition(**opts), prog, PassContext(calibration=calib))
    return m, x, res


def test_trigger_wraps_the_bandwidth_select_and_runs_smooth_steps_on_the_edge(tmp_path):
    from pared.backends.executor import Executor
    from pared.backends.link import EmulatedLink
    from pared.ir.selectors.offload import Offload
    m, x, res = triggered(threshold=3.0)
    prog = res.program
    outer = prog.plan.body if not isinstance(prog.plan.body, Seq) else prog.plan.body.nodes[0]
    sels = prog.plan.selects()
    assert isinstance(sels[0].selector, Offload) and isinstance(sels[1].selector, Bandwidth)
    assert [lab for lab, _ in sels[0].cases] == ["edge", "offload"]
    assert dict(sels[0].cases)["edge"] == Call("main.whole", ("in:image", "in:state"), prog.plan.outputs, "edge")
    assert dict(sels[0].cases)["offload"] is sels[1]
    assert outer is sels[0] or sels[0] in list(iter_nodes(outer))
    pp = prog.records.of(PartitionPlan, "main")
    assert pp.trigger == "state" and pp.trigger_threshold == 3.0
    assert 0 < pp.trigger_calibration_share < 0.2      # a smooth calibration stream: warm-up and noise only
    # an episode: warm-up offloads, the steady motion runs on the edge, the stop offloads (then held one call)
    runner = prog.runner()
    img = x[0]
    traj = _trajectory(30, stop_at=20, seed=3)
    with torch.no_grad():
        for s in traj:
            out = runner([img, s])[0]
            assert_close_to_eager(m(img, s), out, rel_l2=2e-3)
    t = runner.trace
    assert all(lab.startswith("offload/") for lab in t[:4])
    assert t[10:20] == ["edge"] * 10
    assert t[20].startswith("offload/") and t[21].startswith("offload/") and t[-1] == "edge"
    # the artifact decides the same way, and only offloaded calls cross the link
    path = save_program(prog, str(tmp_path / "a"), {"name": "cpu", "backend": "onnxruntime",
                                                     "provider": "CPUExecutionProvider"})
    link = EmulatedLink(Link.mbit("wifi", 20, rtt_ms=1), sleep=False)
    exe = Executor(path, links={("edge", "cloud"): link})
    for s in traj:
        out = exe(img.numpy(), s.numpy())
        with torch.no_grad():
            np.testing.assert_allclose(out, m(img, s).numpy(), rtol=0, atol=2e-3)
    assert exe.trace == t
    def messages(node):        # consecutive transfers in one direction travel as one message
        if not isinstance(node, Seq):
            return 0
        dirs = [(n.src, n.dst) if isinstance(n, Transfer) else None for n in node.nodes]
        return sum(1 for i, d in enumerate(dirs) if d is not None and (i == 0 or dirs[i - 1] != d))
    moves = {lab: messages(node) for lab, node in sels[1].cases}
    assert link.transfers == sum(moves[lab.split("/")[1]] for lab in t if lab != "edge") > 0
    assert {moves[lab.split("/")[1]] for lab in t if lab != "edge"} == {2}      # there and back


def test_trigger_share_is_calibrated_on_the_calibration_stream():
    _, _, res = triggered(share=0.25)
    pp = res.program.records.of(PartitionPlan, "main")
    assert pp.trigger_threshold is not None and math.isfinite(pp.trigger_threshold)
    # the threshold puts a quarter of the scored calls above it; hold (1) and warm-up add a few more
    assert 0.25 <= pp.trigger_calibration_share <= 0.5


@pytest.mark.parametrize("trigger,ctx_calib,msg,err", [
    ({"position": [0], "colour": 1}, True, "option 'trigger' has unknown key\\(s\\) \\['colour'\\]", OptionError),
    ({"position": [0], "threshold": 1, "share": 0.2}, True, "a threshold or a share", OptionError),
    ({"previous": [4]}, True, "option 'trigger' needs 'position'", OptionError),
    ({"position": [0], "share": 1.5}, True, "'trigger.share' must be in \\(0, 1\\)", OptionError),
    ({"position": [0], "window": 1}, True, "option 'trigger': offload selector: window must be", OptionError),
    ({"position": [0], "input": "proprio"}, True, "the program has no input 'proprio'", OptionError),
    ({"position": [0], "share": 0.2}, False, "'trigger.share' calibrates .* none were given", PassError),
    ("fast", True, "option 'trigger' expects dict", OptionError),
])
def test_bad_trigger_options(trigger, ctx_calib, msg, err):
    torch.manual_seed(0)
    m = _StatePatchNet().eval()
    x = (torch.randn(1, 3, 32, 32), _trajectory(1)[0])
    prog = capture(m, x)
    at = ("net.patch",)
    prog = prog.with_record(modeled_cost(prog, "main", Deployment.from_json(DEP), ("edge", "cloud"), at), "main")
    calib = [(x[0], s) for s in _trajectory(40)] if ctx_calib else None
    with pytest.raises(err, match=msg):
        Partition(deployment=DEP, at=list(at), mbit=SWEEP, trigger=trigger)(prog, PassContext(calibration=calib))


def test_search_dads_adds_the_dag_cut_and_its_artifact_computes_the_model(tmp_path):
    """search: dads on TwoBranchNet: at 1 Mbit/s the DAG min-cut (both reductions on the edge, the
    heavy branch on the cloud) beats every cut in graph order; it becomes the low band's case, its
    parts compose to the eager model, and the saved artifact runs it torch-free over the link."""
    from pared.backends.executor import Executor
    from pared.backends.link import EmulatedLink
    from pared.testing import two_branch_net
    m, x = two_branch_net()
    prog = capture(m, x)
    prog = prog.with_record(modeled_cost(prog, "main", Deployment.from_json(DEP), ("edge", "cloud"), ("**",)), "main")
    chain = run_pass_checked(Partition(deployment=DEP, at=["**"], mbit=[1, 1000], compress=["none"]), prog,
                             PassContext())
    res = run_pass_checked(Partition(deployment=DEP, at=["**"], mbit=[1, 1000], compress=["none"], search="dads"),
                           prog, PassContext())
    pp = res.program.records.of(PartitionPlan, "main")
    pc = chain.program.records.of(PartitionPlan, "main")
    assert pp.search == "dads" and pc.search == "chain"
    low = pp.case(pp.bands[0])
    assert low.label.startswith("d4m") and low.moved and low.cut.startswith("dag:4~") and low.bytes == 2 * 64 * 4
    assert pp.sweep[0].latency_s < 0.6 * pc.sweep[0].latency_s       # the chain's best at 1 Mbit/s
    assert pp.sweep[1].chosen == pc.sweep[1].chosen                   # at 1000 Mbit/s both send the input
    a = res.program.graphs[f"main.{low.label}_first"]
    b = res.program.graphs[f"main.{low.label}_second"]
    xs = (torch.randn(1, 4096, generator=torch.Generator().manual_seed(3)),)
    with torch.no_grad():
        ref = m(*xs)
        assert_close_to_eager(ref, b.run(*a.run(*xs))[0], rel_l2=1e-6, what="the DADS case")
    path = save_program(res.program, str(tmp_path / "a"), {"name": "cpu", "backend": "onnxruntime",
                                                          "provider": "CPUExecutionProvider"})
    link = EmulatedLink(Link.mbit("wifi", 1, rtt_ms=1), sleep=False)
    exe = Executor(path, links={("edge", "cloud"): link})
    for _ in range(3):
        out = exe(xs[0].numpy())
    assert exe.trace[-1] == low.label
    np.testing.assert_allclose(out, ref.numpy(), rtol=0, atol=1e-4)
    assert link.bytes_sent >= 3 * 2 * 64 * 4
