"""taylor_cache (TaylorSeer, first order): the table and coefficients, numerics
against an eager emulation, per-step values in the artifact, no-op, bad options."""
import numpy as np
import pytest
import torch

import pared
from pared.ir.capture import capture
from pared.ir.errors import OptionError
from pared.ir.plan import Plan
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.passes.cache.taylor_cache import taylor_table
from pared.testing import eager_taylor_loop, tiny_dit, tiny_sampler_loop

STEPS = 9


def test_table_and_coefficients():
    table, coefs = taylor_table(9, 3, 2)
    assert table == ("full0", "full", "forecast", "forecast", "full", "forecast", "forecast", "full", "forecast")
    # forecast at 2, 3: last full 1, gap 1 -> 1, 2; at 5, 6: last full 4, gap 3 -> 1/3, 2/3
    assert coefs == (0.0, 0.0, 1.0, 2.0, 0.0, 1 / 3, 2 / 3, 0.0, 1 / 3)


def _cached(**opts):
    m, (x, t) = tiny_dit()
    prog = capture(m, (x, t))
    return m, x, prog, get_pass("taylor_cache")(steps=STEPS, **opts)(prog, PassContext())


def test_structure_and_numerics():
    m, x, prog, res = _cached(interval=3)
    p = res.program
    assert set(p.graphs) == {"main.full0", "main.full", "main.forecast"}
    assert p.graphs["main.forecast"].input_names[-3:] == ("cache.blocks", "cache.delta", "coef")
    assert res.stats == {"forecast_steps": 5, "cached_blocks": 4, "steps": STEPS, "graphs": 1}
    table, coefs = taylor_table(STEPS, 3, 2)
    runner = p.runner()
    got = tiny_sampler_loop(x, STEPS)(lambda *a: runner(list(a))[0])
    assert runner.trace == list(table)
    torch.testing.assert_close(got, eager_taylor_loop(m, x, table, coefs), rtol=1e-5, atol=1e-5)


def test_plan_step_values_round_trip_and_reach_the_artifact(tmp_path):
    m, (x, t) = tiny_dit()
    loop = tiny_sampler_loop(x, STEPS)
    opt = pared.optimize(m, (x, t), pipeline=[{"taylor_cache": {"interval": 3, "steps": STEPS}}], calibration=loop,
                         bench_repeats=0, allow_fidelity_loss=True)
    plan = opt.program.plan
    assert Plan.from_json(plan.to_json()) == plan
    ex = pared.load(opt.save(str(tmp_path / "art")))
    got = loop(lambda *a: torch.from_numpy(ex(*[v.numpy() for v in a])))
    r = opt.program.runner()
    want = loop(lambda *a: r(list(a))[0])
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    assert ex.trace == r.trace


def test_interval_one_is_a_no_op():
    m, x, prog, res = _cached(interval=1)
    assert res.modified is False and res.program is prog


@pytest.mark.parametrize("opts, msg", [
    ({"warmup": 1}, "option 'warmup' must be in \\[2, inf\\]"),
    ({"interval": 0}, "option 'interval'"),
])
def test_bad_options(opts, msg):
    with pytest.raises(OptionError, match=msg):
        _cached(**opts)
