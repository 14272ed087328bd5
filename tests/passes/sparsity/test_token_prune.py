"""token_prune: the rewritten graph computes what the eager model computes when the same tokens
are dropped after the same block (pared.testing.PruneTokensRef: argsort and Python loops), for
every score; later blocks run on the kept count and the text-padding mask is gathered with the
tokens; the readout read from the end stays valid; keep >= candidates is a no-op and a second run
finds nothing; bad options and unfit graphs are refused naming the option or node; it composes
with layer_skip in either order and lowers to ONNX Runtime and TVM with no scatter, torch-free."""
import functools
import json
import os

import numpy as np
import pytest
import torch

from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.transform import PassContext, PassManager
from pared.registry import get_pass
from pared.testing import (PruneTokensRef, assert_close_to_eager, check_idempotent, check_noop, run_pass_checked,
                           tiny_dit, tiny_vit, tiny_vla, tiny_vla_inputs)

VIS = [4, 20]         # TinyVLA: [text 0..3 | visual 4..19 | state 20 | readout 21]


def _prune(program, **opts):
    return run_pass_checked(get_pass("token_prune")(**opts), program, PassContext())


@functools.cache
def _tiny(batch=3):
    m, inputs = tiny_vla(batch=batch)
    return m, inputs, capture(m, inputs)


def _softmax_shapes(program):
    return [tuple(n.meta["val"].shape) for n in program.graphs["main"].module.graph.nodes
            if n.op == "call_function" and "softmax" in str(n.target) and not n.meta.get("pared.ir.created_by")]


@pytest.mark.parametrize("opts, ref", [
    ({"keep": 6, "tokens": VIS, "queries": [[0, 4]], "after": 1}, PruneTokensRef(1, 4, 20, 6, "relevance", ((0, 4),))),
    ({"keep": 6, "tokens": VIS, "after": 0, "score": "received"}, PruneTokensRef(0, 4, 20, 6, "received")),
    ({"keep": 8, "tokens": VIS, "queries": [[0, 4]], "score": "relevance_diversity", "after": "blocks.2"},
     PruneTokensRef(2, 4, 20, 8, "relevance", ((0, 4),), by_diversity=4)),
    ({"keep": 5, "tokens": VIS, "score": "relevance_diversity", "diversity": 0.8, "after": 0},
     PruneTokensRef(0, 4, 20, 5, "relevance", None, by_diversity=4)),
    ({"ratio": 0.25, "tokens": VIS}, PruneTokensRef(0, 4, 20, 4)),            # queries: text, state, readout
    ({"keep": 3, "tokens": [0, 20], "queries": [[20, 22]], "after": -2}, PruneTokensRef(2, 0, 20, 3, "relevance",
                                                                                       ((20, 22),))),
    ({"keep": 5, "tokens": VIS, "after": 1, "mode": "transform"}, PruneTokensRef(1, 4, 20, 5, temperature=0.1)),
    ({"keep": 6, "tokens": VIS, "score": "relevance_diversity", "mode": "transform", "temperature": 0.5},
     PruneTokensRef(0, 4, 20, 6, by_diversity=3, temperature=0.5)),
])
def test_matches_the_eager_model_with_the_same_tokens_dropped(opts, ref):
    m, _, prog = _tiny()
    res = _prune(prog, **opts)
    assert res.modified
    x = tiny_vla_inputs(3, seed=7)                  # held-out inputs, rows padded differently
    with torch.no_grad():
        want = m(*x, prune=ref)
        got = res.program(*x)
        unpruned = m(*x)
    assert_close_to_eager(want, got, rel_l2=1e-5, what="token_prune vs eager dropping")      # measured 0
    assert float((want - unpruned).norm() / unpruned.norm()) > 1e-3, "the reference dropped nothing that matters"
    (g,) = res.program.records["TokenPruneDecisions"].graphs
    n_out = 22 - (ref.end - ref.start) + ref.keep
    assert (g.tokens_in, g.tokens_out, g.keep, g.by_diversity) == (22, n_out, ref.keep, ref.by_diversity)
    shapes = _softmax_shapes(res.program)
    assert shapes[:ref.after + 1] == [(3, 4, 22, 22)] * (ref.after + 1)
    assert shapes[ref.after + 1:] == [(3, 4, n_out, n_out)] * (4 - ref.after - 1)
    assert g.flops_after < g.flops_before or ref.after == 3


def test_structure_one_gather_per_site_no_scatter_no_sort():
    _, _, prog = _tiny()
    res = _prune(prog, keep=6, tokens=VIS, score="relevance_diversity")
    ops = res.program.graphs["main"].op_counts()
    assert not any("scatter" in o or o.endswith("sort") for o in ops), sorted(ops)
    assert sum(v for o, v in ops.items() if "topk" in o) == 1
    # the tokens and the text-padding mask (used by the 3 later blocks): one gather each
    assert sum(v for o, v in ops.items() if o.endswith("gather.default")) == 2, ops
    created = [n for n in res.program.graphs["main"].module.graph.nodes if n.meta.get("pared.ir.created_by")]
    assert created and all(n.meta["pared.ir.created_by"] == "token_prune" for n in created)
    assert {n.meta["pared.ir.region"] for n in created} == {"blocks.0"}


def test_batch_of_one_and_the_readout_stays_last():
    m, inputs, prog = _tiny(batch=1)
    res = _prune(prog, keep=2, tokens=VIS, after=1)
    x = tiny_vla_inputs(1, seed=3)
    with torch.no_grad():
        assert_close_to_eager(m(*x, prune=PruneTokensRef(1, 4, 20, 2)), res.program(*x), rel_l2=1e-5)


def test_keep_all_is_a_noop_and_a_second_run_finds_nothing():
    _, _, prog = _tiny()
    check_noop(get_pass("token_prune")(keep=16, tokens=VIS), prog, PassContext())
    res = _prune(prog, keep=6, tokens=VIS)
    check_idempotent(get_pass("token_prune")(keep=6, tokens=VIS), res.program, PassContext())


@pytest.mark.parametrize("opts, message", [
    ({"tokens": VIS}, "give one of option .keep. .* or .target."),
    ({"keep": 2, "ratio": 0.5, "tokens": VIS}, "; got keep and ratio"),
    ({"keep": 0, "tokens": VIS}, "option 'keep' must be in \\[1, inf\\]"),
    ({"ratio": 1.5, "tokens": VIS}, "option 'ratio' must be in \\(0, 1\\]"),
    ({"keep": 2, "tokens": [5, 3]}, "option 'tokens' takes a token range"),
    ({"keep": 2, "tokens": VIS, "score": "relevence"}, "did you mean 'relevance'"),
    ({"keep": 2, "tokens": VIS, "score": "received", "queries": [[0, 4]]}, "option 'queries' goes with score"),
    ({"keep": 2, "tokens": VIS, "diversity": 1.0}, "option 'diversity' must be in \\[0, 1\\)"),
    ({"keep": 2, "tokens": VIS, "kepe": 3}, "unknown option 'kepe'; did you mean 'keep'"),
    ({"keep": 2, "tokens": VIS, "mode": "merge"}, "option 'mode' must be one of \\['select', 'transform'\\]"),
    ({"keep": 2, "tokens": VIS, "temperature": 0.0}, "option 'temperature' must be in \\(0, inf\\]"),
])
def test_bad_options(opts, message):
    with pytest.raises(OptionError, match=message):
        get_pass("token_prune")(**opts)


@pytest.mark.parametrize("opts, error, message", [
    ({"keep": 2, "tokens": [4, 22]}, OptionError, "reads token -1 after the blocks .* inside the candidate range"),
    ({"keep": 2, "tokens": [4, 30]}, OptionError, "\\[4, 30\\) runs past the 22 tokens"),
    ({"keep": 2, "tokens": VIS, "after": "blocks.9"}, OptionError, "has no attention block 'blocks.9'"),
    ({"keep": 2, "tokens": VIS, "after": "blocks.*"}, OptionError, "matches 4 blocks"),
    ({"keep": 2, "tokens": VIS, "graphs": ["head"]}, OptionError, "'head' matches none of the program's graphs"),
    ({"keep": 2, "tokens": [0, 22], "score": "relevance"}, OptionError, "needs query tokens"),
])
def test_bad_options_for_the_model(opts, error, message):
    _, _, prog = _tiny()
    with pytest.raises(error, match=message):
        get_pass("token_prune")(**opts)(prog, PassContext())


def test_a_dense_graph_is_refused_when_named_and_left_alone_otherwise():
    m, inputs = tiny_dit(attention=True)
    prog = capture(m, inputs)
    with pytest.raises(PassError, match="carries the token axis; dropping tokens would change its shape"):
        get_pass("token_prune")(keep=2, tokens=[0, 4], graphs=["main"])(prog, PassContext())
    with pytest.raises(OptionError, match="no graph fits the options: .*carries the token axis"):
        get_pass("token_prune")(keep=2, tokens=[0, 4])(prog, PassContext())


def test_vit_candidates_default_to_the_patches_and_relevance_to_cls():
    """On a ViT the [CLS] token is detected and kept; relevance is then [CLS] -> patch attention (EViT)."""
    m, (x,) = tiny_vit()
    res = _prune(capture(m, (x,)), keep=4, after=0)
    (g,) = res.program.records["TokenPruneDecisions"].graphs
    assert (g.tokens, g.queries, g.tokens_out) == ((1, 17), ((0, 1),), 5)
    with torch.no_grad():
        out = res.program(torch.randn(3, 1, 8, 8))
    assert out.shape == (3, 4) and torch.isfinite(out).all()


# -- composition --------------------------------------------------------------------------------
def test_composes_with_layer_skip_in_either_order():
    """Skipping blocks.3 and dropping tokens after blocks.1, in both orders, is the eager model
    with block 3 the identity and the same tokens dropped."""
    m, inputs, prog = _tiny()
    from pared.passes.sparsity.layer_skip import LayerSkip   # noqa: F401 (registers)
    calib = [tiny_vla_inputs(3, seed=s) for s in (11, 12)]
    skip = {"layer_skip": {"layers": ["blocks.3"]}}
    prune = {"token_prune": {"keep": 6, "tokens": VIS, "after": 1}}
    x = tiny_vla_inputs(3, seed=7)
    with torch.no_grad():
        want = m(*x, prune=PruneTokensRef(1, 4, 20, 6), skip=(3,))
    for order in ([skip, prune], [prune, skip]):
        passes = [get_pass(next(iter(p)))(**next(iter(p.values()))) for p in order]
        out, _ = PassManager(passes).run(prog, PassContext(calibration=calib))
        with torch.no_grad():
            assert_close_to_eager(want, out(*x), rel_l2=1e-5, what=f"order {[next(iter(p)) for p in order]}")
        assert out.records.get("TokenPruneDecisions") is not None and out.records.get("LayerSkipDecisions")


@pytest.mark.heavy     # lowers and runs artifacts: `make test-heavy` (CI runs it after `make test`)
@pytest.mark.parametrize("mode", ["select", "transform"])
def test_lowers_on_ort_and_tvm_and_runs_torch_free(tmp_path, mode):
    """relevance + diversity after block 0 (22 -> 11 tokens), dropped or transformed: the ONNX file
    has no scatter, both artifacts carry the record, and loaded without torch they compute what
    the torch graph computes."""
    import onnx

    from pared.ir.target import get_target
    from pared.testing import run_torch_free, save_program
    _, _, prog = _tiny()
    res = _prune(prog, keep=5, tokens=VIS, score="relevance_diversity", mode=mode)
    paths = {t: save_program(res.program, str(tmp_path / t), get_target(t).to_json()) for t in ("cpu", "tvm-cpu")}
    ops = {n.op_type for f in os.listdir(paths["cpu"]) if f.endswith(".onnx")
           for n in onnx.load(os.path.join(paths["cpu"], f), load_external_data=False).graph.node}
    assert not {o for o in ops if "Scatter" in o} and {"TopK", "GatherElements", "CumSum"} <= ops, sorted(ops)
    for path in paths.values():
        with open(os.path.join(path, "manifest.json")) as f:
            assert json.load(f)["records"]["TokenPruneDecisions"]["graphs"][0]["tokens_out"] == 11
    x = tiny_vla_inputs(3, seed=9)
    for i, v in enumerate(x):
        np.save(tmp_path / f"x{i}.npy", v.numpy())
    run_torch_free(f"""
        import numpy as np, pared
        x = [np.load({str(tmp_path)!r} + f"/x{{i}}.npy") for i in range(3)]
        for t, p in {paths!r}.items():
            np.save({str(tmp_path)!r} + f"/y_{{t}}.npy", pared.load(p).run_flat(*x)[0])
    """)
    with torch.no_grad():
        want = res.program(*x).numpy()
    for t in paths:
        got = np.load(tmp_path / f"y_{t}.npy")
        assert np.abs(got - want).max() < 1e-4 * np.abs(want).max(), t


def test_a_goal_keeps_the_fewest_tokens_that_still_meet_it():
    """target: {cosine: 0.999} on the calibration run: the kept count is the smallest trial that
    meets the goal and the one below it (when tried) misses; the record keeps the trials."""
    m, inputs, prog = _tiny()
    calib = [tiny_vla_inputs(3, seed=s) for s in (11, 12, 13)]
    res = run_pass_checked(get_pass("token_prune")(target={"cosine": 0.999}, tokens=VIS, after=1), prog,
                           PassContext(calibration=calib))
    rec = res.program.records["TokenPruneDecisions"]
    keep = rec.graphs[0].keep
    trials = dict(rec.trials)
    assert rec.target == (("cosine", 0.999),) and 1 <= keep < 16 and keep in trials
    assert dict(trials[keep])["cosine"] >= 0.999
    if keep - 1 in trials:
        assert dict(trials[keep - 1])["cosine"] < 0.999
    assert len(trials) <= 5                                       # a binary search over 1..16
    with pytest.raises(OptionError, match="give one of option .keep.*; got keep and target"):
        get_pass("token_prune")(keep=2, target={"cosine": 0.99})
    with pytest.raises(PassError, match="option 'target' needs a calibration run"):
        get_pass("token_prune")(target={"cosine": 0.99}, tokens=VIS)(prog, PassContext())
