"""The `offload` selector (RAPID's proprioceptive trigger): the two anomaly scores against a
sliding window, their dynamic weighting, the threshold, hold and warm-up, one decision per
request call, calibration to a share, JSON, and errors that name the field."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pared.ir.errors import PlanError
from pared.ir.selectors import Choice, selector_from_json
from pared.ir.selectors.offload import Offload, OffloadState, calibrated_threshold

# a state: [x, y, z, gripper, x_prev, y_prev, z_prev, gripper_prev]
POS, PREV, EFF, EFF_PREV = (0, 1, 2), (4, 5, 6), (3,), (7,)


def states(velocities, grips=None):
    """State vectors of a hand moving with the given per-tick velocities (3-vectors)."""
    p = np.zeros(3)
    g = 1.0
    out = []
    for i, v in enumerate(velocities):
        prev, gprev = p.copy(), g
        p = p + np.asarray(v, dtype=np.float64)
        if grips is not None:
            g = grips[i]
        out.append(np.concatenate([p, [g], prev, [gprev]]))
    return out


def sel(**kw):
    base = dict(input="in:state", cases=("edge", "offload"), position=POS, previous=PREV, effort=EFF,
                effort_previous=EFF_PREV, window=8, smooth=1, threshold=3.0, hold=2, warmup=3)
    return Offload(**{**base, **kw})


def decide(s: Offload, xs):
    st, out = s.new_state(), []
    for i, x in enumerate(xs):
        label, st = s.choose(st, Choice(i, lambda r, x=x: x[None]))
        out.append(label)
    return out, st


def smooth_velocities(n, rng):
    """A steady motion with a little noise (the smooth, redundant phase)."""
    return [np.array([0.01, 0.0, 0.0]) + rng.normal(0, 1e-4, 3) for _ in range(n)]


def test_smooth_motion_stays_on_the_edge_after_warm_up():
    rng = np.random.default_rng(0)
    labels, _ = decide(sel(), states(smooth_velocities(30, rng)))
    # warm-up: the first call has no velocity, the next ones too little history
    assert labels[0] == "offload"
    assert labels[:4] == ["offload"] * 4
    assert labels[5:] == ["edge"] * 25


def test_a_sudden_stop_offloads_and_holds():
    rng = np.random.default_rng(1)
    v = smooth_velocities(20, rng) + [np.zeros(3)] + [np.zeros(3) + rng.normal(0, 1e-4, 3) for _ in range(10)]
    labels, _ = decide(sel(hold=2), states(v))
    assert labels[19] == "edge"
    assert labels[20:23] == ["offload"] * 3         # the stop, then held two calls
    assert labels[-1] == "edge"                     # the window has learned the new (still) regime


def test_a_contact_with_a_still_arm_offloads_by_the_effort_score():
    rng = np.random.default_rng(2)
    v = smooth_velocities(30, rng)
    grips = [1.0 + rng.normal(0, 1e-4) for _ in range(30)]
    grips[20] = 0.6                                  # the gripper closes on something
    s = sel(hold=0)
    labels, st = decide(s, states(v, grips))
    assert labels[20] == "offload" and labels[19] == "edge"
    # the acceleration score stayed quiet; the effort score carried it (dynamic weighting)
    st2 = OffloadState()
    for x in states(v, grips)[:21]:
        s.score(x, st2)
    z_acc, z_eff = st2.z
    assert z_eff > s.threshold and z_acc < 3.0


def test_score_is_the_softmax_weighted_anomaly():
    s = sel(window=4, warmup=3, floor=0.0)
    st = OffloadState()
    # hand-made histories: accelerations [1, 2, 3], efforts [0.5, 0.5, 1.0] then a new value of each
    st.acc, st.eff, st.last_v = [1.0, 2.0, 3.0], [0.5, 0.5, 1.0], np.zeros(3)
    x = np.array([0, 0, 0, 1.0, -6.0, 0, 0, 3.0])      # velocity (6, 0, 0): acceleration 6; effort |1 - 3| = 2
    got = s.score(x, st)
    za = (6 - 2) / np.std([1, 2, 3])
    ze = (2 - np.mean([0.5, 0.5, 1.0])) / np.std([0.5, 0.5, 1.0])
    w = np.exp([za - max(za, ze), ze - max(za, ze)])
    assert got == pytest.approx((w / w.sum()) @ [za, ze])
    assert st.acc == [1.0, 2.0, 3.0, 6.0] and st.eff == [0.5, 0.5, 1.0, 2.0]


def test_no_previous_indices_uses_the_previous_call_and_no_effort_uses_acceleration_alone():
    rng = np.random.default_rng(3)
    s = Offload("in:state", ("edge", "offload"), position=POS, window=8, threshold=3.0, hold=0)
    v = smooth_velocities(20, rng) + [np.array([-0.02, 0, 0])] + smooth_velocities(3, rng)
    labels, st = decide(s, states(v))
    assert labels[:4] == ["offload"] * 4 and labels[10:20] == ["edge"] * 10
    assert labels[20] == "offload" and len(st.z) == 1


def test_one_decision_per_request_call():
    s = sel()
    xs = states(smooth_velocities(12, np.random.default_rng(4)))
    st = s.new_state()
    for i, x in enumerate(xs):
        a, st = s.choose(st, Choice(i, lambda r, x=x: x[None], request_call=i))
        n = len(st.acc)
        b, st = s.choose(st, Choice(i, lambda r: (_ for _ in ()).throw(AssertionError("read twice")), request_call=i))
        assert a == b and len(st.acc) == n


def test_calibrated_threshold_offloads_the_share():
    rng = np.random.default_rng(5)
    v = [np.array([0.01, 0, 0]) + rng.normal(0, 3e-3, 3) for _ in range(400)]
    s = sel(hold=0)
    scores = s.scores_over(states(v))
    assert all(math.isnan(x) for x in scores[:4])
    thr = calibrated_threshold(scores, 0.2, "test")
    labels, _ = decide(sel(hold=0, threshold=thr), states(v))
    share = sum(lab == "offload" for lab in labels[4:]) / len(labels[4:])
    assert share == pytest.approx(0.2, abs=0.01)
    # the pass's share of a calibration stream is the same decisions, replayed
    assert sel(hold=0, threshold=thr).offloads_over(states(v)) == [lab == "offload" for lab in labels]
    with pytest.raises(PlanError, match="test: the calibration stream gives 3 scores"):
        calibrated_threshold([math.nan, 1.0, 2.0, 3.0], 0.5, "test")


def test_json_round_trip():
    s = sel(threshold=1.5)
    back = selector_from_json(s.to_json())
    assert back == s and isinstance(back.position, tuple)


@pytest.mark.parametrize("kw,msg", [
    ({"position": ()}, "position needs at least one state index"),
    ({"previous": (4,)}, "previous has 1 indices for the 3 of position"),
    ({"effort_previous": ()}, "effort has 1 indices and effort_previous 0"),
    ({"cases": ("a", "a")}, "cases are two distinct labels"),
    ({"window": 1}, "window must be an int >= 2"),
    ({"warmup": 9}, "warmup \\(9\\) cannot exceed window \\(8\\)"),
    ({"threshold": math.inf}, "threshold must be a finite number"),
    ({"position": (0, -1, 2)}, "position must be state indices"),
    ({"input": "state"}, "input must be a reference like 'in:state'"),
])
def test_bad_fields_name_the_field(kw, msg):
    with pytest.raises(PlanError, match=msg):
        sel(**kw)


def test_a_state_too_short_is_named():
    s = sel()
    with pytest.raises(PlanError, match="in:state has 5 values per row; index 7 is past them"):
        s.score(np.zeros(5), OffloadState())
