"""kv_drop's goal: the most heads (lowest Dummy Forcing cost first) whose dropping still meets a
goal on the calibration stream, every trial recorded, against the program before. Its compact
state: rows only for the heads that keep frames, the same stream as the full state and the
eager frame lists, heavy hitters' scores per row, and the errors."""
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


def test_a_judge_measures_the_goal_on_the_candidates_own_rollouts(typed):
    """With option 'judge' the goal is measured free-running: each trial is the judge's score of the
    candidate's own rollout (the eager Streamer keeping what its layout keeps, the loop feeding its
    outputs back) against the program before's, and the most heads meeting it are dropped."""
    import numpy as np
    prog, _ = typed
    x0 = torch.randn(2, 4, 16, generator=torch.Generator().manual_seed(5))

    def loop(fn):
        x, outs = x0, []
        for f in range(12):
            for append in (0.0, 1.0):
                y = fn(x, torch.tensor([float(f)]), torch.tensor([append]))
                outs.append(np.asarray(y))
                x = torch.tanh(torch.as_tensor(outs[-1]))
        return np.stack(outs)

    def judge(reference, candidate):
        return {"error_rise": float(np.abs(candidate - reference).mean())}

    def eager_free(p):        # the eager Streamer with p's per-head policies, free-running
        e, _ = testing.tiny_streamer(capacity_frames=10, layout=p.records["KVStream"].kv_layout())
        with torch.no_grad():
            return loop(e.eval())
    ref = eager_free(prog)
    scores = [judge(ref, eager_free(get_pass("kv_drop")(share=n / 4)(prog, PassContext()).program))["error_rise"]
              for n in (1, 2)]
    assert 0 < scores[0] < scores[1]
    goal = sum(scores) / 2
    res = get_pass("kv_drop")(target={"error_rise": goal}, judge=judge)(prog, PassContext(calibration=loop))
    dec = res.program.records["KVDropDecisions"]
    assert len(dec.heads) == 1 and dec.judge.endswith("judge")
    tried = dict(dec.trials)
    assert tried[1][0][1] == pytest.approx(scores[0], abs=1e-5) and tried[2][0][1] == pytest.approx(scores[1], abs=1e-5)


# -- the compact cache state: only the (layer, head) pairs that keep frames have rows ------------------
@pytest.fixture(scope="module")
def drops():
    m, ex = testing.tiny_streamer()
    prog = capture(m, ex)
    full = get_pass("kv_drop")(heads=[[0, 1], [1, 0]], compact=False)(prog, PassContext()).program
    res = get_pass("kv_drop")(heads=[[0, 1], [1, 0]])(prog, PassContext())
    return m, prog, full, res


def _stream(prog, calls):
    run = prog.runner()
    with torch.no_grad():
        return [run(list(c))[0] for c in calls]


def test_compact_state_streams_what_the_full_state_does(drops):
    m, _, full, res = drops
    calls = testing.tiny_stream_calls(10, reads=1)
    lay = res.program.records["KVStream"].kv_layout()
    assert lay == full.records["KVStream"].kv_layout()
    ref = testing.eager_stream(m.step, lay, calls, m.head_dim)
    for i, (c, f, r) in enumerate(zip(_stream(res.program, calls), _stream(full, calls), ref)):
        torch.testing.assert_close(c, f, atol=1e-6, rtol=1e-6, msg=f"call {i}")
        torch.testing.assert_close(c, r, atol=1e-6, rtol=1e-6, msg=f"call {i}")


def test_compact_state_has_a_row_per_kept_head_and_the_step_reads_only_those(drops):
    from pared.ir.stream import STEP
    _, prog, full, res = drops
    rec = res.program.records["KVStream"]
    assert rec.rows == ((0, 0), (1, 1)) and full.records["KVStream"].rows is None
    shapes = {s.name: s.shape for s in res.program.plan.state}
    assert shapes == {"kv.cache": (1, 2, 2, 2, 12, 8), "kv.pos": (1, 2, 12), "kv.valid": (1, 2, 12), "kv.count": (1,)}
    assert {s.name: s.shape for s in full.plan.state}["kv.cache"] == (2, 2, 2, 2, 12, 8)
    assert {s.name: s.shape for s in prog.plan.state}["kv.cache"] == (2, 2, 2, 2, 12, 8)     # the input unchanged
    dec = res.program.records["KVDropDecisions"]
    assert (dec.state_rows_before, dec.state_rows_after) == (4, 2) and res.stats["state_rows"] == 2
    # cache 4 B/float, positions float, validity bool, the count int64; halved but for the count
    assert (dec.state_bytes_before, dec.state_bytes_after) == (4 * 2 * 12 * 8 * 4 + 4 * 12 * 5 + 8,
                                                               2 * 2 * 12 * 8 * 4 + 2 * 12 * 5 + 8)
    # the step reads the cache only as its one "layer" of rows; each layer's heads from their rows
    step = res.program.graphs[STEP]
    g = step.module.graph
    cache = next(n for n in g.nodes if n.op == "placeholder" and n.target == "kv_cache")
    assert [(u.target, u.args[1:]) for u in cache.users] == [(torch.ops.aten.select.int, (0, 0))]
    rows = [n for n in g.nodes if n.target == torch.ops.aten.slice.Tensor and n.args[0].target ==
            torch.ops.aten.select.int and n.args[0].args[0] in cache.users]
    assert sorted((n.args[0].args[2], n.args[2], n.args[3]) for n in rows) == [(0, 0, 1), (0, 1, 2), (1, 0, 1),
                                                                                 (1, 1, 2)]
    assert all(u.target == torch.ops.aten.cat.default for n in rows for u in n.users)
    ex = dict(zip(step.input_names, step.example_inputs))
    assert ex["kv_cache"].shape[:4] == (1, 2, 2, 2) and ex["cache_pos"].shape[:2] == ex["cache_valid"].shape[:2] == (1, 2)
    assert dict(zip(step.input_names, step.dynamic_dims))["kv_cache"] == \
        dict(zip(prog.graphs[STEP].input_names, prog.graphs[STEP].dynamic_dims))["kv_cache"]


def test_compact_state_with_heavy_hitters_keeps_their_scores_per_row():
    """Snap heads rank frames by the attention the step reports: the compact append reduces the
    step's mass [L, H, C] to the kept rows, and the scores are declared per row."""
    m, ex = testing.tiny_streamer(capacity_frames=10)
    snap = get_pass("kv_policy")(policy="snap", frames=5)(capture(m, ex), PassContext()).program
    full = get_pass("kv_drop")(heads=[[0, 1], [1, 1]], compact=False)(snap, PassContext()).program
    comp = get_pass("kv_drop")(heads=[[0, 1], [1, 1]])(snap, PassContext()).program
    rec = comp.records["KVStream"]
    assert rec.rows == ((0, 0), (1, 0)) and rec.kv_layout().scored
    assert {s.name: s.shape for s in comp.plan.state} == {
        "kv.cache": (1, 2, 2, 2, 20, 8), "kv.pos": (1, 2, 20), "kv.valid": (1, 2, 20), "kv.count": (1,),
        "kv.score": (1, 2, 5)}
    calls = testing.tiny_stream_calls(12)
    ref = testing.eager_stream(m.step, rec.kv_layout(), calls, m.head_dim)
    for i, (c, f, r) in enumerate(zip(_stream(comp, calls), _stream(full, calls), ref)):
        torch.testing.assert_close(c, f, atol=1e-6, rtol=1e-6, msg=f"call {i}")
        torch.testing.assert_close(c, r, atol=1e-5, rtol=1e-5, msg=f"call {i}")


def test_compact_state_options_and_order_are_checked(drops):
    _, _, full, res = drops
    with pytest.raises(OptionError, match="pass 'kv_drop': option 'compact' expects bool, got str 'yes'"):
        get_pass("kv_drop")(compact="yes")
    again = get_pass("kv_drop")(heads=[[0, 1], [1, 0]])(res.program, PassContext())
    assert again.modified is False and again.program is res.program            # nothing more to drop
    with pytest.raises(PassError, match="an earlier kv_drop compacted the cache state to 2 \\(layer, head\\) rows"):
        get_pass("kv_drop")(heads=[[0, 0]])(res.program, PassContext())
    with pytest.raises(PassError, match="pass 'kv_policy': kv_drop compacted the cache state.*apply this pass before "
                                        "kv_drop, or run kv_drop with compact: false"):
        get_pass("kv_policy")(policy="window", frames=2)(res.program, PassContext())
    assert get_pass("kv_policy")(policy="window", frames=2)(full, PassContext()).modified   # the full state resizes


class _ScaledCache(torch.nn.Module):
    """TinyFrameStep reading its whole cache scaled: not the kv_cache[layer, j] a compact state replaces."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def forward(self, x, frame_pos, kv_cache, cache_pos, cache_valid):
        return self.step(x, frame_pos, kv_cache * 0.5, cache_pos, cache_valid)


def test_compact_state_needs_the_step_to_read_its_history_by_layer():
    from pared.ir.stream import Streamer
    m, ex = testing.tiny_streamer()
    s = Streamer(_ScaledCache(m.step), layers=2, heads=2, head_dim=8, tokens_per_frame=4, capacity_frames=3)
    prog = capture(s, ex)
    with pytest.raises(PassError, match="pass 'kv_drop': the step graph 'step' reads its cache as %mul.*expected "
                                        "kv_cache\\[layer, 0 \\| 1\\]; run with compact: false"):
        get_pass("kv_drop")(heads=[[0, 1]])(prog, PassContext())
    res = get_pass("kv_drop")(heads=[[0, 1]], compact=False)(prog, PassContext())
    assert res.modified and res.program.records["KVStream"].rows is None


def test_compact_state_without_a_layer_streams_torch_free(tmp_path):
    """Every head of layer 0 dropped: the layer has no rows, its snap heads' mass is zero, and
    the artifact (ONNX Runtime) carries the one row left, equal to the eager frame lists."""
    import numpy as np

    from pared.targets import get_target
    m, ex = testing.tiny_streamer(capacity_frames=10)
    snap = get_pass("kv_policy")(policy="snap", frames=5)(capture(m, ex), PassContext()).program
    prog = get_pass("kv_drop")(heads=[[0, 0], [0, 1], [1, 1]])(snap, PassContext()).program
    rec = prog.records["KVStream"]
    assert rec.rows == ((1, 0),)
    assert {s.name: s.shape for s in prog.plan.state}["kv.cache"] == (1, 2, 2, 1, 20, 8)
    path = testing.save_program(prog, str(tmp_path / "art"), get_target("cpu").to_json())
    calls = testing.tiny_stream_calls(12)
    got, trace, held = testing.stream_torch_free(path, calls, str(tmp_path), trace=2)
    assert trace == ["init/keep", "go/append"]
    # what the artifact carries is the compact state as declared: one row, its scores, the count
    size = {"float32": 4, "bool": 1, "int64": 8}
    assert held == sum(int(np.prod(s.shape)) * size[s.dtype] for s in prog.plan.state) == \
        2 * 2 * 20 * 8 * 4 + 20 * 5 + 5 * 4 + 8
    ref = torch.stack(testing.eager_stream(m.step, rec.kv_layout(), calls, m.head_dim)).numpy()
    np.testing.assert_allclose(got, ref, atol=2e-5, rtol=1e-5)
