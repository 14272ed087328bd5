"""ir/stream.py: a Streamer captured with its KV cache as state of the Plan. The program over a
stream of calls against the eager Streamer and against an eager step fed frame lists; the
plan's structure; requests; the artifact streaming torch-free; errors."""

import numpy as np
import pytest
import torch

from pared import testing
from pared.ir.capture import capture
from pared.ir.errors import CaptureError
from pared.ir.kvcache import HeadPolicy, KVLayout
from pared.ir.plan import Bins, Call, Select, Table
from pared.ir.stream import APPEND, INIT, STEP, KVStream, Streamer


@pytest.fixture(scope="module")
def captured():
    m, ex = testing.tiny_streamer()
    return m, capture(m, ex)


def test_plan_keeps_the_cache_as_state_and_appends_on_request(captured):
    m, prog = captured
    assert set(prog.graphs) == {STEP, INIT, APPEND}
    assert prog.plan.inputs == ("x", "frame_pos", "append")
    assert {s.name: s.shape for s in prog.plan.state} == {
        "kv.cache": (2, 2, 2, 2, 12, 8), "kv.pos": (2, 2, 12), "kv.valid": (2, 2, 12), "kv.count": (1,)}
    first, step, last = prog.plan.body.nodes
    assert isinstance(first, Select) and isinstance(first.selector, Table) and first.case("init").graph == INIT
    assert isinstance(step, Call) and step.inputs[-3:] == ("state:kv.cache", "state:kv.pos", "state:kv.valid")
    assert isinstance(last.selector, Bins) and last.selector.input == "in:append"
    assert last.case("append").outputs == ("state:kv.cache", "state:kv.pos", "state:kv.valid", "state:kv.count")
    rec = prog.records["KVStream"]
    assert isinstance(rec, KVStream) and rec.dynamic_capacity and rec.frame_pos == "frame_pos"
    assert rec.kv_layout() == m.layout
    # the step graph reads any capacity: its cache input's token dimension is a symbol
    dims = dict(zip(prog.graphs[STEP].input_names, prog.graphs[STEP].dynamic_dims))
    assert [d for d, _ in dims["kv_cache"]] == [4] and [d for d, _ in dims["cache_pos"]] == [2]


def test_stream_through_the_plan_equals_eager_and_frame_lists(captured):
    m, prog = captured
    calls = testing.tiny_stream_calls(10, reads=2)
    run = prog.runner()
    m.reset()
    with torch.no_grad():
        got = [run(list(c))[0] for c in calls]
        eager = [m(*c) for c in calls]
    ref = testing.eager_stream(m.step, m.layout, calls, m.head_dim)
    for i, (g, e, r) in enumerate(zip(got, eager, ref)):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-6, msg=f"call {i}")
        torch.testing.assert_close(g, r, atol=1e-6, rtol=1e-6, msg=f"call {i}")
    assert run.trace[:4] == ["init/keep", "go/keep", "go/append", "go/keep"]
    # past 3 frames the window forgets: the same frame after a full cache differs
    full = testing.eager_stream(m.step, KVLayout.uniform(HeadPolicy.window(10), 2, 2, 4), calls, m.head_dim)
    assert torch.allclose(full[8], ref[8]) and not torch.allclose(full[-1], ref[-1], atol=1e-4)


def test_a_new_stream_starts_at_reset_or_an_earlier_frame(captured):
    m, _ = captured
    calls = testing.tiny_stream_calls(4)
    with torch.no_grad():
        m.reset()
        a = [m(*c) for c in calls]
        b = [m(*c) for c in calls]            # frame 0 again, after frame 3 was appended: a new stream
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y)


@pytest.mark.parametrize("heavy", [False, pytest.param(True, marks=pytest.mark.heavy)], ids=["pyramid", "heavy_veil"])
@pytest.mark.parametrize("target", ["cpu", pytest.param("tvm-cpu", marks=pytest.mark.heavy)])
def test_artifact_streams_torch_free_after_kv_policy_and_kv_drop(tmp_path, target, heavy):
    """ONNX Runtime keeps the step's capacity dynamic; TVM gets it fixed at the layout's
    (backends/lower.py: Program.pinned_by_state, from the cache's state declarations). With heavy-hitter veil heads the step reports its
    attention (split by kv_drop at layer 1) and the state carries the frame scores; the reference
    ranks frames by the attention the eager step computes. kv_drop compacts the state to the
    heads that keep frames."""
    from pared.registry import get_pass
    from pared.ir.transform import PassContext
    from pared.targets import get_target
    m, ex = testing.tiny_streamer()
    types = {"veil": {"sink": 1, "recent": 2, "middle": "heavy", "middle_frames": 2}} if heavy else None
    prog = get_pass("kv_policy")(policy="pyramid", head_types=[["anchor", "wave"], ["veil", "veil"]], types=types)(
        capture(m, ex), PassContext()).program
    assert prog.records["KVStream"].kv_layout().scored == heavy
    prog = get_pass("kv_drop")(heads=[[1, 1]])(prog, PassContext()).program     # composes: drops one more
    assert prog.records["KVStream"].policy == "pyramid+kv_drop"
    # the compact state: rows only for the three heads that keep frames, what the artifact carries
    rec = prog.records["KVStream"]
    assert rec.rows == ((0, 0), (0, 1), (1, 0))
    c, f = rec.kv_layout().capacity, rec.kv_layout().frames
    assert {s.name: s.shape for s in prog.plan.state} == {
        "kv.cache": (1, 2, 2, 3, c, 8), "kv.pos": (1, 3, c), "kv.valid": (1, 3, c), "kv.count": (1,),
        **({"kv.score": (1, 3, f)} if heavy else {})}
    path = testing.save_program(prog, str(tmp_path / "art"), get_target(target).to_json())
    calls = testing.tiny_stream_calls(24)
    got, trace, _ = testing.stream_torch_free(path, calls, str(tmp_path))
    assert trace == ["init/keep", "go/append", "go/keep"]
    layout = prog.records["KVStream"].kv_layout()
    ref = torch.stack(testing.eager_stream(m.step, layout, calls, m.head_dim)).numpy()
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)


def test_capture_errors_name_what_is_wrong():
    m, ex = testing.tiny_streamer()
    with pytest.raises(CaptureError, match="then `append`"):
        capture(m, ex[:1])
    bad = Streamer(m.step, layers=3, heads=2, head_dim=8, tokens_per_frame=4, capacity_frames=2)
    with pytest.raises(CaptureError, match=r"new_kv\) has shape \(2, 2, 2, 2, 4, 8\); the declared cache needs "
                                           r"\(3, 2, 2, 2, 4, 8\)"):
        capture(bad, ex)
    with pytest.raises(ValueError, match="give capacity_frames >= 1"):
        Streamer(m.step, layers=2, heads=2, head_dim=8, tokens_per_frame=4)


def test_state_declarations_pin_the_step_capacity_for_static_backends():
    """Program.pinned_by_state: the step's capacity (one symbol over kv_cache, cache_pos and
    cache_valid, all read from declared state) takes the declared size; the batch, which the
    frame input also carries and the state declares symbolically, stays dynamic; graphs without
    state inputs are returned as they are."""
    from pared.registry import get_pass
    from pared.ir.transform import PassContext
    m, ex = testing.tiny_streamer(batch=2)
    batch = torch.export.Dim("batch", min=1, max=64)
    prog = capture(m, ex, dynamic_shapes=({0: batch}, None, None))
    prog = get_pass("kv_policy")(policy="window", frames=5)(prog, PassContext()).program
    step = prog.graphs[STEP]
    dims = dict(zip(step.input_names, step.dynamic_dims))
    assert {d for d, _ in dims["kv_cache"]} == {2, 4} and {d for d, _ in dims["x"]} == {0}
    pinned = prog.pinned_by_state(STEP)
    got = dict(zip(pinned.input_names, pinned.dynamic_dims))
    assert [d for d, _ in got["kv_cache"]] == [2] and got["cache_pos"] == () and got["cache_valid"] == ()
    assert got["x"] == dims["x"]
    ex_in = dict(zip(pinned.input_names, pinned.example_inputs))
    assert ex_in["kv_cache"].shape[4] == ex_in["cache_pos"].shape[2] == 5 * 4
    assert prog.pinned_by_state(INIT) is prog.graphs[INIT]
