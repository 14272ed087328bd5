"""Passes that compose: program passes transform the Plan they are given (a Call
becomes a Select over variants), graph passes run over every graph and decide
once per layer. Each test checks the structure the composition produced and its
numerics against an eager emulation of what the composition means."""
import numpy as np
import pytest
import torch
from torch.export import Dim

from pared.ir.capture import capture
from pared.ir.errors import PassError
from pared.ir.plan import Bins, Latch, Rule, Select, Seq, Table
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.testing import eager_taylor_loop, op_count, tiny_dit, tiny_sampler_loop

STEPS = 8


def _rel_l2(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm())


def _run_loop(program, x, steps=STEPS):
    r = program.runner()
    out = tiny_sampler_loop(x, steps)(lambda *a: r(list(a))[0])
    return out, r


def _eager_interval(m, x, table, span=(1, 4), hooks=None):
    ts = torch.linspace(900, 0, STEPS)
    x, cache = x.clone(), {}
    with torch.no_grad():
        for i, t in enumerate(ts):
            tt = torch.full((x.shape[0],), float(t))
            out = (m(x, tt, span=span, record=cache) if table[i] == "full"
                   else m(x, tt, span=span, residual=cache["residual"]))
            x = x - 0.1 * out
    return x


# -- quantize_linears after a cache pass ------------------------------------------
def _cached_then_quantized(**qopts):
    m, (x, t) = tiny_dit()
    prog = capture(m, (x, t))
    ctx = PassContext(calibration=tiny_sampler_loop(x, STEPS))
    cached = get_pass("interval_cache")(interval=3, steps=STEPS)(prog, ctx).program
    res = get_pass("quantize_linears")(**qopts)(cached, ctx)
    return m, x, cached, res


def test_quantize_linears_after_a_cache_pass_decides_once_per_layer():
    m, x, cached, res = _cached_then_quantized()
    p = res.program
    assert res.modified and set(p.graphs) == {"main.full", "main.reuse"} and p.plan == cached.plan
    # every linear of each variant is quantized: no float matmul is left, and `full` has the
    # quantizers quantize_linears gives the uncached model
    alone = get_pass("quantize_linears")()(capture(m, (x, torch.full((2,), 900.0))),
                                           PassContext(calibration=tiny_sampler_loop(x, STEPS))).program
    q = "quantized_decomposed.quantize_per_tensor"
    assert op_count(p, q, "main.full") == op_count(alone, q) > op_count(p, q, "main.reuse") > 0
    for name, g in p.graphs.items():
        for n in g.module.graph.nodes:
            if n.op == "call_function" and str(n.target) in ("aten.addmm.default", "aten.mm.default"):
                reads = [str(a.target) for a in n.all_input_nodes if a.op == "call_function"]
                assert "quantized_decomposed.dequantize_per_tensor.default" in reads, (name, n.format_node())
    # the QuantPlan lists each layer once (22), and the variants hold one int8 tensor per shared layer
    layers = p.records["QuantPlan"].layers
    assert len(layers) == 6 * 3 + 4 and len({lq.weight for lq in layers}) == len(layers)
    consts = {}
    for name, g in p.graphs.items():
        for n in g.module.graph.nodes:
            if n.op == "get_attr" and str(n.target).startswith("_quant_") and str(n.target).endswith("_w"):
                consts.setdefault(name, []).append(getattr(g.module, str(n.target)))
    shared = {id(t) for t in consts["main.full"]} & {id(t) for t in consts["main.reuse"]}
    assert len(shared) == 2 * 3 + 4 and res.stats["shared_constants"] >= len(shared)
    # each layer's activation range is its input's range over the calls where it ran, in the
    # eager emulation of the cached loop (a cached block's layers only at full steps)
    seen: dict[str, list[torch.Tensor]] = {}
    handles = [mod.register_forward_pre_hook(lambda mod, a, name=name: seen.setdefault(name, []).append(a[0]))
               for name, mod in m.named_modules() if isinstance(mod, torch.nn.Linear)]
    table = p.plan.body.selector.cases
    _eager_interval(m, x, table)
    for h in handles:
        h.remove()
    def span(regions):
        vals = [v for r in regions for v in seen[r]]
        return min(0.0, min(float(v.min()) for v in vals)), max(0.0, max(float(v.max()) for v in vals))
    # the six adaLN layers read one activation (the t-MLP's output): one quantizer, one range over
    # every call, though blocks 1-4 run only at full steps
    adas = [f"blocks.{i}.ada" for i in range(6)]
    for lq in layers:
        want = span(adas if lq.region in adas else [lq.region])
        assert lq.activation_range == pytest.approx(want, rel=1e-5, abs=1e-6), lq.region
    calls_run = {lq.region: len(seen[lq.region]) for lq in layers}
    assert calls_run["blocks.2.mlp.0"] == table.count("full") and calls_run["blocks.5.mlp.0"] == STEPS
    # numerics: int8 error only, against the eager cached loop
    got, r = _run_loop(p, x)
    assert r.trace == list(table)
    assert _rel_l2(got, _eager_interval(m, x, table)) < 0.02


def test_running_quantize_linears_again_finds_nothing_more():
    m, x, cached, res = _cached_then_quantized()
    again = get_pass("quantize_linears")()(res.program, PassContext(calibration=tiny_sampler_loop(x, STEPS)))
    assert again.modified is False and again.program is res.program


def test_dynamic_quantization_and_caching_commute():
    """Dynamic INT8 is local to each layer, so cache-then-quantize and quantize-then-cache are
    the same computation."""
    m, (x, t) = tiny_dit()
    prog = capture(m, (x, t))
    ctx = PassContext()
    cache = get_pass("interval_cache")(interval=3, steps=STEPS)
    quant = get_pass("quantize_linears")(mode="dynamic")
    a = quant(cache(prog, ctx).program, ctx).program
    b = cache(quant(prog, ctx).program, ctx).program
    assert set(a.graphs) == set(b.graphs) == {"main.full", "main.reuse"}
    for name in a.graphs:
        assert op_count(a, "pared_quant.dynamic_linear", name) == op_count(b, "pared_quant.dynamic_linear", name) > 0
    got_a, ra = _run_loop(a, x)
    got_b, rb = _run_loop(b, x)
    assert ra.trace == rb.trace
    torch.testing.assert_close(got_a, got_b, rtol=1e-6, atol=1e-6)


# -- a cache pass after timestep_quant's buckets ------------------------------------
def _bucketed(buckets=4):
    m, (x, t) = tiny_dit()
    prog = capture(m, (x, t))
    ctx = PassContext(calibration=tiny_sampler_loop(x, STEPS))
    q = get_pass("timestep_quant")(buckets=buckets)(prog, ctx).program
    return m, x, prog, q, ctx


def test_taylor_cache_after_timestep_buckets_nests_a_table_in_each_bucket():
    m, x, prog, q, ctx = _bucketed()
    res = get_pass("taylor_cache")(interval=3, steps=STEPS)(q, ctx)
    p = res.program
    assert res.stats["graphs"] == 4
    assert set(p.graphs) == {f"main.bucket{b}.{v}" for b in range(4) for v in ("full0", "full", "forecast")}
    # bins by t around a step table, per bucket; the bins are the ones timestep_quant chose
    outer = p.plan.body
    assert isinstance(outer, Select) and outer.selector == q.plan.body.selector
    assert isinstance(outer.selector, Bins) and outer.selector.input == "in:t"
    for label, inner in outer.cases:
        assert isinstance(inner.selector, Table) and {c.graph for _, c in inner.cases} == \
            {f"main.{label}.{v}" for v in ("full0", "full", "forecast")}
    # the buckets share the carried state (numeric variants of one graph) and the coefficient table
    assert {s.name for s in p.plan.state} == {"taylor_cache.main.last", "taylor_cache.main.delta"}
    assert [n for n, _ in p.plan.step_values] == ["taylor_cache.coef"]
    # the variants keep their bucket's quantization: the same int8 weights as the bucket graph
    assert op_count(p, "quantized_decomposed.quantize_per_tensor", "main.bucket2.full") == \
        op_count(q, "quantized_decomposed.quantize_per_tensor", "main.bucket2")
    got, r = _run_loop(p, x)
    table = p.records["CachePlan"].schedule
    buckets = q.records["TimestepQuantPlan"].schedule
    assert r.trace == [f"{b}/{v}" for b, v in zip(buckets, table)]
    # a forecast right after a bucket boundary reads what the previous bucket computed
    assert any(b1 != b0 and v == "forecast" for b0, b1, v in zip(buckets, buckets[1:], table[1:]))
    # numerics: within int8 error of the float Taylor loop, and within caching error of the buckets alone
    xe = eager_taylor_loop(m, x, table, p.plan.step_values[0][1])
    quant_only, _ = _run_loop(q, x)
    assert _rel_l2(got, xe) < 0.02 and _rel_l2(got, quant_only) < 0.05
    # full steps compute the bucket graph itself: step 0 equals timestep_quant's program exactly
    r0, rq = p.runner(), q.runner()
    t0 = torch.full((2,), 900.0)
    torch.testing.assert_close(r0([x, t0])[0], rq([x, t0])[0], rtol=0, atol=0)


def test_residual_cache_after_buckets_keeps_one_rule_history():
    m, x, prog, q, ctx = _bucketed()
    p = get_pass("residual_cache")(threshold=10.0, warmup=2)(q, ctx).program
    keys = {sel.key for sel in p.plan.selects() if isinstance(sel.selector, Rule)}
    assert keys == {"residual_cache.main"}
    _, r = _run_loop(p, x)
    # threshold 10 reuses from the first call past warmup on, across bucket boundaries
    assert [s.split("/")[1] for s in r.trace] == ["compute", "compute"] + ["reuse"] * (STEPS - 2)


# -- cfg_skip around residual_cache -------------------------------------------------
def _cfg(batch=4):
    m, (x, t) = tiny_dit(batch=batch)
    b = Dim("batch", min=2, max=64)
    return m, x, t, capture(m, (x, t), dynamic_shapes=({0: b}, {0: b}))


def test_cfg_skip_around_residual_cache_is_a_latch_around_rules():
    m, x, t, prog = _cfg()
    ctx = PassContext()
    guided = get_pass("cfg_skip")(threshold=0.99, warmup=1)(prog, ctx).program
    res = get_pass("residual_cache")(threshold=0.3, warmup=1)(guided, ctx)
    p = res.program
    assert res.stats["graphs"] == 2
    latch = p.plan.body
    assert isinstance(latch.selector, Latch) and [lab for lab, _ in latch.cases] == ["both", "cond_only"]
    for label, case in latch.cases:
        assert isinstance(case, Seq) and case.nodes[0].graph == f"main.{label}.probe"
        assert isinstance(case.nodes[1].selector, Rule)
    # the latch reads the agreement the cached `both` variants still output
    assert latch.selector.signal in {o for _, c in latch.cases[0][1].nodes[1].cases for o in c.outputs}
    # each half keeps its own cache: the two halves differ in batch
    assert {s.name for s in p.plan.state} == {"residual_cache.main.both.mid", "residual_cache.main.cond_only.mid"}
    # conditional and unconditional rows agree (as guidance ends): both, then cond_only, each cached
    xs = torch.cat([x[:2], x[:2]])
    r = p.runner()
    outs = []
    xi = xs.clone()
    for i in range(6):
        out = r([xi, torch.full((4,), 900.0 - 150 * i)])[0]
        outs.append(out)
        xi = xi - 0.1 * out
    assert r.trace[0] == "both/compute" and r.trace[-1].startswith("cond_only/")
    assert "reuse" in "".join(r.trace)
    # the eager meaning: the latched branch runs half the batch with its own span cache
    caches = {"both": {}, "cond_only": {}}
    xe = xs.clone()
    with torch.no_grad():
        for i, chosen in enumerate(r.trace):
            branch, variant = chosen.split("/")
            tt = torch.full((4,), 900.0 - 150 * i)
            xin, tin = (xe, tt) if branch == "both" else (xe[:2], tt[:2])
            kw = {"record": caches[branch]} if variant == "compute" else {"residual": caches[branch]["residual"]}
            e = m(xin, tin, span=(1, 5), **kw)
            out = e if branch == "both" else torch.cat([e, e])
            torch.testing.assert_close(outs[i], out, rtol=1e-5, atol=1e-5)
            xe = xe - 0.1 * out


def test_cfg_skip_after_a_block_cache_is_refused_by_meaning():
    m, x, t, prog = _cfg()
    ctx = PassContext()
    cached = get_pass("residual_cache")(threshold=0.3)(prog, ctx).program
    with pytest.raises(PassError, match="cfg_skip measures the agreement of the model's two CFG halves.*Run cfg_skip "
                                        "before residual_cache"):
        get_pass("cfg_skip")()(cached, ctx)


def test_two_block_caches_on_one_graph_are_refused_by_meaning():
    m, (x, t) = tiny_dit()
    prog = capture(m, (x, t))
    cached = get_pass("interval_cache")(interval=3, steps=STEPS)(prog, PassContext()).program
    with pytest.raises(PassError, match="graph 'main.full' is a variant interval_cache made for its own schedule; "
                                        "a second block cache would choose the same calls by a second schedule"):
        get_pass("taylor_cache")(steps=STEPS)(cached, PassContext())


@pytest.mark.parametrize("name, opts", [
    ("interval_cache", {"interval": 3, "steps": STEPS}),
    ("delta_cache", {"interval": 3, "steps": STEPS}),
    ("taylor_cache", {"interval": 3, "steps": STEPS}),
    ("residual_cache", {"threshold": 0.3}),
])
def test_a_cache_pass_run_twice_finds_nothing_more(name, opts):
    m, (x, t) = tiny_dit()
    prog = capture(m, (x, t))
    ctx = PassContext(calibration=tiny_sampler_loop(x, STEPS))
    once = get_pass(name)(**opts)(prog, ctx)
    assert once.modified
    twice = get_pass(name)(**opts)(once.program, ctx)
    assert twice.modified is False and twice.program is once.program


@pytest.mark.heavy      # the trained dit_mnist, 4 buckets x taylor_cache, sampled torch-free (about 1 min)
def test_artifact_of_buckets_and_taylor_runs_torch_free_with_the_same_trace(tmp_path):
    import pared
    m, (x, t) = tiny_dit()
    loop = tiny_sampler_loop(x, STEPS)
    opt = pared.optimize(m, (x, t), pipeline=[{"timestep_quant": {"buckets": 4}},
                                              {"taylor_cache": {"interval": 3, "steps": STEPS}}],
                         calibration=loop, bench_repeats=0, allow_fidelity_loss=True)
    ex = pared.load(opt.save(str(tmp_path / "art")))
    got = loop(lambda *a: torch.from_numpy(ex(*[v.numpy() for v in a])))
    r = opt.program.runner()
    want = loop(lambda *a: r(list(a))[0])
    assert ex.trace == r.trace and r.trace[0] == "bucket0/full0"
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-3, atol=1e-4)


# -- expert_quant over cfg_skip's two graphs ------------------------------------------
def test_expert_quant_after_cfg_skip_gives_each_expert_one_width_in_both_halves():
    from pared.testing import dequantized_experts, tiny_moe_dit
    m, (x, t) = tiny_moe_dit(batch=4)
    b = Dim("batch", min=2, max=64)
    prog = capture(m, (x, t), dynamic_shapes=({0: b}, {0: b}))
    guided = get_pass("cfg_skip")(threshold=0.99, warmup=1)(prog, PassContext()).program
    res = get_pass("expert_quant")(block_size=16, bits=[4, 8, 32], weight_bytes=0.5)(
        guided, PassContext(calibration=tiny_sampler_loop(x, 6)))
    p = res.program
    plan = p.records["ExpertQuantPlan"]
    assert res.stats["graphs"] == 2 and len(plan.bits_count) >= 2 and p.plan == guided.plan
    # the two halves hold the same packed codes (one tensor each)
    codes = {name: {str(n.target): getattr(g.module, str(n.target)) for n in g.module.graph.nodes
                    if n.op == "get_attr" and str(n.target).startswith("_moeq_")} for name, g in p.graphs.items()}
    both, half = codes["main.both"], codes["main.cond_only"]
    assert both.keys() == half.keys() and all(both[k] is half[k] for k in both)
    # the eager meaning: the model with each expert's weights dequantized at its chosen width,
    # run on the whole batch, then (latched) on the conditional half
    ref = dequantized_experts(m, plan, 16)
    same = torch.cat([x[:2], x[:2]])
    r = p.runner()
    outs = [r([same, t])[0] for _ in range(3)]
    assert r.trace == ["both", "both", "cond_only"]
    with torch.no_grad():
        full, cond = ref(same, t), ref(same[:2], t[:2])
    torch.testing.assert_close(outs[0], full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs[2], torch.cat([cond, cond]), rtol=1e-5, atol=1e-5)


def test_expert_quant_after_expert_cache_is_refused_by_meaning():
    from pared.testing import tiny_moe_dit
    m, (x, t) = tiny_moe_dit()
    prog = capture(m, (x, t))
    cached = get_pass("expert_cache")(interval=3, refresh=1, steps=6)(prog, PassContext()).program
    with pytest.raises(PassError, match="reads the expert weights outside a stacked-expert layer .* run expert_quant "
                                        "before expert_cache"):
        get_pass("expert_quant")(block_size=16)(cached, PassContext(calibration=tiny_sampler_loop(x, 6)))


@pytest.mark.parametrize("name, opts", [
    ("quantize_weights_int4", {"force": True, "block_size": 16}),
    ("dead_code_elimination", {}),     # the cache variants leave a dead node behind in each
])
def test_graph_passes_rewrite_every_variant_alike(name, opts):
    """After a cache pass: every variant is rewritten, and the result equals rewriting the
    uncached model first and caching it after (the rewrite is local to each layer)."""
    m, (x, t) = tiny_dit()
    prog = capture(m, (x, t))
    ctx = PassContext()
    cache = get_pass("interval_cache")(interval=3, steps=STEPS)
    rewrite = get_pass(name)(**opts)
    res = rewrite(cache(prog, ctx).program, ctx)
    assert res.modified, f"{name} found nothing to rewrite in the variants: the test would compare no-ops"
    a = res.program
    b = cache(rewrite(prog, ctx).program, ctx).program
    for g in a.graphs:
        assert a.graphs[g].op_counts() == b.graphs[g].op_counts(), g
    got_a, ra = _run_loop(a, x)
    got_b, rb = _run_loop(b, x)
    assert ra.trace == rb.trace
    torch.testing.assert_close(got_a, got_b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("refresh", [0, 1])
def test_expert_cache_after_expert_quant_caches_the_quantized_experts(refresh):
    """MoECa over MoQa-style expert bits: the cache pass finds the MoE layers whose weights are now
    codes dequantized in the graph, and caches (and refreshes) the quantized experts."""
    from pared.testing import dequantized_experts, tiny_moe_dit
    m, (x, t) = tiny_moe_dit()
    prog = capture(m, (x, t))
    steps = 8
    ctx = PassContext(calibration=tiny_sampler_loop(x, steps))
    q = get_pass("expert_quant")(block_size=16, bits=[4, 8], weight_bytes=0.3)(prog, ctx).program
    res = get_pass("expert_cache")(interval=3, refresh=refresh, steps=steps)(q, ctx)
    p = res.program
    assert res.stats["moe_layers"] == 3 and set(p.graphs) == {"main.full", "main.reuse"}
    ref = dequantized_experts(m, q.records["ExpertQuantPlan"], 16)
    r = p.runner()
    got = tiny_sampler_loop(x, steps)(lambda *a: r(list(a))[0])
    xe, cache = x.clone(), {}
    with torch.no_grad():
        for i, tt in enumerate(torch.linspace(900, 0, steps)):
            out = ref(xe, torch.full((x.shape[0],), float(tt)), mode=r.trace[i], cache=cache, refresh=refresh)
            xe = xe - 0.1 * out
    assert "reuse" in r.trace
    torch.testing.assert_close(got, xe, rtol=1e-5, atol=1e-5)


def test_mixed_precision_after_a_cache_pass_is_refused_by_meaning():
    m, (x, t) = tiny_dit()
    prog = capture(m, (x, t))
    ctx = PassContext(calibration=tiny_sampler_loop(x, STEPS))
    prog = get_pass("quant_sensitivity")()(prog, ctx).program
    cached = get_pass("interval_cache")(interval=3, steps=STEPS)(prog, ctx).program
    with pytest.raises(PassError, match="measured on graph 'main'; this program runs graphs .* made by interval_cache, "
                                        "whose calls that measurement does not cover"):
        get_pass("mixed_precision")(weight_bytes=0.5)(cached, ctx)
