"""residual_cache (FirstBlockCache / TeaCache-style adaptive reuse): structure,
the decision rule, numerics against an eager emulation of the chosen trace,
threshold 0, state isolation, the artifact, bad options."""
import numpy as np
import pytest
import torch

import pared
from pared.ir.capture import capture
from pared.ir.errors import OptionError
from pared.ir.plan import Rule
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.testing import op_count, tiny_dit, tiny_sampler_loop

STEPS = 10


def _cached(**opts):
    m, (x, t) = tiny_dit()
    prog = capture(m, (x, t))
    return m, x, prog, get_pass("residual_cache")(**opts)(prog, PassContext())


def _run(program, x):
    r = program.runner()
    return tiny_sampler_loop(x, STEPS)(lambda *a: r(list(a))[0]), r.trace


def test_structure():
    m, x, prog, res = _cached(threshold=0.2, front=1, back=1)
    p = res.program
    assert set(p.graphs) == {"main.probe", "main.compute", "main.reuse"} and isinstance(p.plan.selects()[0].selector, Rule)
    mm = lambda g: op_count(p, "aten.addmm.default", f"main.{g}") + op_count(p, "aten.mm.default", f"main.{g}")
    # 3 matmuls per block; t_mlp (2) everywhere, embed in the probe, out after the tail
    assert mm("probe") == 2 + 1 + 3 * 1
    assert mm("compute") == 2 + 3 * 5 + 1
    assert mm("reuse") == 2 + 3 * 1 + 1
    assert p.graphs["main.reuse"].input_names[-2:] == ("cache.mid", "hidden")
    assert p.records["CachePlan"].spans[0].blocks == ("blocks.1", "blocks.2", "blocks.3", "blocks.4")
    assert res.stats == {"cached_blocks": 4, "front": 1, "back": 1, "graphs": 1}
    assert set(prog.graphs) == {"main"}


def test_numerics_follow_the_eager_meaning_of_the_trace():
    m, x, prog, res = _cached(threshold=0.2)
    got, trace = _run(res.program, x)
    assert trace[:2] == ["compute", "compute"] and "reuse" in trace     # warmup 2, then reuse happens
    ts = torch.linspace(900, 0, STEPS)
    xe, cache = x.clone(), {}
    with torch.no_grad():
        for i, t in enumerate(ts):
            tt = torch.full((2,), float(t))
            out = (m(xe, tt, span=(1, 5), record=cache) if trace[i] == "compute"
                   else m(xe, tt, span=(1, 5), residual=cache["residual"]))
            xe = xe - 0.1 * out
    torch.testing.assert_close(got, xe, rtol=1e-5, atol=1e-5)


def test_decision_rule_thresholds_and_caps():
    m, x, prog, _ = _cached(threshold=0.2)
    traces = {}
    for th in (1e-9, 0.2, 10.0):
        traces[th] = _run(get_pass("residual_cache")(threshold=th)(prog, PassContext()).program, x)[1]
    assert traces[1e-9] == ["compute"] * STEPS
    assert traces[10.0] == ["compute", "compute"] + ["reuse"] * (STEPS - 2)
    assert traces[0.2].count("reuse") < traces[10.0].count("reuse")
    capped = _run(get_pass("residual_cache")(threshold=10.0, max_consecutive=2)(prog, PassContext()).program, x)[1]
    assert capped == ["compute", "compute", "reuse", "reuse", "compute", "reuse", "reuse", "compute", "reuse", "reuse"]


def test_never_reusing_matches_the_uncached_program():
    m, x, prog, res = _cached(threshold=1e-12)
    got, trace = _run(res.program, x)
    want, _ = _run(prog, x)
    assert set(trace) == {"compute"}
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    m, x, prog, res = _cached(threshold=0.0)
    assert res.modified is False and res.program is prog


def test_state_does_not_leak_between_requests_or_rows():
    m, x, prog, res = _cached(threshold=10.0)
    r = res.program.runner()
    loop = tiny_sampler_loop(x, STEPS)
    first = loop(lambda *a: r(list(a))[0])
    r.reset()
    torch.testing.assert_close(loop(lambda *a: r(list(a))[0]), first, rtol=0, atol=0)
    for row in range(2):   # threshold 10: always reuse, so the trace is the same alone and batched
        single = capture(m, (x[row:row + 1], torch.full((1,), 900.0)))
        pr = get_pass("residual_cache")(threshold=10.0)(single, PassContext()).program.runner()
        alone = tiny_sampler_loop(x[row:row + 1], STEPS)(lambda *a: pr(list(a))[0])
        torch.testing.assert_close(alone[0], first[row], rtol=1e-5, atol=1e-5)


def test_artifact_matches_torch_including_decisions(tmp_path):
    m, (x, t) = tiny_dit()
    loop = tiny_sampler_loop(x, STEPS)
    opt = pared.optimize(m, (x, t), pipeline=[{"residual_cache": {"threshold": 0.2}}], calibration=loop,
                         bench_repeats=0, allow_fidelity_loss=True)
    ex = pared.load(opt.save(str(tmp_path / "art")))
    got = loop(lambda *a: torch.from_numpy(ex(*[v.numpy() for v in a])))
    want, trace = _run(opt.program, x)
    assert ex.trace == trace
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("opts, msg", [
    ({"threshold": -1}, "option 'threshold' must be in \\[0, inf\\]"),
    ({"front": 3, "back": 3}, "leave none of the model's 6 blocks"),
    ({"front": 0}, "option 'front'"),
])
def test_bad_options(opts, msg):
    with pytest.raises(OptionError, match=msg):
        _cached(**opts)


def test_a_psnr_or_speedup_goal_searches_the_threshold():
    from pared.passes.cache.common import evaluate_on_calibration, graph_flops
    m, (x, t) = tiny_dit()
    prog = capture(m, (x, t))
    loop = tiny_sampler_loop(x, STEPS)
    r = prog.runner()
    ref = loop(lambda *a: r(list(a))[0])
    base = graph_flops(prog.main)
    for goal in ({"psnr_db": 80.0}, {"speedup": 1.5}):
        res = get_pass("residual_cache")(target=goal)(prog, PassContext(calibration=loop))
        rec = res.program.records["CachePlan"]
        assert len(rec.search) >= 2 and rec.threshold in [p[0] for p in rec.search] + [2.0]
        psnr, sp = evaluate_on_calibration(res.program, loop, ref, base)
        if "psnr_db" in goal:
            assert psnr >= 80.0
            # and it is the largest passing threshold measured
            assert rec.threshold == max(p[0] for p in rec.search if p[1] >= 80.0)
        else:
            assert sp >= 1.5
            assert rec.threshold == min(p[0] for p in rec.search if p[2] >= 1.5)


def test_goal_errors():
    from pared.ir.errors import PassError
    m, (x, t) = tiny_dit()
    prog = capture(m, (x, t))
    with pytest.raises(OptionError, match="option 'target': unknown metric 'fid'; known: psnr_db, speedup"):
        get_pass("residual_cache")(target={"fid": 3})
    with pytest.raises(OptionError, match="must be a positive number"):
        get_pass("residual_cache")(target={"psnr_db": -3})
    with pytest.raises(PassError, match="needs a calibration loop"):
        get_pass("residual_cache")(target={"psnr_db": 30})(prog, PassContext(calibration=[(x, t)]))
    with pytest.raises(PassError, match="reaches a 50.0x FLOPs speedup"):
        get_pass("residual_cache")(target={"speedup": 50.0})(prog, PassContext(calibration=tiny_sampler_loop(x, STEPS)))
