"""interval_cache (FORA / DeepCache): structure, numerics against an eager
emulation, no-op, state isolation, the artifact, bad options."""
import numpy as np
import pytest
import torch

import pared
from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.testing import op_count, tiny_dit, tiny_sampler_loop

STEPS = 8


def _cached(**opts):
    m, (x, t) = tiny_dit()
    prog = capture(m, (x, t))
    ctx = PassContext(calibration=tiny_sampler_loop(x, STEPS))
    prog = get_pass("temporal_redundancy")()(prog, ctx).program
    res = get_pass("interval_cache")(**opts)(prog, ctx)
    return m, x, prog, res


def _eager_cached_loop(m, x, table, span):
    """What interval caching means, in eager PyTorch: full steps record the span's
    residual, reuse steps add it to the span's input."""
    ts = torch.linspace(900, 0, STEPS)
    x = x.clone()
    cache = {}
    with torch.no_grad():
        for i, t in enumerate(ts):
            tt = torch.full((x.shape[0],), float(t))
            if table[i] == "full":
                out = m(x, tt, span=span, record=cache)
            else:
                out = m(x, tt, span=span, residual=cache["residual"])
            x = x - 0.1 * out
    return x


def test_structure_and_plan():
    m, x, prog, res = _cached(interval=3)
    before = prog.main.module.code
    p = res.program
    assert res.modified and set(p.graphs) == {"main.full", "main.reuse"}
    assert p.plan.selects()[0].selector.cases == ("full", "reuse", "reuse", "full", "reuse", "reuse", "full", "reuse")
    assert res.stats == {"reuse_steps": 5, "cached_blocks": 4, "steps": STEPS, "graphs": 1}
    # the reuse graph runs 2 of the 6 blocks: 3 matmuls per block (ada, mlp.0, mlp.2) + embed/t_mlp/out
    mm = lambda g: op_count(p, "aten.addmm.default", f"main.{g}") + op_count(p, "aten.mm.default", f"main.{g}")
    assert mm("full") - mm("reuse") == 4 * 3
    assert p.graphs["main.reuse"].input_names[-1] == "cache.blocks"
    assert p.graphs["main.full"].output_names[-1] == "cache.blocks"
    plan = p.records["CachePlan"]
    assert plan.spans[0].blocks == ("blocks.1", "blocks.2", "blocks.3", "blocks.4")
    assert dict(plan.flops)["main.reuse"] < dict(plan.flops)["main.full"]
    assert prog.main.module.code == before and set(prog.graphs) == {"main"}   # input left alone


def test_numerics_match_the_eager_meaning_of_caching():
    m, x, prog, res = _cached(interval=3)
    p = res.program
    runner = p.runner()
    got = tiny_sampler_loop(x, STEPS)(lambda *a: runner(list(a))[0])
    want = _eager_cached_loop(m, x, p.plan.selects()[0].selector.cases, (1, 4))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert runner.trace == list(p.plan.selects()[0].selector.cases)
    # and caching changed something: the uncached loop differs
    with torch.no_grad():
        plain = tiny_sampler_loop(x, STEPS)(m)
    assert (plain - got).abs().max() > 1e-4


def test_interval_one_is_a_no_op():
    m, x, prog, res = _cached(interval=1)
    assert res.modified is False and res.program is prog and res.stats["reuse_steps"] == 0


def test_cache_state_is_per_request_and_per_row():
    m, x, prog, res = _cached(interval=4)
    p = res.program
    runner = p.runner()
    loop = tiny_sampler_loop(x, STEPS)
    both = loop(lambda *a: runner(list(a))[0])
    # a second request after reset gives the same result (nothing carried over)
    runner.reset()
    again = loop(lambda *a: runner(list(a))[0])
    torch.testing.assert_close(again, both, rtol=0, atol=0)
    # each row alone gives the same rows: no row reads another row's cache
    for r in range(2):
        single = capture(m, (x[r:r + 1], torch.full((1,), 900.0)))
        ctx = PassContext(calibration=tiny_sampler_loop(x[r:r + 1], STEPS))
        pr = get_pass("interval_cache")(interval=4, steps=STEPS)(single, ctx).program.runner()
        alone = tiny_sampler_loop(x[r:r + 1], STEPS)(lambda *a: pr(list(a))[0])
        torch.testing.assert_close(alone[0], both[r], rtol=1e-5, atol=1e-5)


def test_artifact_runs_the_plan_torch_free_and_matches_torch(tmp_path):
    m, (x, t) = tiny_dit()
    loop = tiny_sampler_loop(x, STEPS)
    opt = pared.optimize(m, (x, t), pipeline=["temporal_redundancy", {"interval_cache": {"interval": 3}}],
                         calibration=loop, bench_repeats=0, allow_fidelity_loss=True)
    path = opt.save(str(tmp_path / "art"))
    ex = pared.load(path)
    assert ex.manifest["records"]["CachePlan"]["method"] == "interval_cache"
    ex.reset()
    got = loop(lambda *a: torch.from_numpy(ex(*[v.numpy() for v in a])))
    assert ex.trace == ["full", "reuse", "reuse", "full", "reuse", "reuse", "full", "reuse"]
    runner = opt.program.runner()
    want = loop(lambda *a: runner(list(a))[0])
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opts, msg", [
    ({"interval": 0}, "option 'interval' must be in \\[1, inf\\], got 0"),
    ({"first": 4, "last": 2}, "options 'first'/'last': block range \\[4, 2\\] is empty"),
    ({"last": 9}, "outside the model's 6 blocks"),
    ({"intervall": 2}, "did you mean 'interval'"),
])
def test_bad_options(opts, msg):
    with pytest.raises(OptionError, match=msg):
        _cached(**opts)


def test_steps_must_be_known():
    m, (x, t) = tiny_dit()
    with pytest.raises(OptionError, match="option 'steps'"):
        get_pass("interval_cache")()(capture(m, (x, t)), PassContext())


def test_a_span_whose_hidden_states_change_shape_is_refused():
    """Blocks of two stacks of different widths: no residual (output - input) to reuse."""
    from torch import nn

    from pared.passes.cache.common import make_span

    class Block(nn.Module):
        def __init__(self, d):
            super().__init__()
            self.lin = nn.Linear(d, d)

        def forward(self, x):
            return x + self.lin(x)

    class TwoStacks(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.ModuleList([Block(8), Block(8)])
            self.proj = nn.Linear(8, 16)
            self.b = nn.ModuleList([Block(16), Block(16)])

        def forward(self, x):
            for blk in self.a:
                x = blk(x)
            x = self.proj(x)
            for blk in self.b:
                x = blk(x)
            return x

    prog = capture(TwoStacks().eval(), (torch.randn(2, 8),))
    regions = prog.regions()
    with pytest.raises(PassError, match=r"takes \[2, 8\] and gives \[2, 16\]: it has no residual to reuse"):
        make_span(prog.main.module, "blocks", [regions["a.0"], regions["b.1"]], "interval_cache")
    assert make_span(prog.main.module, "blocks", [regions["b.0"], regions["b.1"]], "interval_cache").blocks == ("b.0", "b.1")
