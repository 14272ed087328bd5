"""The format registry: one table of quantization formats that every analysis and pass reads."""
import pytest

from pared.analysis import latency, quant_sensitivity
from pared.backends.onnxruntime.int8_check import INTEGER_OPS
from pared.ir.formats import FORMATS, get_format
from pared.ir.measure import LINEAR_FORMATS, LinearFormat
from pared.passes.quant import mixed_precision


def test_byte_costs_per_format():
    k, n = 256, 64
    assert get_format("fp32").weight_bytes(k, n) == 4 * k * n
    assert get_format("w8a8").weight_bytes(k, n) == k * n + 4 * n                 # codes + a scale per channel
    # block-wise: 256 / 32 = 8 blocks a row; int4 codes two to a byte, a float32 scale per block
    assert get_format("w4").weight_bytes(k, n, 32) == n * 8 * 16 + 4 * n * 8
    assert get_format("w4").weight_bytes(k, n, 32, symmetric=False) == n * 8 * 16 + 4 * n * 8 + n * 4
    assert get_format("w8").weight_bytes(k, n, 128) == n * 2 * 128 + 4 * n * 2
    assert [f.name for f in FORMATS.values() if f.weight_only] == ["w4", "w8"]


def test_every_table_reads_the_registry():
    assert LINEAR_FORMATS == {name: f.weight_bits for name, f in FORMATS.items()}
    assert quant_sensitivity.FORMATS == latency.FORMATS == {"w8a8": 8, "w4": 4, "w8": 8}
    assert mixed_precision.FORMAT_BITS == {name: FORMATS[name].weight_bits for name in mixed_precision.FORMAT_BITS}
    assert LinearFormat("w4").bits == 4 and LinearFormat("w4").weight_only
    # the integer kernels a quantized format may run as are ones the ORT lowering check counts
    for f in FORMATS.values():
        if f.name != "fp32":
            assert set(f.ort_kernels) <= set(INTEGER_OPS), f.name


def test_an_unknown_format_is_named():
    with pytest.raises(ValueError, match=r"pass 'x': unknown format 'int3'; known: fp32, w8a8, w4, w8"):
        get_format("int3", "pass 'x'")


def test_activation_widths_of_a_static_w8a8_decision():
    from pared.ir.formats import LinearSpec
    ok = LinearSpec("w8a8", "t", act_range=(-1.0, 1.0), weight_qmax=127, act_bits=4)
    assert ok.problems(8, 4, weight_qmax_limit=127) == []
    assert "act_bits" not in LinearSpec("w8a8", "t", act_range=(0.0, 1.0), weight_qmax=127).to_json()
    assert ok.to_json()["act_bits"] == 4
    assert any("act_bits 1 is not an activation width in 2..8" in p for p in
               LinearSpec("w8a8", "t", act_range=(0.0, 1.0), weight_qmax=127, act_bits=1).problems(
                   8, 4, weight_qmax_limit=127))
    assert any("needs a static act_range" in p for p in
               LinearSpec("w8a8", "t", dynamic=True, weight_qmax=127, act_bits=4).problems(8, 4, weight_qmax_limit=127))
