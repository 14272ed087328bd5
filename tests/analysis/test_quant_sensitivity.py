"""quant_sensitivity: what it records, checked against eager models quantized by hand
and against the quantization passes; read-only; bad options."""
import json
import math

import numpy as np
import pytest
import torch

from pared.analysis.quant_sensitivity import SensitivityProfile, compare_outputs, replay
from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.passes.quant.common import dequantize_weight_int4, quantize_weight_int4, quantized_weight_bytes
from pared.testing import tiny_dit, tiny_sampler_loop, tiny_transformer


def _calibration(seed=1, n=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 50, (2, 16), generator=g),) for _ in range(n)]


def _profile(**opts):
    m, (x,) = tiny_transformer()
    prog = capture(m, (x,))
    ctx = PassContext(calibration=_calibration())
    res = get_pass("quant_sensitivity")(**opts)(prog, ctx)
    return m, prog, res, res.program.records.of(SensitivityProfile)


def _eager_outputs(m, calibration):
    rows = []
    with torch.no_grad():
        for (ids,) in calibration:
            out = m(ids)
            rows.append(torch.cat([out["tokens"].reshape(2, -1), out["logits"]], dim=1).double().numpy())
    return np.concatenate(rows)


def test_records_every_layer_and_format():
    m, prog, res, prof = _profile()
    assert res.modified is False and res.program.main is prog.main and not prog.records     # read-only
    assert prof.calls == 3 and prof.block_size == 32 and len(prof.layers) == 9
    lay = prof.layer("blocks.0.mlp.0")
    assert (lay.in_features, lay.out_features, lay.formats) == (32, 128, ("w8a8", "w4"))
    assert lay.fp32_bytes == 4 * 32 * 128
    assert lay.bytes == (quantized_weight_bytes(32, 128, 8), quantized_weight_bytes(32, 128, 4, 32))
    assert lay.flops == 2 * 32 * 32 * 128                          # rows 2 x 16, per call
    for x in prof.layers:
        assert all(e > 0 for e in x.rel_l2)
        assert all(abs(s + 20 * math.log10(e)) < 1e-9 for s, e in zip(x.sqnr_db, x.rel_l2))
        assert len(x.activation_call_ranges) == 3 and x.activation_outlier_ratio >= 1.0
    # 4-bit weights cost more than W8A8 on every layer of this model
    assert all(x.error("w4") > x.error("w8a8") for x in prof.layers) and prof.layers[0].error("fp32") == 0.0
    json.dumps(prof.to_json())


def test_int4_error_matches_the_eager_model_quantized_by_hand():
    m, prog, res, prof = _profile()
    cal = _calibration()
    ref = _eager_outputs(m, cal)
    lin = m.blocks[1].mlp[0]
    w = lin.weight.data.clone()
    q, s, z = quantize_weight_int4(w, 32, True)
    try:
        lin.weight.data = dequantize_weight_int4(q, s, z, tuple(w.shape))
        got = _eager_outputs(m, cal)
    finally:
        lin.weight.data = w
    want = compare_outputs(ref, got)["rel_l2"]
    assert prof.layer("blocks.1.mlp.0").error("w4") == pytest.approx(want, rel=1e-4)


def test_w8a8_error_matches_quantize_linears_on_that_layer_alone():
    m, prog, res, prof = _profile()
    cal = _calibration()
    others = [x.layer for x in prof.layers if x.layer != "blocks.0.qkv"]
    one = get_pass("quantize_linears")(exclude=others)(prog, PassContext(calibration=cal))
    assert one.stats["quantized"] == 1
    got = compare_outputs(replay(prog.main.module, cal), replay(one.program.main.module, cal))["rel_l2"]
    # the analysis does not round the bias to int32; everything else is the same
    assert prof.layer("blocks.0.qkv").error("w8a8") == pytest.approx(got, rel=0.05)


def test_activation_ranges_match_eager_hooks():
    m, prog, res, prof = _profile()
    seen = []
    h = m.blocks[0].mlp[2].register_forward_hook(lambda mod, a, out: seen.append(a[0].detach().clone()))
    try:
        with torch.no_grad():
            for (ids,) in _calibration():
                m(ids)
    finally:
        h.remove()
    lay = prof.layer("blocks.0.mlp.2")
    assert lay.activation_range == pytest.approx((min(float(v.min()) for v in seen), max(float(v.max()) for v in seen)))
    assert lay.activation_call_ranges[1] == pytest.approx((float(seen[1].min()), float(seen[1].max())))


def test_loop_calibration_measures_the_loop_result():
    m, (x, t) = tiny_dit(layers=2)
    prog = capture(m, (x, t))
    ctx = PassContext(calibration=tiny_sampler_loop(x, 4))
    prof = get_pass("quant_sensitivity")(formats=["w4"])(prog, ctx).program.records.of(SensitivityProfile)
    assert prof.calls == 4 and all(x.formats == ("w4",) and x.rel_l2[0] > 0 for x in prof.layers if x.layer != "embed")
    # a layer with no int4 form is kept (its bytes count) with no candidate, and says why
    assert prof.layer("embed").formats == () and ("embed", "w4: input dim 4 not a multiple of block_size 32") in \
        prof.skipped
    with torch.no_grad():
        final = tiny_sampler_loop(x, 4)(m)
    assert prof.output_norm == pytest.approx(float(final.double().norm()), rel=1e-5)


def test_weight_only_int8_is_nearly_lossless_and_costs_its_blocks():
    m, prog, res, prof = _profile(formats=["w8a8", "w8", "w4"], w8_block_size=32)
    assert prof.w8_block_size == 32
    for x in prof.layers:
        assert x.formats == ("w8a8", "w8", "w4")
        assert x.error("w8") < x.error("w8a8") and x.error("w8") < x.error("w4")
        assert x.bytes[1] == quantized_weight_bytes(x.in_features, x.out_features, 32) // 4 + \
            4 * x.out_features * (x.in_features // 32)            # codes + a scale per block
    # by hand: that layer's weight through 8-bit blocks
    from pared.passes.quant.common import dequantize_weight_blocks, quantize_weight_blocks
    cal = _calibration()
    ref = _eager_outputs(m, cal)
    lin = m.blocks[0].proj
    w = lin.weight.data.clone()
    try:
        lin.weight.data = dequantize_weight_blocks(*quantize_weight_blocks(w, 32, True, 8), tuple(w.shape), 8)
        got = _eager_outputs(m, cal)
    finally:
        lin.weight.data = w
    assert prof.layer("blocks.0.proj").error("w8") == pytest.approx(compare_outputs(ref, got)["rel_l2"], rel=1e-3)


def test_patterns_select_layers():
    _, _, _, prof = _profile(layers="blocks.1.**", exclude="blocks.1.qkv")
    assert [x.layer for x in prof.layers] == ["blocks.1.proj", "blocks.1.mlp.0", "blocks.1.mlp.2"]


@pytest.mark.parametrize("opts, message", [
    ({"formats": ["w2"]}, "option 'formats' takes candidates from \\['w8a8', 'w4', 'w8'\\]"),
    ({"block_size": 48}, "option 'block_size' must be a power of two"),
    ({"block_size": 8}, "option 'block_size' must be a power of two >= 16"),
    ({"w8_block_size": 96}, "option 'w8_block_size' must be a power of two"),
    ({"format": ["w4"]}, "unknown option 'format'; did you mean 'formats'"),
])
def test_bad_options(opts, message):
    with pytest.raises(OptionError, match=f"pass 'quant_sensitivity'.*{message}"):
        get_pass("quant_sensitivity")(**opts)


def test_needs_a_calibration_run_and_a_layer():
    m, (x,) = tiny_transformer()
    prog = capture(m, (x,))
    with pytest.raises(PassError, match="pass 'quant_sensitivity' needs a calibration run"):
        get_pass("quant_sensitivity")()(prog, PassContext())
    with pytest.raises(PassError, match="pass 'quant_sensitivity': no linear layer .* matches layers \\['nope'\\]"):
        get_pass("quant_sensitivity")(layers="nope")(prog, PassContext(calibration=_calibration()))
