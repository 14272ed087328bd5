"""dynamic_precision (DyQ-VLA): activation widths switched per call by the robot's motion over
one set of int8 weights. Numerics of every width against an eager fake-quant emulation (nn.Linear
hooks), the choice per call against speeds computed by hand, the structure (one weight set, a
clamp per layer below 8 bits), the a8 variant equal to quantize_linears', the torch-free artifact
on integer kernels in every variant, the memory figure, no-op and bad options."""
import bisect
import contextlib
import os

import numpy as np
import pytest
import torch
from torch import nn

import pared
from pared import testing
from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.quant import activation_qparams, int8_weight_qmax, quantize_bias, quantize_weight
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.testing import op_count, run_torch_free

POSITION = [0, 1, 2]
#: an emulated width against its variant: the same integer arithmetic, float rounding apart
#: (measured 3e-7)
REL_L2 = 1e-5


def _calibration(n=24, seed=11):
    return [testing.tiny_vla_inputs(1, seed=s) for s in range(seed, seed + n)]


@pytest.fixture(scope="module")
def result():
    m, inp = testing.tiny_vla(batch=1)
    prog = capture(m, inp)
    res = get_pass("dynamic_precision")(position=POSITION, bits=[8, 4, 2], dwell=1)(
        prog, PassContext(calibration=_calibration()))
    return m, prog, res


@contextlib.contextmanager
def _fake_quant(model: nn.Module, layers, bits: int):
    """Every quantized nn.Linear of `model` computed as the rewrite means it: x clamped and rounded on
    the 2^bits grid of its calibrated range, int8 per-channel weights, an int32 bias at s_x * s_w."""
    by_region = {lq.region: lq for lq in layers}
    qmax = int8_weight_qmax(None)
    handles = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.Linear) or name not in by_region:
            continue
        lo, hi = by_region[name].activation_range
        s, z = activation_qparams(lo, hi, bits)
        wq, ws = quantize_weight(mod.weight.detach().t(), qmax)
        wd = wq.to(torch.float32) * ws
        bq, bs = quantize_bias(mod.bias, s, ws)
        bd = bq.to(torch.float32) * bs

        def fwd(x, s=s, z=z, wd=wd, bd=bd):
            q = torch.clamp(torch.round(x / s) + z, 0, (1 << bits) - 1)
            return ((q - z) * s) @ wd + bd
        handles.append((mod, mod.forward))
        mod.forward = fwd
    try:
        yield
    finally:
        for mod, f in handles:
            mod.forward = f


def test_every_width_computes_its_fake_quant_emulation(result):
    m, _, res = result
    rec = res.program.records.get("DynamicPrecisionDecisions")
    assert [lv.label for lv in rec.levels] == ["a8", "a4", "a2"]
    held = testing.tiny_vla_inputs(1, seed=99)
    outs = {}
    for lv in rec.levels:
        got = res.program.graphs[f"main.{lv.label}"].run(*held)[0]
        with torch.no_grad(), _fake_quant(m, rec.layers, lv.bits):
            ref = m(*held)
        err = float((got - ref).norm() / ref.norm())
        assert err < REL_L2, (lv.label, err)
        outs[lv.label] = got
    with torch.no_grad():
        fp = m(*held)
    errs = [float((outs[k] - fp).norm() / fp.norm()) for k in ("a8", "a4", "a2")]
    assert errs[0] < errs[1] < errs[2], errs            # fewer bits, further from float


def test_the_level_follows_the_speed_of_the_state(result):
    _, _, res = result
    rec = res.program.records.get("DynamicPrecisionDecisions")
    rng = np.random.default_rng(0)
    # a trajectory: slow, fast, slow; speeds by hand against the record's edges (dwell 1)
    steps = np.concatenate([np.full(4, 0.1), np.full(4, 3 * rec.edges[-1]), np.full(3, 0.1)])
    pos = np.cumsum(steps[:, None] * np.array([[0.6, 0.8, 0.0]]), axis=0)
    r = res.program.runner()
    want = []
    for i, p in enumerate(pos):
        img, ids, _ = testing.tiny_vla_inputs(1, seed=int(rng.integers(1000)))
        r([img, ids, torch.tensor(p[None], dtype=torch.float32)])
        want.append("a8" if i == 0 else rec.levels[bisect.bisect_right(rec.edges, steps[i])].label)
    assert r.trace == want
    assert want.count("a2") == 4 and want[0] == "a8" and want[-1] == "a8"


def test_one_set_of_int8_weights_and_a_clamp_per_layer_below_8_bits(result):
    _, _, res = result
    g = res.program.graphs
    rec = res.program.records.get("DynamicPrecisionDecisions")
    n = len(rec.layers)
    assert n == 18                                  # state, 4 blocks x (qkv, proj, mlp.0, mlp.2), head
    weights = [{k: v for k, v in gr.module.named_buffers() if k.endswith("_w")} for gr in g.values()]
    assert len(weights) == 3 and len(weights[0]) == n and {v.dtype for v in weights[0].values()} == {torch.int8}
    for w in weights[1:]:
        assert set(w) == set(weights[0]) and all(w[k] is weights[0][k] for k in w)
    for lab, clamps in (("a8", 0), ("a4", n), ("a2", n)):
        assert op_count(res.program, "aten.clamp.default", f"main.{lab}") == clamps
        assert op_count(res.program, "quantized_decomposed.quantize_per_tensor", f"main.{lab}") == n
    assert {lq.activation_bits for lq in rec.layers} == {8}


def test_the_8_bit_variant_is_quantize_linears_static_int8(result):
    m, prog, res = result
    ql = get_pass("quantize_linears")()(prog, PassContext(calibration=_calibration())).program
    held = testing.tiny_vla_inputs(1, seed=5)
    assert torch.equal(ql(*held), res.program.graphs["main.a8"].run(*held)[0])


def test_memory_is_int8_weights_and_the_levels_activation_bits(result):
    _, _, res = result
    rec = res.program.records.get("DynamicPrecisionDecisions")
    w = sum(lq.in_features * lq.out_features + 4 * lq.out_features for lq in rec.layers)
    assert rec.weight_bytes == w
    assert rec.float_weight_bytes == sum(4 * lq.in_features * lq.out_features for lq in rec.layers)
    e = rec.activation_elements
    assert [lv.activation_bytes for lv in rec.levels] == [e, e // 2, e // 4]
    fp = rec.float_weight_bytes + rec.other_param_bytes + 4 * e
    assert rec.memory_ratio({"a8": 1.0}) == pytest.approx((w + rec.other_param_bytes + e) / fp)
    assert rec.memory_ratio({"a8": 0.5, "a2": 0.5}) == pytest.approx((w + rec.other_param_bytes + (e + e // 4) / 2) / fp)
    assert sum(lv.calibration_share for lv in rec.levels) == pytest.approx(1.0)


def test_each_weight_counts_once_over_graphs_of_several_weight_groups():
    """A Denoiser (an encoder and a head: two weight groups) whose head already has cache variants:
    every quantized weight counts once in the bytes, so the memory is a ratio below 1 (the bytes of
    the quantized layers' float weights are the program's float parameters they hold)."""
    from pared.ir.program import param_bytes
    m, x = testing.tiny_denoiser(steps=4)
    prog = capture(m, x)
    prog = get_pass("action_cache")(schedule="interval", interval=2)(prog, PassContext()).program
    calib = [testing.tiny_denoiser_inputs(1, seed=s) for s in range(30, 38)]
    res = get_pass("dynamic_precision")(input="obs", position=[0, 1, 2], bits=[8, 4])(
        prog, PassContext(calibration=calib))
    rec = res.program.records.get("DynamicPrecisionDecisions")
    # each weight once: a (region, weight) pair; action_cache's reuse variant holds its own narrowed
    # modulation weights (the gates' rows), distinct tensors the artifact stores as well
    once = {(lq.region, lq.weight): lq for lq in rec.layers}
    assert any("narrowed" in w for _, w in once)
    assert rec.float_weight_bytes == sum(4 * lq.in_features * lq.out_features for lq in once.values())
    assert 0 < rec.float_weight_bytes <= param_bytes(prog) and rec.other_param_bytes >= 0
    assert 0 < rec.memory_ratio() < 1


def test_the_artifact_runs_every_variant_on_integer_kernels_torch_free(tmp_path):
    m, inp = testing.tiny_vla(batch=1)
    calib = _calibration(12)
    opt = pared.optimize(m, inp, target="cpu", calibration=calib, bench_repeats=0, holdout=[],
                         allow_fidelity_loss=True,
                         pipeline=[{"dynamic_precision": {"position": POSITION, "bits": [8, 4], "dwell": 1}}])
    d = opt.save(str(tmp_path / "a"))
    for g in ("main.a8", "main.a4"):
        assert opt._manifest["graphs"][g]["int8"]["integer_ops"] == {"QGemm": 18}, g
    assert os.path.exists(os.path.join(d, "shared.weights"))
    np.savez(tmp_path / "seq.npz", **{f"{i}_{k}": a.numpy() for i, c in enumerate(calib) for k, a in enumerate(c)})
    r = opt.program.runner()
    with torch.no_grad():
        want = np.stack([r(list(c))[0].numpy() for c in calib])
    out = run_torch_free(f"""
        import numpy as np, pared, sys
        ex = pared.load({d!r})
        z = np.load({str(tmp_path / 'seq.npz')!r})
        ys = [np.asarray(ex(*[z[f"{{i}}_{{k}}"] for k in range(3)])) for i in range({len(calib)})]
        assert "torch" not in sys.modules
        np.save({str(tmp_path / 'y.npy')!r}, np.stack(ys))
        print(",".join(ex.trace))
    """)
    trace = out.strip().splitlines()[-1].split(",")
    assert trace == r.trace and len(set(trace)) == 2
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, atol=2e-6)


def test_nothing_to_do_and_a_second_run(result):
    m, prog, res = result
    ctx = PassContext(calibration=_calibration())
    again = get_pass("dynamic_precision")(position=POSITION, bits=[8, 4, 2])(res.program, ctx)
    assert again.modified is False and again.program is res.program
    none = get_pass("dynamic_precision")(position=POSITION, exclude=["**"])(prog, ctx)
    assert none.modified is False and none.program is prog


@pytest.mark.parametrize("opts, msg", [
    ({"bits": [4, 8]}, "option 'bits' must be distinct widths in 2..8, finest first"),
    ({"bits": [16, 8]}, "16-bit \\(float\\) activations have no kernel"),
    ({"position": []}, "option 'position' is required"),
    ({"shares": [0.5, 0.6]}, "option 'shares' needs 2 positive shares"),
    ({"dwell": 0}, "option 'dwell' must be in \\[1, inf\\]"),
    ({"previous": [5]}, "previous has 1 indices for the 3 of position"),
    ({"gripper_quantile": 1.5}, "option 'gripper_quantile' must be in \\[0, 1\\]"),
])
def test_bad_options(opts, msg):
    with pytest.raises(OptionError, match=msg):
        get_pass("dynamic_precision")(**{"position": POSITION, **opts})


def test_bad_programs_and_calibrations_are_named(result):
    _, prog, _ = result
    with pytest.raises(OptionError, match="option 'input' names 'robot', which is not a program input"):
        get_pass("dynamic_precision")(position=POSITION, input="robot")(prog, PassContext(calibration=_calibration()))
    with pytest.raises(PassError, match="pass calibration= a list of input tuples"):
        get_pass("dynamic_precision")(position=POSITION)(prog, PassContext(calibration=lambda f: None))
    with pytest.raises(PassError, match="gives 2 speeds; 2 levels need at least 4"):
        get_pass("dynamic_precision")(position=POSITION)(prog, PassContext(calibration=_calibration(3)))


def test_pared_bench_reports_the_widths_used_and_the_memory(result):
    from pared.workloads.bench import precision_summary
    _, prog, res = result
    rec = res.program.records.get("DynamicPrecisionDecisions")
    got = precision_summary(res.program, ["a8", "a4/full", "a4", "a2"])
    assert got["level_shares"] == {"a2": 0.25, "a4": 0.5, "a8": 0.25}
    assert got["memory_ratio"] == pytest.approx(rec.memory_ratio({"a8": 0.25, "a4": 0.5, "a2": 0.25}))
    assert precision_summary(prog, ["main"]) is None
