"""magnitude_cache (MagCache): the calibrated ratios, the decision table,
numerics against an eager emulation, no-op, bad options."""
import numpy as np
import pytest
import torch

from pared.ir.capture import capture
from pared.ir.errors import OptionError
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.passes.cache.magnitude_cache import magcache_schedule, magnitude_ratios
from pared.testing import tiny_dit, tiny_sampler_loop

STEPS = 10


def test_ratios_and_rule():
    r = [np.ones((2, 3, 4)), 2 * np.ones((2, 3, 4)), np.ones((2, 3, 4))]
    assert magnitude_ratios(r) == [1.0, 2.0, 0.5]
    # err accumulates |1 - prod|: 0.02, 0.02 + 0.0396 = 0.0596 <= 0.06, then 0.0596 + 0.0588 > 0.06
    g = [1.0, 1.0, 0.98, 0.98, 0.98, 1.0]
    assert magcache_schedule(g, 0.06, 3, 2) == ("full", "full", "reuse", "reuse", "full", "reuse")
    assert magcache_schedule([1.0] * 8, 0.06, 2, 1) == ("full", "reuse", "reuse", "full", "reuse", "reuse",
                                                        "full", "reuse")


def _cached(**opts):
    m, (x, t) = tiny_dit()
    prog = capture(m, (x, t))
    return m, x, prog, get_pass("magnitude_cache")(**opts)(prog, PassContext(calibration=tiny_sampler_loop(x, STEPS)))


def test_structure_and_numerics():
    m, x, prog, res = _cached(threshold=0.5, max_skip=2, retention=0.2)
    p = res.program
    table = p.plan.selects()[0].selector.cases
    assert table[:2] == ("full", "full") and "reuse" in table and len(table) == STEPS
    rec = p.records["CachePlan"]
    assert rec.spans[0].blocks == tuple(f"blocks.{i}" for i in range(6)) and len(rec.calibration) == STEPS
    assert magcache_schedule(rec.calibration, 0.5, 2, 2) == table
    runner = p.runner()
    got = tiny_sampler_loop(x, STEPS)(lambda *a: runner(list(a))[0])
    xe, cache = x.clone(), {}
    with torch.no_grad():
        for i, t in enumerate(torch.linspace(900, 0, STEPS)):
            tt = torch.full((2,), float(t))
            out = (m(xe, tt, span=(0, 5), record=cache) if table[i] == "full"
                   else m(xe, tt, span=(0, 5), residual=cache["residual"]))
            xe = xe - 0.1 * out
    torch.testing.assert_close(got, xe, rtol=1e-5, atol=1e-5)


def test_threshold_zero_is_a_no_op():
    m, x, prog, res = _cached(threshold=0.0)
    assert res.modified is False and res.program is prog


@pytest.mark.parametrize("opts, msg", [
    ({"threshold": -0.1}, "option 'threshold'"),
    ({"retention": 2}, "option 'retention' must be in \\[0, 1\\]"),
    ({"first": 5, "last": 1}, "block range"),
])
def test_bad_options(opts, msg):
    with pytest.raises(OptionError, match=msg):
        _cached(**opts)


def test_a_psnr_goal_picks_the_threshold():
    m, (x, t) = tiny_dit()
    prog = capture(m, (x, t))
    res = get_pass("magnitude_cache")(target={"psnr_db": 70.0})(prog, PassContext(calibration=tiny_sampler_loop(x, STEPS)))
    assert res.modified
    rec = res.program.records["CachePlan"]
    passing = [p for p in rec.search if p[1] >= 70.0]
    assert passing and rec.threshold == max(p[0] for p in passing)
    assert any(p[1] < 70.0 for p in rec.search)      # the search did cross the goal
