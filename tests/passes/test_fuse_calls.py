"""fuse_calls: consecutive plan calls become one graph; a call after a select moves into each
case; outputs only the second call read are dropped; the artifact computes the same values."""
import numpy as np
import torch

import pared
from pared.backends.executor import Executor
from pared.ir.capture import capture
from pared.ir.plan import Call, Loop, Select, iter_nodes
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.testing import tiny_decoder, tiny_decoder_inputs, tiny_denoiser, tiny_denoiser_inputs


def _calls(program):
    return [n for n in iter_nodes(program.plan.body) if isinstance(n, Call)]


def test_denoiser_loop_fuses_head_and_update():
    m, x = tiny_denoiser(steps=6)
    prog = capture(m, x)
    res = get_pass("fuse_calls")()(prog, PassContext())
    p = res.program
    assert set(p.graphs) == {"encoder+denoise.start", "head+denoise.update"}
    (loop,) = p.plan.step_loops()
    assert isinstance(loop.body, Call) and loop.body.graph == "head+denoise.update"
    # the head's output (denoise.out) was read by the update only: no longer an output
    assert loop.body.outputs == ("denoise.x",)
    assert p.graphs["head+denoise.update"].output_names == ("output",)
    held = tiny_denoiser_inputs(1, 4)
    torch.testing.assert_close(p(*held), prog(*held), rtol=0, atol=0)
    assert set(prog.graphs) == {"encoder", "denoise.start", "head", "denoise.update"}   # input left alone


def test_call_after_a_select_moves_into_each_case():
    m, x = tiny_denoiser(steps=8)
    prog = capture(m, x)
    cached = get_pass("action_cache")(schedule="interval", interval=2)(prog, PassContext()).program
    res = get_pass("fuse_calls")()(cached, PassContext())
    (sel,) = res.program.plan.selects()
    assert [c.graph for _, c in sel.cases] == ["head.full+denoise.update", "head.reuse1+denoise.update"]
    # the full case still writes the cached sub-block outputs to state
    full = dict(sel.cases)["full"]
    assert sum(o.startswith("state:") for o in full.outputs) == 6 and full.outputs[-1] == "denoise.x"
    held = tiny_denoiser_inputs(1, 5)
    torch.testing.assert_close(res.program(*held), cached(*held), rtol=0, atol=0)


def test_speculative_decoding_fuses_head_and_accept(tmp_path):
    m, x = tiny_decoder()
    cal = [tiny_decoder_inputs(1, 100 + i) for i in range(16)]
    pipe = [{"speculative_decode": {"drafter": "retrieval"}}]
    plain = pared.optimize(m, x, target="cpu", pipeline=pipe, calibration=cal, bench_repeats=0)
    fused = pared.optimize(m, x, target="cpu", pipeline=pipe + ["fuse_calls"], calibration=cal, bench_repeats=0)
    assert "head+speculative_decode.accept" in fused.program.graphs
    e0 = Executor(plain.save(str(tmp_path / "a")), threads=1)
    e1 = Executor(fused.save(str(tmp_path / "b")), threads=1)
    for seed in (7, 8, 9):
        h = [a.numpy() for a in tiny_decoder_inputs(1, seed)]
        np.testing.assert_array_equal(e1(*h), e0(*h))
        assert len(e1.graph_trace[-1]) < len(e0.graph_trace[-1])


def test_nothing_to_fuse_across_a_loop_boundary():
    m, x = tiny_decoder(n_tokens=3)
    p = get_pass("fuse_calls")()(capture(m, x), PassContext()).program
    loops = [n for n in iter_nodes(p.plan.body) if isinstance(n, Loop)]
    assert len(loops) == 1 and isinstance(loops[0].body, Call)          # head+pick inside
    assert [c.graph for c in _calls(p)] == ["encoder+decode.start", "head+decode.pick", "detokenize"]
    assert not any(isinstance(n, Select) for n in iter_nodes(p.plan.body))
