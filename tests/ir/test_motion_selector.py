"""The `motion` selector: kinematic proxies, levels by speed, overrides, hysteresis, one choice
per request call."""
import json

import numpy as np
import pytest

from pared.ir.plan import Call, Loop, Plan, PlanError, PlanRunner, Select, Seq
from pared.ir.selectors import selector_from_json
from pared.ir.selectors.motion import Motion

CASES = ("a16", "a8", "a4")


def _plan(sel, loop=0, twice=False):
    one = Select(sel, tuple((c, Call(c, ("in:s",), ("y",))) for c in sel.cases), "motion")
    body = Loop(one, count=loop) if loop else one
    if twice:
        body = Seq((one, Select(sel, tuple((c, Call(c, ("in:s",), ("y",))) for c in sel.cases), "motion")))
    return Plan(inputs=("s",), outputs=("y",), body=body)


def _run(sel, states, **kw):
    r = PlanRunner(_plan(sel, **kw), lambda name, args: [args[0]])
    for s in states:
        r([np.asarray(s, dtype=np.float32)[None]])
    return r


def _x(*xs):
    return [[v, 0.0, 0.0] for v in xs]


def test_levels_follow_speed_with_dwell_going_coarser_and_at_once_going_finer():
    sel = Motion("in:s", CASES, position=(0,), edges=(1.0, 3.0), dwell=2)
    # speeds: ?, .5, 2, 2, 5, 5, .1, 2
    r = _run(sel, _x(0, 0.5, 2.5, 4.5, 9.5, 14.5, 14.6, 16.6))
    assert r.trace == ["a16", "a16", "a16", "a8", "a8", "a4", "a16", "a16"]


def test_dwell_one_is_no_hysteresis():
    sel = Motion("in:s", CASES, position=(0,), edges=(1.0, 3.0), dwell=1)
    r = _run(sel, _x(0, 0.5, 2.5, 9.5, 9.6))
    assert r.trace == ["a16", "a16", "a8", "a4", "a16"]


def test_speed_from_the_states_own_previous_position():
    # position (0, 1) and its copy one tick earlier (2, 3): speed known from the first call
    sel = Motion("in:s", CASES, position=(0, 1), previous=(2, 3), edges=(1.0, 3.0), dwell=1)
    r = _run(sel, [[3, 4, 0, 0], [3, 4, 3, 3], [0, 0, 0, 0.5]])
    assert r.trace == ["a4", "a8", "a16"]         # speeds |(3, 4)| = 5, |(0, 1)| = 1, |(0, -0.5)|
    st = r._selectors["motion"]
    assert st.proxies[0] == pytest.approx(0.5)


def test_gripper_change_and_jerk_force_the_finest_level():
    grip = Motion("in:s", CASES, position=(0,), previous=(1,), gripper=(2, 3), gripper_threshold=0.2,
                  edges=(1.0, 3.0), dwell=1)
    r = _run(grip, [[5, 0, 0, 0], [5, 0, 1.0, 0.5], [5, 0, 1.0, 0.95]])
    assert r.trace == ["a4", "a16", "a4"]
    jerk = Motion("in:s", CASES, position=(0,), edges=(1.0, 3.0), jerk_threshold=1.0, dwell=1)
    # velocities 5, 5, 5 (jerk 0), then 5, 5, 9 (jerk 4)
    r = _run(jerk, _x(0, 5, 10, 15, 20, 29))
    assert r.trace == ["a16", "a4", "a4", "a4", "a4", "a16"]


def test_one_choice_per_request_call_in_a_loop_and_across_keyed_selects():
    sel = Motion("in:s", CASES, position=(0,), edges=(1.0, 3.0), dwell=1)
    ref = _run(sel, _x(0, 2, 7, 7.5)).trace
    looped = _run(sel, _x(0, 2, 7, 7.5), loop=3).trace
    assert looped == ["/".join([t] * 3) for t in ref]
    twice = _run(sel, _x(0, 2, 7, 7.5), twice=True).trace
    assert twice == ["/".join([t] * 2) for t in ref]


def test_reset_starts_a_new_request_at_the_finest_level():
    sel = Motion("in:s", CASES, position=(0,), edges=(1.0, 3.0), dwell=1)
    r = _run(sel, _x(0, 9))
    assert r.trace == ["a16", "a4"]
    r.reset()
    r([np.asarray([[20.0, 0, 0]], np.float32)])
    assert r.trace == ["a16"]                     # no speed yet: the history went with the request


def test_json_roundtrip_and_plan_validation():
    sel = Motion("in:s", CASES, position=(0, 1), previous=(2, 3), gripper=(4, 5), gripper_threshold=0.1,
                 edges=(0.5, 2.0), jerk_threshold=1.5, dwell=3)
    back = selector_from_json(json.loads(json.dumps(sel.to_json())))
    assert back == sel
    p = _plan(sel)
    assert Plan.from_json(json.loads(json.dumps(p.to_json()))) == p
    p.validate({c: (1, 1) for c in CASES})


@pytest.mark.parametrize("kw, msg", [
    (dict(edges=(1.0,)), "3 levels need 2 speed edges"),
    (dict(edges=(3.0, 1.0)), "strictly ascending"),
    (dict(position=()), "at least one state index"),
    (dict(position=(0, -1)), "state indices"),
    (dict(previous=(1,), position=(0, 2)), "one per position index"),
    (dict(gripper=(1,)), "(current, previous)"),
    (dict(gripper_threshold=0.1), "needs the gripper indices"),
    (dict(jerk_threshold=float("nan")), "finite"),
    (dict(dwell=0), "dwell must be an int >= 1"),
])
def test_bad_options_raise(kw, msg):
    args = dict(input="in:s", cases=CASES, position=(0,), edges=(1.0, 3.0))
    args.update(kw)
    with pytest.raises(PlanError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        Motion(**args)


def test_an_index_past_the_state_is_named():
    sel = Motion("in:s", CASES, position=(7,), edges=(1.0, 3.0))
    with pytest.raises(PlanError, match="in:s has 3 values per row; index 7"):
        _run(sel, _x(0))
