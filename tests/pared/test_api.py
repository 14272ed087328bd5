"""optimize(): capture -> passes -> lower -> check; the report; never mutating the model."""
import json
import os
from dataclasses import dataclass

import numpy as np
import pytest
import torch

import pared
from pared.ir.errors import FidelityError, PassError
from pared.ir.transform import PassResult, RewritePass, register_pass
from pared.testing import assert_close_to_eager, assert_unchanged, state_snapshot, tiny_transformer


@register_pass("_api_perturb")
class _Perturb(RewritePass):
    """A deliberately lossy test rewrite: adds `eps` to every graph output."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        eps: float = 1.0  # added to each output

    def __call__(self, program, ctx):
        g = program.main
        gm = g.copy_module()
        out = next(n for n in gm.graph.nodes if n.op == "output")
        new = []
        with gm.graph.inserting_before(out):
            for v in out.args[0]:
                new.append(gm.graph.call_function(torch.ops.aten.add.Scalar, (v, self.options.eps)))
        out.args = (tuple(new),)
        gm.recompile()
        return PassResult(program.with_graph("main", g.with_module(gm)), modified=True)


@pytest.fixture(scope="module")
def optimized():
    m, inputs = tiny_transformer()
    calib = [(torch.randint(0, 50, (2, 16)),) for _ in range(2)]
    return m, inputs, pared.optimize(m, inputs, pipeline=["constant_folding", {"dead_code_elimination": {}}],
                                     calibration=calib, bench_repeats=3)


def test_report_has_fidelity_and_speed(optimized):
    m, inputs, opt = optimized
    f = opt.report["fidelity"]
    assert f["passed"] and f["cosine_min"] > 0.9999 and f["rel_l2_max"] < 1e-4 and f["checked_inputs"] == 3
    s = opt.report["speed"]
    assert s["eager_ms"] > 0 and s["artifact_ms"] > 0 and s["repeats"] == 3
    assert [p["name"] for p in opt.report["passes"]] == ["constant_folding", "dead_code_elimination"]


def test_optimized_is_callable_with_torch_or_numpy(optimized):
    m, inputs, opt = optimized
    ids = torch.randint(0, 50, (2, 16))
    out = opt(ids)
    assert isinstance(out["logits"], torch.Tensor)
    assert_close_to_eager(m(ids), out, rel_l2=1e-5)
    assert isinstance(opt(ids.numpy())["logits"], np.ndarray)


def test_save_writes_manifest_with_report(optimized, tmp_path):
    _, inputs, opt = optimized
    path = opt.save(str(tmp_path / "art"))
    man = json.load(open(os.path.join(path, "manifest.json")))
    assert man["report"]["fidelity"]["passed"] is True
    assert man["target"]["name"] == "cpu" and man["plan"]["body"]["op"] == "call"
    assert man["graphs"]["main"]["inputs"][0]["name"] == "ids"
    ex = pared.load(path)
    assert ex.report["speed"]["repeats"] == 3
    assert not any(f.endswith((".pkl", ".pt", ".pth")) for f in os.listdir(path))


def test_optimize_never_mutates_the_model():
    m, inputs = tiny_transformer()
    m.train()
    snap = state_snapshot(m)
    pared.optimize(m, inputs, pipeline=["constant_folding"], bench_repeats=0, fidelity={"min_cosine": 0.99})
    assert_unchanged(m, snap)


def test_fidelity_bound_raises_with_figures():
    m, inputs = tiny_transformer()
    with pytest.raises(FidelityError, match="misses the fidelity bound: cosine .* < 0.999") as e:
        pared.optimize(m, inputs, pipeline=[{"_api_perturb": {"eps": 1.0}}], bench_repeats=0)
    assert e.value.report["cosine_min"] < 0.999
    kept = pared.optimize(m, inputs, pipeline=[{"_api_perturb": {"eps": 1.0}}], bench_repeats=0,
                          allow_fidelity_loss=True)
    assert kept.report["fidelity"]["passed"] is False


def test_unknown_fidelity_bound():
    m, inputs = tiny_transformer()
    with pytest.raises(ValueError, match="did you mean 'min_cosine'"):
        pared.optimize(m, inputs, fidelity={"min_cosin": 0.9})


@register_pass("_api_fail")
class _Fail(RewritePass):
    def __call__(self, program, ctx):
        raise ValueError("no regions match 'blocks.*'")


def test_failing_pass_is_named():
    m, inputs = tiny_transformer()
    with pytest.raises(PassError, match=r"pass '_api_fail' failed \(after constant_folding\): ValueError: no regions"):
        pared.optimize(m, inputs, pipeline=["constant_folding", "_api_fail"])


def test_bad_option_in_pass_list():
    m, inputs = tiny_transformer()
    with pytest.raises(pared.PipelineError, match=r"passes\[0\].*'_api_perturb'.*'eps'"):
        pared.optimize(m, inputs, pipeline=[{"_api_perturb": {"eps": "x"}}])


def _mlp_and_inputs():
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 8))
    small = [(0.1 * torch.randn(4, 16),) for _ in range(3)]    # the calibrated range
    large = [(20.0 * torch.randn(4, 16),) for _ in range(2)]   # far outside it: clipped by the quantizers
    return m, small, large


def test_fidelity_is_judged_on_holdout_when_given():
    m, small, large = _mlp_and_inputs()
    common = dict(pipeline=["quantize_linears"], calibration=small, bench_repeats=0, allow_fidelity_loss=True)
    held = pared.optimize(m, small[0], holdout=large, **common).report["fidelity"]
    assert held["in_sample"] is False and held["judged_on"] == "example + holdout"
    assert held["checked_inputs"] == 1 + len(large)
    inside = pared.optimize(m, small[0], **common).report["fidelity"]
    assert inside["in_sample"] is True and inside["judged_on"] == "example + calibration (in-sample)"
    assert inside["checked_inputs"] == 1 + len(small)
    # the held-out inputs, not the calibration ones, were judged: only they saturate the int8 ranges
    assert inside["rel_l2_max"] < 0.1 < held["rel_l2_max"]


def test_fidelity_without_calibration_or_holdout_is_the_example_only():
    m, small, _ = _mlp_and_inputs()
    f = pared.optimize(m, small[0], bench_repeats=0).report["fidelity"]
    assert f["in_sample"] is False and f["judged_on"] == "example only" and f["checked_inputs"] == 1


def test_speed_runs_both_sides_on_the_same_pinned_threads(monkeypatch):
    made = []

    class Recording(pared.api.Executor):
        def __init__(self, *a, **kw):
            super().__init__(*a, **kw)
            made.append(self)

    monkeypatch.setattr(pared.api, "Executor", Recording)
    m, small, _ = _mlp_and_inputs()
    before = torch.get_num_threads()
    s = pared.optimize(m, small[0], bench_repeats=2, bench_threads=2).report["speed"]
    assert s["threads"] == 2 and s["torch_threads"] == 2 and s["artifact_threads"] == 2
    assert torch.get_num_threads() == before            # torch's own count is put back
    timed = [ex for ex in made if ex.target.get("threads") == 2]
    assert timed, "no Executor was made with the pinned thread count"
    opts = timed[0].graphs["main"].session.get_session_options()
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    with pytest.raises(ValueError, match="bench_threads must be >= 1"):
        pared.optimize(m, small[0], bench_threads=0)


def test_fidelity_takes_the_goal_spelling_and_the_field_names():
    from pared.fidelity import Fidelity
    assert Fidelity.of({"cosine": 0.99, "rel_l2": 0.05}) == Fidelity(min_cosine=0.99, max_rel_l2=0.05)
    assert Fidelity.of({"min_cosine": 0.99}) == Fidelity(min_cosine=0.99)           # max_rel_l2 keeps 1e-2
    assert Fidelity.of({"cosine": 0.9, "max_rel_l2": None}) == Fidelity(min_cosine=0.9, max_rel_l2=None)
    with pytest.raises(ValueError, match="unknown fidelity bound 'cosin'; did you mean 'cosine'"):
        Fidelity.of({"cosin": 0.9})
    with pytest.raises(ValueError, match="fidelity: cosine expects a number, got 'high'"):
        Fidelity.of({"cosine": "high"})
