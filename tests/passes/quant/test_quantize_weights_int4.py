"""quantize_weights_int4 (weight-only block-wise INT4): structure, numerics against
eager (lossy: bound stated) and against the ORT artifact (the same numbers), the
cost model's memory-bound choice, the no-op cases, idempotence, bad options, and
the proof that ONNX Runtime runs the layers as MatMulNBits."""
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from pared.backends.onnxruntime.int8_check import check_int4_kernels, integer_kernel_report
from pared.backends.onnxruntime.lower import lower_graph
from pared.backends.onnxruntime.matmul_nbits import int4_layers, lower_matmul_nbits
from pared.backends.onnxruntime.runtime import OrtGraph
from pared.ir.capture import capture
from pared.ir.errors import BackendError, OptionError
from pared.ir.program import get_attr
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.passes.quant.common import dequantize_weight_int4, quantize_weight_int4, quantized_weight_bytes
from pared.passes.quant.quantize_weights_int4 import WeightQuantPlan
from pared.targets import get_target
from pared.testing import op_count, tiny_transformer

CPU = {"name": "cpu", "backend": "onnxruntime", "threads": 1}
#: the lossy bound against eager fp32 for the tiny transformer's tokens with every layer at
#: int4, block 32 (measured: 0.029 symmetric, 0.027 asymmetric)
REL_L2 = 0.05
#: the torch graph against its ORT artifact: the same dequantized weights, only the
#: summation order differs (measured: ~1e-7)
ARTIFACT_REL_L2 = 1e-5


def _rel_l2(ref, got):
    ref, got = np.asarray(ref, np.float64), np.asarray(got, np.float64)
    return float(np.linalg.norm(ref - got) / np.linalg.norm(ref))


class MLP(nn.Module):
    """Two Linears of different arithmetic intensity at 64 rows: the wide one
    compute-bound (15 FLOP/byte), the narrow one memory-bound (3.5 FLOP/byte)."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(64, 512)
        self.down = nn.Linear(512, 8, bias=False)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _mlp(rows=64):
    torch.manual_seed(0)
    return MLP().eval(), torch.randn(rows, 64)


def _quantized(**opts):
    m, (x,) = tiny_transformer()
    prog = capture(m, (x,))
    res = get_pass("quantize_weights_int4")(**opts)(prog, PassContext(target=get_target("cpu")))
    return m, x, prog, res


def test_structure_codes_scales_and_plan():
    m, x, prog, res = _quantized(force=True)
    before = prog.main.module.code
    p = res.program
    assert res.modified and res.stats == {"quantized": 9, "compute_bound": 0, "excluded": 0, "indivisible": 0}
    # per layer one per-channel dequantize of the codes (a block per "channel"), the matmul kept
    assert op_count(p, "quantized_decomposed.dequantize_per_channel") == 9
    assert op_count(p, "quantized_decomposed.quantize_per_tensor") == 0       # activations stay float
    assert op_count(p, "aten.addmm") == 9
    gm = p.main.module
    consts = {str(n.target): get_attr(gm, str(n.target)) for n in gm.graph.nodes if n.op == "get_attr"}
    codes = {k: v for k, v in consts.items() if k.startswith("_int4_") and k.endswith("_w")}
    assert len(codes) == 9
    assert all(v.dtype == torch.uint8 and v.shape[1] == 32 and int(v.max()) <= 15 for v in codes.values())
    assert not any(k.endswith(("qkv.weight", "proj.weight", "head.weight")) for k in consts)   # float weights gone
    plan = p.records["WeightQuantPlan"]
    assert isinstance(plan, WeightQuantPlan) and plan.block_size == 32 and plan.symmetric and len(plan.layers) == 9
    lq = next(lq for lq in plan.layers if lq.region == "blocks.0.mlp.0")
    assert (lq.in_features, lq.out_features, lq.rows) == (32, 128, 32)
    assert lq.quant_bytes == quantized_weight_bytes(32, 128, 4, 32) == 128 * 16 + 128 * 4
    json.dumps(plan.to_json())
    assert prog.main.module.code == before and "WeightQuantPlan" not in prog.records   # input left alone


@pytest.mark.parametrize("symmetric", [True, False])
def test_numerics_within_the_stated_bound(symmetric):
    m, x, prog, res = _quantized(force=True, symmetric=symmetric)
    held_out = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, got = m(held_out), res.program(held_out)
    assert 1e-5 < _rel_l2(ref["tokens"], got["tokens"]) < REL_L2


def test_codes_round_trip_within_half_a_step():
    torch.manual_seed(0)
    w = torch.randn(8, 64)
    for sym in (True, False):
        q, s, z = quantize_weight_int4(w, 32, sym)
        wd = dequantize_weight_int4(q, s, z, (8, 64))
        step = s.repeat_interleave(32).reshape(8, 64)
        assert torch.all((wd - w).abs() <= step / 2 + 1e-6)
        assert sym == bool(torch.all(z == 8))


def test_cost_model_quantizes_only_memory_bound_layers():
    m, x = _mlp()
    prog = capture(m, (x,))
    cpu = get_target("cpu")                                    # ridge 2e11 / 2e10 = 10 FLOP/byte
    res = get_pass("quantize_weights_int4")()(prog, PassContext(target=cpu))
    assert res.stats["quantized"] == 1 and res.stats["compute_bound"] == 1
    plan = res.program.records["WeightQuantPlan"]
    assert [lq.region for lq in plan.layers] == ["down"] and plan.ridge == 10.0
    assert plan.layers[0].intensity < 10.0 and ("up", "compute_bound") in plan.skipped
    # force: the cost model is not asked
    forced = get_pass("quantize_weights_int4")(force=True)(prog, PassContext(target=cpu))
    assert forced.stats["quantized"] == 2
    # a target whose ridge is below every layer's intensity: nothing pays, nothing changes
    flat = dataclasses.replace(cpu, peak_flops=1e10, mem_bandwidth=1e10)
    none = get_pass("quantize_weights_int4")()(prog, PassContext(target=flat))
    assert none.modified is False and none.program is prog and none.stats["compute_bound"] == 2


def test_layers_and_exclude_select_regions():
    _, _, _, res = _quantized(force=True, layers="blocks.**", exclude=["blocks.1.mlp.*"])
    regions = {lq.region for lq in res.program.records["WeightQuantPlan"].layers}
    assert regions == {"blocks.0.qkv", "blocks.0.proj", "blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.qkv",
                       "blocks.1.proj"}
    assert res.stats["excluded"] == 2


def test_indivisible_input_dim_stays_float():
    prog = capture(nn.Sequential(nn.Linear(40, 8), nn.Linear(8, 32)).eval(), (torch.randn(4, 40),))
    res = get_pass("quantize_weights_int4")(force=True, block_size=16)(prog, PassContext())
    assert res.modified is False and res.stats["indivisible"] == 2      # 40 and 8 are not multiples of 16


def test_no_linear_layers_is_a_no_op():
    prog = capture(nn.Sequential(nn.LayerNorm(8), nn.GELU()).eval(), (torch.randn(2, 8),))
    res = get_pass("quantize_weights_int4")(force=True)(prog, PassContext())
    assert res.modified is False and res.program is prog and res.stats["quantized"] == 0


def test_running_twice_finds_nothing_more():
    m, x, prog, res = _quantized(force=True)
    again = get_pass("quantize_weights_int4")(force=True)(res.program, PassContext())
    assert again.modified is False and again.program is res.program


@pytest.mark.parametrize("opts, message", [
    ({"block_size": 24}, "option 'block_size' must be a power of two >= 16"),
    ({"block_size": 8}, "option 'block_size' must be a power of two >= 16"),
    ({"layers": []}, "option 'layers' is empty"),
    ({"symetric": False}, "unknown option 'symetric'; did you mean 'symmetric'"),
    ({"force": "yes"}, "option 'force' expects bool"),
])
def test_bad_options(opts, message):
    with pytest.raises(OptionError, match=f"pass 'quantize_weights_int4'.*{message}"):
        get_pass("quantize_weights_int4")(**opts)


@pytest.mark.parametrize("symmetric", [True, False])
def test_ort_runs_matmul_nbits_with_the_torch_numbers(tmp_path, symmetric):
    m, x = _mlp()
    res = get_pass("quantize_weights_int4")(force=True, symmetric=symmetric)(capture(m, (x,)), PassContext())
    entry = lower_graph(res.program.main, "main", CPU, str(tmp_path))
    assert entry["int4"] == {"layers": 2, "matmul_nbits": 2}
    rep = entry["int8"]
    assert rep["integer_ops"] == {"MatMulNBits": 2}
    assert rep["float_matmuls"] == 0 and rep["dequantize_linear"] == 0 and rep["dq_into_float_matmul"] == []
    # the artifact computes what the rewritten torch graph computes
    held_out = torch.randn(64, 64, generator=torch.Generator().manual_seed(3))
    got = OrtGraph(str(tmp_path), entry, CPU)([held_out.numpy()])[0]
    with torch.no_grad():
        torch_side = res.program(held_out)
    assert _rel_l2(torch_side, got) < ARTIFACT_REL_L2
    # and the zero points are shipped only when they are not MatMulNBits' default 8
    import onnx
    node = next(n for n in onnx.load(str(tmp_path / "main.onnx")).graph.node if n.op_type == "MatMulNBits")
    assert (len(node.input) > 3 and node.input[3] != "") == (not symmetric)


def test_batched_linear_form_lowers_to_matmul_nbits(tmp_path):
    class PermutedLinear(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(32, 24)

        def forward(self, x):                       # x [S, B, 32]: bmm(x, expand(W^T)) -> view -> add(b)
            return self.lin(x.permute(1, 0, 2))

    torch.manual_seed(0)
    m, x = PermutedLinear().eval(), torch.randn(6, 2, 32)
    prog = capture(m, (x,))
    assert op_count(prog, "aten.bmm") == 1
    res = get_pass("quantize_weights_int4")(force=True)(prog, PassContext())
    assert res.stats["quantized"] == 1 and op_count(res.program, "aten.bmm") == 0
    with torch.no_grad():
        assert _rel_l2(m(x), res.program(x)) < 0.1
    entry = lower_graph(res.program.main, "main", CPU, str(tmp_path))
    assert entry["int4"]["matmul_nbits"] == 1


def test_lowering_refuses_layers_it_cannot_find(tmp_path):
    m, x = _mlp()
    res = get_pass("quantize_weights_int4")(force=True)(capture(m, (x,)), PassContext())
    from pared.backends.onnxruntime.lower import export_onnx
    path = str(tmp_path / "m.onnx")
    export_onnx(res.program.main, path)
    layers = int4_layers(res.program.main)
    assert sorted(layers) == ["_int4_0_w", "_int4_1_w"] and layers["_int4_0_w"].k == 64
    bogus = {"_int4_7_w": layers["_int4_0_w"]}
    with pytest.raises(BackendError, match="graph 'g': int4 layers \\['_int4_7_w'\\] were not found"):
        lower_matmul_nbits(path, bogus, "g")


def test_check_refuses_too_few_matmul_nbits(tmp_path):
    m, x = _mlp()
    res = get_pass("quantize_weights_int4")(force=True)(capture(m, (x,)), PassContext())
    entry = lower_graph(res.program.main, "main", CPU, str(tmp_path))
    rep = integer_kernel_report(str(tmp_path / "main.onnx"), CPU)
    assert check_int4_kernels(rep, 2)["matmul_nbits"] == 2 and entry["int4"]["layers"] == 2
    with pytest.raises(BackendError, match="graph 'g1': 3 int4 layers but 2 MatMulNBits"):
        check_int4_kernels(rep, 3, "g1")
