"""delta_cache (Δ-DiT): rear blocks cached early, front blocks late; structure,
numerics against an eager emulation, no-op, the artifact, bad options."""
import numpy as np
import pytest
import torch

import pared
from pared.ir.capture import capture
from pared.ir.errors import OptionError
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.testing import op_count, tiny_dit, tiny_sampler_loop

STEPS = 10


def _cached(**opts):
    m, (x, t) = tiny_dit()
    prog = capture(m, (x, t))
    ctx = PassContext(calibration=tiny_sampler_loop(x, STEPS))
    prog = get_pass("temporal_redundancy")()(prog, ctx).program
    return m, x, prog, get_pass("delta_cache")(**opts)(prog, ctx)


def test_structure_and_schedule():
    m, x, prog, res = _cached(interval=3, boundary=0.5)
    p = res.program
    assert set(p.graphs) == {"main.full", "main.reuse_rear", "main.reuse_front"}
    assert p.plan.selects()[0].selector.cases == ("full", "reuse_rear", "reuse_rear", "full", "reuse_rear",
                                        "reuse_front", "full", "reuse_front", "reuse_front", "full")
    assert res.stats == {"reuse_steps": 6, "cached_blocks": 3, "boundary_step": 5, "steps": STEPS, "graphs": 1}
    spans = {s.name: s.blocks for s in p.records["CachePlan"].spans}
    assert spans == {"delta_front": ("blocks.0", "blocks.1", "blocks.2"),
                     "delta_rear": ("blocks.3", "blocks.4", "blocks.5")}
    mm = lambda g: op_count(p, "aten.addmm.default", f"main.{g}") + op_count(p, "aten.mm.default", f"main.{g}")
    assert mm("full") - mm("reuse_rear") == 3 * 3 and mm("full") - mm("reuse_front") == 3 * 3
    assert p.graphs["main.full"].output_names[-2:] == ("cache.delta_front", "cache.delta_rear")
    assert set(prog.graphs) == {"main"}


def test_numerics_match_the_eager_meaning():
    m, x, prog, res = _cached(interval=3, boundary=0.5)
    table = res.program.plan.selects()[0].selector.cases
    runner = res.program.runner()
    got = tiny_sampler_loop(x, STEPS)(lambda *a: runner(list(a))[0])
    ts = torch.linspace(900, 0, STEPS)
    xe, front, rear = x.clone(), {}, {}
    with torch.no_grad():
        for i, t in enumerate(ts):
            tt = torch.full((2,), float(t))
            if table[i] == "full":
                out = m(xe, tt, span=(0, 2), record=front)
                m(xe, tt, span=(3, 5), record=rear)
            elif table[i] == "reuse_rear":
                out = m(xe, tt, span=(3, 5), residual=rear["residual"])
            else:
                out = m(xe, tt, span=(0, 2), residual=front["residual"])
            xe = xe - 0.1 * out
    torch.testing.assert_close(got, xe, rtol=1e-5, atol=1e-5)


def test_only_the_variants_the_schedule_uses_are_built():
    m, x, prog, res = _cached(interval=2, boundary=1.0)
    assert set(res.program.graphs) == {"main.full", "main.reuse_rear"}
    assert [s.name for s in res.program.records["CachePlan"].spans] == ["delta_rear"]


def test_interval_one_is_a_no_op():
    m, x, prog, res = _cached(interval=1)
    assert res.modified is False and res.program is prog


def test_artifact_matches_torch(tmp_path):
    m, (x, t) = tiny_dit()
    loop = tiny_sampler_loop(x, STEPS)
    opt = pared.optimize(m, (x, t), pipeline=[{"delta_cache": {"interval": 2, "steps": STEPS}}],
                         calibration=loop, bench_repeats=0, allow_fidelity_loss=True)
    ex = pared.load(opt.save(str(tmp_path / "art")))
    got = loop(lambda *a: torch.from_numpy(ex(*[v.numpy() for v in a])))
    runner = opt.program.runner()
    want = loop(lambda *a: runner(list(a))[0])
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opts, msg", [
    ({"boundary": 1.5}, "option 'boundary' must be in \\[0, 1\\]"),
    ({"cached_blocks": 7}, "'cached_blocks': 7 is not in \\[1, 6\\]"),
    ({"interval": 0}, "option 'interval'"),
])
def test_bad_options(opts, msg):
    with pytest.raises(OptionError, match=msg):
        _cached(**opts)
