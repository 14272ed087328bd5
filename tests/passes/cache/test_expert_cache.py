"""expert_cache (MoECa): recognizing stacked-expert MoE layers, structure, numerics
against an eager emulation (TinyMoEDiT's mode=full/reuse), the no-op and
lossless settings, per-row state, the artifact, bad options."""
import numpy as np
import pytest
import torch

import pared
from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.plan import Rule, Table
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.passes.cache.expert_cache import find_expert_stacks
from pared.testing import op_count, tiny_dit, tiny_moe_dit, tiny_sampler_loop

STEPS = 10


def _cached(batch=2, **opts):
    m, (x, t) = tiny_moe_dit(batch=batch)
    prog = capture(m, (x, t))
    return m, x, prog, get_pass("expert_cache")(steps=STEPS, **opts)(prog, PassContext())


def _run(program, x):
    r = program.runner()
    return tiny_sampler_loop(x, STEPS)(lambda *a: r(list(a))[0]), r.trace


def test_finds_each_moe_layer():
    m, (x, t) = tiny_moe_dit()
    prog = capture(m, (x, t))
    stacks = find_expert_stacks(prog.main.module)
    assert [s.region for s in stacks] == ["blocks.0.ff", "blocks.1.ff", "blocks.2.ff"]
    assert all(s.b1 and s.b2 and len(s.act) == 1 for s in stacks)
    # a model without experts has none
    d, (xd, td) = tiny_dit()
    pd = capture(d, (xd, td))
    assert find_expert_stacks(pd.main.module) == []


def test_structure():
    m, x, prog, res = _cached(interval=3, refresh=1)
    p = res.program
    assert set(p.graphs) == {"main.full", "main.reuse"} and isinstance(p.plan.selects()[0].selector, Table)
    # warmup 2, then a full step every 3rd
    assert p.plan.selects()[0].selector.cases == ("full", "full", "reuse", "reuse", "full", "reuse", "reuse", "full", "reuse",
                                        "reuse")
    assert res.stats == {"reuse_steps": 6, "moe_layers": 3, "attention_caches": 3, "experts": 4, "steps": STEPS,
                         "graphs": 1, "refresh": 1, "routing": "current"}
    # the full graph batches every expert (2 bmm per layer); reuse runs only the gathered ones (4-D matmuls)
    assert op_count(p, "aten.bmm.default", "main.full") == 3 * 2 + 3 * 2     # + attention's q@k, w@v
    assert op_count(p, "aten.bmm.default", "main.reuse") == 3 * 2             # gathered experts, no attention
    assert op_count(p, "aten.index_put.default", "main.reuse") == 3
    # attention's qkv and proj linears are gone from reuse; the router, shared expert and ada stay
    mm = lambda g: op_count(p, "aten.addmm.default", f"main.{g}") + op_count(p, "aten.mm.default", f"main.{g}")
    assert mm("full") - mm("reuse") == 3 * 2
    assert p.graphs["main.reuse"].input_names[2:5] == ("cache.experts0", "cache.experts1", "cache.experts2")
    assert p.graphs["main.full"].output_names[-3:] == ("cache.attn0", "cache.attn1", "cache.attn2")
    fl = dict(p.records["CachePlan"].flops)
    assert fl["main.reuse"] < fl["main.full"] / 2
    assert set(prog.graphs) == {"main"}


def _eager(m, x, trace, refresh):
    ts = torch.linspace(900, 0, STEPS)
    xe, cache = x.clone(), {}
    with torch.no_grad():
        for i, t in enumerate(ts):
            out = m(xe, torch.full((x.shape[0],), float(t)), mode=trace[i], cache=cache, refresh=refresh)
            xe = xe - 0.1 * out
    return xe


@pytest.mark.parametrize("refresh", [0, 1, 3])
def test_numerics_match_the_eager_emulation(refresh):
    m, x, prog, res = _cached(interval=3, refresh=refresh)
    got, trace = _run(res.program, x)
    want = _eager(m, x, trace, refresh)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    plain, _ = _run(prog, x)
    assert (got - plain).abs().max() > 1e-4          # reuse did change the result


def test_refreshing_every_expert_without_attention_reuse_is_lossless():
    m, x, prog, res = _cached(interval=3, refresh=4, attention=False)
    got, trace = _run(res.program, x)
    want, _ = _run(prog, x)
    assert "reuse" in trace
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_more_refresh_means_less_error():
    errs = []
    for k in (0, 2, 4):
        m, x, prog, res = _cached(interval=5, refresh=k, attention=False)
        got, _ = _run(res.program, x)
        want, _ = _run(prog, x)
        errs.append(float((got - want).norm() / want.norm()))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-5


def test_interval_one_is_a_no_op():
    m, x, prog, res = _cached(interval=1)
    assert res.modified is False and res.program is prog


def test_state_is_per_request_and_per_row():
    m, x, prog, res = _cached(interval=4, refresh=1)
    r = res.program.runner()
    loop = tiny_sampler_loop(x, STEPS)
    first = loop(lambda *a: r(list(a))[0])
    r.reset()
    torch.testing.assert_close(loop(lambda *a: r(list(a))[0]), first, rtol=0, atol=0)
    # the refreshed experts are chosen per row: each row alone gives its row of the batch
    for row in range(2):
        single = capture(m, (x[row:row + 1], torch.full((1,), 900.0)))
        pr = get_pass("expert_cache")(steps=STEPS, interval=4, refresh=1)(single, PassContext()).program.runner()
        alone = tiny_sampler_loop(x[row:row + 1], STEPS)(lambda *a: pr(list(a))[0])
        torch.testing.assert_close(alone[0], first[row], rtol=1e-5, atol=1e-5)


def test_artifact_matches_torch(tmp_path):
    m, (x, t) = tiny_moe_dit()
    loop = tiny_sampler_loop(x, STEPS)
    opt = pared.optimize(m, (x, t), pipeline=[{"expert_cache": {"interval": 3, "refresh": 1, "steps": STEPS}}],
                         calibration=loop, bench_repeats=0, allow_fidelity_loss=True)
    ex = pared.load(opt.save(str(tmp_path / "art")))
    got = loop(lambda *a: torch.from_numpy(ex(*[v.numpy() for v in a])))
    want, trace = _run(opt.program, x)
    assert ex.trace == trace
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-4, atol=1e-5)


def _adaptive(**opts):
    m, (x, t) = tiny_moe_dit()
    prog = capture(m, (x, t))
    return m, x, prog, get_pass("expert_cache")(**opts)(prog, PassContext())


@pytest.mark.parametrize("front", [0, 1])
def test_adaptive_schedule_follows_the_probe_and_the_eager_meaning(front):
    m, x, prog, res = _adaptive(threshold=0.2, refresh=1, front=front)
    p = res.program
    assert set(p.graphs) == {"main.probe", "main.full", "main.reuse"} and isinstance(p.plan.selects()[0].selector, Rule)
    assert p.plan.selects()[0].selector.compute == "full" and p.plan.selects()[0].selector.threshold == 0.2
    # front 0: the probe computes no block (TeaCache's modulated input); front 1: the first block
    assert op_count(p, "aten.bmm.default", "main.probe") == (0 if front == 0 else 4)
    assert res.stats["moe_layers"] == 3 - front and res.stats["attention_caches"] == 3 - front
    got, trace = _run(p, x)
    assert trace[:2] == ["full", "full"] and "reuse" in trace and "full" in trace[2:]
    if front == 0:     # the eager emulation caches every block
        torch.testing.assert_close(got, _eager(m, x, trace, 1), rtol=1e-5, atol=1e-5)


def test_adaptive_threshold_zero_is_a_no_op_and_larger_thresholds_reuse_more():
    m, x, prog, res = _adaptive(threshold=0.0)
    assert res.modified is False and res.program is prog
    counts = [_run(_adaptive(threshold=th)[3].program, x)[1].count("reuse") for th in (1e-6, 0.2, 10.0)]
    assert counts[0] == 0 and counts[0] <= counts[1] <= counts[2] == STEPS - 2


def test_adaptive_psnr_goal_searches_the_threshold():
    m, (x, t) = tiny_moe_dit()
    prog = capture(m, (x, t))
    loop = tiny_sampler_loop(x, STEPS)
    res = get_pass("expert_cache")(target={"psnr_db": 60.0})(prog, PassContext(calibration=loop))
    rec = res.program.records["CachePlan"]
    assert len(rec.search) >= 2
    assert rec.threshold == max(p[0] for p in rec.search if p[1] >= 60.0)


@pytest.mark.parametrize("opts, err, msg", [
    ({"refresh": 5}, OptionError, "5 is more than the 4 experts"),
    ({"interval": 0}, OptionError, "option 'interval'"),
    ({"refresh": -1}, OptionError, "option 'refresh'"),
    ({"threshold": 0.1, "front": 3}, OptionError, "3 blocks leave none of the model's 3 blocks"),
    ({"target": {"fid": 1}}, OptionError, "option 'target': unknown metric 'fid'; known: psnr_db, speedup"),
])
def test_bad_options(opts, err, msg):
    with pytest.raises(err, match=msg):
        _cached(**opts)


def test_models_without_experts_and_dynamic_captures_are_refused():
    d, (x, t) = tiny_dit()
    with pytest.raises(PassError, match="found no mixture-of-experts layer"):
        get_pass("expert_cache")(steps=STEPS)(capture(d, (x, t)), PassContext())
    m, (x, t) = tiny_moe_dit(batch=4)
    dyn = capture(m, (x, t), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},
                                             {0: torch.export.Dim("batch", min=1, max=64)}))
    with pytest.raises(PassError, match="static shapes"):
        get_pass("expert_cache")(steps=STEPS)(dyn, PassContext())
