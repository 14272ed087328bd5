"""action_cache (BAC / EfficientVLA sub-block caching across denoising steps): the dynamic
program against brute force, Bubbling Union, structure, numerics against an eager emulation
(forward hooks), the steps loop against a per-call denoiser, the artifact, bad options."""
import itertools

import numpy as np
import pytest
import torch

import pared
from pared.backends.executor import Executor
from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.transform import PassContext
from pared.passes.cache.action_cache import (bac_updates, bubbling_union, grouped_updates, kept_similarity,
                                             segment_value)
from pared.registry import get_pass
from pared.testing import eager_block_cache, op_count, tiny_denoiser, tiny_denoiser_inputs

STEPS = 8


def _calibration(n=6):
    return [tiny_denoiser_inputs(1, 50 + i) for i in range(n)]


def _cached(**opts):
    m, x = tiny_denoiser(steps=STEPS)
    prog = capture(m, x)
    res = get_pass("action_cache")(**opts)(prog, PassContext(calibration=_calibration()))
    return m, prog, res


def _total(S, ups):
    ups = sorted(ups) + [S.shape[0]]
    return sum(segment_value(S, a, b) for a, b in zip(ups, ups[1:]))


@pytest.mark.parametrize("m", [1, 2, 3, 5])
def test_dp_finds_the_best_update_steps(m):
    rng = np.random.default_rng(m)
    k = 7
    S = np.triu(rng.uniform(0.3, 1.0, (k, k)))
    np.fill_diagonal(S, 1.0)
    got = bac_updates(S, m)
    assert got[0] == 0 and len(got) == m and list(got) == sorted(set(got))
    best = max(_total(S, (0,) + c) for c in itertools.combinations(range(1, k), m - 1))
    assert _total(S, got) == pytest.approx(best)


def test_dp_updates_where_similarity_drops():
    """Steps 0-3 alike, 4-7 alike, nothing alike across: two updates go to 0 and 4."""
    S = np.full((8, 8), 0.1)
    S[:4, :4] = S[4:, 4:] = 0.99
    np.fill_diagonal(S, 1.0)
    assert bac_updates(S, 2) == (0, 4)
    assert kept_similarity(S, (0, 4)) == pytest.approx(0.99 * 6 / 8 + 2 / 8)


def test_bubbling_union_only_for_high_error_upstream_blocks():
    blocks = ["b0.attn", "b0.mlp", "b1.attn", "b1.mlp"]
    ups = [{0, 4}, {0, 2}, {0, 5}, {0, 6}]
    errors = [0.3, 0.01, 0.2, 0.02]            # the attentions err most
    bubbled = bubbling_union(blocks, ups, errors, [False, True, False, True], 0.5)
    assert bubbled == ["b0.attn", "b1.attn"]
    assert ups == [{0, 2, 4, 6}, {0, 2}, {0, 5, 6}, {0, 6}]   # b1.attn only gets the FFN after it
    ups2 = [{0, 4}, {0, 2}, {0, 5}, {0, 6}]
    assert bubbling_union(blocks, ups2, errors, [False, True, False, True], 0.0) == []
    assert ups2 == [{0, 4}, {0, 2}, {0, 5}, {0, 6}]


def _kept(S, group_of, ups):
    return sum(kept_similarity(S[i], ups[g]) for i, g in enumerate(group_of))


def test_grouping_merges_the_sub_blocks_that_lose_least_together():
    """Two families of sub-blocks, alike within (similar until step 4, or until step 2): two groups
    recover them, and no partition into two groups (each scheduled by the DP on its summed S) keeps
    more; one group is a single shared schedule."""
    rng = np.random.default_rng(0)
    k, m = 6, 2
    S = np.zeros((4, k, k))
    for i, cut in enumerate((4, 2, 4, 2)):
        s = np.full((k, k), 0.2)
        s[:cut, :cut] = s[cut:, cut:] = 0.95
        S[i] = np.triu(s + rng.uniform(0, 0.02, (k, k)))
        np.fill_diagonal(S[i], 1.0)
    group_of, ups = grouped_updates(S, m, 2)
    assert group_of == [0, 1, 0, 1] and ups == [(0, 4), (0, 2)]
    one, (shared,) = grouped_updates(S, m, 1)
    assert one == [0] * 4 and len(shared) == m
    assert grouped_updates(S, m, 4)[0] == [0, 1, 2, 3]
    # no partition into 2 groups keeps more
    best = 0.0
    for labels in itertools.product(range(2), repeat=4):
        if len(set(labels)) != 2:
            continue
        gu = [bac_updates(S[[i for i in range(4) if labels[i] == g]].sum(0), m) for g in range(2)]
        best = max(best, _kept(S, labels, gu))
    assert _kept(S, group_of, ups) == pytest.approx(best)


def test_groups_bound_the_variants_and_match_the_emulation():
    m, prog, res = _cached(schedule="bac", updates=3, groups=2, bubble=0)
    rec = res.program.records.get("ActionCachePlan", graph="head")
    assert len(set(rec.groups)) == 2 and len(rec.groups) == 6
    assert len({u for u in rec.updates}) == 2 and len(rec.variants) + 1 <= 4
    updates = dict(zip(rec.blocks, rec.updates))
    held = tiny_denoiser_inputs(1, 3)
    torch.testing.assert_close(res.program(*held), eager_block_cache(m, held, updates), rtol=0, atol=2e-5)
    with pytest.raises(OptionError, match="option 'groups' belongs to schedule 'bac'"):
        get_pass("action_cache")(schedule="interval", groups=2)


def test_structure_and_record():
    m, prog, res = _cached(schedule="bac", updates=3)
    p = res.program
    rec = p.records.get("ActionCachePlan", graph="head")
    assert rec.blocks == tuple(f"blocks.{i}.{s}" for i in range(3) for s in ("attn", "mlp"))
    assert all(len(u) >= 3 and u[0] == 0 for u in rec.updates) and rec.schedule[0] == "full"
    assert len(rec.similarity) == 6 and all(0 < s <= 1 for s in rec.similarity)
    # only the head is cached; its calls are a table select inside the steps loop
    assert {g for g in p.graphs if g.startswith("head.")} == {f"head.{v}" for v in ["full", *dict(rec.variants)]}
    assert {"encoder", "denoise.update", "denoise.start"} <= set(p.graphs) and "head" not in p.graphs
    (loop,) = p.plan.step_loops()
    assert [s.selector.cases for s in p.plan.selects()] == [rec.schedule]
    # a variant reusing every sub-block runs no attention and no MLP matmul of the blocks
    every = [v for v, r in rec.variants if len(r) == 6]
    mm = lambda g: op_count(p, "aten.addmm.default", g) + op_count(p, "aten.mm.default", g) \
        + op_count(p, "aten.bmm.default", g)
    if every:
        assert mm(f"head.{every[0]}") < mm("head.full") - 3 * 4
        # and each block's adaLN linear computes only the two gates still read, not shift and scale
        def ada_splits(g):
            return [n.args[1] for n in p.graphs[g].module.graph.nodes
                    if n.target == torch.ops.aten.split_with_sizes.default and len(n.args[1]) in (2, 6)]
        assert ada_splits("head.full") == [[32] * 6] * 3
        assert ada_splits(f"head.{every[0]}") == [[32] * 2] * 3
        torch.testing.assert_close(p.graphs[f"head.{every[0]}"].module.get_buffer(
            next(n.target for n in p.graphs[f"head.{every[0]}"].module.graph.nodes
                 if n.op == "get_attr" and "narrowed" in str(n.target) and str(n.target).endswith("_weight"))),
            torch.cat([m.head.blocks[0].ada.weight[64:96], m.head.blocks[0].ada.weight[160:192]]), rtol=0, atol=0)
    flops = dict(rec.flops)
    assert all(flops[f"head.{v}"] < flops["head.full"] for v, _ in rec.variants)
    assert set(prog.graphs) == {"encoder", "denoise.start", "head", "denoise.update"}   # input left alone


def test_narrowing_off_keeps_whole_modulation_linears_and_the_same_values():
    m, prog, on = _cached(schedule="interval", interval=3)
    _, _, off = _cached(schedule="interval", interval=3, narrow=False)
    rec = on.program.records.get("ActionCachePlan", graph="head")
    every = next(v for v, r in rec.variants if len(r) == 6)

    def widths(res):
        return [n.meta["val"].shape[-1] for n in res.program.graphs[f"head.{every}"].module.graph.nodes
                if n.target == torch.ops.aten.addmm.default]
    assert 6 * 32 in widths(off) and 6 * 32 not in widths(on) and 2 * 32 in widths(on)
    held = tiny_denoiser_inputs(1, 5)
    torch.testing.assert_close(on.program(*held), off.program(*held), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opts", [{"schedule": "bac", "updates": 3}, {"schedule": "bac", "updates": 4, "bubble": 0},
                                  {"schedule": "interval", "interval": 3}])
def test_matches_the_eager_emulation(opts):
    m, prog, res = _cached(**opts)
    rec = res.program.records.get("ActionCachePlan", graph="head")
    updates = dict(zip(rec.blocks, rec.updates))
    for seed in (3, 4):
        held = tiny_denoiser_inputs(1, seed)
        ref = eager_block_cache(m, held, updates)
        got = res.program(*held)
        torch.testing.assert_close(got, ref, rtol=0, atol=2e-5)
        with torch.no_grad():
            assert not torch.allclose(m(*held), ref, atol=1e-5)     # the caching changed something


def test_every_step_updating_is_exact_and_a_noop():
    m, prog, res = _cached(schedule="interval", interval=1)
    assert not res.modified and res.program is prog
    m, prog, res = _cached(schedule="bac", updates=STEPS)
    assert not res.modified


def test_steps_loop_schedule_equals_a_per_call_denoiser():
    """The same interval schedule on the whole sampler (steps = loop iterations) and on the head
    captured alone, called once per step by the user's loop (steps = calls): equal outputs."""
    m, x = tiny_denoiser(steps=STEPS)
    whole = get_pass("action_cache")(schedule="interval", interval=3)(capture(m, x), PassContext()).program
    held = tiny_denoiser_inputs(1, 7)
    cond = m.encoder(*held[:-1])
    head_prog = capture(m.head, (held[-1], m.value("t", 0), cond))
    per_call = get_pass("action_cache")(schedule="interval", interval=3, steps=STEPS)(head_prog,
                                                                                     PassContext()).program
    runner = per_call.runner()
    xx = held[-1]
    with torch.no_grad():
        for i in range(STEPS):
            out = runner([xx, m.value("t", i), cond])[0]
            xx = m.update(xx, out, m.value("scale", i))
    torch.testing.assert_close(whole(*held), xx, rtol=0, atol=1e-6)
    assert runner.trace == list(per_call.records.get("ActionCachePlan", graph="main").schedule)


def test_artifact_runs_the_schedule(tmp_path):
    m, x = tiny_denoiser(steps=STEPS)
    opt = pared.optimize(m, x, target="cpu", pipeline=[{"action_cache": {"schedule": "bac", "updates": 3}}],
                         calibration=_calibration(), bench_repeats=0, allow_fidelity_loss=True)
    ex = Executor(opt.save(str(tmp_path / "a")), threads=1)
    rec = opt.program.records.get("ActionCachePlan", graph="head")
    held = tiny_denoiser_inputs(1, 11)
    for _ in range(2):                        # a second call starts again at step 0
        got = ex(*[a.numpy() for a in held])
        np.testing.assert_allclose(got, opt.program(*held).numpy(), atol=1e-5)
        assert ex.trace[-1] == "/".join(rec.schedule)


def test_bad_options_and_inputs():
    with pytest.raises(OptionError, match="option 'schedule': must be one of \\['bac', 'interval'\\]"):
        get_pass("action_cache")(schedule="fora")
    with pytest.raises(OptionError, match="option 'bubble' must be in"):
        get_pass("action_cache")(bubble=2.0)
    m, x = tiny_denoiser(steps=STEPS)
    prog = capture(m, x)
    with pytest.raises(OptionError, match="option 'parts': the blocks of graph 'head' have no sub-block named one of \\['ffn'\\].*'attn'"):
        get_pass("action_cache")(schedule="interval", parts="ffn")(prog, PassContext())
    with pytest.raises(PassError, match="schedule 'bac'\\): needs a calibration run"):
        get_pass("action_cache")()(prog, PassContext())


def test_asks_the_harness_for_the_loop_form():
    from pared.ir.transform import Pass, capture_needs
    passes = [get_pass("action_cache")(), get_pass("cfg_skip")(), get_pass("constant_folding")()]
    assert capture_needs(passes) == {"loop", "dynamic_batch"}
    assert capture_needs([get_pass("speculative_decode")()]) == {"loop"}

    class Odd(Pass):
        name = "odd"
        capture_needs = frozenset({"gpu"})
    with pytest.raises(ValueError, match="pass 'odd' declares unknown capture needs \\['gpu'\\]"):
        capture_needs([Odd()])
