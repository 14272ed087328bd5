"""quantize_linears (static INT8): structure, numerics against eager (lossy: bound
stated), the no-op cases, idempotence, bad options, and the proof that ONNX
Runtime runs the layers with integer kernels."""
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

import pared
from pared.backends.onnxruntime.int8_check import check_integer_kernels, integer_kernel_report
from pared.backends.onnxruntime.lower import lower_graph
from pared.ir.capture import capture
from pared.ir.errors import BackendError, OptionError, PassError
from pared.ir.program import get_attr
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.passes.quant.common import QuantPlan
from pared.testing import op_count, tiny_transformer

#: the lossy bound: every output within this relative L2 of eager fp32 (measured:
#: 0.004 on the tokens, 0.02 on the 4 logits), and cosine above COSINE
REL_L2 = 0.05
COSINE = 0.999
CPU = {"name": "cpu", "backend": "onnxruntime", "threads": 1}


def _calibration(seed=1, n=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 50, (2, 16), generator=g),) for _ in range(n)]


def _quantized(**opts):
    m, (x,) = tiny_transformer()
    prog = capture(m, (x,))
    res = get_pass("quantize_linears")(**opts)(prog, PassContext(calibration=_calibration()))
    return m, x, prog, res


def _rel_l2(ref, got):
    return float(torch.linalg.norm(ref - got) / torch.linalg.norm(ref))


class PermutedLinear(nn.Module):
    """A Linear on a non-contiguous 3-D input: torch.export writes it as
    bmm(x, expand(W^T)) -> view -> add(b), not addmm."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 24)
        self.out = nn.Linear(24, 8)

    def forward(self, x):                       # x [S, B, 16]
        return self.out(torch.relu(self.lin(x.permute(1, 0, 2))))


def test_structure_int8_weights_int32_bias_and_plan():
    m, x, prog, res = _quantized()
    before = prog.main.module.code
    p = res.program
    assert res.modified and res.stats == {"quantized": 9, "excluded": 0, "bias_int32": 9, "calibration_calls": 4}
    # per layer: one activation quantize/dequantize pair, a per-channel dequantize each for weight and bias
    assert op_count(p, "quantized_decomposed.quantize_per_tensor") == 9
    assert op_count(p, "quantized_decomposed.dequantize_per_tensor") == 9
    assert op_count(p, "quantized_decomposed.dequantize_per_channel") == 18
    assert op_count(p, "aten.addmm") == 9
    gm = p.main.module
    consts = {str(n.target): get_attr(gm, str(n.target)) for n in gm.graph.nodes if n.op == "get_attr"}
    weights = [v for k, v in consts.items() if k.endswith("_w")]
    biases = [v for k, v in consts.items() if k.endswith("_b")]
    assert len(weights) == 9 and all(w.dtype == torch.int8 and w.abs().max() <= 127 for w in weights)
    assert len(biases) == 9 and all(b.dtype == torch.int32 for b in biases)
    # the float weights are gone from the graph (the biases' float copies too)
    assert not any(k.endswith(("qkv.weight", "proj.weight", "head.weight", "qkv.bias")) for k in consts)
    plan = p.records["QuantPlan"]
    assert isinstance(plan, QuantPlan) and len(plan.layers) == 9 and plan.calibration == "minmax"
    lq = next(lq for lq in plan.layers if lq.region == "blocks.0.mlp.0")
    assert (lq.in_features, lq.out_features, lq.weight_bits, lq.bias) == (32, 128, 8, True)
    assert lq.activation_range[0] <= 0 <= lq.activation_range[1] and 0 <= lq.activation_zero_point <= 255
    json.dumps(plan.to_json())                          # serializable for the manifest
    assert prog.main.module.code == before and "QuantPlan" not in prog.records   # input left alone


def test_numerics_within_the_stated_bound():
    m, x, prog, res = _quantized()
    held_out = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, got = m(held_out), res.program(held_out)
    for k in ("tokens", "logits"):
        assert _rel_l2(ref[k], got[k]) < REL_L2, k
        cos = torch.nn.functional.cosine_similarity(ref[k].flatten(), got[k].flatten(), dim=0)
        assert cos > COSINE, k
    # and it is lossy: not the float graph
    assert _rel_l2(ref["tokens"], got["tokens"]) > 1e-5


def test_percentile_calibration_clips_the_range():
    _, _, _, mm = _quantized()
    _, _, _, pc = _quantized(method="percentile", percentile=99.0)
    assert pc.program.records["QuantPlan"].percentile == 99.0
    for a, b in zip(mm.program.records["QuantPlan"].layers, pc.program.records["QuantPlan"].layers):
        assert b.activation_scale <= a.activation_scale + 1e-12
    assert any(b.activation_scale < a.activation_scale for a, b in
               zip(mm.program.records["QuantPlan"].layers, pc.program.records["QuantPlan"].layers))


def test_batched_linear_form_is_quantized_with_its_bias():
    torch.manual_seed(0)
    m = PermutedLinear().eval()
    x = torch.randn(6, 2, 16)
    prog = capture(m, (x,))
    assert op_count(prog, "aten.bmm") == 1
    res = get_pass("quantize_linears")()(prog, PassContext(calibration=[(torch.randn(6, 2, 16),) for _ in range(3)]))
    assert res.stats["quantized"] == 2 and res.stats["bias_int32"] == 2
    assert op_count(res.program, "aten.bmm") == 0 and op_count(res.program, "aten.addmm") == 2
    with torch.no_grad():
        assert _rel_l2(m(x), res.program(x)) < REL_L2


def test_exclude_keeps_regions_float():
    m, x, prog, res = _quantized(exclude=["blocks.0", "head"])
    assert res.stats["quantized"] == 4 and res.stats["excluded"] == 5
    regions = {lq.region for lq in res.program.records["QuantPlan"].layers}
    assert regions == {"blocks.1.qkv", "blocks.1.proj", "blocks.1.mlp.0", "blocks.1.mlp.2"}
    assert "head" in res.program.records["QuantPlan"].excluded
    # a single pattern string works too
    assert get_pass("quantize_linears")(exclude="blocks.**").options.exclude == ("blocks.**",)


def test_no_linear_layers_is_a_no_op():
    prog = capture(nn.Sequential(nn.LayerNorm(8), nn.GELU()).eval(), (torch.randn(2, 8),))
    res = get_pass("quantize_linears")()(prog, PassContext(calibration=[(torch.randn(2, 8),)]))
    assert res.modified is False and res.program is prog and res.stats["quantized"] == 0


def test_everything_excluded_is_a_no_op():
    m, x, prog, res = _quantized(exclude=["**"])
    assert res.modified is False and res.program is prog and res.stats == {"quantized": 0, "excluded": 9}


def test_running_twice_finds_nothing_more():
    m, x, prog, res = _quantized()
    again = get_pass("quantize_linears")()(res.program, PassContext(calibration=_calibration()))
    assert again.modified is False and again.program is res.program


@pytest.mark.parametrize("opts, message", [
    ({"mode": "dynamic", "smooth": 0.5}, "option 'smooth' needs mode 'static'"),
    ({"mode": "dynamc"}, "option 'mode' expects"),
    ({"method": "kl"}, "option 'method' expects"),
    ({"percentile": 40.0}, "option 'percentile' must be in \\(50, 100\\]"),
    ({"exlude": ["head"]}, "unknown option 'exlude'; did you mean 'exclude'"),
])
def test_bad_options(opts, message):
    with pytest.raises(OptionError, match=f"pass 'quantize_linears'.*{message}"):
        get_pass("quantize_linears")(**opts)


def test_needs_a_calibration_run():
    m, (x,) = tiny_transformer()
    with pytest.raises(PassError, match="pass 'quantize_linears' needs a calibration run"):
        get_pass("quantize_linears")()(capture(m, (x,)), PassContext())


def test_ort_runs_the_layers_with_integer_kernels(tmp_path):
    m, x, prog, res = _quantized()
    entry = lower_graph(res.program.main, "main", CPU, str(tmp_path))
    rep = entry["int8"]
    assert rep["integer_ops"] == {"QGemm": 9}
    assert rep["dq_into_float_matmul"] == [] and rep["dequantize_linear"] == 0
    # the file itself, re-checked from outside the lowering
    again = check_integer_kernels(str(tmp_path / "main.onnx"), CPU)
    assert again["integer_ops"] == {"QGemm": 9}
    # ORT's integer result stays within the bound against eager
    from pared.backends.onnxruntime.runtime import OrtGraph
    got = OrtGraph(str(tmp_path), entry, CPU)([x.numpy()])
    with torch.no_grad():
        ref = m(x)
    assert _rel_l2(ref["tokens"], torch.from_numpy(got[0])) < REL_L2


def test_plain_graph_gets_no_int8_check(tmp_path):
    m, x, prog, res = _quantized()
    assert "int8" not in lower_graph(prog.main, "main", CPU, str(tmp_path))


def _qdq_gemm_onnx(path, *, zero_points: bool):
    """Q/DQ -> Gemm with an int32 bias; without zero points ORT's QDQ selectors skip it."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    k, n = 16, 8
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(np.array(0.02, np.float32), "sx"),
             numpy_helper.from_array(np.array(128, np.uint8), "zx"),
             numpy_helper.from_array(rng.integers(-127, 127, (k, n)).astype(np.int8), "wq"),
             numpy_helper.from_array(np.full(n, 0.01, np.float32), "ws"),
             numpy_helper.from_array(rng.integers(-100, 100, n).astype(np.int32), "bq"),
             numpy_helper.from_array(np.full(n, 2e-4, np.float32), "bs"),
             numpy_helper.from_array(np.zeros(n, np.int8), "wz"),
             numpy_helper.from_array(np.zeros(n, np.int32), "bz")]
    zw, zb = (["wz"], ["bz"]) if zero_points else ([], [])
    nodes = [helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
             helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
             helper.make_node("DequantizeLinear", ["wq", "ws"] + zw, ["wd"], axis=1, name="dq_weight"),
             helper.make_node("DequantizeLinear", ["bq", "bs"] + zb, ["bd"], axis=0, name="dq_bias"),
             helper.make_node("Gemm", ["xd", "wd", "bd"], ["y"], name="fc")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)]), path)


def test_check_fails_when_a_dequantize_still_feeds_a_float_matmul(tmp_path):
    bad, good = str(tmp_path / "bad.onnx"), str(tmp_path / "good.onnx")
    _qdq_gemm_onnx(bad, zero_points=False)
    _qdq_gemm_onnx(good, zero_points=True)
    assert integer_kernel_report(good, CPU)["integer_ops"] == {"QGemm": 1}
    rep = integer_kernel_report(bad, CPU)
    assert rep["integer_ops"] == {} and ["dq_weight", "fc", "Gemm"] in rep["dq_into_float_matmul"]
    with pytest.raises(BackendError, match="graph 'g1': .*DequantizeLinear '(dq_weight|dq_bias|.*)' still feeds "
                                           "the float Gemm 'fc'"):
        check_integer_kernels(bad, CPU, "g1")


def test_check_refuses_a_level_without_qdq_fusion(tmp_path):
    path = str(tmp_path / "good.onnx")
    _qdq_gemm_onnx(path, zero_points=True)
    with pytest.raises(BackendError, match="ort_opt_level 'basic' does not fuse"):
        check_integer_kernels(path, dict(CPU, ort_opt_level="basic"))


def test_optimize_end_to_end_records_the_plan_and_the_kernels(tmp_path):
    m, (x,) = tiny_transformer()
    opt = pared.optimize(m, (x,), pipeline=[{"quantize_linears": {"method": "minmax"}}],
                         calibration=_calibration(), fidelity={"min_cosine": 0.99, "max_rel_l2": REL_L2},
                         bench_repeats=0)
    assert opt.report["fidelity"]["passed"]
    path = opt.save(str(tmp_path / "art"))
    with open(os.path.join(path, "manifest.json")) as f:
        manifest = json.load(f)
    assert manifest["records"]["QuantPlan"]["calibration"] == "minmax"
    assert manifest["graphs"]["main"]["int8"]["integer_ops"] == {"QGemm": 9}
    ex = pared.load(path)
    got = ex(x.numpy())
    with torch.no_grad():
        ref = m(x)
    assert _rel_l2(ref["logits"], torch.from_numpy(np.asarray(got["logits"]))) < REL_L2


def test_every_graph_of_a_multi_graph_program_is_quantized():
    """A cached program (a full graph, a reuse graph, a table): both graphs quantized, calibrated
    by running the inputs through the Plan (the reuse graph sees the cached feature)."""
    from pared.testing import two_graph_program
    _, prog = two_graph_program()
    torch.manual_seed(1)
    xs = [(torch.randn(2, 8),) for _ in range(3)]
    res = get_pass("quantize_linears")()(prog, PassContext(calibration=xs))
    assert res.modified and res.stats["graphs"] == 2 and res.stats["calibration_calls"] == 3
    assert op_count(res.program, "quantized_decomposed.quantize_per_tensor", "full") == 3
    assert op_count(res.program, "quantized_decomposed.quantize_per_tensor", "reuse") == 1
    want, got = prog.runner(), res.program.runner()
    for x in xs:
        assert _rel_l2(want([x[0]])[0], got([x[0]])[0]) < 0.02
    assert got.trace == ["full", "reuse", "reuse"]


class OutlierMLP(nn.Module):
    """Two Linears reading one activation with a few outlier channels (as transformer
    hidden states have): one activation scale for all channels is then coarse."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(32, 16)
        self.b = nn.Linear(32, 16)
        gain = torch.ones(32)
        gain[:2] = 60.0
        self.register_buffer("gain", gain)

    def forward(self, x):
        h = x * self.gain
        return self.a(h) + self.b(h)


def test_smooth_shares_factors_and_reduces_the_error():
    torch.manual_seed(0)
    m = OutlierMLP().eval()
    x = torch.randn(256, 32)
    prog = capture(m, (x,))
    cal = [(torch.randn(256, 32),) for _ in range(3)]
    plain = get_pass("quantize_linears")()(prog, PassContext(calibration=cal))
    smooth = get_pass("quantize_linears")(smooth=0.5)(prog, PassContext(calibration=cal))
    # one Mul by 1/s and one shared factor constant for the two layers reading h
    assert op_count(smooth.program, "aten.mul") == op_count(plain.program, "aten.mul") + 2
    gm = smooth.program.main.module
    assert len([n for n in gm.graph.nodes if n.op == "get_attr" and str(n.target).endswith("_smooth")]) == 1
    plan = smooth.program.records["QuantPlan"]
    assert plan.smooth == 0.5 and all(lq.smooth_range is not None for lq in plan.layers)
    with torch.no_grad():
        ref = m(x)
        err_plain, err_smooth = _rel_l2(ref, plain.program(x)), _rel_l2(ref, smooth.program(x))
    assert err_smooth < 0.7 * err_plain and err_smooth < REL_L2     # measured: 0.024 vs 0.040


def test_smooth_lowers_to_integer_kernels(tmp_path):
    torch.manual_seed(0)
    m = OutlierMLP().eval()
    x = torch.randn(64, 32)
    res = get_pass("quantize_linears")(smooth=0.5)(capture(m, (x,)), PassContext(calibration=[(x,)]))
    entry = lower_graph(res.program.main, "main", CPU, str(tmp_path))
    assert entry["int8"]["integer_ops"] == {"QGemm": 2} and entry["int8"]["dq_into_float_matmul"] == []


@pytest.mark.parametrize("opts, message", [
    ({"smooth": 1.5}, "option 'smooth' must be in \\[0, 1\\]"),
    ({"smooth": 0.5, "method": "percentile"}, "option 'smooth' needs method 'minmax'"),
])
def test_bad_smooth_options(opts, message):
    with pytest.raises(OptionError, match=f"pass 'quantize_linears'.*{message}"):
        get_pass("quantize_linears")(**opts)


def test_pipeline_file_builds():
    from pared.pipeline import build_passes, load_pipeline
    from pared.workloads import EXAMPLES
    passes = build_passes(load_pipeline(os.path.join(EXAMPLES, "pipelines", "minilm_int8.yaml")))
    q = next(p for p in passes if p.name == "quantize_linears")
    assert q.options.smooth == 0.5 and q.options.exclude == () and q.options.outliers == 0
    ffn_out = q.options.overrides[1]
    assert ffn_out.layers == ("bert.encoder.layer.*.output.dense",) and ffn_out.outliers == 32
    assert ffn_out.set_smooth and ffn_out.smooth is None
    # the FFN output pattern does not reach attention's output projection (matched by the first entry)
    assert q.options.overrides[0].matches(("bert.encoder.layer.0.attention.output.dense",))
    assert not ffn_out.matches(("bert.encoder.layer.0.attention.output.dense",))


def test_constant_folding_after_quantizing_keeps_the_quantizers():
    m, x, prog, res = _quantized()
    deq = lambda p: sum(n for k, n in p.main.op_counts().items() if k.startswith("quantized_decomposed.dequantize"))
    before = deq(res.program)
    folded = get_pass("constant_folding")()(res.program, PassContext())
    assert before > 0 and deq(folded.program) == before


# -- dynamic-activation mode: scales per call, no calibration

def _dynamic():
    m, (x,) = tiny_transformer()
    prog = capture(m, (x,))
    return m, x, prog, get_pass("quantize_linears")(mode="dynamic")(prog, PassContext())


def test_dynamic_structure_needs_no_calibration():
    m, x, prog, res = _dynamic()
    before = prog.main.module.code
    assert res.modified and res.stats == {"quantized": 9, "excluded": 0, "bias_int32": 0, "calibration_calls": 0}
    p = res.program
    assert op_count(p, "pared_quant.dynamic_linear") == 9
    assert op_count(p, "aten.addmm") == 0 and op_count(p, "quantized_decomposed") == 0
    gm = p.main.module
    consts = {str(n.target): get_attr(gm, str(n.target)) for n in gm.graph.nodes if n.op == "get_attr"}
    weights = [v for k, v in consts.items() if k.endswith("_w")]
    assert len(weights) == 9 and all(w.dtype == torch.int8 for w in weights)
    assert not any(k.endswith(("qkv.weight", "proj.weight", "head.weight")) for k in consts)
    plan = p.records["QuantPlan"]
    assert plan.mode == "dynamic" and plan.calls == 0 and "per call" in plan.activations
    json.dumps(plan.to_json())
    assert prog.main.module.code == before
    again = get_pass("quantize_linears")(mode="dynamic")(p, PassContext())
    assert again.modified is False and again.program is p


def test_dynamic_numerics_within_the_stated_bound():
    m, x, prog, res = _dynamic()
    held_out = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, got = m(held_out), res.program(held_out)
    for k in ("tokens", "logits"):
        assert _rel_l2(ref[k], got[k]) < REL_L2, k       # measured: 0.004 (tokens), 0.012 (logits)
    assert _rel_l2(ref["tokens"], got["tokens"]) > 1e-5


def test_dynamic_op_matches_a_hand_computed_layer():
    """dynamic_linear computes DynamicQuantizeLinear's grid: a row whose range is
    [0, 2.55] gets s_x = 0.01, z_x = 0, so x = 1.234 is stored as 123."""
    from pared.passes.quant.quantize_linears import dynamic_linear
    x = torch.tensor([[1.234, 2.55, 0.0]])
    wq = torch.tensor([[1], [0], [0]], dtype=torch.int8)
    y = dynamic_linear(x, wq, torch.tensor([0.5]), torch.tensor([1.0]))
    assert torch.allclose(y, torch.tensor([[123 * 0.01 * 0.5 + 1.0]]), atol=1e-6)


def test_dynamic_ort_uses_integer_kernels(tmp_path):
    m, x, prog, res = _dynamic()
    entry = lower_graph(res.program.main, "main", CPU, str(tmp_path))
    import onnx
    exported = [n.op_type for n in onnx.load(str(tmp_path / "main.onnx")).graph.node]
    assert exported.count("DynamicQuantizeLinear") == 9 and exported.count("MatMulInteger") == 9
    rep = entry["int8"]
    assert rep["integer_ops"] == {"DynamicQuantizeMatMul": 9}      # ORT fused each layer
    assert rep["dynamic_into_float"] == [] and rep["dynamic_quantize_linear"] == 0
    assert entry["check"]["rel_l2"] < 1e-3                          # ORT and the fx graph: the same grid
    from pared.backends.onnxruntime.runtime import OrtGraph
    held_out = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(9))
    got = OrtGraph(str(tmp_path), entry, CPU)([held_out.numpy()])
    with torch.no_grad():
        assert _rel_l2(m(held_out)["tokens"], torch.from_numpy(got[0])) < REL_L2


def _dynamic_onnx(path, *, dequantized: bool):
    """DynamicQuantizeLinear -> MatMulInteger (-> Cast -> Mul); or, when `dequantized`,
    its output cast back to float and fed to a float MatMul."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    k, n = 16, 8
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.integers(-127, 127, (k, n)).astype(np.int8), "wq"),
             numpy_helper.from_array(np.full(n, 0.01, np.float32), "ws"),
             numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "wf")]
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "sx", "zx"], name="dql")]
    if dequantized:
        nodes += [helper.make_node("Cast", ["xq"], ["xd"], to=TensorProto.FLOAT, name="cast"),
                  helper.make_node("MatMul", ["xd", "wf"], ["y"], name="mm")]
    else:
        nodes += [helper.make_node("MatMulInteger", ["xq", "wq", "zx"], ["acc"]),
                  helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
                  helper.make_node("Mul", ["sx", "ws"], ["s"]),
                  helper.make_node("Mul", ["accf", "s"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, n])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20),
                                                      helper.make_opsetid("com.microsoft", 1)]), path)


def test_check_verifies_dynamic_kernels(tmp_path):
    good, bad = str(tmp_path / "good.onnx"), str(tmp_path / "bad.onnx")
    _dynamic_onnx(good, dequantized=False)
    _dynamic_onnx(bad, dequantized=True)
    rep = check_integer_kernels(good, CPU)
    assert set(rep["integer_ops"]) & {"DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger"}
    assert rep["dynamic_into_float"] == []
    with pytest.raises(BackendError, match="graph 'g2': .*DynamicQuantizeLinear 'dql' feeds the Cast 'cast'"):
        check_integer_kernels(bad, CPU, "g2")


# -- entropy (KL) calibration

def _heavy_tailed(g, n, positive=False):
    """A Gaussian bulk with 1 value in 5000 an outlier of magnitude 20..60 (as transformer
    hidden states carry); through GELU when `positive` (a nonnegative-heavy activation)."""
    x = torch.randn(n, generator=g)
    k = n // 5000
    idx = torch.randint(0, n, (k,), generator=g)
    x[idx] = torch.empty(k).uniform_(20, 60, generator=g) * torch.sign(torch.randn(k, generator=g))
    return torch.nn.functional.gelu(x) if positive else x


@pytest.mark.parametrize("positive", [False, True])
def test_entropy_clips_outliers_and_beats_minmax(positive):
    """KL calibration cuts the range near the bulk's edge: per value it errs far less
    than min-max (whose 255 levels are mostly spent on the outliers), at the cost of
    the clipped outliers (stated, not hidden: their squared error dominates the MSE)."""
    from pared.passes.quant.common import RangeObserver, activation_qparams

    def fake_quant(x, lo, hi):
        s, z = activation_qparams(lo, hi)
        return (torch.clamp(torch.round(x / s) + z, 0, 255) - z) * s

    g = torch.Generator().manual_seed(0)
    mm, kl = RangeObserver("minmax", 99.99), RangeObserver("entropy", 99.99)
    for _ in range(4):
        v = _heavy_tailed(g, 100_000, positive)
        mm.observe(v)
        kl.observe(v)
    (mlo, mhi), (klo, khi) = mm.range(), kl.range()
    assert mhi > 20 and khi < mhi / 4                       # measured: 3.9 / 7.4 vs. 59.8 / 59.7
    assert klo >= mlo and (klo > -6 if not positive else klo == mlo)
    assert khi > 3.0                                        # the bulk (|x| < 3) stays inside
    test = _heavy_tailed(g, 100_000, positive)
    err_mm = (fake_quant(test, mlo, mhi) - test).abs()
    err_kl = (fake_quant(test, klo, khi) - test).abs()
    assert err_kl.mean() < 0.3 * err_mm.mean()              # measured: 0.014 vs 0.116 (signed), 0.010 vs 0.067
    bulk = test.abs() < 3
    assert (err_kl[bulk] ** 2).mean() < 0.05 * (err_mm[bulk] ** 2).mean()


def test_entropy_calibration_in_the_pass():
    _, _, _, mm = _quantized()
    m, x, prog, kl = _quantized(method="entropy")
    plan = kl.program.records["QuantPlan"]
    assert plan.calibration == "entropy" and plan.percentile is None
    pairs = list(zip(mm.program.records["QuantPlan"].layers, plan.layers))
    assert all(b.activation_scale <= a.activation_scale + 1e-12 for a, b in pairs)
    held_out = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        assert _rel_l2(m(held_out)["tokens"], kl.program(held_out)["tokens"]) < REL_L2


# -- option `matmuls`: attention's activation x activation matmuls ------------
def test_matmuls_quantizes_both_attention_matmuls():
    m, x, prog, base = _quantized()
    _, _, _, res = _quantized(matmuls=True)
    # 2 blocks x (q.k^T, attn.v), two operands each, on top of the 9 linear inputs
    assert res.stats["matmuls"] == 4 and res.stats["quantized"] == 9
    assert op_count(res.program, "quantized_decomposed.quantize_per_tensor") == 9 + 8
    assert op_count(base.program, "quantized_decomposed.quantize_per_tensor") == 9
    bmms = [n for n in res.program.main.module.graph.nodes if n.target is torch.ops.aten.bmm.default]
    assert len(bmms) == 4
    for n in bmms:
        assert all(str(a.target) == "quantized_decomposed.dequantize_per_tensor.default" for a in n.args[:2])
    assert "matmuls" not in base.stats
    assert op_count(prog, "quantized_decomposed") == 0  # input untouched
    held_out = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = m(held_out)
        got = res.program(held_out)
    # lossy: the same bound as the linear layers alone (measured 0.0040 vs 0.0038 on the tokens)
    assert _rel_l2(ref["tokens"], got["tokens"]) < REL_L2
    assert _rel_l2(ref["logits"], got["logits"]) < REL_L2


def test_matmuls_run_with_integer_kernels(tmp_path):
    m, x, prog, res = _quantized(matmuls=True)
    entry = lower_graph(res.program.main, "main", CPU, str(tmp_path))
    rep = entry["int8"]
    # no float matmul is left: each attention matmul became an integer kernel
    assert rep["float_matmuls"] == 0 and rep["dq_into_float_matmul"] == []
    assert rep["integer_ops"].get("QGemm") == 9
    assert rep["integer_ops"].get("MatMulIntegerToFloat", 0) + rep["integer_ops"].get("QLinearMatMul", 0) == 4
    from pared.backends.onnxruntime.runtime import OrtGraph
    got = OrtGraph(str(tmp_path), entry, CPU)([x.numpy()])
    with torch.no_grad():
        ref = m(x)
    assert _rel_l2(ref["tokens"], torch.from_numpy(got[0])) < REL_L2


def test_matmuls_option_checks():
    with pytest.raises(OptionError, match="pass 'quantize_linears'.*option 'matmuls' needs mode 'static'"):
        get_pass("quantize_linears")(mode="dynamic", matmuls=True)
    with pytest.raises(OptionError, match="option 'matmuls' expects bool"):
        get_pass("quantize_linears")(matmuls="yes")
    # a second run finds nothing more, matmuls included
    m, x, prog, res = _quantized(matmuls=True)
    again = get_pass("quantize_linears")(matmuls=True)(res.program, PassContext(calibration=_calibration()))
    assert again.modified is False and again.program is res.program


# -- outlier channels in float (LLM.int8()-style) and per-layer overrides

def _outlier_mlp(n=256):
    torch.manual_seed(0)
    m = OutlierMLP().eval()
    x = torch.randn(n, 32)
    return m, x, capture(m, (x,)), [(torch.randn(n, 32),) for _ in range(3)]


def test_outliers_run_the_largest_channels_in_float():
    m, x, prog, cal = _outlier_mlp()
    plain = get_pass("quantize_linears")()(prog, PassContext(calibration=cal))
    res = get_pass("quantize_linears")(outliers=2)(prog, PassContext(calibration=cal))
    assert res.modified and res.stats["quantized"] == 2 and res.stats["outlier_channels"] == 4
    p = res.program
    # per layer: the int8 addmm plus a Gather of the outlier channels into a float mm, added to it;
    # unsmoothed, no mask: the outlier channels saturate in the uint8 activation, against zero
    # weight rows
    assert op_count(p, "aten.addmm") == 2 and op_count(p, "aten.mm") == 2
    assert op_count(p, "aten.index_select") == 2
    assert op_count(p, "aten.mul") == op_count(plain.program, "aten.mul")
    gm = p.main.module
    consts = {str(n.target): get_attr(gm, str(n.target)) for n in gm.graph.nodes if n.op == "get_attr"}
    assert not [k for k in consts if k.endswith("_smooth")]
    idx = [v for k, v in consts.items() if k.endswith("_oi")]
    assert len(idx) == 2 and all(i.tolist() == [0, 1] for i in idx)        # the two gain-60 channels
    assert [lq.outlier_channels for lq in p.records["QuantPlan"].layers] == [(0, 1), (0, 1)]
    assert all(lq.outlier_channels == () for lq in plain.program.records["QuantPlan"].layers)
    rows = [v for k, v in consts.items() if k.endswith("_ow")]
    assert all(r.dtype == torch.float32 and tuple(r.shape) == (2, 16) for r in rows)
    weights = [v for k, v in consts.items() if k.endswith("_w")]
    assert all(w.dtype == torch.int8 and not w[:2].any() for w in weights)   # their int8 rows are 0
    torch.testing.assert_close(rows[0], m.a.weight.detach().t()[:2])
    # the activation scale no longer covers the outliers: about 60x finer
    scales = [lq.activation_scale for lq in p.records["QuantPlan"].layers]
    assert max(scales) < min(lq.activation_scale for lq in plain.program.records["QuantPlan"].layers) / 20
    with torch.no_grad():
        ref = m(x)
        err_plain, err = _rel_l2(ref, plain.program(x)), _rel_l2(ref, p(x))
    assert err < 0.1 * err_plain and err < 0.005                     # measured: 0.0008 vs 0.040
    # with smoothing: the same channels in float, SmoothQuant factors on the rest
    both = get_pass("quantize_linears")(outliers=2, smooth=0.5)(prog, PassContext(calibration=cal))
    with torch.no_grad():
        assert _rel_l2(ref, both.program(x)) < 0.005                 # measured: 0.0011
    assert all(lq.smooth_range is not None for lq in both.program.records["QuantPlan"].layers)
    # smoothed: one Mul per layer, both reading one constant: 1 / s with 0 on the outlier channels
    assert op_count(both.program, "aten.mul") == op_count(plain.program, "aten.mul") + 2
    bgm = both.program.main.module
    (inv,) = [get_attr(bgm, str(n.target)) for n in bgm.graph.nodes
              if n.op == "get_attr" and str(n.target).endswith("_smooth")]
    assert inv[:2].tolist() == [0.0, 0.0] and bool((inv[2:] > 0).all())
    assert "QuantPlan" not in prog.records                           # input left alone


@pytest.mark.parametrize("smooth", [0.5, None])
def test_outliers_lower_to_integer_kernels(tmp_path, smooth):
    """Smoothed, and unsmoothed (no mask: the outlier channels saturate in ORT's QuantizeLinear
    against zero int8 weight rows), the same integer kernels and numbers."""
    m, x, prog, cal = _outlier_mlp(64)
    res = get_pass("quantize_linears")(outliers=2, smooth=smooth)(prog, PassContext(calibration=[(x,)]))
    entry = lower_graph(res.program.main, "main", CPU, str(tmp_path))
    rep = entry["int8"]
    # the layers stay QGemm; only the [64, 2] x [2, 16] outlier parts are float matmuls
    assert rep["integer_ops"] == {"QGemm": 2} and rep["dq_into_float_matmul"] == []
    assert rep["dequantize_linear"] == 0 and rep["float_matmuls"] <= 2
    from pared.backends.onnxruntime.runtime import OrtGraph
    got = OrtGraph(str(tmp_path), entry, CPU)([x.numpy()])
    with torch.no_grad():
        ref = m(x)
    assert _rel_l2(ref, torch.from_numpy(got[0])) < 0.005


def test_outliers_on_the_batched_linear_form():
    torch.manual_seed(0)
    m = PermutedLinear().eval()
    cal = [(torch.randn(6, 2, 16),) for _ in range(3)]
    res = get_pass("quantize_linears")(outliers=3)(capture(m, cal[0]), PassContext(calibration=cal))
    assert res.stats["quantized"] == 2 and res.stats["outlier_channels"] == 6
    assert op_count(res.program, "aten.bmm") == 0 and op_count(res.program, "aten.index_select") == 2
    # on a calibrated input (Gaussian channels have no outliers, so a held-out one may clip harder
    # than without the option: the minmax range of the rest is tighter)
    with torch.no_grad():
        assert _rel_l2(m(cal[0][0]), res.program(cal[0][0])) < 0.01        # measured: 0.006


def test_overrides_set_smooth_and_outliers_per_layer():
    m, x, prog, res0 = _quantized(smooth=0.5)
    res = get_pass("quantize_linears")(
        smooth=0.5, overrides=[{"layers": "blocks.*.proj", "smooth": None},
                               {"layers": ["blocks.*.mlp.2", "head"], "smooth": None, "outliers": 4},
                               {"layers": "blocks.**", "outliers": 1}])(prog, PassContext(calibration=_calibration()))
    plan = {lq.region: lq for lq in res.program.records["QuantPlan"].layers}
    assert plan["blocks.0.proj"].smooth_range is None and plan["blocks.1.mlp.2"].smooth_range is None
    assert plan["blocks.0.qkv"].smooth_range is not None and plan["blocks.1.mlp.0"].smooth_range is not None
    # proj: first match (smooth off; outliers pass-wide 0); mlp.2 and head: 4 each; qkv and mlp.0: 1 each
    assert res.stats["outlier_channels"] == 2 * 4 + 4 + 2 * 1 + 2 * 1
    assert op_count(res.program, "aten.index_select") == 2 + 1 + 2 + 2
    held_out = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref, got = m(held_out), res.program(held_out)
    for k in ("tokens", "logits"):
        assert _rel_l2(ref[k], got[k]) < REL_L2, k
    # running twice: the outlier matmuls are not layers, nothing more to quantize
    again = get_pass("quantize_linears")(outliers=1)(res.program, PassContext(calibration=_calibration()))
    assert again.modified is False and again.program is res.program
    # an override that changes nothing gives the pass-wide result
    same = get_pass("quantize_linears")(smooth=0.5, overrides=[{"layers": "nothing.*", "outliers": 3}])(
        prog, PassContext(calibration=_calibration()))
    assert same.program.main.module.code == res0.program.main.module.code


def test_overrides_must_agree_on_a_shared_activation():
    m, x, prog, cal = _outlier_mlp()
    with pytest.raises(PassError, match="pass 'quantize_linears': layers \\['a', 'b'\\] read one activation.*"
                                        "give them one setting"):
        get_pass("quantize_linears")(overrides=[{"layers": "a", "outliers": 2}])(prog, PassContext(calibration=cal))


def test_outliers_must_leave_channels_to_int8():
    m, x, prog, cal = _outlier_mlp()
    with pytest.raises(PassError, match="option 'outliers' \\(32\\) leaves none of the 32 input channels"):
        get_pass("quantize_linears")(outliers=32)(prog, PassContext(calibration=cal))


@pytest.mark.parametrize("opts, message", [
    ({"outliers": -1}, "option 'outliers' must be in \\[0, inf\\]"),
    ({"outliers": 4, "method": "entropy"}, "option 'outliers' needs method 'minmax'"),
    ({"outliers": 4, "mode": "dynamic"}, "option 'outliers' needs mode 'static'"),
    ({"overrides": [{"layers": "a", "outlier": 2}]}, "entry 0: unknown key 'outlier'; did you mean 'outliers'"),
    ({"overrides": [{"smooth": 0.5}]}, "entry 0: 'layers' must be a region pattern"),
    ({"overrides": [{"layers": "a", "smooth": 1.5}]}, "option 'overrides\\[0\\].smooth' must be in \\[0, 1\\]"),
    ({"overrides": [{"layers": "a", "outliers": 2.5}]}, "entry 0: 'outliers' expects an int"),
    ({"overrides": ["a"]}, "entry 0: expected a mapping"),
    ({"overrides": [{"layers": "a"}, {"layers": "b", "smooth": 0.5}], "method": "percentile"},
     "option 'overrides\\[1\\]' needs method 'minmax'"),
])
def test_bad_outlier_and_override_options(opts, message):
    with pytest.raises(OptionError, match=f"pass 'quantize_linears'.*{message}"):
        get_pass("quantize_linears")(**opts)


# -- the target's instruction set sets the int8 weight range (issue 22)

def _for_isa(features, **opts):
    from pared.targets import Target
    tgt = Target.from_json({"name": "box", "backend": "onnxruntime", "provider": "CPUExecutionProvider",
                            "arch": "x86_64", "isa": list(features)})
    m, (x,) = tiny_transformer()
    prog = capture(m, (x,))
    return get_pass("quantize_linears")(**opts)(prog, PassContext(calibration=_calibration(), target=tgt))


@pytest.mark.parametrize("mode", ["static", "dynamic"])
def test_weight_range_follows_the_target_isa(mode):
    # AVX2 only: ORT's u8s8 kernels sum pairs in 16 bits, so 7-bit codes; with VNNI the full range
    for features, qmax in ((["avx2"], 63), (["avx2", "avx512f", "avx512bw"], 63), (["avx2", "avx512_vnni"], 127),
                           (["avx2", "avx_vnni"], 127), (["avx2", "amx_int8"], 127)):
        res = _for_isa(features, mode=mode)
        gm = res.program.main.module
        codes = [get_attr(gm, n) for n in dir(gm) if n.startswith("_quant_") and n.endswith("_w")]
        assert len(codes) == 9 and max(int(c.abs().max()) for c in codes) == qmax, (features, qmax)
        plan = res.program.records["QuantPlan"]
        assert plan.weight_qmax == qmax and ("7-bit" in plan.weights) == (qmax == 63)


def test_seven_bit_activation_operands_are_clipped_before_quantize():
    # ONNX QuantizeLinear saturates to the whole int8 range: the 7-bit bound of the s8 operand of
    # attention's matmuls is a clamp in the graph (a Clip in ONNX), so fx and ORT agree past the range
    seven = _for_isa(["avx2"], matmuls=True)
    full = _for_isa(["avx2", "avx512_vnni"], matmuls=True)
    assert op_count(seven.program, "aten.clamp") == 4 and op_count(full.program, "aten.clamp") == 0
    signed = [n for n in seven.program.main.module.graph.nodes
              if n.op == "call_function" and "quantize_per_tensor" in str(n.target) and n.args[5] == torch.int8]
    assert signed and all(n.args[3:5] == (-63, 63) for n in signed)
    assert all(str(n.args[0].target) == "aten.clamp.default" for n in signed if "dequantize" not in str(n.target))


def test_keep_8bit_stores_uint8_weights_only_where_the_target_takes_7_bits(tmp_path):
    keep = [{"layers": "blocks.*.mlp.2", "keep_8bit": True}]
    seven = _for_isa(["avx2"], overrides=keep)
    gm = seven.program.main.module
    layers = seven.program.records["QuantPlan"].layers
    kept = [lq for lq in layers if lq.weight_storage == "uint8"]
    assert len(kept) == 2 and all(lq.region.endswith("mlp.2") for lq in kept)
    for i, lq in enumerate(layers):
        w = get_attr(gm, f"_quant_{i}_w")
        if lq.weight_storage == "uint8":          # codes around 128 over the full 8 bits
            assert w.dtype == torch.uint8 and int((w.to(torch.int16) - 128).abs().max()) == 127
            assert int(get_attr(gm, f"_quant_{i}_wz").unique()) == 128
        else:
            assert w.dtype == torch.int8 and int(w.abs().max()) == 63
    # lowered: ORT fuses the uint8-weight layers into QGemm too, exact (U8U8 sums in 32 bits)
    from pared.targets import Target
    tgt = Target.from_json({"name": "box", "backend": "onnxruntime", "provider": "CPUExecutionProvider",
                            "arch": "x86_64", "isa": ["avx2"]})
    entry = lower_graph(seven.program.main, "main", dict(tgt.to_json(), threads=1), str(tmp_path))
    assert entry["int8"]["integer_ops"].get("QGemm") == 9 and entry["int8"]["exact"]["worst_rel_l2"] <= 1e-5
    assert entry["check"]["rel_l2"] <= 1e-4
    # with VNNI the int8 weights keep the full range anyway: nothing to keep
    full = _for_isa(["avx2", "avx512_vnni"], overrides=keep)
    assert all(lq.weight_storage == "int8" for lq in full.program.records["QuantPlan"].layers)
    with pytest.raises(OptionError, match="'keep_8bit' expects true or false"):
        get_pass("quantize_linears")(overrides=[{"layers": "x", "keep_8bit": "yes"}])
