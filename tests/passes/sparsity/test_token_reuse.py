"""token_reuse (VLA-Cache): over a request of calls whose frames change patch by patch, the
program computes what pared.testing.ReuseTokensRef computes eagerly (the same level per call,
the same outputs); a frame equal to the previous one reuses tokens and returns the cold call's
outputs; the first call of a request is cold; relevant tokens are never reused; the variant's
blocks run on fewer rows while their attention keeps every key; bad options and unfit graphs are
refused naming the option; a second run finds nothing; it lowers to ONNX Runtime and runs
torch-free with the state carried across calls."""
import functools

import numpy as np
import pytest
import torch

from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.testing import ReuseTokensRef, check_idempotent, run_pass_checked, tiny_vla, tiny_vla_inputs

SITE = {"tokens": [4, 20], "patch": 2, "input": "image"}       # TinyVLA: 16 visual tokens, 2x2 patches of 8x8


@functools.cache
def _tiny(batch=3):
    m, inputs = tiny_vla(batch=batch)
    return m, inputs, capture(m, inputs)


def _reuse(program, ctx=None, **opts):
    return run_pass_checked(get_pass("token_reuse")(**{**SITE, **opts}), program, ctx or PassContext())


def _frames(batch: int, calls: int, seed: int = 3):
    """A request: one frame, then each call changes 1..3 patches (by different amounts, so no two
    patches tie on similarity) and nudges the state."""
    img, ids, st = tiny_vla_inputs(batch, seed)
    g = torch.Generator().manual_seed(seed)
    out = [(img, ids, st)]
    for c in range(1, calls):
        img = img.clone()
        for _ in range(1 + c % 3):
            i, j = (int(v) for v in torch.randint(0, 4, (2,), generator=g))
            img[:, :, 2 * i:2 * i + 2, 2 * j:2 * j + 2] += 0.3 * torch.rand(batch, 1, 2, 2, generator=g)
        out.append((img, ids, st + 0.05 * c))
    return out


@pytest.mark.parametrize("opts, alphas", [
    ({"levels": [4, 8], "relevant": 4, "layers": "uniform"}, (1, 1, 1, 1)),
    ({"levels": [4, 8], "relevant": 4, "layers": [0.5, 0.5, 1, 1]}, (0.5, 0.5, 1, 1)),
    ({"levels": [2, 6, 10], "relevant": 2, "layers": [0, 0.5, 0.5, 1], "threshold": 0.9}, (0, 0.5, 0.5, 1)),
    ({"levels": [3], "relevant": 0, "layers": "uniform"}, (1, 1, 1, 1)),
    ({"levels": [4, 8], "relevant": 4, "layers": "uniform", "relevance_blocks": 1}, (1, 1, 1, 1)),
])
def test_matches_the_eager_emulation_call_by_call(opts, alphas):
    m, _, prog = _tiny()
    res = _reuse(prog, **opts)
    ref = ReuseTokensRef(m, levels=opts["levels"], relevant=opts["relevant"], alphas=alphas,
                         threshold=opts.get("threshold", 0.996), relevance_blocks=opts.get("relevance_blocks"))
    runner = res.program.runner()
    chosen = []
    for x in _frames(3, 7):
        with torch.no_grad():
            got = runner(list(x))[0]
        want = ref(*x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        chosen.append(runner.trace[-1])
    assert chosen[0] == "cold" and ref.chosen[0] == "cold"
    labels = [c.split("/")[-1] for c in chosen[1:]]
    assert labels == ["full" if c == "full" else f"r{c}" for c in ref.chosen[1:]]
    assert any(lab.startswith("r") for lab in labels), labels      # some calls reuse tokens


@functools.cache
def _tiny_vision():
    m, inputs = tiny_vla(batch=2, vision_layers=2)
    return m, inputs, capture(m, inputs)


def test_vision_blocks_reuse_as_the_first_block_and_match_the_eager_emulation():
    """A ViT of 2 blocks over the 16 patch tokens before the backbone: with `vision_blocks` they
    run on the backbone's first block's rows (their keys / values reused alike), the rows put back
    in place; every call equals the eager emulation."""
    m, _, prog = _tiny_vision()
    res = _reuse(prog, levels=[4, 8], relevant=4, layers=[0.5, 0.5, 1, 1], blocks="blocks.*",
                 vision_blocks="vision.*")
    p = res.program
    rec = p.records["TokenReuseDecisions@main"]
    assert rec.vision_blocks == ("vision.0", "vision.1") and rec.levels[1].per_block == (4, 4, 4, 4, 8, 8)
    sm = [tuple(n.meta["val"].shape) for n in p.graphs["main.r8"].module.graph.nodes
          if n.op == "call_function" and "softmax" in str(n.target)]
    assert sm[:2] == [(2, 4, 12, 16), (2, 4, 12, 16)]          # 16 - 4 patch rows, every patch a key
    ref = ReuseTokensRef(m, levels=[4, 8], relevant=4, alphas=(0.5, 0.5, 1, 1))
    runner = p.runner()
    for x in _frames(2, 6):
        with torch.no_grad():
            got = runner(list(x))[0]
        torch.testing.assert_close(got, ref(*x), rtol=1e-5, atol=1e-5)
    assert any(t.startswith("warm/r") for t in runner.trace) and runner.trace[0] == "cold"
    with pytest.raises(OptionError, match="must all run before the backbone"):
        get_pass("token_reuse")(**SITE, layers="uniform", blocks="blocks.*",
                                vision_blocks="blocks.0")(prog, PassContext())


def test_an_unchanged_frame_reuses_tokens_and_returns_the_cold_outputs():
    m, x, prog = _tiny()
    res = _reuse(prog, levels=[4, 8, 12], relevant=4, layers="uniform")
    runner = res.program.runner()
    with torch.no_grad():
        cold = runner(list(x))[0]
        warm = runner(list(x))[0]
        eager = m(*x)
    assert runner.trace == ["cold", "warm/r12"]
    torch.testing.assert_close(cold, eager, rtol=0, atol=0)
    torch.testing.assert_close(warm, cold, rtol=1e-6, atol=1e-6)
    runner.reset()
    with torch.no_grad():
        runner(list(x))
    assert runner.trace == ["cold"]                 # a new request starts cold


def test_structure_fewer_rows_every_key_and_the_plan():
    _, _, prog = _tiny(batch=1)
    res = _reuse(prog, levels=[4, 8], relevant=4, layers=[0.5, 0.5, 1, 1])
    p = res.program
    assert set(p.graphs) == {"main.cold", "main.probe", "main.r4", "main.r8"}
    rec = p.records["TokenReuseDecisions@main"]
    assert [lv.per_block for lv in rec.levels] == [(2, 2, 4, 4), (4, 4, 8, 8)]
    sm = [tuple(n.meta["val"].shape) for n in p.graphs["main.r8"].module.graph.nodes
          if n.op == "call_function" and "softmax" in str(n.target)]
    # 22 tokens: 4 text + 16 visual + state + readout; rows 22 - reuse, keys all 22
    assert sm == [(1, 4, 18, 22), (1, 4, 18, 22), (1, 4, 14, 22), (1, 4, 14, 22)]
    assert rec.levels[1].flops < rec.levels[0].flops < rec.cold_flops
    g = p.graphs["main.r8"]
    assert not [n for n in g.module.graph.nodes if "scatter" in str(n.target)]
    # per block its keys, values and where each token's key sits; no scatter: Gathers and Concats
    assert len(g.input_names) == 3 + 2 + 12 and len(g.output_names) == 1 + 2 + 12
    state = {s.name for s in p.plan.state}
    assert state == {f"token_reuse.main.{s}" for s in ["patches", "relevance", *(f"{x}{i}" for x in "kvp"
                                                                                   for i in range(4))]}
    text = str(p.plan.body)
    assert "Table(cases=('cold',), default='warm')" in text and "Bins(input='token_reuse.main.reusable'" in text


def test_relevant_tokens_are_never_reused():
    """With every patch equal, the reused tokens are the least relevant ones: the `relevant` of
    highest previous relevance stay among the recomputed rows at every block."""
    _, x, prog = _tiny(batch=1)
    res = _reuse(prog, levels=[12], relevant=4, layers="uniform")
    runner = res.program.runner()
    with torch.no_grad():
        runner(list(x))
    rel = runner.state["token_reuse.main.relevance"][0]
    top = set(torch.argsort(rel, descending=True)[:4].tolist())
    # the rows the warm variant computes at its first block: prefix, 4 visual, suffix
    g = res.program.graphs["main.r12"]
    ins = list(x) + [runner.state[f"token_reuse.main.{s}"] for s in
                     ["patches", "relevance", *(f"{x}{i}" for x in "kvp" for i in range(4))]]
    gathered = [n for n in g.module.graph.nodes if n.op == "call_function" and "gather" in str(n.target)
                and tuple(n.meta["val"].shape) == (1, 10, 32)]          # the stream's rows at the first block
    index_node = gathered[0].args[2]
    from torch.fx import Interpreter
    seen = {}

    class Tap(Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n is index_node:
                seen["index"] = out
            return out
    with torch.no_grad():
        Tap(g.module).run(*ins)
    rows = seen["index"][0, :, 0].tolist()
    assert len(rows) == 22 - 12
    assert {r - 4 for r in rows if 4 <= r < 20} == top


@pytest.mark.parametrize("opts, error, message", [
    ({"tokens": None}, OptionError, "option 'tokens' is required"),
    ({"patch": None}, OptionError, "option 'patch' is required"),
    ({"patch": 4}, OptionError, "in 4-pixel patches does not give the 16 visual tokens"),
    ({"input": "picture", "graphs": ["main"]}, OptionError, "option 'input': 'picture' is not an input"),
    ({"relevant": 16}, OptionError, "option 'relevant' must be a share in \\[0, 1\\] or a count below"),
    ({"levels": [8, 4]}, OptionError, "option 'levels' must be ascending distinct"),
    ({"levels": [14], "relevant": 4}, OptionError, "at most 12 visual tokens can be reused"),
    ({"layers": [1, 0.5, 1, 1]}, OptionError, "must be in \\[0, 1\\] and not fall with depth"),
    ({"layers": [0.5, 1]}, OptionError, "gives 2 shares but graph 'main' has 4 blocks"),
    ({"layers": "deep"}, OptionError, "option 'layers' must be one of"),
    ({"layers": 5}, OptionError, "option 'layers' must be one of .* or a list of per-block shares, got 5"),
    ({"blocks": "nothing.*", "graphs": ["main"]}, OptionError, "option 'blocks': 'nothing.\\*' matches none"),
    ({"tokens": [4, 22]}, OptionError, "does not give the 18 visual tokens"),
    ({"tokens": [0, 16], "queries": [0, 4]}, OptionError, "overlap the visual tokens"),
    ({"layers": "entropy"}, PassError, "measures each block's attention on the calibration run"),
])
def test_bad_options(opts, error, message):
    _, _, prog = _tiny()
    with pytest.raises(error, match=message):
        get_pass("token_reuse")(**{**SITE, "layers": "uniform", **opts})(prog, PassContext())


def test_reading_a_visual_token_after_the_blocks_is_refused():
    """A model whose output reads visual token 5 cannot have it reused."""
    m, x = tiny_vla(batch=1)

    class ReadsVisual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.m = m

        def forward(self, image, ids, state):
            b = image.shape[0]
            vis = self.m.patch(image).flatten(2).transpose(1, 2)
            h = torch.cat([self.m.embed(ids), vis, self.m.state(state)[:, None],
                           self.m.readout.expand(b, -1, -1)], dim=1) + self.m.pos
            bias = torch.cat([(ids == 0).to(h.dtype) * -1e9, torch.zeros(b, 18)], dim=1)[:, None, None, :]
            for blk in self.m.blocks:
                h, _ = blk(h, bias)
            return self.m.head(self.m.norm(h[:, 5]))
    prog = capture(ReadsVisual().eval(), x)
    with pytest.raises(OptionError, match="reads token 5 after the blocks .* inside the visual tokens \\[4, 20\\) which a warm"):
        get_pass("token_reuse")(**SITE, layers="uniform", levels=[4])(prog, PassContext())


def test_entropy_shares_come_from_the_calibration_run_and_a_second_run_finds_nothing():
    _, _, prog = _tiny()
    calib = [tiny_vla_inputs(3, seed=s) for s in range(20, 24)]
    res = _reuse(prog, PassContext(calibration=calib), levels=[4, 8])
    rec = res.program.records["TokenReuseDecisions@main"]
    assert len(rec.concentration) == 4 and all(0 < c < 1 for c in rec.concentration)
    top = max(rec.concentration)
    run = 0.0
    for a, c in zip(rec.alphas, rec.concentration):
        run = max(run, c / top)
        assert a == pytest.approx(run)
    assert rec.alphas[-1] == pytest.approx(1.0)
    check_idempotent(get_pass("token_reuse")(**SITE, levels=[4, 8]), res.program, PassContext(calibration=calib))


@pytest.mark.heavy     # lowers and runs an artifact: `make test-heavy` (CI runs it after `make test`)
def test_lowers_on_ort_and_runs_torch_free_across_calls(tmp_path):
    """The artifact, loaded without torch, runs a request of changing frames with the same levels
    and outputs as the torch program."""
    from pared.ir.target import get_target
    from pared.testing import run_torch_free, save_program
    _, _, prog = _tiny()
    res = _reuse(prog, levels=[4, 8], relevant=4, layers=[0.5, 0.5, 1, 1])
    path = save_program(res.program, str(tmp_path / "a"), get_target("cpu").to_json())
    frames = _frames(3, 6)
    for c, x in enumerate(frames):
        for i, v in enumerate(x):
            np.save(tmp_path / f"x{c}_{i}.npy", v.numpy())
    out = run_torch_free(f"""
        import numpy as np, pared
        ex = pared.load({path!r})
        for c in range({len(frames)}):
            x = [np.load({str(tmp_path)!r} + f"/x{{c}}_{{i}}.npy") for i in range(3)]
            np.save({str(tmp_path)!r} + f"/y{{c}}.npy", ex.run_flat(*x)[0])
        print("TRACE", ex.trace)
    """)
    runner = res.program.runner()
    for c, x in enumerate(frames):
        with torch.no_grad():
            want = runner(list(x))[0].numpy()
        got = np.load(tmp_path / f"y{c}.npy")
        assert np.abs(got - want).max() < 1e-4 * np.abs(want).max(), c
    assert f"TRACE {runner.trace}" in out
    assert any(t.endswith(("r4", "r8")) for t in runner.trace)


def test_then_dynamic_precision_one_width_and_one_level_per_call_and_reuse_stays_exact():
    """token_reuse, then dynamic_precision over every variant (cold, probe, levels): each call runs
    one reuse level at one width (the selects of a call agree), the levels share one set of int8
    weights, and an unchanged frame still returns the cold call's outputs at that width."""
    _, x, prog = _tiny(batch=1)
    res = _reuse(prog, levels=[4, 8], relevant=4, layers="uniform")
    calib = [tiny_vla_inputs(1, seed=s) for s in range(40, 52)]
    both = get_pass("dynamic_precision")(position=[0, 1, 2], bits=[8, 4], dwell=1)(
        res.program, PassContext(calibration=calib)).program
    assert {"main.cold.a8", "main.r8.a4", "main.probe"} <= set(both.graphs)
    int8 = {n: {str(t.data_ptr()) for t in g.module.buffers() if t.dtype == torch.int8}
            for n, g in both.graphs.items() if n.startswith(("main.cold", "main.r"))}
    assert len({frozenset(v) for v in int8.values()}) == 1 and next(iter(int8.values()))   # one weight set
    runner = both.runner()
    with torch.no_grad():
        cold = runner(list(x))[0]
        warm = runner(list(x))[0]
    level, width = runner.trace[1].split("/")[1], runner.trace[1].split("/")[2]
    assert runner.trace[0].startswith("cold/") and level == "r8" and width == runner.trace[0].split("/")[1]
    torch.testing.assert_close(warm, cold, rtol=1e-5, atol=1e-5)


def test_pared_bench_reports_the_share_of_calls_per_level():
    """workloads.bench.reuse_summary reads the reuse level out of each call's labels (beside other
    passes' labels), as pared bench reports it; None for a program without token_reuse."""
    from pared.workloads.bench import reuse_summary
    _, _, prog = _tiny()
    res = _reuse(prog, levels=[4, 8], relevant=4, layers="uniform")
    got = reuse_summary(res.program, ["cold/a8", "warm/r8/a4", "warm/full/a8", "warm/r4/a8"])
    assert got["level_shares"] == {"cold": 0.25, "full": 0.25, "r4": 0.25, "r8": 0.25}
    assert got["mean_reused"] == pytest.approx((8 + 4) / 4) and got["calls"] == 4
    assert reuse_summary(prog, ["main"]) is None
