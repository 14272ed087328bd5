"""Deployments (devices and links as data) and the `bandwidth` selector of a partition."""
from __future__ import annotations

import math
import os

import numpy as np
import pytest

from pared.ir.errors import PlanError, TargetError
from pared.ir.plan import Plan
from pared.ir.selectors import Choice, selector_from_json
from pared.ir.selectors.bandwidth import Bandwidth
from pared.ir.target import Deployment, Link, get_deployment

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TARGETS = os.path.join(ROOT, "examples", "targets")


def test_shipped_deployments_load_and_say_what_runs_here():
    d = get_deployment(os.path.join(TARGETS, "deploy_pi5_xeon.yaml"))
    assert d.device("edge").name == "pi5-cpu" and d.device("edge").is_cross
    assert d.device("cloud").peak_flops == 4.3e12
    assert d.link("cloud", "edge").bandwidth == 20e6 / 8 and d.link("edge", "cloud").rtt == 0.02
    # profiles that state another CPU are estimated, not measured here
    assert not d.runs_here("edge") and not d.runs_here("cloud")
    e = get_deployment(os.path.join(TARGETS, "deploy_emulated.yaml"))
    assert e.runs_here("edge") and e.runs_here("cloud") and e.slowdown("edge") == 4 and e.slowdown("cloud") == 1


def test_round_trip_through_json():
    e = get_deployment(os.path.join(TARGETS, "deploy_emulated.yaml"))
    back = Deployment.from_json(e.to_json())
    assert back == e


@pytest.mark.parametrize("doc,msg", [
    ({"devices": {}}, "'devices' must map device names"),
    ({"devices": {"edge": "cpu"}, "links": [{"between": ["edge", "cloud"], "mbit": 5}]},
     "link 'edge-cloud' names device 'cloud'"),
    ({"devices": {"edge": "cpu", "cloud": "cpu"}, "links": [{"between": ["edge"], "mbit": 5}]},
     "needs 'between: \\[device, device\\]'"),
    ({"devices": {"edge": "cpu", "cloud": "cpu"}, "links": [{"between": ["edge", "cloud"], "mbit": -1}]},
     "mbit must be a number > 0"),
    ({"devices": {"edge": "nope"}}, "device 'edge': unknown target 'nope'"),
    ({"devices": {"edge": "cpu"}, "emulate": {"edge": {"host": "cpu", "slowdown": 0.5}}}, "slowdown must be a number >= 1"),
    ({"devices": {"edge": "cpu"}, "emulate": {"edge": {"on": "cpu"}}}, "unknown field 'on'"),
    ({"devices": {"edge": "cpu"}, "emulate": {"arm": {"host": "cpu"}}}, "emulate names device 'arm'"),
    ({"devices": {"edge": "cpu"}, "link": []}, "unknown field 'link'"),
    ({"devices": {"edge": {"name": "x", "backend": "onnxruntime", "provider": "CPUExecutionProvider",
                           "peak_flops": "1.0e11"}}}, "write 1.0e\\+11"),
])
def test_malformed_deployments_are_refused_naming_the_field(doc, msg):
    with pytest.raises(TargetError, match=msg):
        Deployment.from_json(doc)


def test_missing_file_and_unknown_link(tmp_path):
    with pytest.raises(TargetError, match="does not exist"):
        get_deployment(str(tmp_path / "nope.yaml"))
    d = Deployment.from_json({"devices": {"edge": "cpu", "cloud": "cpu"}})
    with pytest.raises(TargetError, match="no link between 'edge' and 'cloud'"):
        d.link("edge", "cloud")
    d2 = d.with_link("edge", "cloud", Link.mbit("w", 10))
    assert d2.link("cloud", "edge").bandwidth == 10e6 / 8


# -- the bandwidth selector ------------------------------------------------------------------
MB = 1e6 / 8


def _sel(**kw):
    args = dict(link="link:wifi", cases=("first", "k5", "second"), edges=(5 * MB, 100 * MB), initial=20 * MB)
    args.update(kw)
    return Bandwidth(**args)


def _run(sel, signals):
    """The labels chosen over calls, each call seeing one signal ([bw, count] or None: unbound)."""
    st, out = sel.new_state(), []
    for i, sig in enumerate(signals):
        env = {} if sig is None else {"link:wifi": np.array(sig, dtype=np.float64)}
        c = Choice(i, lambda ref, env=env: env[ref])
        lab, st = sel.choose(st, c)
        out.append(lab)
    return out, st


def test_bands_pick_by_the_predicted_bandwidth():
    sel = _sel(window=1, hysteresis=0.0)
    labs, _ = _run(sel, [None, (1 * MB, 1), (50 * MB, 2), (500 * MB, 3), (2 * MB, 4)])
    assert labs == ["k5", "first", "k5", "second", "first"]


def test_a_stale_measurement_adds_no_sample():
    """The count did not grow: the same measurement seen again is not averaged in twice."""
    sel = _sel(window=2, hysteresis=0.0)
    labs, st = _run(sel, [(1 * MB, 1), (1 * MB, 1), (500 * MB, 2)])
    assert st.samples == [1 * MB, 500 * MB]
    assert labs == ["first", "first", "second"]      # the mean of (1, 500) Mbit/s is above the 100 edge
    assert math.isclose(st.predicted, 250.5 * MB)


def test_moving_average_and_hysteresis_keep_the_cut_near_an_edge():
    sel = _sel(window=3, hysteresis=0.2)
    # around the 100 Mbit/s edge: 90..115 stays in k5 (its band reaches 120 with the margin)
    labs, _ = _run(sel, [(50 * MB, 1), (110 * MB, 2), (115 * MB, 3), (118 * MB, 4)])
    assert labs == ["k5", "k5", "k5", "k5"]
    labs, _ = _run(sel, [(50 * MB, 1), (300 * MB, 2), (300 * MB, 3), (300 * MB, 4)])
    assert labs == ["k5", "second", "second", "second"]   # mean 175, 216, 300: past 120


def test_a_fall_is_taken_at_once_and_a_rise_on_the_average():
    """fall: immediate predicts min(mean, latest): one slow measurement moves the cut to the edge's
    side at the next call; a fast one moves it out only when the mean has risen. fall: average
    waits for the mean both ways."""
    mbit = [500, 500, 500, 2, 2, 150, 150]
    seq = [(m * MB, i + 1) for i, m in enumerate(mbit)]
    labs, st = _run(_sel(window=3, hysteresis=0.0), seq)
    assert labs == ["second", "second", "second", "first", "first", "k5", "second"]
    assert st.predicted == pytest.approx((2 + 150 + 150) / 3 * MB)
    labs, _ = _run(_sel(window=3, hysteresis=0.0, fall="average"), seq)
    assert labs == ["second", "second", "second", "second", "second", "k5", "second"]


def test_unbound_link_keeps_the_initial_bandwidth():
    labs, _ = _run(_sel(), [None, None, None])
    assert labs == ["k5"] * 3


def test_json_round_trip_and_validation():
    sel = _sel()
    assert selector_from_json(sel.to_json()) == sel
    for kw, msg in [({"link": "in:bw"}, "a reference 'link:NAME'"),
                    ({"edges": (100 * MB, 5 * MB)}, "strictly ascending"),
                    ({"edges": (5 * MB,)}, "3 cases need 2 edges"),
                    ({"initial": 0.0}, "initial must be a bandwidth > 0"),
                    ({"window": 0}, "window must be an integer >= 1"),
                    ({"fall": "slow"}, "fall must be one of \\['immediate', 'average'\\]"),
                    ({"hysteresis": 1.0}, "hysteresis must be in \\[0, 1\\)")]:
        with pytest.raises(PlanError, match=msg):
            _sel(**kw)


def test_plan_binds_link_signals_and_transfers_write_state():
    """The runner binds `link:` signals at each call; a Transfer into state: carries it over."""
    from pared.ir.plan import Call, PlanRunner, Select, Seq, StateBuffer, Transfer
    sel = _sel(window=1, hysteresis=0.0)
    body = Seq((Select(sel, (("first", Call("a", ("in:x",), ("y",), "edge")),
                             ("k5", Call("b", ("in:x",), ("y",), "edge")),
                             ("second", Call("c", ("in:x",), ("y",), "cloud")))),
                Transfer("y", "edge", "cloud", "state:last")))
    plan = Plan(("x",), ("state:last",), body, (StateBuffer("last"),))
    plan.validate({"a": (1, 1), "b": (1, 1), "c": (1, 1)})
    sig = {"v": np.array([500 * MB, 1.0])}
    devices = []
    runner = None

    def run_graph(name, args):
        devices.append((name, runner.device))
        return [args[0] + {"a": 1, "b": 2, "c": 3}[name]]
    runner = PlanRunner(plan, run_graph, signals=lambda: {"link:wifi": sig["v"], "other": 0})
    assert runner([np.zeros(1)])[0][0] == 3
    assert runner.state["last"][0] == 3
    sig["v"] = np.array([1 * MB, 2.0])
    assert runner([np.zeros(1)])[0][0] == 1
    assert devices == [("c", "cloud"), ("a", "edge")]
    assert runner.trace == ["second", "first"]


def test_consecutive_transfers_one_way_are_one_message_and_pins_override_the_selector():
    """transfer_many gets each run of Transfers between the same two devices (same direction) at
    once; a pinned select takes its pinned case whatever its selector says."""
    from pared.ir.plan import Call, PlanRunner, Select, Seq, Transfer
    sel = _sel(window=1, hysteresis=0.0)
    cut = Seq((Call("a", ("in:x",), ("h1", "h2"), "edge"),
               Transfer("h1", "edge", "cloud", "c1"), Transfer("h2", "edge", "cloud", "c2"),
               Transfer("in:x", "edge", "cloud", "c3"),
               Call("b", ("c1", "c2", "c3"), ("o1", "o2"), "cloud"),
               Transfer("o1", "cloud", "edge", "y1"), Transfer("o2", "cloud", "edge", "y2")))
    body = Select(sel, (("first", Call("w", ("in:x",), ("y1", "y2"), "edge")), ("k5", cut),
                        ("second", Call("w", ("in:x",), ("y1", "y2"), "cloud"))), key="p")
    plan = Plan(("x",), ("y1", "y2"), body)
    plan.validate({"a": (1, 2), "b": (3, 2), "w": (1, 2)})
    graphs = {"a": lambda x: [x + 1, x + 2], "b": lambda a, b, c: [a + b, c * 10], "w": lambda x: [2 * x + 3, 10 * x]}
    messages = []

    def many(vals, src, dst):
        messages.append((src, dst, len(vals)))
        return vals
    sig = {"link:wifi": np.array([15 * MB, 1.0])}          # the k5 band
    runner = PlanRunner(plan, lambda n, a: graphs[n](*a), signals=lambda: sig, transfer_many=many)
    out = runner([np.ones(1)])
    assert [float(o[0]) for o in out] == [5.0, 10.0]
    assert messages == [("edge", "cloud", 3), ("cloud", "edge", 2)]
    pinned = PlanRunner(plan, lambda n, a: graphs[n](*a), signals=lambda: sig, transfer_many=many, pin={"p": "first"})
    assert [float(o[0]) for o in pinned([np.ones(1)])] == [5.0, 10.0] and pinned.trace == ["first"]
    with pytest.raises(PlanError, match="pin: the plan has no select with key 'q'; its keys are \\['p'\\]"):
        PlanRunner(plan, lambda n, a: [], pin={"q": "first"})
    with pytest.raises(PlanError, match="has no case 'edge'; it has \\['first', 'k5', 'second'\\]"):
        PlanRunner(plan, lambda n, a: [], pin={"p": "edge"})
