"""cfg_skip (Adaptive Guidance): the latch, the half-batch graph, numerics against
eager, the artifact, a static capture refused, no-op, bad options."""
import numpy as np
import pytest
import torch
from torch.export import Dim

import pared
from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.plan import Latch, Plan
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.testing import op_count, tiny_dit


def _dynamic(batch=4):
    m, (x, t) = tiny_dit(batch=batch)
    b = Dim("batch", min=2, max=64)
    return m, x, t, capture(m, (x, t), dynamic_shapes=({0: b}, {0: b}))


def _run(program, x, t, calls=4):
    r = program.runner()
    outs = [r([x, t])[0] for _ in range(calls)]
    return outs, r.trace


def test_latches_once_the_halves_agree_and_then_runs_half_the_batch():
    m, x, t, prog = _dynamic()
    res = get_pass("cfg_skip")(threshold=0.99, warmup=1)(prog, PassContext())
    p = res.program
    assert set(p.graphs) == {"main.both", "main.cond_only"} and isinstance(p.plan.selects()[0].selector, Latch)
    assert op_count(p, "aten.slice.Tensor", "main.cond_only") >= 2
    same = torch.cat([x[:2], x[:2]])          # conditional and unconditional agree exactly
    outs, trace = _run(p, same, t)
    assert trace == ["both", "both", "cond_only", "cond_only"]
    with torch.no_grad():
        ref = m(x[:2], t[:2])
    torch.testing.assert_close(outs[-1], torch.cat([ref, ref]), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs[0], torch.cat([ref, ref]), rtol=1e-5, atol=1e-6)


def test_disagreeing_halves_never_latch_and_match_the_uncached_model():
    m, x, t, prog = _dynamic()
    p = get_pass("cfg_skip")(threshold=0.99, warmup=0)(prog, PassContext()).program
    outs, trace = _run(p, x, t)
    assert set(trace) == {"both"}
    with torch.no_grad():
        torch.testing.assert_close(outs[-1], m(x, t), rtol=1e-5, atol=1e-6)
    r = p.runner()           # a new request starts unlatched
    r([torch.cat([x[:2], x[:2]]), t])
    r.reset()
    r([x, t])
    assert r.trace == ["both"]


def test_artifact_follows_the_same_latch(tmp_path):
    m, (x, t) = tiny_dit(batch=4)
    b = Dim("batch", min=2, max=64)
    opt = pared.optimize(m, (x, t), dynamic_shapes=({0: b}, {0: b}), pipeline=[{"cfg_skip": {"warmup": 1}}],
                         bench_repeats=0, allow_fidelity_loss=True)
    assert Plan.from_json(opt.program.plan.to_json()) == opt.program.plan
    ex = pared.load(opt.save(str(tmp_path / "art")))
    same = torch.cat([x[:2], x[:2]]).numpy()
    got = [ex(same, t.numpy()) for _ in range(3)]
    assert ex.trace == ["both", "both", "cond_only"]
    with torch.no_grad():
        ref = m(x[:2], t[:2]).numpy()
    np.testing.assert_allclose(got[-1], np.concatenate([ref, ref]), rtol=1e-4, atol=1e-5)


def test_static_capture_and_odd_batches_are_refused():
    m, (x, t) = tiny_dit(batch=4)
    with pytest.raises(PassError, match="needs the batch dimension .* inputs \\['x', 't'\\] were captured static"):
        get_pass("cfg_skip")()(capture(m, (x, t)), PassContext())
    m, x, t, prog = _dynamic(batch=3)
    with pytest.raises(PassError, match="example batch must be even"):
        get_pass("cfg_skip")()(prog, PassContext())


def test_threshold_above_one_is_a_no_op_and_bad_options_raise():
    m, x, t, prog = _dynamic()
    res = get_pass("cfg_skip")(threshold=1.5)(prog, PassContext())
    assert res.modified is False and res.program is prog
    with pytest.raises(OptionError, match="option 'warmup'"):
        get_pass("cfg_skip")(warmup=-1)
