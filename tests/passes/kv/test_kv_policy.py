"""kv_policy's budgets: a pyramid rescaled to a budget, and the smallest budget meeting a goal on
the calibration stream (bisection, every trial recorded), against the program with the cache
before."""
import pytest

from pared import testing
from pared.analysis.metrics import compare_outputs
from pared.analysis.recorder import replay
from pared.ir.capture import capture
from pared.ir.errors import OptionError
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
