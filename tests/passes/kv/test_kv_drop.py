"""kv_drop's goal: the most heads (lowest Dummy Forcing cost first) whose dropping still meets a
goal on the calibration stream, every trial recorded, against the program before."""
import pytest
import torch

from pared import testing
from pared.analysis.metrics import compare_outputs
from pared.analysis.recorder import record_inputs, replay
from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.transform import PassContext
from pared.registry import get_pass


@pytest.fixture(scope="module")
def typed():
    m, ex = testing.tiny_streamer(capacity_frames=10)
    calls = testing.tiny_stream_calls(12)
    prog = get_pass("head_types")(recent=1, min_frames=3, max_distance=8)(capture(m, ex),
                                                                         PassContext(calibration=calls)).program
    return prog, calls


def test_target_drops_the_most_heads_that_meet_the_goal(typed):
    prog, calls = typed
    ref = replay(prog, calls)
    # the goal between what dropping one head and dropping two measure, in cost order
    one = get_pass("kv_drop")(share=0.25)(prog, PassContext()).program
    two = get_pass("kv_drop")(share=0.5)(prog, PassContext()).program
    p1 = compare_outputs(ref, replay(one, calls))["psnr_db"]
    p2 = compare_outputs(ref, replay(two, calls))["psnr_db"]
    assert p1 > p2
    goal = (p1 + p2) / 2
    res = get_pass("kv_drop")(target={"psnr_db": goal})(prog, PassContext(calibration=calls))
    dec = res.program.records["KVDropDecisions"]
    assert dec.heads == one.records["KVDropDecisions"].heads and len(dec.heads) == 1
    tried = dict(dec.trials)
    assert tried[1][0][1] == pytest.approx(p1, abs=1e-4) and tried[1][0][1] >= goal
    assert tried[2][0][1] < goal                         # one more head misses it
    assert dec.target == (("psnr_db", goal),)
    # a goal nothing but the full history meets drops nothing, and the record says what was measured
    none = get_pass("kv_drop")(target={"psnr_db": 1e9})(prog, PassContext(calibration=calls))
    assert none.stats["dropped_heads"] == 0 and set(none.program.graphs) == set(prog.graphs)
    assert none.program.graphs[prog.records["KVStream"].step] is prog.graphs[prog.records["KVStream"].step]
    empty = none.program.records["KVDropDecisions"]
    assert empty.heads == () and empty.trials and all(m[0][1] < 1e9 for _, m in empty.trials)
    assert dict(empty.trials)[1][0][1] == pytest.approx(p1, abs=1e-4)


def test_target_options_are_checked(typed):
    prog, _ = typed
    with pytest.raises(OptionError, match="give option 'heads' \\(which to drop\\) or 'target'"):
        get_pass("kv_drop")(heads=[[0, 0]], target={"psnr_db": 30})
    with pytest.raises(OptionError, match="option 'target'.*agreement"):
        get_pass("kv_drop")(target={"agreement": 0.9})
    with pytest.raises(PassError, match="needs a calibration stream"):
        get_pass("kv_drop")(target={"psnr_db": 30})(prog, PassContext())


def test_target_is_measured_on_the_reference_inputs(typed):
    """A free-running calibration (each call's input made from the output before it, sin(10 · y)):
    any dropped head sends the stream elsewhere, yet each trial is the error of the candidate's
    outputs on the reference's own inputs, its cache computed by its own policy from them."""
    prog, _ = typed
    m, _ = testing.tiny_streamer(capacity_frames=10)            # the same seeded weights as `prog`
    x0 = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(5))

    def loop(fn):
        x = x0
        for f in range(12):
            for append in (0.0, 1.0):
                x = torch.sin(10.0 * fn(x, torch.tensor([float(f)]), torch.tensor([append])))
    one = get_pass("kv_drop")(share=0.25)(prog, PassContext()).program
    two = get_pass("kv_drop")(share=0.5)(prog, PassContext()).program
    inputs = record_inputs(prog, loop)[0]

    def eager(p):             # an eager step fed the frame lists of p's policy, over the recorded inputs
        outs = testing.eager_stream(m.step, p.records["KVStream"].kv_layout(), inputs, m.head_dim)
        return torch.stack(outs).to(torch.float64).reshape(-1, outs[0][0].numel()).numpy()
    ref = eager(prog)
    p1, p2 = (compare_outputs(ref, eager(p))["psnr_db"] for p in (one, two))
    free = compare_outputs(replay(prog, loop), replay(one, loop))["psnr_db"]
    assert p1 > p2 > free + 10                   # free-running: the divergence, not the error
    goal = (p1 + p2) / 2
    res = get_pass("kv_drop")(target={"psnr_db": goal})(prog, PassContext(calibration=loop))
    dec = res.program.records["KVDropDecisions"]
    assert dec.heads == one.records["KVDropDecisions"].heads
    tried = dict(dec.trials)
    assert tried[1][0][1] == pytest.approx(p1, abs=1e-3) and tried[2][0][1] == pytest.approx(p2, abs=1e-3)
