"""sparse_attention: the rewritten graph computes what the eager model computes with an additive
-inf mask on each local head (pared.testing.sparse_attention_bias: Python loops over the grid, or a
sort for top-k), for windows of several shapes, with and without a [CLS]; the window form really
shrinks the attention (its softmaxes are [windows, w, w + globals], the dense heads keep theirs) and
the top-k form says it is masks-only; heads come from the entropy profile (its class, or a
threshold) or are named; a goal keeps the most local heads that still meet it; bad options are
refused naming the option; it lowers to ONNX Runtime and TVM, torch-free."""
import functools
import json
import os

import numpy as np
import pytest
import torch

from pared.analysis.attention_entropy import AttentionEntropyProfile
from pared.analysis.metrics import compare_outputs
from pared.analysis.recorder import replay
from pared.ir.capture import capture
from pared.ir.errors import OptionError
from pared.ir.transform import PassContext, PassManager
from pared.registry import get_pass
from pared.testing import check_idempotent, run_pass_checked, sparse_attention_bias, tiny_vit

N = 17                      # TinyViT: [CLS] + a 4 x 4 grid of patches, 4 heads, 3 blocks


@functools.cache
def _tiny():
    m, x = tiny_vit(batch=3)
    return m, capture(m, x)


def _calib():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(3, 1, 8, 8, generator=g),) for _ in range(2)]


def _held_out():
    return torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(7))


def _sparse(program, ctx=None, **opts):
    return run_pass_checked(get_pass("sparse_attention")(**opts), program, ctx or PassContext())


def _eager(m, x, rec):
    """The eager model with each recorded site's local heads masked as its options say."""
    scores = {}
    for s in rec.sites:
        blk = int(s.layer.split(".")[1])
        if rec.mode == "window":
            scores[blk] = sparse_attention_bias(s.heads, N, s.local, grid=rec.grid, window=rec.window,
                                                tokens=rec.tokens)
        else:
            scores[blk] = sparse_attention_bias(s.heads, N, s.local, k=rec.k)
    with torch.no_grad():
        return m(x, scores=scores)


@pytest.mark.parametrize("opts", [
    {"heads": {"blocks.0": [1, 2], "blocks.2": [0, 1, 2, 3]}},                     # default window 2 x 2
    {"heads": {"blocks.1": [3]}, "window": [1, 4]},                               # rows
    {"heads": {"blocks.*": [0, 3]}, "window": [4, 2]},
    {"heads": {"blocks.0": [2]}, "grid": [4, 4], "tokens": [1, 17], "window": [2, 4]},
    {"heads": {"blocks.*": [0]}, "mode": "topk", "k": 5},
    {"heads": {"blocks.2": [1, 2, 3]}, "mode": "topk", "k": 1},
])
def test_matches_the_eager_model_with_the_same_heads_masked(opts):
    m, prog = _tiny()
    res = _sparse(prog, **opts)
    assert res.modified
    rec = res.program.records["AttentionSparsityDecisions"]
    x = _held_out()
    with torch.no_grad():
        want, dense = _eager(m, x, rec), m(x)
    with torch.no_grad():
        got = res.program(x)
    assert float((got - want).abs().max()) < 1e-5 * float(want.abs().max())         # measured 2e-7
    assert float((dense.detach() - want).abs().max()) > 1e-3, "the masks changed nothing: the test could not fail"
    named = {lay: hs for lay, hs in opts["heads"].items()}
    for s in rec.sites:
        assert any(s.layer == lay or lay.endswith("*") for lay in named) and s.heads == 4


def _softmax_shapes(program):
    return sorted(tuple(n.meta["val"].shape) for n in program.graphs["main"].module.graph.nodes
                  if n.op == "call_function" and "softmax" in str(n.target))


def test_window_form_shrinks_the_attention_and_keeps_dense_heads_dense():
    """Heads 1, 2 of block 0 local with 2 x 2 windows: their scores are [3·2·4 windows, 4, 4 + 1 [CLS]]
    plus the [CLS] row over every key; heads 0, 3 stay [3, 2, 17, 17]; blocks 1 and 2 are untouched;
    no top-k; the record's FLOPs fall as the windows say."""
    _, prog = _tiny()
    res = _sparse(prog, heads={"blocks.0": [1, 2]})
    shapes = _softmax_shapes(res.program)
    assert shapes == sorted([(24, 4, 5), (3, 2, 1, 17), (3, 2, 17, 17), (3, 4, 17, 17), (3, 4, 17, 17)]), shapes
    ops = res.program.graphs["main"].op_counts()
    assert not any("topk" in o or "gather" in o or "scatter" in o for o in ops), sorted(ops)
    made = [n for n in res.program.graphs["main"].module.graph.nodes
            if n.meta.get("pared.ir.created_by") == "sparse_attention"]
    assert made and {n.meta.get("pared.ir.region") for n in made} == {"blocks.0"}
    (s,) = res.program.records["AttentionSparsityDecisions"].sites
    assert (s.keys, s.local_keys, s.local) == (17, 5, (1, 2))
    d = 8                                              # head dim: 32 / 4
    dense = 2 * 3 * 4 * 17 * 17 * 2 * d
    local = 2 * 3 * 2 * (4 * 4 * 5 + 1 * 17) * 2 * d
    assert (s.attention_flops, s.attention_flops_after) == (dense, dense // 2 + local)
    (g, before, after) = res.program.records["AttentionSparsityDecisions"].graph_flops[0]
    assert after < before


def test_topk_is_recorded_as_masks_only():
    _, prog = _tiny()
    res = _sparse(prog, heads={"blocks.1": [0]}, mode="topk", k=4)
    rec = res.program.records["AttentionSparsityDecisions"]
    assert (rec.lowering, rec.k, rec.grid) == ("masks-only", 4, None)
    assert _softmax_shapes(res.program) == [(3, 4, 17, 17)] * 3               # the dense scores still run
    assert res.program.graphs["main"].op_counts().get("aten.topk.default") == 1
    assert rec.sites[0].attention_flops_after < rec.sites[0].attention_flops


def _profile(program, **opts):
    ctx = PassContext(calibration=_calib())
    out, _ = PassManager([get_pass("attention_entropy")(**opts)]).run(program, ctx)
    return out, ctx


def test_heads_come_from_the_entropy_profile():
    """max_normalized t: exactly the heads whose normalized entropy is below t; no threshold: the
    profile's own 'local' class (here classified with local_threshold 0.983: the tiny random
    model's heads are all near 0.98)."""
    _, prog = _tiny()
    pro, ctx = _profile(prog, local_threshold=0.983, global_threshold=0.99)
    prof = pro.records["AttentionEntropyProfile"]
    norm = {s.layer: s.head_normalized for s in prof.graph("main").sites}
    t = sorted(v for hs in norm.values() for v in hs)[5]                       # 5 heads below it
    res = _sparse(pro, ctx, max_normalized=t, mode="topk", k=6)
    got = {s.layer: s.local for s in res.program.records["AttentionSparsityDecisions"].sites}
    want = {lay: tuple(h for h, v in enumerate(hs) if v < t) for lay, hs in norm.items()}
    assert got == {k: v for k, v in want.items() if v} and sum(map(len, got.values())) == 5
    kinds = {s.layer: tuple(h for h, k in enumerate(s.head_kind) if k == "local") for s in prof.graph("main").sites}
    assert any(kinds.values())
    res = _sparse(pro, ctx, mode="topk", k=6)
    got = {s.layer: s.local for s in res.program.records["AttentionSparsityDecisions"].sites}
    assert got == {k: v for k, v in kinds.items() if v}
    for s in res.program.records["AttentionSparsityDecisions"].sites:
        assert s.normalized == norm[s.layer]


def test_no_local_head_is_a_noop_and_a_second_run_finds_nothing():
    _, prog = _tiny()
    ctx = PassContext(calibration=_calib())
    res = _sparse(prog, ctx, max_normalized=0.0)
    assert not res.modified and res.program is prog
    res = _sparse(prog, heads={"blocks.0": [0, 1, 2, 3], "blocks.1": [2]})
    again = check_idempotent(get_pass("sparse_attention")(heads={"blocks.0": [0, 1, 2, 3], "blocks.1": [2]}),
                             res.program, PassContext())
    assert not again.modified


def test_a_goal_keeps_the_most_local_heads_that_still_meet_it():
    """target {cosine: 0.998} (top-12 of 17 keys): the chosen count's trial meets the goal, the next count (when
    tried) misses it, the lowest-entropy heads are the ones made local, and replaying the
    calibration run through the result measures what the record says."""
    _, prog = _tiny()
    calib = _calib()
    ctx = PassContext(calibration=calib)
    res = _sparse(prog, ctx, target={"cosine": 0.998}, mode="topk", k=12)
    rec = res.program.records["AttentionSparsityDecisions"]
    trials = dict(rec.trials)
    m = rec.local_heads
    assert 1 <= m < 12 and dict(trials[m])["cosine"] >= 0.998
    if m + 1 in trials:
        assert dict(trials[m + 1])["cosine"] < 0.998
    assert rec.target == (("cosine", 0.998),)
    prof = ctx.require(AttentionEntropyProfile, "test", prog)
    ranked = sorted((v, s.layer, h) for s in prof.graph("main").sites for h, v in enumerate(s.head_normalized))
    chosen = {(lay, h) for s in rec.sites for lay, h in ((s.layer, h) for h in s.local)}
    assert chosen == {(lay, h) for _, lay, h in ranked[:m]}
    measured = compare_outputs(replay(prog, calib), replay(res.program, calib))
    assert abs(measured["cosine"] - dict(trials[m])["cosine"]) < 1e-6


@pytest.mark.parametrize("opts, message", [
    ({"mode": "sliding"}, "option 'mode' must be one of \\['window', 'topk'\\]"),
    ({"heads": {"blocks.0": [0]}, "max_normalized": 0.5}, "give at most one of options 'max_normalized', 'heads'"),
    ({"heads": {"blocks.0": [0]}, "window": [3, 2]}, "option 'window' \\[3, 2\\] does not divide the grid \\[4, 4\\]"),
    ({"heads": {"blocks.0": [0]}, "window": [4, 4]}, "is the whole grid"),
    ({"heads": {"blocks.0": [0]}, "grid": [5, 4]}, "option 'grid' \\[5, 4\\] \\(20 tokens\\) does not fit the 17"),
    ({"heads": {"blocks.0": [0]}, "tokens": [1, 17]}, "option 'tokens' needs option 'grid'"),
    ({"heads": {"blocks.0": [0]}, "grid": [4, 4], "tokens": [0, 12]}, "has 16 tokens but option 'tokens'"),
    ({"heads": {"block.0": [0]}}, "option 'heads': 'block.0' matches no attention layer"),
    ({"heads": {"blocks.0": [4]}}, "blocks.0 has 4 heads, no head 4"),
    ({"heads": {"blocks.0": [0]}, "mode": "topk", "k": 17}, "option 'k' \\(17\\) keeps every one of the 17 keys"),
    ({"heads": "blocks.0"}, "option 'heads' takes \\{layer pattern: \\[head, ...\\]\\}"),
    ({"head": {"blocks.0": [0]}}, "unknown option 'head'; did you mean 'heads'"),
])
def test_bad_options(opts, message):
    _, prog = _tiny()
    with pytest.raises(OptionError, match=message):
        _sparse(prog, **opts)


def test_an_odd_grid_asks_for_a_window():
    m, x = tiny_vit(batch=2)
    m2 = type(m)(image=6)                       # 3 x 3 patches + [CLS]
    prog = capture(m2.eval(), (torch.randn(2, 1, 6, 6),))
    with pytest.raises(OptionError, match="the grid \\[3, 3\\] of blocks.0 has an odd side; give option 'window'"):
        _sparse(prog, heads={"blocks.0": [0]})
    assert _sparse(prog, heads={"blocks.0": [0]}, window=[1, 3]).modified


@pytest.mark.parametrize("mode", ["window", pytest.param("topk", marks=pytest.mark.heavy)])
def test_lowers_on_ort_and_tvm_and_runs_torch_free(tmp_path, mode):
    from pared.ir.target import get_target
    from pared.testing import run_torch_free, save_program
    _, prog = _tiny()
    res = _sparse(prog, heads={"blocks.0": [1, 2], "blocks.2": [0]}, mode=mode, k=5)
    paths = {t: save_program(res.program, str(tmp_path / t), get_target(t).to_json()) for t in ("cpu", "tvm-cpu")}
    for path in paths.values():
        with open(os.path.join(path, "manifest.json")) as f:
            assert json.load(f)["records"]["AttentionSparsityDecisions"]["mode"] == mode
    x = _held_out()
    np.save(tmp_path / "x.npy", x.numpy())
    run_torch_free(f"""
        import numpy as np, pared
        x = np.load({str(tmp_path)!r} + "/x.npy")
        for t, p in {paths!r}.items():
            np.save({str(tmp_path)!r} + f"/y_{{t}}.npy", pared.load(p).run_flat(x)[0])
    """)
    with torch.no_grad():
        want = res.program(x).numpy()
    for t in paths:
        got = np.load(tmp_path / f"y_{t}.npy")
        assert np.abs(got - want).max() < 1e-4 * np.abs(want).max(), t
