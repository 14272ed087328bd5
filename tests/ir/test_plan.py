import dataclasses
import json

import numpy as np
import pytest

from pared.ir.plan import Always, Call, Plan, PlanError, PlanRunner, Rule, StateBuffer, Table, rel_l1


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


def _cache_plan(schedule):
    return Plan(
        inputs=("x",), outputs=("y",),
        routines=(
            ("full", (Call("full", ("in:x",), ("y", "state:feat")),)),
            ("reuse", (Call("reuse", ("in:x", "state:feat"), ("y",)),)),
            ("probe", (Call("probe", ("in:x",), ("sig",)),)),
        ),
        schedule=schedule, state=(StateBuffer("feat"),))


ARITY = {"full": (1, 2), "reuse": (2, 1), "probe": (1, 1)}


def test_single_plan_roundtrip():
    p = Plan.single("main", ["a", "b"], ["o"])
    assert p.to_json()["schedule"] == {"routine": "main", "kind": "always"}
    again = Plan.from_json(json.loads(json.dumps(p.to_json())))
    assert again == p


def test_table_plan_runs_and_carries_state():
    plan = _cache_plan(Table(("full", "reuse", "reuse"), default="full"))
    plan.validate(ARITY)
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    r = PlanRunner(plan, _graphs())
    x0, x1 = np.ones(3), np.full(3, 5.0)
    assert r([x0])[0].tolist() == [2, 2, 2]
    assert r([x1])[0].tolist() == [6, 6, 6]       # 5 + cached 1
    r([x1])
    assert r([x1])[0].tolist() == [10, 10, 10]    # past the table: default "full"
    assert r.trace == ["full", "reuse", "reuse", "full"]
    r.reset()
    assert r.call_index == 0 and r.state == {}


def test_rule_plan_reuses_while_signal_is_stable():
    plan = _cache_plan(Rule(probe="probe", signal="sig", compute="full", reuse="reuse", threshold=0.1,
                            warmup=1, max_consecutive=2))
    plan.validate(ARITY)
    r = PlanRunner(plan, _graphs())
    xs = [np.ones(2), np.ones(2) * 1.01, np.ones(2) * 1.02, np.ones(2) * 1.03, np.ones(2) * 3.0]
    for x in xs:
        r([x])
    # warmup computes; two stable steps reuse; the cap forces a compute; a jump computes
    assert r.trace == ["full", "reuse", "reuse", "full", "full"]
    assert Plan.from_json(plan.to_json()) == plan


def test_reading_state_before_written_is_an_error():
    plan = _cache_plan(Table(("reuse",), default="full"))
    with pytest.raises(PlanError, match="before any call wrote it"):
        PlanRunner(plan, _graphs())([np.ones(2)])


@pytest.mark.parametrize("mutate,msg", [
    (lambda p: Plan(p.inputs, ("nope",), p.routines, p.schedule, p.state), "not produced"),
    (lambda p: Plan(p.inputs, p.outputs, p.routines, Always("missing"), p.state), "does not define"),
    (lambda p: Plan(p.inputs, p.outputs, (("full", (Call("ghost", ("in:x",), ("y",)),)),), Always("full")), "unknown graph"),
    (lambda p: Plan(p.inputs, p.outputs, (("full", (Call("full", ("in:x",), ("y",)),)),), Always("full")), "binds"),
    (lambda p: Plan(p.inputs, p.outputs, (("full", (Call("reuse", ("in:x", "zz"), ("y",)),)),), Always("full")), "before it is produced"),
])
def test_validate_names_the_fault(mutate, msg):
    base = _cache_plan(Always("full"))
    with pytest.raises(PlanError, match=msg):
        mutate(base).validate(ARITY)


def test_from_json_rejects_unknown_version_and_kind():
    d = Plan.single("main", ["a"], ["o"]).to_json()
    with pytest.raises(PlanError, match="version"):
        Plan.from_json(dict(d, version=99))
    with pytest.raises(PlanError, match="schedule kind"):
        Plan.from_json(dict(d, schedule={"kind": "oracle"}))


def test_rel_l1():
    assert rel_l1(np.array([1.0, 1.0]), np.array([1.0, 1.0])) == 0
    assert rel_l1(np.array([1.1, 0.9]), np.array([1.0, 1.0])) == pytest.approx(0.1)


def test_latch_plan_switches_for_the_rest_of_the_request():
    from pared.ir.plan import Latch
    plan = Plan(inputs=("x",), outputs=("y",), routines=(
        ("both", (Call("both", ("in:x",), ("y", "agree")),)),
        ("half", (Call("half", ("in:x",), ("y",)),)),
    ), schedule=Latch(compute="both", then="half", signal="agree", threshold=0.9, warmup=1))
    plan.validate({"both": (1, 2), "half": (1, 1)})
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan

    def run(name, args):
        x = args[0]
        return [x, np.array([x[0]])] if name == "both" else [x * 0]
    r = PlanRunner(plan, run)
    for v in (0.95, 0.5, 0.95, 0.1, 0.1):       # call 0 agrees but is warmup; call 2 latches
        r([np.array([v])])
    assert r.trace == ["both", "both", "both", "half", "half"]
    r.reset()
    r([np.array([0.1])])
    assert r.trace == ["both"]


def test_step_values_feed_per_call_scalars():
    plan = Plan(inputs=("x",), outputs=("y",), routines=(
        ("main", (Call("scale", ("in:x", "step:c"), ("y",)),)),
    ), schedule=Always("main"), step_values=(("c", (1.0, 2.0, 3.0)),))
    plan.validate({"scale": (2, 1)})
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    r = PlanRunner(plan, lambda name, args: [args[0] * args[1]])
    got = [float(r([np.ones(1, np.float32)])[0][0]) for _ in range(4)]
    assert got == [1.0, 2.0, 3.0, 3.0]          # past the table: the last value
    bad = Plan(inputs=("x",), outputs=("y",), routines=(("main", (Call("scale", ("in:x", "step:k"), ("y",)),)),),
               schedule=Always("main"))
    with pytest.raises(PlanError, match="reads 'step:k' before it is produced"):
        bad.validate({"scale": (2, 1)})


def test_bins_plan_picks_a_routine_by_an_inputs_value():
    from pared.ir.plan import Bins
    plan = Plan(inputs=("x", "t"), outputs=("y",), routines=(
        ("lo", (Call("lo", ("in:x",), ("y",)),)),
        ("hi", (Call("hi", ("in:x",), ("y",)),)),
    ), schedule=Bins(input="t", edges=(500.0,), routines=("lo", "hi")))
    plan.validate({"lo": (1, 1), "hi": (1, 1)})
    assert Plan.from_json(json.loads(json.dumps(plan.to_json()))) == plan
    r = PlanRunner(plan, lambda name, args: [args[0] * (1 if name == "lo" else 2)])
    for t in (900.0, 500.0, 499.9, 0.0):         # an edge belongs to the bin above it
        r([np.ones(2), np.array([t, 0.0], np.float32)])   # the first row's t decides
    assert r.trace == ["hi", "hi", "lo", "lo"]
    with pytest.raises(PlanError, match="bins schedule reads input 'step'"):
        dataclasses.replace(plan, schedule=Bins("step", (1.0,), ("lo", "hi"))).validate({"lo": (1, 1), "hi": (1, 1)})
    with pytest.raises(PlanError, match="2 edges need 3 routines"):
        Bins("t", (1.0, 2.0), ("lo", "hi"))
    with pytest.raises(PlanError, match="strictly ascending"):
        Bins("t", (2.0, 1.0), ("lo", "hi", "lo"))
