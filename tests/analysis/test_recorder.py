"""analysis.recorder: recording the inputs a program receives over a calibration run, and
replaying them teacher-forced through any program (the reference's history for every candidate)."""
import numpy as np
import pytest
import torch

from pared import testing
from pared.analysis.metrics import compare_outputs
from pared.analysis.recorder import record_calls, record_inputs, replay, replay_inputs
from pared.ir.capture import capture
from pared.ir.errors import PassError
from pared.ir.transform import PassContext
from pared.registry import get_pass

FRAMES = 8
GAIN = 10.0


def feedback_loop(frames: int = FRAMES, batch: int = 2, gain: float = GAIN):
    """A free-running stream for tiny_streamer: per frame one reading call and one appending call,
    each call's input made from the output before it (sin(gain · y): a small change goes far)."""
    x0 = torch.randn(batch, 4, 16, generator=torch.Generator().manual_seed(5))

    def loop(fn):
        x = x0
        for f in range(frames):
            for append in (0.0, 1.0):
                y = fn(x, torch.tensor([float(f)]), torch.tensor([append]))
                x = torch.sin(gain * y)
    return loop, x0


@pytest.fixture(scope="module")
def stream():
    m, ex = testing.tiny_streamer(capacity_frames=10)
    prog = capture(m, ex)
    window = get_pass("kv_policy")(policy="window", frames=2)(prog, PassContext()).program
    return m, prog, window


def rows(outs: list) -> np.ndarray:
    """Eager outputs [B, T, D] per call as output_rows stacks them: [calls · B, T · D] float64."""
    return torch.stack(outs).to(torch.float64).reshape(-1, outs[0][0].numel()).numpy()


def test_recorded_inputs_replay_the_reference_exactly(stream):
    _, prog, _ = stream
    loop, x0 = feedback_loop()
    requests = record_inputs(prog, loop)
    assert len(requests) == 1 and len(requests[0]) == 2 * FRAMES        # one request, every call
    first, second = requests[0][0], requests[0][1]
    assert torch.equal(first[0], x0)
    assert [float(c[1][0]) for c in requests[0]] == [float(f) for f in range(FRAMES) for _ in (0, 1)]
    assert [float(c[2][0]) for c in requests[0]] == [0.0, 1.0] * FRAMES
    with torch.no_grad():
        y0 = prog.runner()(list(first))[0]
    assert torch.equal(second[0], torch.sin(GAIN * y0))                 # the loop's own feedback
    # the recorded history through the reference gives exactly what the loop got from it
    assert np.array_equal(replay_inputs(prog, requests), replay(prog, loop))
    # record_calls keeps those outputs while recording (a goal search's reference, not replayed again)
    again, outputs = record_calls(prog, loop)
    assert all(torch.equal(a, b) for c, d in zip(again[0], requests[0]) for a, b in zip(c, d))
    assert outputs.shape[0] == 2 * FRAMES * x0.shape[0] and np.array_equal(outputs, replay_inputs(prog, requests))


def test_a_candidate_is_replayed_on_the_reference_inputs(stream):
    m, prog, window = stream
    loop, _ = feedback_loop()
    requests = record_inputs(prog, loop)
    got = replay_inputs(window, requests)
    # the candidate's outputs on the reference's inputs, its cache kept by its own policy
    # (an eager step fed frame lists of that policy: pared.ir.kvcache.KVReference)
    eager = rows(testing.eager_stream(m.step, window.records["KVStream"].kv_layout(), requests[0], m.head_dim))
    assert got.shape == eager.shape
    np.testing.assert_allclose(got, eager, rtol=1e-5, atol=1e-5)
    # free-running, the loop feeds the candidate its own outputs: other inputs, other samples
    free_inputs = record_inputs(window, loop)[0]
    assert torch.equal(free_inputs[0][0], requests[0][0][0])
    assert not all(torch.equal(a[0], b[0]) for a, b in zip(free_inputs, requests[0]))
    ref = replay_inputs(prog, requests)
    teacher = compare_outputs(ref, got)["psnr_db"]
    free = compare_outputs(replay(prog, loop), replay(window, loop))["psnr_db"]
    assert teacher == pytest.approx(compare_outputs(ref, eager)["psnr_db"], abs=1e-3)
    assert free < teacher - 10                   # the divergence of two rollouts, not the error


def test_each_request_starts_with_the_plan_state_reset(stream):
    _, prog, _ = stream
    calls = testing.tiny_stream_calls(4)
    one = replay_inputs(prog, [calls])
    two = replay_inputs(prog, [calls, calls])
    assert np.array_equal(two[:len(one)], one) and np.array_equal(two[len(one):], one)
    # as one request, the second pass reads the cache the first one filled
    joined = replay_inputs(prog, [calls + calls])
    assert np.array_equal(joined[:len(one)], one) and not np.allclose(joined[len(one):], one)
    # a list calibration records as it is given
    recorded = record_inputs(prog, calls)
    assert len(recorded) == 1 and all(all(torch.equal(a, b) for a, b in zip(r, c))
                                      for r, c in zip(recorded[0], calls))
    assert np.array_equal(replay_inputs(prog, recorded), replay(prog, calls))


def test_errors_say_what_is_missing(stream):
    _, prog, _ = stream
    with pytest.raises(PassError, match="needs a calibration run"):
        record_inputs(prog, None)
    with pytest.raises(PassError, match="made no call"):
        record_inputs(prog, [])
    with pytest.raises(PassError, match="got no recorded call"):
        replay_inputs(prog, [[]])


def test_tapped_graph_hands_over_what_an_interpreter_sees_in_the_same_order():
    import torch.fx as fx

    from pared.analysis.recorder import tapped

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, x, y):
            h = torch.relu(self.lin(x))
            h = h + y
            return h * 2, h.sum()
    gm = fx.symbolic_trace(M())
    names = [n.name for n in gm.graph.nodes]
    watch = {n.name for n in gm.graph.nodes if n.op in ("placeholder", "call_module", "call_function")} | {"output"}
    code = gm.code

    seen_interp = []

    class Observer(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            if n.name in watch and isinstance(out, torch.Tensor):
                seen_interp.append((n.name, out.clone()))
            return out
    seen = []
    t = tapped(gm, watch, lambda name, v: seen.append((name, v.clone())))
    x, y = torch.randn(3, 8), torch.randn(3, 8)
    want = Observer(gm).run(x, y)
    got = t(x, y)
    assert [n for n, _ in seen] == [n for n, _ in seen_interp] == [n for n in names if n in watch and n != "output"]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(seen, seen_interp))
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    # the model's graph is left as it was; the copy shares its weights
    assert gm.code == code and [n.name for n in gm.graph.nodes] == names
    assert t.lin.weight is gm.lin.weight
