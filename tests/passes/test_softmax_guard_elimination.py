"""softmax_guard_elimination: structure (fx and exported ONNX), numerics against eager,
the cases where the guard must stay, idempotence, the input left alone, options."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pared.backends.onnxruntime.lower import lower_graph
from pared.ir.capture import capture
from pared.ir.errors import OptionError
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.testing import assert_close_to_eager, op_count

CPU = {"name": "cpu", "backend": "onnxruntime", "threads": 1}
#: the ops of torch's fully-masked-row guard around a softmax
GUARD_OPS = ("aten.eq", "aten.logical_not", "aten.any", "aten.full_like", "aten.where")


class Attention(nn.Module):
    """Two SDPA blocks (torch decomposes each into a softmax and its guard).

    mask="none": no mask. mask="neg_inf": an additive mask from masked_fill(-inf)
    on a bool input. mask="log": the scores go through log (not on the allow-list).
    mask="div": q divided by a tensor (kept). mask="prep": the input normalized by
    literals and a sinusoidal embedding exp(arange) added (constants only: proven).
    mask="causal": a constant triu(full(-inf)) mask (a literal -inf: kept).
    mask="rmsnorm": RMSNorm (Llama's x * rsqrt(mean(x^2) + eps)) instead of LayerNorm (proven).
    mask="rmsnorm_no_eps" / "rmsnorm_odd": rsqrt(mean(x^2)) / rsqrt(mean(x^3) + eps), which
    may be inf / NaN (kept). mask="batch_bias": a finite bias whose shape reads the batch size
    (captured with a dynamic batch: a symbolic size, an integer, feeds it; proven).
    """

    def __init__(self, dim: int = 16, mask: str = "none"):
        super().__init__()
        self.mask = mask
        self.qkv = nn.ModuleList([nn.Linear(dim, 3 * dim) for _ in range(2)])
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        if self.mask == "prep":
            half = x.shape[-1] // 2
            freqs = torch.exp(-math.log(1000.0) * torch.arange(half, dtype=torch.float32) / half)
            pos = torch.arange(x.shape[1], dtype=torch.float32)[:, None] * freqs
            x = (x - 0.13) / 0.31 + torch.cat([pos.sin(), pos.cos()], dim=-1)
        for lin in self.qkv:
            q, k, v = lin(self._norm(x)).chunk(3, dim=-1)
            q, k, v = (t.unflatten(-1, (2, -1)).transpose(1, 2) for t in (q, k, v))
            if self.mask == "log":
                q = torch.log(q.abs() + 1)
            if self.mask == "div":
                q = q / (k.abs() + 1)
            bias = None
            if self.mask == "causal":
                bias = torch.full((x.shape[1], x.shape[1]), float("-inf")).triu(1)
            if self.mask == "batch_bias":    # finite, shaped by the (dynamic) batch: sym_size feeds it
                bias = torch.full((x.shape[0], 1, 1, x.shape[1]), -0.5)
            if self.mask == "neg_inf":
                bias = torch.zeros(keep.shape, dtype=x.dtype).masked_fill(~keep, float("-inf"))[:, None, None, :]
            x = x + F.scaled_dot_product_attention(q, k, v, attn_mask=bias).transpose(1, 2).flatten(-2)
        return self.out(F.gelu(x))

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        if not self.mask.startswith("rmsnorm"):
            return F.layer_norm(x, x.shape[-1:])
        eps = 0.0 if self.mask == "rmsnorm_no_eps" else 1e-6
        variance = x.pow(3 if self.mask == "rmsnorm_odd" else 2).mean(-1, keepdim=True)
        return x * torch.rsqrt(variance + eps) if eps else x * torch.rsqrt(variance)


def _model(mask="none", seed=0):
    torch.manual_seed(seed)
    m = Attention(mask=mask).eval()
    x = torch.randn(2, 6, 16)
    keep = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    inputs = (x, keep) if mask == "neg_inf" else (x,)
    return m, inputs


def _run(program, **opts):
    return get_pass("softmax_guard_elimination")(**opts)(program, PassContext())


def _guard_ops(program):
    return {op: op_count(program, op) for op in GUARD_OPS}


def test_guard_present_in_capture():
    m, inputs = _model()
    p = capture(m, inputs)
    assert _guard_ops(p) == {"aten.eq": 2, "aten.logical_not": 4, "aten.any": 2, "aten.full_like": 2,
                             "aten.where": 2}


def test_removes_guard_when_scores_are_finite():
    m, inputs = _model()
    p = capture(m, inputs)
    before = p.main.module.code
    res = _run(p)
    assert res.modified and res.stats["simplified"] == 2
    assert res.stats["kept_inf_constant"] == res.stats["kept_unknown_op"] == res.stats["kept_float_input"] == 0
    assert all(v == 0 for v in _guard_ops(res.program).values())
    assert op_count(res.program, "aten._softmax") == 2
    assert p.main.module.code == before  # input program untouched
    assert _guard_ops(p)["aten.where"] == 2
    with torch.no_grad():
        ref = m(*inputs)
        assert torch.equal(p(*inputs), res.program(*inputs))  # bit for bit against the guarded graph
    assert_close_to_eager(ref, res.program(*inputs), rel_l2=1e-6)


def test_a_symbolic_size_is_an_integer_so_a_dynamic_batch_keeps_the_proof():
    """A graph captured with a dynamic batch reads the batch as aten.sym_size; that value is an
    integer, so a bias built from it stays finite (the video_ar streamer's ALiBi bias: its guards
    were kept, 53 -> 36 ms a step call on ORT once removed)."""
    from torch.export import Dim
    m, (x,) = _model("batch_bias")
    p = capture(m, (x,), dynamic_shapes=({0: Dim("batch", min=1, max=64)},))
    assert op_count(p, "aten.sym_size.int") >= 1
    res = _run(p)
    assert res.stats["simplified"] == 2 and res.stats["kept_unknown_op"] == 0
    assert all(v == 0 for v in _guard_ops(res.program).values())
    x5 = torch.randn(5, 6, 16)
    with torch.no_grad():
        assert torch.equal(p(x5), res.program(x5))
        assert_close_to_eager(m(x5), res.program(x5), rel_l2=1e-6)


def test_idempotent_and_noop():
    m, inputs = _model()
    res = _run(capture(m, inputs))
    again = _run(res.program)
    assert again.modified is False and again.program is res.program and again.stats["simplified"] == 0


def test_keeps_guard_with_neg_inf_mask():
    m, inputs = _model("neg_inf")
    p = capture(m, inputs)
    res = _run(p)
    assert res.modified is False and res.program is p
    assert res.stats["simplified"] == 0 and res.stats["kept_inf_constant"] == 2


def test_mask_contract_removes_guard_and_is_exact_on_masks_that_keep_a_key():
    m, inputs = _model("neg_inf")
    p = capture(m, inputs)
    res = _run(p, assume_mask_keeps_a_key=True)
    assert res.modified and res.stats["simplified"] == 2
    assert all(v == 0 for k, v in _guard_ops(res.program).items() if k != "aten.where")
    with torch.no_grad():
        assert torch.equal(p(*inputs), res.program(*inputs))
        # the contract matters: a row with every key masked is NaN without the guard
        x, keep = inputs
        empty = keep.clone()
        empty[0] = False
        assert torch.isfinite(m(x, empty)).all()
        assert torch.isnan(res.program(x, empty)).any()


def test_keeps_guard_when_an_unknown_op_feeds_the_scores():
    m, inputs = _model("log")
    p = capture(m, inputs)
    assert op_count(p, "aten.log") == 2
    res = _run(p)
    assert res.modified is False and res.stats["kept_unknown_op"] == 2


@pytest.mark.parametrize("mask,proven", [("prep", True), ("div", False), ("causal", False)])
def test_literal_division_and_constant_subgraphs(mask, proven):
    m, inputs = _model(mask)
    p = capture(m, inputs)
    res = _run(p)
    assert res.modified is proven
    if proven:
        assert op_count(p, "aten.exp") >= 1 and op_count(p, "aten.div") >= 1
        assert res.stats["simplified"] == 2
        with torch.no_grad():
            assert torch.equal(p(*inputs), res.program(*inputs))
            assert_close_to_eager(m(*inputs), res.program(*inputs), rel_l2=1e-6)
    else:
        key = "kept_inf_constant" if mask == "causal" else "kept_unknown_op"
        assert res.stats[key] == 2 and res.stats["simplified"] == 0


@pytest.mark.parametrize("mask,proven", [("rmsnorm", True), ("rmsnorm_no_eps", False), ("rmsnorm_odd", False)])
def test_rmsnorm_is_finite_only_with_an_even_power_and_eps(mask, proven):
    """Llama's RMSNorm, x * rsqrt(mean(x^2) + eps), is finite for finite x (the guard goes); without
    eps a zero row gives rsqrt(0) = inf, and an odd power a negative mean (NaN): both keep it."""
    m, inputs = _model(mask)
    p = capture(m, inputs)
    assert op_count(p, "aten.rsqrt") == 2 and op_count(p, "aten.pow") == 2
    res = _run(p)
    assert res.modified is proven
    if proven:
        assert res.stats["simplified"] == 2 and all(v == 0 for v in _guard_ops(res.program).values())
        with torch.no_grad():
            assert torch.equal(p(*inputs), res.program(*inputs))
    else:
        assert res.stats["kept_unknown_op"] == 2 and res.stats["simplified"] == 0


def test_float_inputs_not_assumed_finite():
    m, inputs = _model()
    res = _run(capture(m, inputs), assume_finite_inputs=False)
    assert res.modified is False and res.stats["kept_float_input"] == 2


def test_non_finite_parameter_keeps_guard():
    m, inputs = _model()
    with torch.no_grad():
        m2 = Attention().eval()
        m2.load_state_dict(m.state_dict())
        m2.qkv[0].bias[0] = float("-inf")
    res = _run(capture(m2, inputs))
    assert res.stats["kept_inf_constant"] >= 1 and res.stats["simplified"] <= 1


def test_safe_softmax_op_becomes_softmax():
    """A graph holding aten._safe_softmax itself (not decomposed) gets a plain _softmax."""
    m, inputs = _model()
    p = capture(m, inputs)
    g = p.main
    gm = g.copy_module()
    for n in list(gm.graph.nodes):
        if n.op == "call_function" and n.target is torch.ops.aten.where.self and \
                n.args[2].target is torch.ops.aten._softmax.default:
            sm = n.args[2]
            with gm.graph.inserting_before(n):
                safe = gm.graph.call_function(torch.ops.aten._safe_softmax.default, (sm.args[0], sm.args[1]))
            safe.meta.update(n.meta)
            n.replace_all_uses_with(safe)
    gm.graph.eliminate_dead_code()
    gm.recompile()
    p2 = p.with_graph("main", g.with_module(gm))
    assert op_count(p2, "aten._safe_softmax") == 2
    res = _run(p2)
    assert res.stats["simplified"] == 2
    assert op_count(res.program, "aten._safe_softmax") == 0 and op_count(res.program, "aten._softmax") == 2
    with torch.no_grad():
        assert torch.equal(p(*inputs), res.program(*inputs))


def test_artifact_has_no_guard_and_equals_torch(tmp_path):
    import onnx
    from pared.backends.onnxruntime.runtime import OrtGraph
    m, inputs = _model()
    p = capture(m, inputs)
    res = _run(p)
    (tmp_path / "guarded").mkdir()
    (tmp_path / "plain").mkdir()
    guarded = lower_graph(p.main, "main", CPU, str(tmp_path / "guarded"))
    entry = lower_graph(res.program.main, "main", CPU, str(tmp_path / "plain"))
    ops_before = [n.op_type for n in onnx.load(str(tmp_path / "guarded" / "main.onnx")).graph.node]
    ops = [n.op_type for n in onnx.load(str(tmp_path / "plain" / "main.onnx")).graph.node]
    assert "Where" in ops_before and "Equal" in ops_before
    assert {"Where", "Equal", "Not"}.isdisjoint(ops) and ops.count("Softmax") == 2
    assert len(ops) < len(ops_before)
    got = OrtGraph(str(tmp_path / "plain"), entry, CPU)([t.numpy() for t in inputs])
    with torch.no_grad():
        ref = m(*inputs)
    assert_close_to_eager(ref, torch.from_numpy(np.asarray(got[0])), rel_l2=1e-5)
    assert guarded  # both lowerings passed their own ORT-vs-fx check


def test_bad_options():
    with pytest.raises(OptionError, match="option 'assume_finite_inputs' expects bool"):
        get_pass("softmax_guard_elimination")(assume_finite_inputs=1)
    with pytest.raises(OptionError, match="did you mean 'assume_mask_keeps_a_key'"):
        get_pass("softmax_guard_elimination")(assume_mask_keep_a_key=True)
