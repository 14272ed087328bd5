"""Goals: one spelling for what a pass is asked to reach, and the bisection that finds it."""
import math

import pytest

from pared.analysis.search import bisect_log
from pared.ir.errors import OptionError
from pared.ir.goal import Goal


def test_goal_parses_checks_direction_and_names_the_asker():
    g = Goal.parse({"psnr_db": 30, "rel_l2": 0.01}, "pass 'p': option 'target'")
    assert g.terms == (("psnr_db", 30.0), ("rel_l2", 0.01)) and g.metrics == ("psnr_db", "rel_l2")
    assert g.met({"psnr_db": 30.0, "rel_l2": 0.01}) and not g.met({"psnr_db": 29.9, "rel_l2": 0.0})
    assert not g.met({"psnr_db": 40, "rel_l2": 0.02})
    assert str(g) == "psnr_db >= 30, rel_l2 <= 0.01" and g.to_json() == {"psnr_db": 30.0, "rel_l2": 0.01}
    assert Goal.parse(None, "x") is None and Goal.parse(g, "x") == g
    with pytest.raises(KeyError):
        g.met({"psnr_db": 31})


@pytest.mark.parametrize("value, kw, msg", [
    ({"psnr": 30}, {}, r"pass 'p': option 'target': unknown metric 'psnr'; did you mean 'psnr_db'\?"),
    ({"cosine": 0.9}, {"allowed": ("psnr_db", "speedup")},
     r"unknown metric 'cosine'; known: psnr_db, speedup"),
    ({"psnr_db": "high"}, {}, r"psnr_db expects a number, got 'high'"),
    ({"psnr_db": True}, {}, r"psnr_db expects a number"),
    ({"speedup": -1}, {"positive": True}, r"speedup must be a positive number, got -1"),
    ({"psnr_db": 30, "speedup": 2}, {"single": True}, r"takes one goal like"),
    ([30], {}, r"takes a goal like \{psnr_db: X\}"),
    ({}, {}, r"takes a goal like"),
])
def test_bad_goals_are_refused_naming_the_option(value, kw, msg):
    with pytest.raises(OptionError, match=msg):
        Goal.parse(value, "pass 'p': option 'target'", **kw)


@pytest.mark.parametrize("boundary", [0.013, 0.2, 1.7])
def test_bisect_finds_the_boundary_from_either_side(boundary):
    tried = []

    def above(x):
        tried.append(x)
        return x >= boundary

    x, met = bisect_log(above, 1e-3, 4.0, holds_above=True, iters=12)
    assert met and x >= boundary and math.log(x / boundary) < 0.01
    assert tried[0] == 4.0                       # the easy end first

    x, met = bisect_log(lambda v: v <= boundary, 1e-3, 4.0, holds_above=False, iters=12)
    assert met and x <= boundary and math.log(boundary / x) < 0.01


def test_bisect_reports_a_goal_no_trial_meets():
    tried = []
    assert bisect_log(lambda x: tried.append(x) or False, 1e-3, 4.0, holds_above=True) == (4.0, False)
    assert tried == [4.0]                        # missed at the easy end: missed everywhere
    assert bisect_log(lambda x: False, 1e-3, 4.0, holds_above=False, iters=3) == (1e-3, False)
    # met at the hard end: one trial
    tried.clear()
    assert bisect_log(lambda x: tried.append(x) or True, 1e-3, 4.0, holds_above=False) == (4.0, True)
    assert tried == [4.0]
    with pytest.raises(ValueError, match="0 < lo < hi"):
        bisect_log(lambda x: True, 0.0, 1.0, holds_above=True)
