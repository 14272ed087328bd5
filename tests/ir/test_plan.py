import dataclasses
import json

import numpy as np
import pytest

from pared.ir.plan import (SELECTORS, Bins, Call, Latch, Loop, Plan, PlanError, PlanRunner, Rule, Select, Seq,
                           StateBuffer, Table, Transfer, rel_l1)


def _graphs():
    # "full": y = 2x and emits the feature to cache; "reuse": y = cached + x
    def run(name, args):
        if name == "full":
            return [2 * args[0], args[0]]
        if name == "reuse":
            return [args[0] + args[1]]
        if name == "probe":
            return [args[0][:1]]
        raise KeyError(name)
    return run


FULL = Call("full", ("in:x",), ("y", "state:feat"))
REUSE = Call("reuse", ("in:x", "state:feat"), ("y",))
PROBE = Call("probe", ("in:x",), ("sig",))


def _cache_plan(selector, probe=False):
    sel = Select(selector, (("full", FULL), ("reuse", REUSE)))
    return Plan(inputs=("x",), outputs=("y",), body=Seq((PROBE, sel)) if probe else sel,
                state=(StateBuffer("feat"),))


ARITY = {"full": (1, 2), "reuse": (2, 1), "probe": (1, 1)}


def _roundtrip(plan):
    return Plan.from_json(json.loads(json.dumps(plan.to_json())))


def test_single_plan_roundtrip():
    p = Plan.single("main", ["a", "b"], ["o"])
    assert p.to_json()["body"] == {"op": "call", "graph": "main", "inputs": ["in:a", "in:b"],
                                   "outputs": ["main.o"], "device": None}
    assert _roundtrip(p) == p
    r = PlanRunner(p, lambda name, args: [args[0] + args[1]])
    assert r([1, 2]) == [3] and r.trace == ["main"] and r.graph_trace == [("main",)]


def test_table_plan_runs_and_carries_state():
    plan = _cache_plan(Table(("full", "reuse", "reuse"), default="full"))
    plan.validate(ARITY)
    assert _roundtrip(plan) == plan
    r = PlanRunner(plan, _graphs())
    x0, x1 = np.ones(3), np.full(3, 5.0)
    assert r([x0])[0].tolist() == [2, 2, 2]
    assert r([x1])[0].tolist() == [6, 6, 6]       # 5 + cached 1
    r([x1])
    assert r([x1])[0].tolist() == [10, 10, 10]    # past the table: default "full"
    assert r.trace == ["full", "reuse", "reuse", "full"]
    assert r.graph_trace == [("full",), ("reuse",), ("reuse",), ("full",)]
    r.reset()
    assert r.call_index == 0 and r.state == {} and r.trace == []


def test_rule_plan_reuses_while_signal_is_stable():
    plan = _cache_plan(Rule(signal="sig", compute="full", reuse="reuse", threshold=0.1, warmup=1,
                            max_consecutive=2), probe=True)
    plan.validate(ARITY)
    r = PlanRunner(plan, _graphs())
    xs = [np.ones(2), np.ones(2) * 1.01, np.ones(2) * 1.02, np.ones(2) * 1.03, np.ones(2) * 3.0]
    for x in xs:
        r([x])
    # warmup computes; two stable steps reuse; the cap forces a compute; a jump computes
    assert r.trace == ["full", "reuse", "reuse", "full", "full"]
    assert r.graph_trace[1] == ("probe", "reuse")     # the probe runs every call
    assert _roundtrip(plan) == plan


def test_reading_state_before_written_is_an_error():
    plan = _cache_plan(Table(("reuse",), default="full"))
    with pytest.raises(PlanError, match="before any call wrote it"):
        PlanRunner(plan, _graphs())([np.ones(2)])


def _table():
    return Table(("full",), "full")


@pytest.mark.parametrize("mutate,msg", [
    (lambda p: dataclasses.replace(p, outputs=("nope",)), "not produced on every path"),
    (lambda p: dataclasses.replace(p, body=Select(Table(("missing",), "full"), p.body.cases)), "does not define"),
    (lambda p: dataclasses.replace(p, body=Call("ghost", ("in:x",), ("y",))), "unknown graph"),
    (lambda p: dataclasses.replace(p, body=Call("full", ("in:x",), ("y",))), "binds"),
    (lambda p: dataclasses.replace(p, body=Call("reuse", ("in:x", "zz"), ("y",))), "before it is produced"),
    (lambda p: dataclasses.replace(p, body=Call("full", ("in:x",), ("y", "state:other"))), "undeclared state"),
    (lambda p: dataclasses.replace(p, body=Call("full", ("in:x",), ("y", "in:x"))), "read-only"),
    # a value produced in one case only is not available after the select
    (lambda p: dataclasses.replace(p, body=Select(_table(), (("full", FULL), ("reuse", PROBE)))),
     "not produced on every path"),
    (lambda p: dataclasses.replace(p, body=Select(Rule(signal="sig", compute="full", reuse="reuse", threshold=0.1),
                                                  p.body.cases)), "reads 'sig' before it is produced"),
    (lambda p: dataclasses.replace(p, body=Select(Latch(compute="full", then="reuse", signal="y2", threshold=0.5),
                                                  p.body.cases)), "after case 'full', which does not produce it"),
    (lambda p: dataclasses.replace(p, body=Seq((Select(_table(), p.body.cases, key="k"),
                                                Select(Table(("reuse",), "full"), p.body.cases, key="k")))),
     "share state but differ"),
    (lambda p: dataclasses.replace(p, body=Seq((FULL, Loop(REUSE, until="never")))), "does not produce"),
])
def test_validate_names_the_fault(mutate, msg):
    base = _cache_plan(Table(("full", "reuse"), "full"))
    base.validate(ARITY)
    with pytest.raises(PlanError, match=msg):
        mutate(base).validate(ARITY)


def test_from_json_rejects_unknown_version_node_and_selector():
    d = Plan.single("main", ["a"], ["o"]).to_json()
    with pytest.raises(PlanError, match="version 99"):
        Plan.from_json(dict(d, version=99))
    with pytest.raises(PlanError, match="node op 'jump'"):
        Plan.from_json(dict(d, body={"op": "jump"}))
    sel = _cache_plan(_table()).to_json()
    sel["body"]["selector"]["kind"] = "oracle"
    with pytest.raises(PlanError, match="selector kind 'oracle'"):
        Plan.from_json(sel)
    with pytest.raises(PlanError, match="malformed plan"):
        Plan.from_json({"version": 2, "inputs": []})


def test_version_1_plans_are_migrated_with_the_same_traces():
    """An artifact written by pared 0.1 (routines + one schedule) loads and runs as before."""
    v1 = {"version": 1, "inputs": ["x"], "outputs": ["y"],
          "routines": {"probe": [{"graph": "probe", "inputs": ["in:x"], "outputs": ["sig"]}],
                       "full": [{"graph": "full", "inputs": ["in:x"], "outputs": ["y", "state:feat"]}],
                       "reuse": [{"graph": "reuse", "inputs": ["in:x", "state:feat"], "outputs": ["y"]}]},
          "schedule": {"kind": "rule", "probe": "probe", "signal": "sig", "compute": "full", "reuse": "reuse",
                       "threshold": 0.1, "metric": "rel_l1", "accumulate": True, "warmup": 1, "max_consecutive": 2},
          "state": [{"name": "feat", "shape": None, "dtype": None}], "step_values": {}}
    plan = Plan.from_json(v1)
    plan.validate(ARITY)
    r = PlanRunner(plan, _graphs())
    for x in [np.ones(2), np.ones(2) * 1.01, np.ones(2) * 1.02, np.ones(2) * 1.03, np.ones(2) * 3.0]:
        r([x])
    assert r.trace == ["full", "reuse", "reuse", "full", "full"]
    table = dict(v1, schedule={"kind": "table", "routines": ["full", "reuse"], "default": "full"})
    r = PlanRunner(Plan.from_json(table), _graphs())
    for _ in range(3):
        r([np.ones(2)])
    assert r.trace == ["full", "reuse", "full"]
    bins = {"version": 1, "inputs": ["x", "t"], "outputs": ["y"],
            "routines": {"lo": [{"graph": "lo", "inputs": ["in:x"], "outputs": ["y"]}],
                         "hi": [{"graph": "hi", "inputs": ["in:x"], "outputs": ["y"]}]},
            "schedule": {"kind": "bins", "input": "t", "edges": [5.0], "routines": ["lo", "hi"]}}
    plan = Plan.from_json(bins)
    assert plan.body.selector == Bins("in:t", (5.0,), ("lo", "hi"))


def test_rel_l1():
    assert rel_l1(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0
    assert rel_l1(np.array([1.1, 0.9]), np.array([1.0, 1.0])) == pytest.approx(0.1)


def _latch_plan(key=None):
    return Plan(inputs=("x",), outputs=("y",), body=Select(
        Latch(compute="both", then="half", signal="agree", threshold=0.9, warmup=1),
        (("both", Call("both", ("in:x",), ("y", "agree"))), ("half", Call("half", ("in:x",), ("y",)))), key))


def _latch_run(name, args):
    x = args[0]
    return [x, np.array([x[0]])] if name == "both" else [x * 0]


def test_latch_plan_switches_for_the_rest_of_the_request():
    plan = _latch_plan()
    plan.validate({"both": (1, 2), "half": (1, 1)})
    assert _roundtrip(plan) == plan
    r = PlanRunner(plan, _latch_run)
    for v in (0.95, 0.5, 0.95, 0.1, 0.1):       # call 0 agrees but is warmup; call 2 latches
        r([np.array([v])])
    assert r.trace == ["both", "both", "both", "half", "half"]
    r.reset()
    r([np.array([0.1])])
    assert r.trace == ["both"]


def test_selects_with_one_key_share_their_state():
    """Two latches under a bins select (variants of one graph at two precisions): with a shared
    key, latching in one bucket holds in the other; without, each starts over."""
    def plan(key):
        inner = _latch_plan(key).body
        return Plan(inputs=("x", "t"), outputs=("y",),
                    body=Select(Bins("in:t", (5.0,), ("lo", "hi")), (("lo", inner), ("hi", inner))))
    for key, want in (("cfg", ["hi/both", "hi/both", "lo/half"]), (None, ["hi/both", "hi/both", "lo/both"])):
        r = PlanRunner(plan(key), _latch_run)
        for v, t in ((0.1, 9.0), (0.95, 9.0), (0.1, 1.0)):
            r([np.array([v]), np.array([t])])
        assert r.trace == want, key


def test_step_values_feed_per_call_scalars():
    plan = Plan(inputs=("x",), outputs=("y",), body=Call("scale", ("in:x", "step:c"), ("y",)),
                step_values=(("c", (1.0, 2.0, 3.0)),))
    plan.validate({"scale": (2, 1)})
    assert _roundtrip(plan) == plan
    r = PlanRunner(plan, lambda name, args: [args[0] * args[1]])
    got = [float(r([np.ones(1, np.float32)])[0][0]) for _ in range(4)]
    assert got == [1.0, 2.0, 3.0, 3.0]          # past the table: the last value
    bad = dataclasses.replace(plan, body=Call("scale", ("in:x", "step:k"), ("y",)), step_values=())
    with pytest.raises(PlanError, match="reads 'step:k' before it is produced"):
        bad.validate({"scale": (2, 1)})


def test_bins_plan_picks_a_case_by_a_references_value():
    plan = Plan(inputs=("x", "t"), outputs=("y",), body=Select(Bins(input="in:t", edges=(500.0,), cases=("lo", "hi")), (
        ("lo", Call("lo", ("in:x",), ("y",))), ("hi", Call("hi", ("in:x",), ("y",))))))
    plan.validate({"lo": (1, 1), "hi": (1, 1)})
    assert _roundtrip(plan) == plan
    r = PlanRunner(plan, lambda name, args: [args[0] * (1 if name == "lo" else 2)])
    for t in (900.0, 500.0, 499.9, 0.0):         # an edge belongs to the bin above it
        r([np.ones(2), np.array([t, 0.0], np.float32)])   # the first row's t decides
    assert r.trace == ["hi", "hi", "lo", "lo"]
    with pytest.raises(PlanError, match="bins selector reads 'in:step'"):
        dataclasses.replace(plan, body=Select(Bins("in:step", (1.0,), ("lo", "hi")), plan.body.cases)).validate(
            {"lo": (1, 1), "hi": (1, 1)})
    with pytest.raises(PlanError, match="2 edges need 3 cases"):
        Bins("in:t", (1.0, 2.0), ("lo", "hi"))
    with pytest.raises(PlanError, match="strictly ascending"):
        Bins("in:t", (2.0, 1.0), ("lo", "hi", "lo"))


def test_nested_selects_trace_each_choice():
    """A cache table inside each timestep bucket: the trace names the bucket, then the variant."""
    def bucket(b):
        return Select(Table(("full", "reuse"), "full"), (
            ("full", Call(f"{b}.full", ("in:x",), ("y", "state:feat"))),
            ("reuse", Call(f"{b}.reuse", ("in:x", "state:feat"), ("y",)))))
    plan = Plan(inputs=("x", "t"), outputs=("y",), state=(StateBuffer("feat"),),
                body=Select(Bins("in:t", (5.0,), ("lo", "hi")), (("lo", bucket("lo")), ("hi", bucket("hi")))))
    arity = {f"{b}.{v}": a for b in ("lo", "hi") for v, a in (("full", (1, 2)), ("reuse", (2, 1)))}
    plan.validate(arity)
    assert _roundtrip(plan) == plan
    r = PlanRunner(plan, lambda name, args: _graphs()(name.split(".")[1], args))
    out = [r([np.full(2, x), np.array([t])])[0][0] for x, t in ((1.0, 9.0), (3.0, 1.0), (4.0, 1.0))]
    # call 1 is in the other bucket and reuses the feature bucket "hi" computed: 3 + 1
    assert out == [2.0, 4.0, 8.0] and r.trace == ["hi/full", "lo/reuse", "lo/full"]


def test_replace_calls_keeps_what_surrounds_the_call():
    plan = Plan(inputs=("x", "t"), outputs=("y",), body=Select(Bins("in:t", (5.0,), ("lo", "hi")), (
        ("lo", Call("lo", ("in:x",), ("y",))), ("hi", Call("hi", ("in:x",), ("y",))))))
    new = plan.replace_calls("hi", lambda c: Select(Table(("full", "reuse"), "full"), (
        ("full", Call("hi.full", c.inputs, c.outputs + ("state:feat",))),
        ("reuse", Call("hi.reuse", c.inputs + ("state:feat",), c.outputs)))), state=[StateBuffer("feat")])
    assert new.body.selector == plan.body.selector and new.body.case("lo") == plan.body.case("lo")
    assert new.graph_names == ("lo", "hi.full", "hi.reuse") and new.state == (StateBuffer("feat"),)
    new.validate({"lo": (1, 1), "hi.full": (1, 2), "hi.reuse": (2, 1)})
    with pytest.raises(PlanError, match="does not call graph 'zz'"):
        plan.replace_calls("zz", lambda c: c)
    with pytest.raises(PlanError, match="declared twice"):
        new.with_declarations([StateBuffer("feat", dtype="float16")])
    assert new.with_declarations([StateBuffer("feat")]) == new    # the same declaration again: shared


def test_loop_and_transfer():
    """A loop until a flag (a decode loop) and a transfer between devices."""
    plan = Plan(inputs=("x",), outputs=("y",), state=(StateBuffer("acc", ("B", 1), "float32", "cloud"),),
                body=Seq((Call("init", ("in:x",), ("state:acc",), device="edge"),
                          Transfer("state:acc", "edge", "cloud", "acc@cloud"),
                          Loop(Call("step", ("state:acc",), ("state:acc", "done")), until="done", max_iters=10),
                          Call("read", ("state:acc",), ("y",)))))
    plan.validate({"init": (1, 1), "step": (1, 2), "read": (1, 1)})
    assert _roundtrip(plan) == plan
    moved = []

    def run(name, args):
        if name == "init":
            return [args[0]]
        if name == "step":
            return [args[0] + 1, np.array([args[0][0] + 1 >= 3])]
        return [args[0]]
    r = PlanRunner(plan, run, transfer=lambda v, s, d: moved.append((s, d)) or v)
    assert r([np.zeros(1)])[0].tolist() == [3.0]
    assert r.graph_trace == [("init", "step", "step", "step", "read")] and moved == [("edge", "cloud")]
    capped = dataclasses.replace(plan, body=dataclasses.replace(plan.body, nodes=(
        plan.body.nodes[0], Loop(Call("step", ("state:acc",), ("state:acc", "done")), until="done", max_iters=2),
        plan.body.nodes[3])))
    assert PlanRunner(capped, run)([np.zeros(1)])[0].tolist() == [2.0]
    counted = dataclasses.replace(plan, body=Seq((plan.body.nodes[0], Loop(Call("read", ("state:acc",), ("state:acc",)),
                                                                           count=4), plan.body.nodes[3])))
    r = PlanRunner(counted, run)
    r([np.zeros(1)])
    assert r.graph_trace == [("init",) + ("read",) * 5]
    with pytest.raises(PlanError, match="exactly one of count and until"):
        Loop(Call("read", (), ()), count=2, until="done")


def test_selectors_are_registered_one_file_each():
    import pared.ir.selectors as sel
    assert set(SELECTORS) >= {"table", "rule", "latch", "bins"}
    for kind, cls in SELECTORS.items():
        assert cls.__module__ == f"{sel.__name__}.{kind}", f"selector {kind!r} lives in {cls.__module__}"
