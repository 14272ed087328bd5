"""kv_policy's budgets: a pyramid rescaled to a budget, and the smallest budget meeting a goal on
the calibration stream (bisection, every trial recorded), against the program with the cache
before."""
import pytest

from pared import testing
from pared.analysis.metrics import compare_outputs
from pared.analysis.recorder import replay
from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.kvcache import HeadPolicy
from pared.ir.transform import PassContext
from pared.passes.kv.kv_policy import rescale
from pared.registry import get_pass


@pytest.fixture(scope="module")
def stream():
    m, ex = testing.tiny_streamer(capacity_frames=10)
    return m, capture(m, ex), testing.tiny_stream_calls(12)


def test_rescale_keeps_the_sink_and_the_proportion():
    anchor = HeadPolicy(sink=3, recent=4, middle="strided", middle_frames=4, interval=6)
    assert rescale(anchor, 16) == HeadPolicy(sink=3, recent=7, middle="strided", middle_frames=6, interval=6)
    assert rescale(anchor, 5) == HeadPolicy(sink=3, recent=1, middle="strided", middle_frames=1, interval=6)
    assert rescale(anchor, 4) == HeadPolicy(sink=3, recent=1)          # no room for a middle
    assert rescale(anchor, 1) == HeadPolicy(sink=0, recent=1)
    assert rescale(HeadPolicy(), 8) == HeadPolicy()
    for f in range(1, 20):
        assert rescale(anchor, f).frames == f


def test_target_finds_the_smallest_budget_that_meets_the_goal(stream):
    m, prog, calls = stream
    res = get_pass("kv_policy")(policy="window", target={"psnr_db": 45})(prog, PassContext(calibration=calls))
    search = res.program.records["KVBudgetSearch"]
    chosen = search.frames
    assert res.program.records["KVStream"].kv_layout().frames == chosen < 10
    tried = dict(search.trials)
    assert tried[chosen][0][1] >= 45                                   # the chosen budget meets it
    assert tried[chosen - 1][0][1] < 45                                # one frame less does not
    # the record's figure is the program's: the stream through it against the full cache
    ref = replay(prog, calls)
    assert compare_outputs(ref, replay(res.program, calls))["psnr_db"] == pytest.approx(tried[chosen][0][1], abs=1e-4)
    # a goal even the full cache does not beat keeps it (nothing to do)
    same = get_pass("kv_policy")(policy="window", target={"psnr_db": 1e9})(prog, PassContext(calibration=calls))
    assert not same.modified


def test_budget_options_are_checked(stream):
    with pytest.raises(OptionError, match="give option 'frames' \\(a budget\\) or 'target' \\(a goal\\), not both"):
        get_pass("kv_policy")(policy="window", frames=3, target={"psnr_db": 30})
    with pytest.raises(OptionError, match="policy 'table' has none"):
        get_pass("kv_policy")(policy="table", policies=[], target={"psnr_db": 30})
    with pytest.raises(OptionError, match="option 'max_frames' goes with 'target'"):
        get_pass("kv_policy")(policy="window", frames=3, max_frames=4)
    with pytest.raises(OptionError, match="option 'target'.*agreement"):
        get_pass("kv_policy")(policy="window", target={"agreement": 0.9})
    m, prog, calls = stream
    res = get_pass("kv_policy")(policy="pyramid", frames=7, head_types=[["anchor", "wave"], ["veil", "dummy"]])(
        prog, PassContext())
    assert [p.frames for row in res.program.records["KVStream"].kv_layout().policies for p in row] == [7, 7, 7, 0]


@pytest.mark.parametrize("policy", ["heavy", "snap"])
def test_heavy_hitters_make_the_step_report_its_attention_and_undo_it(stream, policy):
    """policy heavy (snap): the step graph gains the kv_mass output, the plan a score state the
    append reads and writes; the stream equals frame lists ranked by the eager step's own
    attention. Another policy afterwards takes both away again (the step graph as captured)."""
    import torch
    from pared.ir.stream import MASS, SCORE
    m, prog, calls = stream
    heavy = get_pass("kv_policy")(policy=policy, frames=5)(prog, PassContext()).program
    rec = heavy.records["KVStream"]
    assert rec.kv_layout().policies[0][0] == HeadPolicy(sink=1, recent=2, middle=policy, middle_frames=2)
    assert heavy.graphs["step"].output_names[-1] == MASS and rec.mass == "step.kv_mass"
    assert SCORE in {s.name for s in heavy.plan.state}
    append = next(c for c in heavy.plan.calls() if c.graph == "kv.append")
    assert append.inputs[-1] == "step.kv_mass" and append.outputs[-1] == f"state:{SCORE}"
    run = heavy.runner()
    with torch.no_grad():
        got = [run(list(c))[0] for c in calls]
    ref = testing.eager_stream(m.step, rec.kv_layout(), calls, m.head_dim)
    for i, (g, r) in enumerate(zip(got, ref)):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=f"call {i}")
    # the heavy middle differs from what a sink + window of the same budget keeps; snap's from
    # heavy's (on this ALiBi model the latest call favours the latest frames: snap keeps what
    # sink + window does)
    other = "sink_window" if policy == "heavy" else "heavy"
    lay = get_pass("kv_policy")(policy=other, frames=5)(prog, PassContext()).program.records["KVStream"].kv_layout()
    assert not torch.allclose(testing.eager_stream(m.step, lay, calls, m.head_dim)[-1], ref[-1], atol=1e-4)
    back = get_pass("kv_policy")(policy="window", frames=4)(heavy, PassContext()).program
    assert back.records["KVStream"].mass is None and SCORE not in {s.name for s in back.plan.state}
    assert back.graphs["step"].output_names == prog.graphs["step"].output_names
    assert back.graphs["step"].module.code == prog.graphs["step"].module.code


def test_heavy_hitters_go_before_kv_drop(stream):
    from pared.ir.errors import PassError
    m, prog, calls = stream
    dropped = get_pass("kv_drop")(heads=[[0, 1]])(prog, PassContext()).program
    with pytest.raises(PassError, match="kv_drop split them: apply the heavy policy before kv_drop"):
        get_pass("kv_policy")(policy="heavy", frames=5)(dropped, PassContext())
    with pytest.raises(OptionError, match="pass 'kv_policy': heavy: a budget of 1 frame"):
        get_pass("kv_policy")(policy="heavy", frames=1)


def test_kv_drop_after_ranked_heads_keeps_the_kept_heads_attention(stream):
    """kv_drop splits layer 0's attention; the kept head's mass then comes from its own group's
    probabilities. Snap heads on this ALiBi model keep the latest leaving frames, which a zero or
    wrong mass would not (it keeps the first ones), so the stream equals the frame lists only
    with the right mass."""
    import torch
    m, prog, calls = stream
    snap = get_pass("kv_policy")(policy="snap", frames=5)(prog, PassContext()).program
    dropped = get_pass("kv_drop")(heads=[[0, 1]])(snap, PassContext()).program
    lay = dropped.records["KVStream"].kv_layout()
    assert lay.scored and lay.policies[0][1].frames == 0
    run = dropped.runner()
    with torch.no_grad():
        got = [run(list(c))[0] for c in calls]
    ref = testing.eager_stream(m.step, lay, calls, m.head_dim)
    for i, (g, r) in enumerate(zip(got, ref)):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5, msg=f"call {i}")


def _free_loop(frames: int = 8, batch: int = 2, seed: int = 5):
    """A free-running loop over tiny_streamer: each frame reads the cache once from the last frame's
    output (squashed), then appends its own output; returns the outputs [frames, B, T, D]."""
    import numpy as np
    import torch

    def loop(fn):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(batch, 4, 16, generator=g)
        outs = []
        for f in range(frames):
            pos = torch.tensor([float(f)])
            y = fn(x, pos, torch.tensor([0.0]))
            fn(y, pos, torch.tensor([1.0]))
            outs.append(np.asarray(y))
            x = torch.as_tensor(np.tanh(outs[-1]))
        return np.stack(outs)
    return loop


def _drift(reference, candidate):
    """A judge: the candidate rollout's relative distance from the reference's."""
    import numpy as np
    return {"error_rise": float(np.linalg.norm(candidate - reference) / np.linalg.norm(reference))}


def test_a_judge_measures_the_goal_on_free_running_rollouts(stream):
    """With option 'judge', each trial runs the calibration loop free-running through the candidate
    (the loop feeds the candidate's own outputs back) and scores it with the judge against the
    program before's rollout: every trial's figure is the judge's on the eager Streamer with that
    window, and the budget chosen is the smallest meeting the goal."""
    import torch
    from pared.ir.kvcache import KVLayout, uniform_policy
    m, prog, _ = stream
    loop = _free_loop()
    res = get_pass("kv_policy")(policy="window", target={"error_rise": 0.05}, judge=_drift)(
        prog, PassContext(calibration=loop))
    search = res.program.records["KVBudgetSearch"]
    assert search.judge.endswith("_drift")
    with torch.no_grad():
        full = loop(m.eval())
        for frames, ((metric, value),) in search.trials:
            e, _ = testing.tiny_streamer(capacity_frames=10,
                                         layout=KVLayout.uniform(uniform_policy("window", frames, 0), 2, 2, 4))
            assert metric == "error_rise"
            assert value == pytest.approx(_drift(full, loop(e.eval()))["error_rise"], abs=1e-5), frames
    tried = dict(search.trials)
    chosen = search.frames
    assert res.program.records["KVStream"].kv_layout().frames == chosen < 8
    assert tried[chosen][0][1] <= 0.05 < tried[chosen - 1][0][1]
    # the same goal teacher-forced is another measure (no judge: per-call outputs, here rel_l2)
    tf = get_pass("kv_policy")(policy="window", target={"rel_l2": 0.05})(prog, PassContext(calibration=loop))
    assert tf.program.records["KVBudgetSearch"].judge == ""


def test_judge_options_are_checked(stream):
    m, prog, _ = stream
    with pytest.raises(OptionError, match="option 'judge' measures option 'target'"):
        get_pass("kv_policy")(policy="window", frames=3, judge=_drift)
    with pytest.raises(OptionError, match="option 'judge' must be a callable"):
        get_pass("kv_policy")(policy="window", target={"error_rise": 0.1}, judge=3)
    with pytest.raises(OptionError, match="option 'target'.*accuracy_drop"):     # judged metrics need a judge
        get_pass("kv_policy")(policy="window", target={"accuracy_drop": 0.02})
    with pytest.raises(OptionError, match="option 'judge' measures"):
        get_pass("kv_drop")(share=0.5, judge=_drift)
    loop = _free_loop(frames=3)
    with pytest.raises(PassError, match="option 'judge' \\(.*_drift\\) returned no 'accuracy_drop'"):
        get_pass("kv_policy")(policy="window", target={"accuracy_drop": 0.02}, judge=_drift)(
            prog, PassContext(calibration=loop))

    def broken(reference, candidate):
        raise RuntimeError("no judge model here")
    with pytest.raises(PassError, match="option 'judge' \\(.*broken\\) failed: RuntimeError: no judge model here"):
        long = _free_loop()
        get_pass("kv_drop")(target={"error_rise": 0.1}, judge=broken)(
            get_pass("head_types")()(prog, PassContext(calibration=long)).program, PassContext(calibration=long))


def test_a_pipeline_file_names_the_judge_relative_to_itself(tmp_path, stream):
    from pared.pipeline import build_passes, load_pipeline
    (tmp_path / "judges.py").write_text("def drift(reference, candidate):\n"
                                        "    import numpy as np\n"
                                        "    return {'error_rise': float(np.abs(candidate - reference).max())}\n")
    (tmp_path / "p.yaml").write_text("version: 1\npasses:\n  - kv_policy:\n      policy: window\n"
                                     "      target: {error_rise: 0.5}\n      judge: judges.py:drift\n")
    (p,) = build_passes(load_pipeline(str(tmp_path / "p.yaml")))
    assert p.options.judge.__name__ == "drift"
    (tmp_path / "bad.yaml").write_text("version: 1\npasses:\n  - kv_policy:\n      policy: window\n"
                                       "      target: {error_rise: 0.5}\n      judge: nowhere.py:drift\n")
    from pared.ir.errors import PipelineError
    with pytest.raises(PipelineError, match="bad.yaml:6.*kv_policy.*option 'judge'.*nowhere.py"):
        build_passes(load_pipeline(str(tmp_path / "bad.yaml")))
