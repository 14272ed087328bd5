"""layer_skip: the blocks of lowest I(l) (layer_redundancy, computed on demand) replaced by the
identity on their input, against the eager model with those blocks skipped."""
import copy

import numpy as np
import pytest
import torch

import pared
from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.transform import PassContext, PassManager
from pared.registry import get_pass
from pared.testing import tiny_dit, tiny_sampler_loop

STEPS = 8


class _Identity(torch.nn.Module):
    def forward(self, h, c):
        return h


def _eager_skipping(m, blocks):
    m = copy.deepcopy(m)
    for b in blocks:
        m.blocks[int(b.rsplit(".", 1)[1])] = _Identity()
    return m


def _run(prog, x):
    r = prog.runner()
    return tiny_sampler_loop(x, STEPS)(lambda *a: r(list(a))[0])


def _skip(**opts):
    m, (x, t) = tiny_dit()
    prog = capture(m, (x, t))
    out, hist = PassManager([get_pass("layer_skip")(**opts)]).run(prog, PassContext(
        calibration=tiny_sampler_loop(x, STEPS)))
    return m, x, prog, out, hist


def test_skips_the_lowest_blocks_as_the_eager_model_without_them():
    m, x, prog, out, hist = _skip(skip=2)
    assert [h[0] for h in hist] == ["layer_redundancy (for layer_skip)", "layer_skip"]
    prof = hist[0][1]   # the analysis's result carries no program change
    dec = out.records["LayerSkipDecisions"]
    chosen = [b.block for b in dec.blocks]
    assert len(chosen) == 2 and all(b.startswith("blocks.") for b in chosen)
    # the two lowest I(l) of the profile, in that order
    imps = [b.importance for b in dec.blocks]
    assert imps == sorted(imps)
    with torch.no_grad():
        want = tiny_sampler_loop(x, STEPS)(_eager_skipping(m, chosen))
    torch.testing.assert_close(_run(out, x), want, rtol=1e-5, atol=1e-6)
    # structure: no node of a skipped block is left, and the FLOPs fell by two blocks' worth
    regions = out.regions("main")
    assert not [p for p in regions if any(p == b or p.startswith(b + ".") for b in chosen)]
    (g, before, after), = dec.flops
    assert g == "main" and 0.55 < after / before < 0.75


def test_named_layers_and_nothing_to_skip():
    m, x, prog, out, _ = _skip(layers=["blocks.5", "blocks.1"])
    assert sorted(b.block for b in out.records["LayerSkipDecisions"].blocks) == ["blocks.1", "blocks.5"]
    with torch.no_grad():
        want = tiny_sampler_loop(x, STEPS)(_eager_skipping(m, ["blocks.1", "blocks.5"]))
    torch.testing.assert_close(_run(out, x), want, rtol=1e-5, atol=1e-6)
    _, _, prog, out, hist = _skip(skip=0)
    assert out.main is prog.main and out.plan is prog.plan and not hist[-1][1].modified


@pytest.mark.parametrize("order", [["blocks.4", "blocks.2", "blocks.3"], ["blocks.2", "blocks.3", "blocks.4"],
                                   ["blocks.4", "blocks.3", "blocks.2"]])
def test_adjacent_blocks_are_all_skipped_in_any_order(order):
    """Three adjacent blocks, rewired in any order (the pass goes lowest I(l) first): none comes
    back to life by being handed a skipped neighbour's output."""
    from pared.passes.sparsity.layer_skip import _skip as skip_blocks
    m, (x, t) = tiny_dit()
    prog = capture(m, (x, t))
    out = skip_blocks(prog, order, None)
    assert not [p for p in out.regions("main") if p.split(".")[:2] in (["blocks", "2"], ["blocks", "3"],
                                                                       ["blocks", "4"])]
    with torch.no_grad():
        want = tiny_sampler_loop(x, STEPS)(_eager_skipping(m, order))
    torch.testing.assert_close(_run(out, x), want, rtol=1e-5, atol=1e-6)


def test_a_goal_takes_the_most_blocks_that_still_meet_it():
    # measured on the tiny DiT: skipping 1, 2, 3 blocks gives about 57.0, 55.3, 54.1 dB
    m, x, prog, out, _ = _skip(target={"psnr_db": 55.0})
    dec = out.records["LayerSkipDecisions"]
    assert len(dec.blocks) == 2 and dec.target == (("psnr_db", 55.0),)
    assert [k for k, _ in dec.trials] == [1, 2, 3]                  # stopped at the first miss
    assert [dict(v)["psnr_db"] >= 55.0 for _, v in dec.trials] == [True, True, False]
    _, _, _, capped, _ = _skip(target={"psnr_db": 10.0}, max_skip=1)
    assert len(capped.records["LayerSkipDecisions"].blocks) == 1


@pytest.mark.parametrize("opts, msg", [
    ({}, "give exactly one of options 'skip'"),
    ({"skip": 1, "layers": ["blocks.0"]}, "give exactly one of"),
    ({"skip": -1}, "option 'skip' must be in \\[0, inf\\]"),
    ({"skip": 1, "max_skip": 2}, "option 'max_skip' goes with 'target'"),
    ({"target": {"psnr": 30}}, "option 'target': unknown metric 'psnr'; did you mean 'psnr_db'"),
    ({"layers": []}, "option 'layers' takes block paths"),
])
def test_bad_options(opts, msg):
    with pytest.raises(OptionError, match=msg):
        get_pass("layer_skip")(**opts)


def test_bad_options_for_the_model():
    with pytest.raises(PassError, match="option 'skip' asks for 9 blocks; the model has 6"):
        _skip(skip=9)
    with pytest.raises(PassError, match="option 'layers': 'blocks.9' is not a measured block"):
        _skip(layers=["blocks.9"])


def test_composes_with_a_cache_pass_in_either_order():
    """Skipping a block inside interval_cache's span: the `full` variant computes the shorter
    span and stores its residual, `reuse` adds it; the same as caching the skipped model."""
    m, (x, t) = tiny_dit()
    prog = capture(m, (x, t))
    cal = lambda: PassContext(calibration=tiny_sampler_loop(x, STEPS))       # noqa: E731
    cache = get_pass("interval_cache")(interval=3, steps=STEPS)
    skip = get_pass("layer_skip")(layers=["blocks.3"])
    after, _ = PassManager([cache, skip]).run(prog, cal())
    before, _ = PassManager([skip, cache]).run(prog, cal())
    assert set(after.graphs) == set(before.graphs) == {"main.full", "main.reuse"}
    for p in (after, before):
        assert not [r for g in p.graphs for r in p.regions(g) if r.startswith("blocks.3")]
    got_after, got_before = _run(after, x), _run(before, x)
    torch.testing.assert_close(got_after, got_before, rtol=1e-5, atol=1e-6)
    # the composition really reuses (a run of `full` only would make the two orders equal trivially)
    r = before.runner()
    tiny_sampler_loop(x, STEPS)(lambda *a: r(list(a))[0])
    assert "reuse" in r.trace


def test_lowers_and_runs_torch_free_as_the_fx_program(tmp_path):
    m, (x, t) = tiny_dit()
    opt = pared.optimize(m, (x, t), pipeline=[{"layer_skip": {"skip": 2}}],
                         calibration=tiny_sampler_loop(x, STEPS), bench_repeats=0, allow_fidelity_loss=True)
    ex = pared.load(opt.save(str(tmp_path / "a")))
    got = ex(x.numpy(), t.numpy())
    want = opt.program.graphs["main"].run(x, t)
    want = want[0] if isinstance(want, (tuple, list)) else want
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-4, atol=1e-5)
    assert opt.report["fidelity"]["judged_on"]


class _Leaky(torch.nn.Module):
    """A block that also hands its branch value out (read after the stack)."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, h):
        a = self.lin(h)
        return h + a, a


class _LeakyStack(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([_Leaky() for _ in range(3)])

    def forward(self, h):
        h, first = self.blocks[0](h)
        h, _ = self.blocks[1](h)
        h, _ = self.blocks[2](h)
        return h + first


def test_a_block_whose_other_value_is_read_outside_is_refused_naming_it():
    torch.manual_seed(0)
    m, h = _LeakyStack().eval(), torch.randn(2, 4, 8)
    prog = capture(m, (h,))
    with pytest.raises(PassError, match="block 'blocks.0' of graph 'main' also hands .* outside it"):
        PassManager([get_pass("layer_skip")(layers=["blocks.0"])]).run(prog, PassContext(calibration=[(h,)]))
