"""expert_quant (MoQa-style expert-level precision): numerics against eager and
against a reference dequantization, structure (integer codes, 4-bit packed), the
routing frequency, the allocator against brute force and the budget, the
artifact torch-free, options, the no-op cases."""
import copy
import functools
import itertools

import numpy as np
import pytest
import torch

from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.program import get_attr
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.passes.quant.expert_quant import allocate_experts, expert_bytes, pack, routing_frequency
from pared.testing import assert_unchanged, dequantized_experts, state_snapshot, tiny_dit, tiny_moe_dit, tiny_sampler_loop

STEPS = 3
BS = 16          # TinyMoE's experts: W1 [4, 32, 16], W2 [4, 16, 32]


@functools.lru_cache(maxsize=None)
def _captured():
    m, (x, t) = tiny_moe_dit()
    return m, x, t, capture(m, (x, t))      # passes never edit the program they are given


def _quantized(**opts):
    m, x, t, prog = _captured()
    opts = {"block_size": BS, **opts}
    res = get_pass("expert_quant")(**opts)(prog, PassContext(calibration=tiny_sampler_loop(x, STEPS)))
    return m, x, t, prog, res


def _reference_model(m, plan, block_size=BS):
    """The eager model with each expert's weights replaced by the reference dequantization of its codes."""
    return dequantized_experts(m, plan, block_size)


def test_graph_equals_reference_dequantization_and_stays_near_eager():
    m, x, t, prog, res = _quantized(bits=[4, 8, 32], weight_bytes=0.5)
    plan = res.program.records["ExpertQuantPlan"]
    assert len(plan.bits_count) >= 2                    # a real mix (0.5 leaves room for 8 bits or float)
    ref = _reference_model(m, plan)
    inputs = [(x, t), (x * 0.5, torch.full_like(t, 300.0))]
    for xi, ti in inputs:
        got = res.program(xi, ti)
        with torch.no_grad():
            torch.testing.assert_close(got, ref(xi, ti), rtol=1e-5, atol=1e-5)
            want = m(xi, ti)
        rel = float((got - want).norm() / want.norm())
        assert 0 < rel < 0.05, rel                       # lossy, bounded: one call, mixed 4/8-bit experts


def test_uniform_8_bits_is_close_and_4_bits_is_further():
    errs = {}
    for bits in (8, 4):
        m, x, t, prog, res = _quantized(bits=[bits], weight_bytes=1.0)
        loop = tiny_sampler_loop(x, STEPS)
        r = res.program.runner()
        got = loop(lambda *a: r(list(a))[0])
        with torch.no_grad():
            want = loop(m)
        errs[bits] = float((got - want).norm() / want.norm())
    assert errs[8] < 2e-3 and errs[8] < errs[4] < 0.1, errs


def test_structure_codes_replace_the_float_experts_and_4_bits_are_packed():
    m, x, t, prog, res = _quantized(bits=[4], weight_bytes=1.0)
    _, _, _, _, res8 = _quantized(bits=[8], weight_bytes=1.0)
    gm = res.program.main.module
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    assert not any(tg.endswith(("ff.w1", "ff.w2")) for tg in targets)
    assert not hasattr(getattr(gm.blocks, "0").ff, "w1")   # the float stacks are gone from the module
    codes4 = [get_attr(gm, tg) for tg in sorted(targets) if tg.endswith("_c")]
    codes8 = [get_attr(res8.program.main.module, f"_moeq_{i}_c") for i in range(6)]
    assert len(codes4) == 6 and all(c.dtype == torch.uint8 for c in codes4 + codes8)
    # two 4-bit codes per byte: exactly half the 8-bit codes' bytes
    assert [c.numel() for c in codes4] == [c.numel() // 2 for c in codes8]
    assert sum(c.numel() for c in codes8) == 3 * 4 * (32 * 16) * 2
    plan = res.program.records["ExpertQuantPlan"]
    # bytes per expert: codes + one float32 scale per block of 16 input weights, both matrices
    assert all(e.bytes == 32 * 16 // 2 + 4 * 16 * 2 + 32 * 16 // 2 + 4 * 32 * 1 for lay in plan.layers
               for e in lay.experts)
    assert res.stats["bits4"] == 12 and res.stats["moe_layers"] == 3
    # the router, shared expert and attention stay float; the input program is untouched
    assert hasattr(getattr(prog.main.module.blocks, "0").ff, "w1")
    assert {str(n.target) for n in prog.main.module.graph.nodes if n.op == "get_attr"} >= {"blocks.0.ff.w1"}


def test_pack_is_lossless_and_packs_pairs_low_nibble_first():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack(codes, 4).tolist() == [[1 + 2 * 16, 15]]
    from pared.passes.quant.expert_quant import _unpack
    c = torch.randint(0, 16, (5, 8), dtype=torch.uint8)
    assert torch.equal(_unpack(pack(c, 4), 4), c.to(torch.int32))
    c2 = torch.randint(0, 4, (3, 8), dtype=torch.uint8)
    assert torch.equal(_unpack(pack(c2, 2), 2), c2.to(torch.int32))
    assert expert_bytes(32, 16, 4, 16) == 32 * 16 // 2 + 4 * 16 * 2
    assert expert_bytes(32, 16, 32, 16) == 4 * 32 * 16


def test_routing_frequency_hand_case():
    picks = [torch.tensor([[0, 1], [0, 2]]), torch.tensor([[3, 0]])]
    np.testing.assert_allclose(routing_frequency(picks, 4), [3 / 6, 1 / 6, 1 / 6, 1 / 6])
    np.testing.assert_allclose(routing_frequency([torch.tensor([[1, 1]])], 3), [0, 1, 0])


def test_routing_frequency_of_the_pass_counts_the_routers_picks():
    m, x, t, prog, res = _quantized(bits=[4, 8], weight_bytes=0.25)
    counts = [np.zeros(4) for _ in m.blocks]
    spy = copy.deepcopy(m)
    for i, b in enumerate(spy.blocks):
        def route(flat, _ff=b.ff, _i=i, _orig=type(b.ff).route):
            gate, idx = _orig(_ff, flat)
            counts[_i] += np.bincount(idx.reshape(-1).numpy(), minlength=4)
            return gate, idx
        b.ff.route = route
    with torch.no_grad():
        tiny_sampler_loop(x, STEPS)(spy)
    plan = res.program.records["ExpertQuantPlan"]
    assert plan.calls == STEPS
    for lay, c in zip(plan.layers, counts):
        np.testing.assert_allclose([e.frequency for e in lay.experts], c / c.sum(), rtol=1e-12)


def test_allocator_is_exact_against_brute_force_and_keeps_the_budget():
    rng = np.random.default_rng(0)
    for trial in range(5):
        n = 6
        costs = [[int(c) for c in sorted(rng.integers(1, 40, size=3) * 8)] for _ in range(n)]
        errors = [sorted(rng.random(3).tolist(), reverse=True) for _ in range(n)]
        budget = int(sum(c[1] for c in costs))
        choice = allocate_experts(errors, costs, budget)
        used = sum(costs[i][j] for i, j in enumerate(choice))
        assert used <= budget
        best = min(sum(errors[i][j] for i, j in enumerate(ch)) for ch in itertools.product(range(3), repeat=n)
                   if sum(costs[i][j] for i, j in enumerate(ch)) <= budget)
        assert sum(errors[i][j] for i, j in enumerate(choice)) == pytest.approx(best, rel=1e-12)
    with pytest.raises(ValueError):
        allocate_experts([[1.0, 0.0]], [[8, 16]], 4)


def test_pass_respects_the_budget_and_spends_it_on_the_sensitive_experts():
    # block 16: 4-bit experts take 6 bits a weight, 8-bit ones 10; 8 on average: half of each
    m, x, t, prog, res = _quantized(bits=[4, 8], avg_bits=8.0)
    plan = res.program.records["ExpertQuantPlan"]
    assert plan.bytes <= plan.budget == int(plan.fp32_bytes * 8 / 32)
    assert plan.bytes == sum(e.bytes for lay in plan.layers for e in lay.experts)
    chosen = {4: [], 8: []}
    for lay in plan.layers:
        for e in lay.experts:
            s = dict(e.sensitivity)
            chosen[e.bits].append(e.frequency * (s[4] - s[8]))      # what 8 bits saves on this expert
    assert chosen[4] and chosen[8]
    # an exact choice under equal costs: every 8-bit expert saves at least as much as any 4-bit one
    assert min(chosen[8]) >= max(chosen[4])
    # a larger budget never gives a worse objective
    _, _, _, _, more = _quantized(bits=[4, 8], avg_bits=9.0)
    assert more.program.records["ExpertQuantPlan"].objective <= plan.objective


def test_artifact_runs_torch_free_equal_to_the_torch_side(tmp_path):
    import pared
    from pared.testing import run_torch_free
    m, (x, t) = tiny_moe_dit()
    snap = state_snapshot(m)
    opt = pared.optimize(m, (x, t), pipeline=[get_pass("expert_quant")(block_size=BS, weight_bytes=0.25)],
                         calibration=tiny_sampler_loop(x, STEPS), allow_fidelity_loss=True, bench_repeats=0)
    assert_unchanged(m, snap)
    plan = opt.program.records["ExpertQuantPlan"]
    assert set(plan.bits_count) == {4, 8}
    path = opt.save(str(tmp_path / "art"))
    np.save(tmp_path / "x.npy", x.numpy())
    np.save(tmp_path / "t.npy", t.numpy())
    run_torch_free(f"""
        import numpy as np, pared
        ex = pared.load({path!r})
        np.save({str(tmp_path / 'y.npy')!r}, ex.run_flat(np.load({str(tmp_path / 'x.npy')!r}),
                                                          np.load({str(tmp_path / 't.npy')!r}))[0])
    """)
    got = np.load(tmp_path / "y.npy")
    with torch.no_grad():
        torch_side = opt.program(x, t).numpy()
    assert np.linalg.norm(got - torch_side) / np.linalg.norm(torch_side) < 1e-5


def test_a_model_without_experts_is_a_no_op_and_a_second_run_finds_nothing():
    d, (x, t) = tiny_dit()
    prog = capture(d, (x, t))
    res = get_pass("expert_quant")()(prog, PassContext(calibration=tiny_sampler_loop(x, STEPS)))
    assert res.modified is False and res.program is prog and res.stats == {"moe_layers": 0}
    m, x, t, prog, first = _quantized(bits=[8], weight_bytes=1.0)
    again = get_pass("expert_quant")(block_size=BS)(first.program, PassContext(calibration=tiny_sampler_loop(x, 2)))
    assert again.modified is False and again.stats == {"moe_layers": 0}


@pytest.mark.parametrize("opts, match", [
    ({"bits": [3]}, "'expert_quant': option 'bits'"),
    ({"bits": []}, "'expert_quant': option 'bits'"),
    ({"weight_bytes": 0.3, "avg_bits": 6}, "'expert_quant': options 'weight_bytes' and 'avg_bits'"),
    ({"weight_bytes": 0.0}, "'expert_quant': option 'weight_bytes'"),
    ({"weight_bytes": 1.5}, "'expert_quant': option 'weight_bytes'"),
    ({"avg_bits": 40}, "'expert_quant': option 'avg_bits'"),
    ({"block_size": 15}, "'expert_quant': option 'block_size'"),
    ({"weighting": "hessian"}, "'expert_quant': option 'weighting'"),
])
def test_bad_options_name_the_pass_and_option(opts, match):
    with pytest.raises(OptionError, match=match):
        get_pass("expert_quant")(**opts)


def test_unreachable_budget_and_missing_calibration_are_refused():
    with pytest.raises(PassError, match="expert_quant': option weight_bytes gives a budget"):
        _quantized(bits=[4, 8], weight_bytes=0.05)
    with pytest.raises(PassError, match="'expert_quant' needs a calibration run"):
        get_pass("expert_quant")()(_captured()[3], PassContext())
    with pytest.raises(PassError, match="not a multiple of block_size"):
        _quantized(block_size=12)


def test_pipeline_file_builds():
    import os

    from pared.pipeline import build_passes, load_pipeline
    from pared.workloads import EXAMPLES
    passes = build_passes(load_pipeline(os.path.join(EXAMPLES, "pipelines", "dit_moe_int8.yaml")))
    eq = passes[[p.name for p in passes].index("expert_quant")]
    assert eq.options.bits == (4, 8) and eq.options.weight_bytes == 0.27 and eq.options.block_size == 32
