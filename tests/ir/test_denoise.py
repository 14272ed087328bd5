"""A sampler captured whole (ir/denoise.py): the plan's steps loop, its step values and
selectors by iteration, the torch side and the artifact against eager."""
import numpy as np
import pytest
import torch

import pared
from pared.backends.executor import Executor
from pared.ir.capture import capture
from pared.ir.denoise import Denoiser, DenoiseLoop
from pared.ir.plan import Call, Loop, Plan, PlanRunner, Select, Seq, Table
from pared.ir.records import Record
from pared.testing import tiny_denoiser, tiny_denoiser_inputs


def test_capture_structure_and_record():
    m, x = tiny_denoiser(steps=5)
    prog = capture(m, x)
    assert set(prog.graphs) == {"encoder", "denoise.start", "head", "denoise.update"}
    loop = prog.plan.step_loops()
    assert len(loop) == 1 and loop[0].count == 5 and loop[0].steps
    assert prog.plan.stepped_graphs() == {"head": 5, "denoise.update": 5}
    assert dict(prog.plan.step_values)["denoise.t"] == tuple(float(v) for v in torch.linspace(900, 0, 5))
    rec = prog.records["DenoiseLoop"]
    assert isinstance(rec, DenoiseLoop) and rec.steps == 5 and rec.values == ("denoise.t", "denoise.scale")
    assert Record.from_json(rec.to_json()) == rec
    assert Plan.from_json(prog.plan.to_json()) == prog.plan


def test_program_and_artifact_equal_eager(tmp_path):
    m, x = tiny_denoiser(steps=6, batch=2)
    prog = capture(m, x)
    held = tiny_denoiser_inputs(2, 9)
    with torch.no_grad():
        ref = m(*held)
    torch.testing.assert_close(prog(*held), ref, rtol=0, atol=1e-5)
    opt = pared.optimize(m, x, target="cpu", pipeline=[], bench_repeats=0)
    ex = Executor(opt.save(str(tmp_path / "a")), threads=1)
    got = ex(*[a.numpy() for a in held])
    np.testing.assert_allclose(got, ref.numpy(), atol=1e-5)
    assert ex.graph_trace[-1].count("head") == 6


def test_eager_reads_each_step_value():
    """Changing one step's value changes eager and the program alike (the loop reads step i's)."""
    m, x = tiny_denoiser(steps=4)
    m.schedule["scale"] = (0.1, 0.1, 0.5, 0.1)
    prog = capture(m, x)
    with torch.no_grad():
        ref = m(*x)
    torch.testing.assert_close(prog(*x), ref, rtol=0, atol=1e-5)
    m.schedule["scale"] = (0.1,) * 4
    with torch.no_grad():
        assert not torch.allclose(m(*x), ref, atol=1e-4)


def test_steps_loop_indexes_selects_and_values_by_iteration():
    """Inside Loop(steps=True) a table select chooses, and step: reads, by the iteration; outside,
    by the call index."""
    log = []

    def run_graph(name, args):
        log.append((name, float(args[0][0]) if args else None))
        return [np.zeros(1, np.float32)]
    sel = Select(Table(("a", "b", "b"), "c"), (("a", Call("ga", ("step:v",), ("o",))),
                                                ("b", Call("gb", ("step:v",), ("o",))),
                                                ("c", Call("gc", ("step:v",), ("o",)))))
    plan = Plan((), ("o",), Seq((Call("pre", ("step:v",), ("o",)), Loop(sel, count=4, steps=True))),
                step_values=(("v", (10.0, 11.0, 12.0, 13.0)),))
    r = PlanRunner(plan, run_graph)
    r([])
    assert log == [("pre", 10.0), ("ga", 10.0), ("gb", 11.0), ("gb", 12.0), ("gc", 13.0)]
    log.clear()
    r([])                                         # call 1: outside the loop, the call's value
    assert log[0] == ("pre", 11.0) and [g for g, _ in log[1:]] == ["ga", "gb", "gb", "gc"]
    assert r.trace == ["a/b/b/c"] * 2


def test_bad_denoiser():
    m, _ = tiny_denoiser()
    with pytest.raises(ValueError, match="equally long"):
        Denoiser(m.encoder, m.head, m.update, {"t": [1.0, 2.0], "scale": [0.1]})
    with pytest.raises(ValueError, match="head_values \\['s'\\]"):
        Denoiser(m.encoder, m.head, m.update, {"t": [1.0]}, head_values=("s",))
    with pytest.raises(pared.CaptureError, match="the encoder's inputs and then the initial sample"):
        capture(m, (torch.zeros(1, 6),))
