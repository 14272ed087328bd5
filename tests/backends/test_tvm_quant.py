"""Quantized graphs (quantize_linears) on TVM: uint8 x int8 -> int32 matmuls in Relax,
outputs matching ONNX Runtime's integer kernels, and a torch-free artifact load.

Bound: TVM and ORT both run the layers in integers on the same int8 weights and
uint8-grid activations; they differ only where an activation lies on a rounding
boundary and the two compute x / s in another order or precision. Measured rel L2
2e-8..7e-8 on this model (on all-MiniLM-L6-v2, six layers deep: 0.02 static, 0.004
dynamic); TVM_VS_ORT leaves room for a few one-step flips.
"""
import logging
import os

import numpy as np
import pytest
import torch
from torch import nn

from pared.backends.executor import Executor
from pared.backends.tvm.lower import to_relax
from pared.ir.capture import capture
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.targets import get_target
from pared.testing import assert_close_to_eager, run_torch_free, save_program

TVM_CPU = dict(get_target("tvm-cpu").to_json(), threads=1)
CPU = dict(get_target("cpu").to_json(), threads=1)
#: TVM vs ORT (both integer kernels), relative L2
TVM_VS_ORT = 1e-3
#: either backend vs eager fp32 (lossy int8), relative L2
VS_EAGER = 0.05


class TinyMLP(nn.Module):
    """Linears with and without bias, a 3-D input (addmm after a view) and a 2-D one."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(16, 48)
        self.mid = nn.Linear(48, 48, bias=False)
        self.down = nn.Linear(48, 8)

    def forward(self, x):                       # x [B, S, 16]
        h = torch.relu(self.up(x))
        h = torch.nn.functional.gelu(self.mid(h)) + h
        return self.down(h).mean(dim=1)


def _quantized(mode="static", seed=0):
    torch.manual_seed(seed)
    m = TinyMLP().eval()
    x = torch.randn(4, 8, 16)
    g = torch.Generator().manual_seed(seed + 1)
    cal = [(torch.randn(4, 8, 16, generator=g),) for _ in range(4)]
    res = get_pass("quantize_linears")(mode=mode)(capture(m, (x,)), PassContext(calibration=cal))
    assert res.modified and res.stats["quantized"] == 3
    return m, x, res.program


@pytest.fixture(scope="module", params=["static", "dynamic"])
def artifacts(request, tmp_path_factory):
    m, x, program = _quantized(request.param)
    root = tmp_path_factory.mktemp(f"tvmq_{request.param}")
    return request.param, m, x, program, save_program(program, root / "tvm", TVM_CPU), save_program(program, root / "ort", CPU)


def test_relax_holds_int8_matmuls_and_no_float_dequantize():
    _, _, program = _quantized()
    stats: dict = {}
    text = str(to_relax(program.main, "main", stats))
    assert stats == {"int8_matmul": 3}
    # every layer: uint8 activations (the quantizer's own grid) times int8 weights, accumulated in int32
    assert text.count('out_dtype="int32"') == 3
    assert text.count('dtype="uint8") = R.quantize(') == 3 and text.count('out_dtype="uint8"') == 3
    assert "R.dequantize(" not in text          # no fake-quant left: the weights stay int8


def test_dynamic_mode_relax_holds_int8_matmuls():
    _, _, program = _quantized("dynamic")
    stats: dict = {}
    text = str(to_relax(program.main, "main", stats))
    assert stats == {"int8_matmul": 0, "dynamic_int8_matmul": 3}
    assert text.count('out_dtype="int32"') == 3 and "R.dequantize(" not in text


def test_tvm_matches_ort_and_eager(artifacts):
    mode, m, x, program, tvm_art, ort_art = artifacts
    tvm_ex, ort_ex = Executor(tvm_art), Executor(ort_art)
    assert tvm_ex.manifest["graphs"]["main"]["backend"] == "tvm"
    key = "int8_matmul" if mode == "static" else "dynamic_int8_matmul"
    assert tvm_ex.manifest["graphs"]["main"]["int8"][key] == 3
    ort_ops = ort_ex.manifest["graphs"]["main"]["int8"]["integer_ops"]
    assert sum(ort_ops.values()) == 3, ort_ops
    for seed in (3, 4):
        xs = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(seed))
        got_tvm, got_ort = tvm_ex(xs.numpy()), ort_ex(xs.numpy())
        assert_close_to_eager(got_ort, got_tvm, rel_l2=TVM_VS_ORT, what="tvm vs ort")
        assert_close_to_eager(program(xs), got_tvm, rel_l2=TVM_VS_ORT, what="tvm vs fx graph")
        with torch.no_grad():
            ref = m(xs)
        assert_close_to_eager(ref, got_tvm, rel_l2=VS_EAGER, what="tvm vs eager fp32")
        # lossy: not the float model
        assert float(np.linalg.norm(ref.numpy() - got_tvm) / np.linalg.norm(ref.numpy())) > 1e-5


@pytest.mark.slow
def test_native_int8_layers_run_on_vnni_like_the_baseline_build(tmp_path, caplog):
    """On a host with AVX-512 VNNI, tvm-native tensorizes the integer matmuls whose width is a
    multiple of 16 (up, mid: 48 columns; down, 8 columns, keeps the default tiles), and the
    artifact agrees with tvm-cpu's (the same integer sums; the float epilogues may round apart)."""
    native = get_target("tvm-native").resolve()
    if "+avx512vnni" not in native.tvm_target["mattr"]:
        pytest.skip("this host lacks AVX-512 VNNI")
    _, _, program = _quantized()
    with caplog.at_level(logging.DEBUG, logger="pared.backends.tvm"):
        art = save_program(program, tmp_path / "native", dict(native.to_json(), threads=1))
    scheduled = [r.getMessage() for r in caplog.records if r.name == "pared.backends.tvm"
                 and r.getMessage().startswith("matmul schedule")]
    vnni = sum("VNNI" in m for m in scheduled)          # per build of the graph: 2 tensorized, 1 not
    assert vnni > 0 and vnni == 2 * (len(scheduled) - vnni), scheduled
    base = save_program(program, tmp_path / "cpu", TVM_CPU)
    native_ex, base_ex = Executor(art), Executor(base)
    # the tensorized layers' weight repacks run once at load (schedule.prepack_weights), not per call
    assert native_ex.manifest["graphs"]["main"]["transform_params"] == "main_transform_params"
    assert "transform_params" not in base_ex.manifest["graphs"]["main"]
    assert all(ex.manifest["graphs"]["main"]["workspace"] == "main_workspace" for ex in (native_ex, base_ex))
    for seed in (3, 4):
        xs = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(seed))
        got, want = native_ex(xs.numpy()), base_ex(xs.numpy())
        assert_close_to_eager(want, got, rel_l2=TVM_VS_ORT, what="tvm-native vs tvm-cpu")
        assert_close_to_eager(program(xs), got, rel_l2=TVM_VS_ORT, what="tvm-native vs fx graph")
    # and torch-free, prepacking at load as the in-process executor does: the same outputs
    np.save(tmp_path / "x.npy", xs.numpy())
    run_torch_free(f"""
        import numpy as np, pared
        np.save({str(tmp_path / 'y.npy')!r}, pared.load({str(art)!r})(np.load({str(tmp_path / 'x.npy')!r})))
    """)
    np.testing.assert_array_equal(np.load(tmp_path / "y.npy"), got)


def test_tvm_int8_artifact_runs_without_torch(artifacts):
    mode, m, x, program, tvm_art, ort_art = artifacts
    here = os.path.dirname(tvm_art)
    xs = torch.randn(4, 8, 16, generator=torch.Generator().manual_seed(5))
    np.save(os.path.join(here, "x.npy"), xs.numpy())
    out = run_torch_free(f"""
        import numpy as np, pared
        ex = pared.load({tvm_art!r})
        np.save({os.path.join(here, 'y.npy')!r}, ex(np.load({os.path.join(here, 'x.npy')!r})))
        print("ok")
    """)
    assert "ok" in out
    assert_close_to_eager(Executor(ort_art)(xs.numpy()), np.load(os.path.join(here, "y.npy")), rel_l2=TVM_VS_ORT)


class FakeQuantOnly(nn.Module):
    """Quantizers around a float op that is no linear layer, and a linear whose
    weight is a run-time tensor: both stay float fake-quant in Relax."""

    def forward(self, x, w):
        qd = torch.ops.quantized_decomposed
        xq = qd.quantize_per_tensor.default(x, 0.05, 128, 0, 255, torch.uint8)
        xd = qd.dequantize_per_tensor.default(xq, 0.05, 128, 0, 255, torch.uint8)
        return torch.relu(xd) @ w


def test_quantizers_outside_a_linear_lower_as_relax_quantize_dequantize(tmp_path):
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers quantized_decomposed)
    m = FakeQuantOnly().eval()
    x, w = torch.randn(6, 8), torch.randn(8, 4)
    program = capture(m, (x, w))
    stats: dict = {}
    text = str(to_relax(program.main, "main", stats))
    assert stats == {"int8_matmul": 0} and "R.quantize(" in text and "R.dequantize(" in text
    ex = Executor(save_program(program, tmp_path / "a", TVM_CPU))
    xs, ws = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)), torch.randn(8, 4)
    # the same uint8 grid as torch's quantize op, up to values on a rounding boundary
    assert_close_to_eager(m(xs, ws), ex(xs.numpy(), ws.numpy()), rel_l2=1e-2)
    assert_close_to_eager(program(xs, ws), ex(xs.numpy(), ws.numpy()), rel_l2=1e-2)
