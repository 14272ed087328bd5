"""moe_dispatch: capacity-based static dispatch of dense stacked experts, against an eager
emulation written with loops (TinyMoE.dispatched); its capacities, its record, the structure
it leaves, composing with expert_quant and expert_cache (frozen routing), the artifact."""
import math

import numpy as np
import pytest
import torch

import pared
from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.transform import PassContext
from pared.passes.cache.expert_cache import find_expert_stacks, find_routed_combines
from pared.registry import get_pass
from pared.testing import op_count, tiny_dit, tiny_moe_dit, tiny_sampler_loop

STEPS = 4


def _dispatched(steps=STEPS, **opts):
    m, (x, t) = tiny_moe_dit()
    prog = capture(m, (x, t))
    res = get_pass("moe_dispatch")(**opts)(prog, PassContext(calibration=tiny_sampler_loop(x, steps)))
    return m, x, prog, res


def _loop(program, x, steps=STEPS):
    r = program.runner()
    return tiny_sampler_loop(x, steps)(lambda *a: r(list(a))[0]), [str(n).rsplit(".", 1)[-1] for n in r.trace]


def _eager(m, x, steps=STEPS, **kw):
    xe = x.clone()
    with torch.no_grad():
        for t in torch.linspace(900, 0, steps):
            xe = xe - 0.1 * m(xe, torch.full((x.shape[0],), float(t)), **kw)
    return xe


def test_calibrated_capacities_drop_nothing_on_the_calibration_run_and_match_the_dense_model():
    m, x, prog, res = _dispatched()
    plan = res.program.records["MoEDispatchPlan"]
    assert plan.capacity == "calibrated" and plan.calls == STEPS and len(plan.layers) == 3
    for lay in plan.layers:
        # the most pairs seen per expert, x 1.1, rounded up to 8, at most T (16 tokens)
        assert lay.capacities == tuple(min(16, 8 * math.ceil(c * 1.1 / 8)) for c in lay.most_seen)
        assert lay.dropped == 0.0 and sum(lay.most_seen) <= lay.tokens * lay.top_k * STEPS
    assert dict(plan.measured)["rel_l2"] < 1e-6
    got, _ = _loop(res.program, x)
    torch.testing.assert_close(got, _eager(m, x), rtol=1e-5, atol=1e-5)


def test_a_small_capacity_drops_the_pairs_past_it_in_token_order_as_the_eager_loops_do():
    m, x, prog, res = _dispatched(capacity=0.5, measure=False)
    plan = res.program.records["MoEDispatchPlan"]
    # 0.5 * T * k / E = 0.5 * 16 * 2 / 4 = 4 slots, rounded up to 8 (multiple)
    assert all(lay.capacities == (8, 8, 8, 8) for lay in plan.layers)
    assert max(lay.dropped for lay in plan.layers) > 0, "no pair dropped: the check would not exercise the drop"
    caps = [lay.capacities for lay in plan.layers]
    got, _ = _loop(res.program, x)
    ref = _eager(m, x, capacity=caps)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (got - _eager(m, x)).abs().max() > 1e-3          # and it differs from the dense model


def test_the_recorded_drop_share_counts_the_pairs_over_capacity():
    """Counted on the calibration run as the program before the pass routes it (the dense model)."""
    m, x, prog, res = _dispatched(capacity=0.5, multiple=1, measure=False)
    plan = res.program.records["MoEDispatchPlan"]
    seen = {i: [] for i in range(3)}
    with torch.no_grad():
        def call(xe, tt):
            c = m.cond(tt)
            h = m.embed(xe)
            b, n, d = h.shape
            for i, blk in enumerate(m.blocks):
                shift, scale, gate = blk.ada(c).unsqueeze(1).chunk(3, dim=-1)
                h = h + gate * blk.attn(blk.norm(h))
                flat = (blk.norm(h) * (1 + scale) + shift).reshape(b * n, d)
                g, idx = blk.ff.route(flat)
                seen[i].append(torch.bincount(idx.reshape(-1), minlength=4))
                h = h + blk.ff.combine(flat, blk.ff.experts(flat), g, idx).reshape(b, n, d)   # as routed before
            return m.out(h)
        tiny_sampler_loop(x, STEPS)(call)
    for i, lay in enumerate(plan.layers):
        assert lay.capacities == (4, 4, 4, 4)
        over = sum(int((c - 4).clamp(min=0).sum()) for c in seen[i])
        assert lay.dropped == pytest.approx(over / (STEPS * 16 * 2), abs=1e-6)


def test_structure_experts_run_on_their_slots_only():
    m, x, prog, res = _dispatched(capacity=0.5, measure=False)
    p = res.program
    assert op_count(prog, "aten.bmm.default") == 3 * 2 + 3 * 2          # dense experts + attention
    assert op_count(p, "aten.bmm.default") == 3 * 2                       # attention only
    assert find_expert_stacks(p.main.module) == []           # a second run finds nothing
    # per layer: 4 experts x 2 matmuls of [8, .] rows
    mms = [n for n in p.main.module.graph.nodes if n.op == "call_function"
           and n.target in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)
           and tuple(n.meta["val"].shape)[0] == 8]
    assert len(mms) == 3 * 4 * 2
    assert res.stats["expert_rows"] == 3 * 32 and res.stats["dense_rows"] == 3 * 4 * 16
    again = get_pass("moe_dispatch")()(p, PassContext(calibration=tiny_sampler_loop(x, STEPS)))
    assert not again.modified and again.program is p


def test_bad_options_and_models_without_experts():
    with pytest.raises(OptionError, match="option 'capacity' must be 'calibrated' or a capacity factor"):
        get_pass("moe_dispatch")(capacity="max")
    with pytest.raises(OptionError, match="option 'capacity' must be in"):
        get_pass("moe_dispatch")(capacity=0)
    with pytest.raises(OptionError, match="option 'margin' must be in"):
        get_pass("moe_dispatch")(margin=0.5)
    m, (x, t) = tiny_moe_dit()
    with pytest.raises(PassError, match="needs a calibration run"):
        get_pass("moe_dispatch")()(capture(m, (x, t)), PassContext())
    d, (xd, td) = tiny_dit()
    res = get_pass("moe_dispatch")()(capture(d, (xd, td)), PassContext())
    assert not res.modified and res.stats == {"moe_layers": 0}


def test_composes_with_expert_quant_before_it():
    m, (x, t) = tiny_moe_dit()
    prog = capture(m, (x, t))
    ctx = PassContext(calibration=tiny_sampler_loop(x, STEPS))
    q = get_pass("expert_quant")(weight_bytes=0.3, block_size=16)(prog, ctx).program
    d = get_pass("moe_dispatch")(measure=False)(q, ctx)
    assert d.stats["moe_layers"] == 3
    with torch.no_grad():
        torch.testing.assert_close(d.program(x, t), q(x, t), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dispatch", [False, True])
def test_expert_cache_with_frozen_routing_matches_its_eager_meaning(dispatch):
    """Reuse steps weigh the full step's chosen experts' outputs by the step's own router
    probabilities at those choices; attention is read from the cache."""
    m, (x, t) = tiny_moe_dit()
    prog = capture(m, (x, t))
    ctx = PassContext(calibration=tiny_sampler_loop(x, STEPS))
    caps = None
    if dispatch:
        prog = get_pass("moe_dispatch")(capacity=0.5, measure=False)(prog, ctx).program
        caps = [lay.capacities for lay in prog.records["MoEDispatchPlan"].layers]
    opts = {} if dispatch else {"routing": "frozen"}
    res = get_pass("expert_cache")(interval=3, steps=10, **opts)(prog, ctx)
    assert res.stats["routing"] == "frozen" and res.stats["refresh"] == 0
    p = res.program
    got, trace = _loop(p, x, 10)
    assert "reuse" in trace
    cache: dict = {}
    xe = x.clone()
    with torch.no_grad():
        for i, tt in enumerate(torch.linspace(900, 0, 10)):
            xe = xe - 0.1 * m(xe, torch.full((x.shape[0],), float(tt)), mode=trace[i], cache=cache,
                              routing="frozen", capacity=caps)
    torch.testing.assert_close(got, xe, rtol=1e-5, atol=1e-5)
    # reuse runs no expert and no dispatch: its matmuls are the router, shared expert, ada and output
    assert p.graphs["main.reuse"].input_names[2:8] == tuple(f"cache.{k}{i}" for k in ("idx", "picked")
                                                             for i in range(3))
    assert op_count(p, "aten.bmm.default", "main.reuse") == 0
    assert op_count(p, "aten.cumsum.default", "main.reuse") == 0
    assert op_count(p, "aten.gather.default", "main.reuse") == 3


def test_frozen_routing_refuses_refresh():
    with pytest.raises(OptionError, match="routing 'frozen' caches only the chosen experts"):
        get_pass("expert_cache")(routing="frozen", refresh=1)
    m, (x, t) = tiny_moe_dit()
    ctx = PassContext(calibration=tiny_sampler_loop(x, STEPS))
    d = get_pass("moe_dispatch")(measure=False)(capture(m, (x, t)), ctx).program
    with pytest.raises(OptionError, match="dispatched \\(moe_dispatch\\): set refresh: 0"):
        get_pass("expert_cache")(refresh=2, interval=3, steps=10)(d, ctx)
    assert len(find_routed_combines(d.main.module)) == 3


def test_the_artifact_matches_the_program(tmp_path):
    m, (x, t) = tiny_moe_dit()
    loop = tiny_sampler_loop(x, STEPS)
    opt = pared.optimize(m, (x, t), pipeline=[{"moe_dispatch": {"capacity": 0.5}},
                                              {"expert_cache": {"interval": 2, "steps": STEPS}}],
                         calibration=loop, bench_repeats=0, allow_fidelity_loss=True)
    prog = opt.program
    r = prog.runner()
    want = loop(lambda *a: r(list(a))[0])
    opt.reset()
    got = loop(lambda *a: torch.as_tensor(np.asarray(opt(*a))))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def test_the_bench_summary_reports_the_record():
    from pared.workloads.bench import dispatch_summary
    m, x, prog, res = _dispatched(capacity=0.5, multiple=1)
    got = dispatch_summary(res.program)
    plan = res.program.records["MoEDispatchPlan"]
    assert (got["expert_rows"], got["dense_rows"]) == (res.stats["expert_rows"], res.stats["dense_rows"]) == (3 * 4 * 4, 192)
    lay = plan.layers[0]
    assert got["layers"][0]["busiest_vs_mean"] == round(max(lay.most_seen) / (16 * 2 / 4), 3)
    assert got["layers"][0]["dropped"] == lay.dropped > 0 and got["measured"] == dict(plan.measured)
    assert dispatch_summary(prog) is None


def test_rows_picked_out_of_token_order_are_refused():
    # the experts' rows picked in reverse: the pass reads the picks on the example inputs (the
    # values tapped from the graph) and refuses, naming what it expected
    from pared.passes.sparsity.moe_dispatch import picked_node
    m, (x, t) = tiny_moe_dit()
    prog = capture(m, (x, t))
    (name, g), = prog.graphs.items()
    stack = find_expert_stacks(g.module)[0]
    picked = picked_node(g.module, stack)
    rows = picked.args[2]
    with g.module.graph.inserting_before(picked):
        flipped = g.module.graph.call_function(torch.flip, (rows, [0]))
    picked.replace_input_with(rows, flipped)
    g.module.recompile()
    with pytest.raises(PassError, match=r"are not idx\[t, j\] \* T \+ t in token order"):
        get_pass("moe_dispatch")()(prog, PassContext(calibration=tiny_sampler_loop(x, STEPS)))
