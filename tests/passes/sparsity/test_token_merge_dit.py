"""token_merge in ToMe-SD mode (merge -> branch -> unmerge), for models whose tokens leave the
blocks dense (a DiT): the rewritten graph computes what the eager model patched with tomesd's own
merge/unmerge computes (pared.testing.tomesd_matching: argsort, scatter_reduce, scatter_), on
TinyDiT (attention=True) and on the shipped dit_mnist DiT; every block keeps N tokens while its
merged branch runs on N - r; nothing scatters; it lowers to ONNX Runtime and TVM and runs
torch-free; bad options name the pass and the option; it runs inside every variant taylor_cache
made (and before it), matching an eager emulation of cache + ToMe-SD over a sampler loop."""
import functools
import json
import os

import numpy as np
import pytest
import torch

from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.patterns import find_sites
from pared.ir.regions import node_module_path
from pared.ir.transform import PassContext, PassManager
from pared.passes.cache.taylor_cache import taylor_table
from pared.passes.sparsity.token_merge import GraphUnmerge, grid_partition
from pared.registry import get_pass
from pared.testing import (ToMeSDState, assert_close_to_eager, check_idempotent, check_noop, eager_taylor_loop,
                           run_pass_checked, tiny_dit, tiny_sampler_loop, tiny_transformer, tomesd_dit)

STEPS = 9


def _merge(program, **opts):
    return run_pass_checked(get_pass("token_merge")(**opts), program, PassContext())


def _rel(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@functools.cache
def _tiny():
    m, inputs = tiny_dit(attention=True)
    return m, inputs, capture(m, inputs)


@functools.cache
def _dit():
    from pared.workloads import get_workload
    wl = get_workload("dit_mnist")
    m = wl.build()
    ex = wl.example_inputs()
    return wl, m, ex, capture(m, ex)


def _held_out(seed=7):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 16, 4, generator=g), torch.full((2,), 500.0)


# -- the partition ----------------------------------------------------------------------------
def test_grid_partition_is_tomesds():
    dst, src = grid_partition((4, 4), (2, 2), None)
    assert dst == [0, 2, 8, 10] and len(src) == 12 and sorted(dst + src) == list(range(16))
    assert grid_partition((1, 8), (2, 2), None)[0] == [0, 2, 4, 6]          # stride clipped to one row
    assert grid_partition((5, 5), (2, 2), None)[0] == [0, 2, 10, 12]        # the ragged edge only sources
    dst, _ = grid_partition((8, 8), (2, 2), 3)
    assert len(dst) == 16 and all(((d // 8) // 2, (d % 8) // 2) == (i // 4, i % 4) for i, d in
                                  enumerate(sorted(dst, key=lambda d: ((d // 8) // 2, (d % 8) // 2))))


# -- numerics against the eager emulation ------------------------------------------------------
@pytest.mark.parametrize("opts, state", [
    ({"r": 4}, {"r": 4}),
    ({"r": 12}, {"r": 12}),                                           # every source merged
    ({"r": 20}, {"r": 12}),                                           # capped at the 12 sources
    ({"r": 6, "branches": ["attn", "mlp"]}, {"r": 6, "branches": ("attn", "mlp")}),
    ({"r": 5, "branches": "mlp"}, {"r": 5, "branches": ("mlp",)}),
    ({"r": 3, "seed": 3}, {"r": 3, "seed": 3}),                       # random destinations, drawn once
    ({"ratio": 0.25}, {"r": 4}),                                      # int(0.25 * 16)
    ({"r": [2, 5], "layers": [0, -1]}, {"r": [2, 0, 0, 0, 0, 5]}),
    ({"r": 4, "grid": [2, 8], "stride": [1, 4]}, {"r": 4, "grid": (2, 8), "stride": (1, 4)}),
])
def test_tiny_dit_matches_eager_tomesd(opts, state):
    m, _, prog = _tiny()
    res = _merge(prog, **opts)
    assert res.modified
    x, t = _held_out()
    st = dict(state)
    st.setdefault("grid", (4, 4))
    with torch.no_grad():
        ref = m(x, t, tome=ToMeSDState(st.pop("r"), 6, **st))
        got = res.program(x, t)
        base = m(x, t)
    assert_close_to_eager(ref, got, rel_l2=1e-5, what="token_merge (ToMe-SD) vs eager tomesd")   # measured 1e-7
    assert _rel(base, ref) > 1e-3                                    # the merge changes something


@pytest.mark.parametrize("r, branches", [(16, ("attn",)), (32, ("attn",)), (16, ("attn", "mlp"))])
def test_dit_mnist_matches_eager_tomesd(r, branches):
    """The shipped diffusers DiT against the same model patched with ToMe-SD as tomesd patches
    diffusers (tomesd_dit): the graph is dense (the unpatchify reads the tokens whole), so the pass
    picks ToMe-SD by itself."""
    wl, m, ex, prog = _dit()
    res = _merge(prog, r=r, branches=list(branches))
    with torch.no_grad():
        ref, got = tomesd_dit(m, r, branches=branches)(*ex), res.program(*ex)
    assert_close_to_eager(ref, got, rel_l2=1e-5, what="token_merge (ToMe-SD) vs eager tomesd")   # measured 2e-7
    g = res.program.records["TokenMergeDecisions"].graphs[0]
    assert isinstance(g, GraphUnmerge) and g.grid == (8, 8) and g.dst_tokens == 16
    assert [(b.tokens_in, b.tokens_out, b.branch_tokens, b.branches) for b in g.blocks] == \
        [(64, 64, 64 - r, branches)] * 8


# -- structure ------------------------------------------------------------------------------
def test_structure_blocks_keep_n_tokens_and_branches_run_on_n_minus_r():
    m, (x, t), prog = _tiny()
    res = _merge(prog, r=6, branches=["attn", "mlp"])
    gm = res.program.main.module
    by = {n.name: n for n in gm.graph.nodes}
    rows = {s.region: s for s in find_sites(gm)}
    batch, n, r = 2, 16, 6
    for i in range(6):
        for lin in ("qkv", "proj", "mlp.0", "mlp.2"):
            assert by[rows[f"blocks.{i}.{lin}"].x].meta["val"].shape[0] == batch * (n - r), (i, lin)
        assert by[rows[f"blocks.{i}.ada"].x].meta["val"].shape[0] == batch     # the conditioning: no tokens
    for i in range(6):                                 # what leaves each block keeps all n tokens
        inside = {nd for nd in gm.graph.nodes if nd.op == "call_function" and
                  any(p == f"blocks.{i}" for p, _ in node_module_path(nd))}
        leaving = [nd for nd in inside if any(u not in inside and u.meta.get("pared.ir.created_by") != "token_merge"
                                              for u in nd.users)
                   and isinstance(nd.meta.get("val"), torch.Tensor) and nd.meta["val"].dim() == 3]
        assert leaving and all(tuple(nd.meta["val"].shape) == (batch, n, 32) for nd in leaving), i
    softmax = [nd for nd in gm.graph.nodes if nd.target is torch.ops.aten._softmax.default]
    assert [tuple(s.meta["val"].shape[-2:]) for s in softmax] == [(n - r, n - r)] * 6
    targets = {str(nd.target) for nd in gm.graph.nodes if nd.op == "call_function"}
    assert not any("scatter" in t or "index_put" in t for t in targets), sorted(targets)
    assert {"aten.topk.default", "aten.gather.default", "aten.index_select.default"} <= targets
    rec = res.program.records["TokenMergeDecisions"]
    assert rec.method.startswith("ToMe-SD") and not rec.proportional_attention
    g = rec.graphs[0]
    assert (g.tokens_in, g.tokens_out, g.grid, g.stride, g.dst_tokens) == (16, 16, (4, 4), (2, 2), 4)
    assert all(b.flops_after < b.flops_before for b in g.blocks)
    assert g.flops_after < 0.8 * g.flops_before
    assert res.stats["tokens_out"] == 16 and res.stats["merged_blocks"] == 6
    json.dumps(rec.to_json())


def test_r0_is_a_noop_and_a_second_run_finds_nothing():
    m, _, prog = _tiny()
    check_noop(get_pass("token_merge")(r=0), prog, PassContext())
    check_noop(get_pass("token_merge")(ratio=0.01), prog, PassContext())      # int(0.01 * 16) = 0
    res = _merge(prog, r=4)
    check_idempotent(get_pass("token_merge")(r=4), res.program, PassContext())


def test_a_token_output_picks_tome_sd_and_unmerge_false_refuses_it():
    m, inputs = tiny_transformer()
    prog = capture(m, inputs)
    res = _merge(prog, r=4)
    assert isinstance(res.program.records["TokenMergeDecisions"].graphs[0], GraphUnmerge)
    with pytest.raises(PassError, match="output 'tokens' .* carries the token axis.*option 'unmerge'"):
        get_pass("token_merge")(r=2, unmerge=False)(prog, PassContext())


# -- options and refusals ---------------------------------------------------------------------
@pytest.mark.parametrize("opts, message", [
    ({"r": 2, "branches": ["attn", "ffn"]}, "option 'branches' must name some of \\['attn', 'mlp'\\]"),
    ({"r": 2, "branches": []}, "option 'branches' must name some of"),
    ({"r": 2, "stride": [2, 0]}, "option 'stride' must be one or two positive ints"),
    ({"r": 2, "grid": [4]}, "option 'grid' must be two positive ints"),
    ({"r": 2, "seed": -1}, "option 'seed' must be in \\[0, inf\\]"),
    ({"r": 2, "unmerge": True, "protect": 1}, "option 'protect' must be 0 with unmerge: true"),
    ({"r": 2, "unmerge": "yes"}, "option 'unmerge' expects"),
    ({"r": 2, "strides": 2}, "unknown option 'strides'; did you mean 'stride'"),
])
def test_bad_options(opts, message):
    with pytest.raises(OptionError, match=f"pass 'token_merge': .*{message}"):
        get_pass("token_merge")(**opts)


@pytest.mark.parametrize("opts, error, message", [
    ({"r": 2, "grid": [3, 5]}, OptionError, "option 'grid': \\[3, 5\\] is 15 tokens, graph 'main' has 16"),
    ({"r": [1, 2]}, OptionError, "option 'r' lists 2 values for the 6 selected blocks"),
    ({"r": 2, "layers": [7]}, OptionError, "option 'layers': block 7 is outside the model's 6 blocks"),
])
def test_bad_options_for_the_model(opts, error, message):
    m, _, prog = _tiny()
    with pytest.raises(error, match=f"pass 'token_merge': {message}"):
        get_pass("token_merge")(**opts)(prog, PassContext())


def test_unmerge_true_refuses_a_vit_with_a_class_token():
    from pared.testing import tiny_vit
    m, inputs = tiny_vit()
    with pytest.raises(PassError, match="ToMe-SD .* the first 1 token\\(s\\) are protected \\(detected"):
        get_pass("token_merge")(r=2, unmerge=True)(capture(m, inputs), PassContext())


# -- composition with caching ------------------------------------------------------------------
@pytest.mark.parametrize("order", ["cache_then_merge", "merge_then_cache"])
def test_composes_with_taylor_cache(order):
    """taylor_cache (blocks 1..4 forecast between full steps) and ToMe-SD r=4 in either order:
    every variant (full0, full, forecast: blocks 0 and 5 still run there) holds the merge and the
    unmerge, the variants share their weights, and the sampler loop computes the eager emulation
    of cache + ToMe-SD (eager_taylor_loop with tome=ToMeSDState)."""
    m, (x, t), prog = _tiny()
    cache, merge = get_pass("taylor_cache")(steps=STEPS, interval=3), get_pass("token_merge")(r=4)
    passes = [cache, merge] if order == "cache_then_merge" else [merge, cache]
    out, hist = PassManager(passes).run(prog, PassContext())
    assert set(out.graphs) == {"main.full0", "main.full", "main.forecast"}
    rec = out.records["TokenMergeDecisions"]
    merged = {g.graph: [b.block for b in g.blocks if b.r] for g in rec.graphs}
    if order == "cache_then_merge":
        assert merged == {"main.full0": [f"blocks.{i}" for i in range(6)],
                          "main.full": [f"blocks.{i}" for i in range(6)],
                          "main.forecast": ["blocks.0", "blocks.5"]}
    for name, g in out.graphs.items():
        made = [n for n in g.module.graph.nodes if n.meta.get("pared.ir.created_by") == "token_merge"]
        gathers = [n for n in made if n.target is torch.ops.aten.gather.default]
        assert len(gathers) >= (2 if name.endswith("forecast") else 6) * 2, name    # merge + unmerge per block
    assert out.weight_groups() == [["main.full0", "main.full", "main.forecast"]]
    table, coefs = taylor_table(STEPS, 3, 2)
    runner = out.runner()
    got = tiny_sampler_loop(x, STEPS)(lambda *a: runner(list(a))[0])
    assert runner.trace == list(table)
    want = eager_taylor_loop(m, x, table, coefs, tome=ToMeSDState(4, 6, (4, 4)))
    plain = eager_taylor_loop(m, x, table, coefs)
    assert_close_to_eager(want, got, rel_l2=1e-5, what="taylor_cache + ToMe-SD vs eager")     # measured 1e-7
    assert _rel(plain, want) > 1e-4


# -- lowering ---------------------------------------------------------------------------------
@pytest.mark.heavy     # lowers and runs artifacts: `make test-heavy` (CI runs it after `make test`)
def test_lowers_on_ort_and_tvm_and_runs_torch_free(tmp_path):
    """ToMe-SD r=6 on attention and MLP: the ONNX file has no scatter, both artifacts carry the
    record, and loaded without torch they compute what the rewritten torch graph computes."""
    import onnx

    from pared.ir.target import get_target
    from pared.testing import run_torch_free, save_program
    m, (x, t), prog = _tiny()
    res = _merge(prog, r=6, branches=["attn", "mlp"])
    paths = {tg: save_program(res.program, str(tmp_path / tg), get_target(tg).to_json()) for tg in ("cpu", "tvm-cpu")}
    ops = {n.op_type for f in os.listdir(paths["cpu"]) if f.endswith(".onnx")
           for n in onnx.load(os.path.join(paths["cpu"], f), load_external_data=False).graph.node}
    assert not {o for o in ops if "Scatter" in o} and {"TopK", "GatherElements", "Gather", "MatMul"} <= ops, \
        sorted(ops)
    for path in paths.values():
        with open(os.path.join(path, "manifest.json")) as f:
            g = json.load(f)["records"]["TokenMergeDecisions"]["graphs"][0]
        assert [b["branch_tokens"] for b in g["blocks"]] == [10] * 6 and g["tokens_out"] == 16
    xs, ts = _held_out(11)
    np.save(tmp_path / "x.npy", xs.numpy())
    np.save(tmp_path / "t.npy", ts.numpy())
    run_torch_free(f"""
        import numpy as np, pared
        x, t = np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 't.npy')!r})
        for tg, p in {paths!r}.items():
            np.save({str(tmp_path)!r} + f"/y_{{tg}}.npy", pared.load(p).run_flat(x, t)[0])
    """)
    with torch.no_grad():
        want = res.program(xs, ts).numpy()
    for tg in paths:
        assert _rel(np.load(tmp_path / f"y_{tg}.npy"), want) < 1e-4, tg          # measured ~1e-7


def test_pipeline_file_builds():
    from pared.pipeline import build_passes, load_pipeline
    from pared.workloads import EXAMPLES
    passes = build_passes(load_pipeline(os.path.join(EXAMPLES, "pipelines", "dit_cache_tome.yaml")))
    assert [p.name for p in passes] == ["temporal_redundancy", "taylor_cache", "token_merge"]
    tm = passes[-1].options
    assert tm.r is not None and tm.unmerge is None and tm.branches


#: PSNR of the calibration request's samples (one DDIM-50 batch of 10, CFG 1.5) against the
#: uncached, unmerged model's, measured on this machine: taylor_cache alone 35.77 dB; with ToMe-SD on
#: the attention r=4 33.53 dB, r=8 29.66, r=16 25.35 (dit_cache_tome.yaml's r is 4)
CALIBRATION_PSNR = {4: 33.0, 8: 29.0}


@pytest.mark.heavy
def test_dit_mnist_cache_plus_tome_sd_fidelity_on_the_calibration_request():
    from pared.ir.target import get_target
    from pared.workloads import psnr_db
    wl, m, ex, prog = _dit()
    calib = wl.calibration()
    ctx = PassContext(calibration=calib, target=get_target("cpu"))
    cached, _ = PassManager([get_pass("temporal_redundancy")(),
                             get_pass("taylor_cache")(interval=4, first=0, last=-1)]).run(prog, ctx)

    def run(p):
        runner = p.runner()
        return calib(lambda *a: runner(list(a))[0])
    with torch.no_grad():
        ref = calib(lambda *a: m(*a))
        for r, bound in CALIBRATION_PSNR.items():
            out, _ = PassManager([get_pass("token_merge")(r=r)]).run(cached, PassContext())
            assert [g.graph for g in out.records["TokenMergeDecisions"].graphs] == ["main.full0", "main.full"]
            assert psnr_db(wl.to_pixels(ref), wl.to_pixels(run(out))) >= bound, r


def test_a_read_from_the_end_picks_tomesd():
    """A model that reads its last token after the blocks (a readout, x[:, -1]) cannot let ToMe
    move tokens, so token_merge picks ToMe-SD, which keeps every token in place."""
    from pared.testing import TinyViT

    class ReadLast(TinyViT):
        def forward(self, x):
            t = self.patch(x).flatten(2).transpose(1, 2)
            t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
            for blk in self.blocks:
                t = blk(t)
            return self.head(self.norm(t)[:, -1])
    torch.manual_seed(0)
    m = ReadLast(image=8, patch=1).eval()           # 64 patches + [CLS]
    x = torch.randn(2, 1, 8, 8)
    res = get_pass("token_merge")(r=4, protect=0, grid=(1, 65), stride=(1, 2))(capture(m, (x,)), PassContext())
    (g,) = res.program.records["TokenMergeDecisions"].graphs
    assert isinstance(g, GraphUnmerge) and g.tokens_out == g.tokens_in == 65
