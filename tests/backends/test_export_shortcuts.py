"""The exporters' shortcuts (backends/onnxruntime/lower.py: exporter_shortcuts; backends/tvm/lower.py:
needs_decomposition): a graph none of whose ops a decomposition table rewrites skips the retrace
that would only give it back, and what comes out is what the exporter writes without the
shortcut; a graph with such an op is still decomposed; the cached registry of translations does
not keep one export's custom translations for the next."""
import contextlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from pared.backends.common import decomposed_ops
from pared.backends.onnxruntime import lower
from pared.ir.capture import capture
from pared.testing import tiny_transformer


@pytest.fixture(autouse=True)
def _no_export_cache(monkeypatch):
    """These tests count the exporter's own work: a hit in the suites' export cache would skip it."""
    from pared.backends.onnxruntime import export_cache
    monkeypatch.delenv(export_cache.ENV, raising=False)


class _Block(torch.nn.Module):
    """Linear, LayerNorm, GELU, attention: captured, none of its ops is in the exporter's table."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc, self.norm = torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)

    def forward(self, x):
        h = torch.nn.functional.gelu(self.norm(self.fc(x)))
        return torch.softmax(h @ h.transpose(-1, -2), -1) @ h


def _block():
    return _Block().eval(), (torch.randn(2, 5, 8),)


class _Stats(torch.nn.Module):
    """Ops the exporter's table decomposes even after capture's core-ATen decomposition (var_mean)."""

    def forward(self, x):
        v, m = torch.var_mean(x, -1, keepdim=True)
        return (x - m) / (v + 1e-5).sqrt()


@contextlib.contextmanager
def _no_shortcuts():
    yield False


def _spy_decompose(monkeypatch):
    from torch.onnx._internal.exporter import _fx_passes
    calls = []
    real = _fx_passes.decompose_with_registry

    def spy(ep, registry):
        calls.append(ep)
        return real(ep, registry)
    monkeypatch.setattr(_fx_passes, "decompose_with_registry", spy)
    return calls


def test_a_captured_graph_skips_the_decomposition_and_exports_the_same_file(tmp_path, monkeypatch):
    m, inputs = _block()
    g = capture(m, inputs).main
    calls = _spy_decompose(monkeypatch)
    fast = str(tmp_path / "fast.onnx")
    ep = lower.export_onnx(g, fast)
    assert calls == []                                    # no retrace through the decomposition
    monkeypatch.setattr(lower, "exporter_shortcuts", _no_shortcuts)
    slow = str(tmp_path / "slow.onnx")
    lower.export_onnx(g, slow)
    assert len(calls) == 1                                # the exporter's own path decomposes
    assert onnx.load(fast).graph.SerializeToString() == onnx.load(slow).graph.SerializeToString()


class _Mixed(torch.nn.Module):
    """A float times an integer tensor: the exporter inserts an explicit type promotion."""

    def forward(self, x, k):
        return x * k + 1


def test_the_exporter_edits_a_copy_not_the_program_it_is_given(tmp_path):
    x, k = torch.randn(3, 4), torch.arange(12).reshape(3, 4)
    g = capture(_Mixed(), (x, k)).main
    ep = lower.retrace(g)
    before = ep.graph_module.code
    with lower.exporter_shortcuts():
        program = lower._torch_onnx_export(ep, {})
    assert "convert_element_type" in program.exported_program.graph_module.code   # what the exporter added
    assert ep.graph_module.code == before                 # ... to its own copy
    path = str(tmp_path / "mixed.onnx")
    program.save(path)
    sess = ort.InferenceSession(path)
    got = sess.run(None, dict(zip([i.name for i in sess.get_inputs()], [x.numpy(), k.numpy()])))[0]
    np.testing.assert_allclose(got, _Mixed()(x, k).numpy(), rtol=1e-6)


def test_a_graph_with_an_op_of_the_table_is_decomposed_and_matches_torch(tmp_path, monkeypatch):
    x = torch.randn(3, 8)
    g = capture(_Stats(), (x,)).main
    ep = lower.retrace(g)
    from torch.onnx._internal.exporter import _decomp, _registration
    registry = _registration.ONNXRegistry.from_torchlib()
    table = _decomp.create_onnx_friendly_decomposition_table(set(_decomp.get_onnx_implemented_overloads(registry)))
    assert decomposed_ops(ep, table)                      # the case this test is for
    calls = _spy_decompose(monkeypatch)
    path = str(tmp_path / "stats.onnx")
    lower.export_onnx(g, path)
    assert len(calls) == 1
    got = ort.InferenceSession(path).run(None, {ort.InferenceSession(path).get_inputs()[0].name: x.numpy()})[0]
    np.testing.assert_allclose(got, _Stats()(x).numpy(), rtol=1e-5, atol=1e-5)


def test_the_cached_registry_keeps_no_custom_translation_between_exports():
    from torch.onnx._internal.exporter import _registration

    def fake(x):
        return x
    op = torch.ops.aten.relu.default
    with lower.exporter_shortcuts() as on:
        assert on
        first = _registration.ONNXRegistry.from_torchlib()
        n = len(first.get_decomps(op))
        first.register_op(op, fake)
        assert len(first.get_decomps(op)) == n + 1
        second = _registration.ONNXRegistry.from_torchlib()
        assert len(second.get_decomps(op)) == n            # a fresh copy: not the first export's table
        assert second.functions is not first.functions
    # and outside the context the exporter's own constructor is back
    assert "from_torchlib" in _registration.ONNXRegistry.__dict__
    assert _registration.ONNXRegistry.__dict__["from_torchlib"].__func__.__name__ == "from_torchlib"


def test_a_failing_shortcut_falls_back_to_the_exporters_own_path(tmp_path, monkeypatch):
    m, inputs = _block()
    g = capture(m, inputs).main

    @contextlib.contextmanager
    def broken():
        from torch.onnx._internal.exporter import _fx_passes
        real = _fx_passes.decompose_with_registry

        def fail(ep, registry):
            raise RuntimeError("shortcut broke")
        _fx_passes.decompose_with_registry = fail
        try:
            yield True
        finally:
            _fx_passes.decompose_with_registry = real
    monkeypatch.setattr(lower, "exporter_shortcuts", broken)
    path = str(tmp_path / "m.onnx")
    lower.export_onnx(g, path)
    sess = ort.InferenceSession(path)
    got = sess.run(None, {sess.get_inputs()[0].name: inputs[0].numpy()})[0]
    np.testing.assert_allclose(got, m(*inputs).detach().numpy(), rtol=1e-5, atol=1e-5)


def test_tvm_skips_the_core_aten_decomposition_only_where_it_is_the_identity(monkeypatch):
    pytest.importorskip("tvm")
    from pared.backends.tvm import lower as tvm_lower
    m, inputs = tiny_transformer()
    g = capture(m, inputs).main
    # captured graphs are core ATen: nothing for the default table to rewrite
    assert not tvm_lower.needs_decomposition(lower.retrace(g))
    raw = torch.export.export(m, inputs, strict=False)
    assert tvm_lower.needs_decomposition(raw)              # an uncaptured program: aten.linear, ...
    fast = tvm_lower.to_relax(g, "main").script()
    monkeypatch.setattr(tvm_lower, "needs_decomposition", lambda ep: True)
    assert tvm_lower.to_relax(g, "main").script() == fast


class _Squeeze(torch.nn.Module):
    """aten.squeeze.dims, which the exporter's table decomposes: dims of size 1 (one negative),
    a dim that is not of size 1 (kept), and a squeeze that drops nothing (an alias)."""

    def forward(self, x, y):
        a = torch.squeeze(x, (1, -1)) * 2                 # [3, 1, 4, 1] -> [3, 4]
        b = torch.squeeze(y, (0, 2))                      # [2, 5, 1] -> [2, 5]: dim 0 is kept
        c = torch.squeeze(a, (0,))                        # nothing of size 1: the same tensor
        return a.sum(-1, keepdim=True) + b.sum() + c


def _squeeze_inputs():
    torch.manual_seed(1)
    return torch.randn(3, 1, 4, 1), torch.randn(2, 5, 1)


def _onnx_table():
    from torch.onnx._internal.exporter import _decomp, _registration
    registry = _registration.ONNXRegistry.from_torchlib()
    return _decomp.create_onnx_friendly_decomposition_table(set(_decomp.get_onnx_implemented_overloads(registry)))


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_squeeze_dims_is_rewritten_node_by_node_as_the_tables_retrace_gives_it():
    from pared.backends.common import local_decomposition
    g = capture(_Squeeze(), _squeeze_inputs()).main
    ep = lower.retrace(g)
    table = _onnx_table()
    assert decomposed_ops(ep, table) == ["aten.squeeze.dims"]      # the case this test is for
    before = ep.graph_module.code
    gm = local_decomposition(ep, table)
    assert ep.graph_module.code == before                           # the program handed in is unchanged
    retraced = ep.run_decompositions(table).graph_module
    assert _targets(gm) == _targets(retraced)                       # the same ops in the same order
    assert "prims.view_of.default" in _targets(gm) and _targets(gm).count("prims.squeeze.default") == 3
    # every node of the program keeps its name (a rewritten one's on the last node replacing it):
    # the exported file's values are named after the program's nodes
    assert {n.name for n in ep.graph.nodes} <= {n.name for n in gm.graph.nodes}
    for want, got in zip(retraced(*g.example_inputs), gm(*g.example_inputs)):
        assert torch.equal(want, got)


def test_a_symbolic_size_under_squeeze_dims_needs_the_retrace():
    from pared.backends.common import local_decomposition

    class SqueezeBatch(torch.nn.Module):
        def forward(self, x):
            return torch.squeeze(x, (0, 2)) + 1

    x = torch.randn(2, 5, 1)
    ep = torch.export.export(SqueezeBatch(), (x,), dynamic_shapes=({0: torch.export.Dim("b")},))
    assert local_decomposition(ep, _onnx_table()) is None           # is dim 0 of size 1? only a retrace can say


def test_a_graph_whose_only_table_op_is_squeeze_dims_exports_without_the_retrace(tmp_path, monkeypatch):
    inputs = _squeeze_inputs()
    g = capture(_Squeeze(), inputs).main
    calls = _spy_decompose(monkeypatch)
    fast = str(tmp_path / "fast.onnx")
    lower.export_onnx(g, fast)
    assert calls == []
    monkeypatch.setattr(lower, "exporter_shortcuts", _no_shortcuts)
    slow = str(tmp_path / "slow.onnx")
    lower.export_onnx(g, slow)
    assert len(calls) == 1
    ops = [sorted(n.op_type for n in onnx.load(p).graph.node) for p in (fast, slow)]
    assert ops[0] == ops[1]
    got = []
    for path in (fast, slow):
        sess = ort.InferenceSession(path)
        got.append(sess.run(None, dict(zip([i.name for i in sess.get_inputs()], [t.numpy() for t in inputs])))[0])
    np.testing.assert_array_equal(got[0], got[1])                   # the same computation
    np.testing.assert_allclose(got[0], _Squeeze()(*inputs).numpy(), rtol=1e-6, atol=1e-6)


def test_rules_tried_only_at_their_root_op_rewrite_as_every_rule_everywhere(tmp_path, monkeypatch):
    """optimize_onnx tries a rewrite rule only at nodes of its pattern's root op type: the file is
    byte for byte the one every rule tried at every node gives, and rules did fire on this graph."""
    m, inputs = tiny_transformer()
    g = capture(m, inputs).main
    fired = []
    real = lower._RootOpRule.try_rewrite

    def counting(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        if out is not None:
            fired.append(str(self._rule))
        return out
    monkeypatch.setattr(lower._RootOpRule, "try_rewrite", counting)
    filtered = str(tmp_path / "filtered.onnx")
    lower.export_onnx(g, filtered)
    assert fired                                          # the comparison below is not of an untouched graph
    monkeypatch.setattr(lower, "_at_root_op", lambda rule: rule)
    everywhere = str(tmp_path / "everywhere.onnx")
    lower.export_onnx(g, everywhere)
    assert onnx.load(filtered).SerializeToString() == onnx.load(everywhere).SerializeToString()


def test_a_rule_is_filtered_only_where_its_pattern_ends_in_one_constant_op():
    from onnxscript import rewriter
    rules = list(rewriter._DEFAULT_REWRITE_RULES)
    wrapped = [lower._at_root_op(r) for r in rules]
    assert sum(isinstance(w, lower._RootOpRule) for w in wrapped) >= len(rules) - 3
    for r, w in zip(rules, wrapped):
        if isinstance(w, lower._RootOpRule):
            assert w._op_type == str(r._target_pattern.output_node.op)
            assert w.name == r.name and w.remove_nodes == r.remove_nodes     # the rule's own attributes
        else:
            assert w is r
