"""ONNX Runtime lowering, the Executor and multi-graph plans, against eager PyTorch."""
import numpy as np
import pytest
import torch

from pared.backends.executor import Executor
from pared.ir.capture import capture
from pared.ir.errors import ArtifactError
from pared.targets import get_target
from pared.testing import assert_close_to_eager, run_torch_free, save_program, tiny_transformer, two_graph_program

CPU = get_target("cpu").to_json()


def test_tiny_transformer_matches_eager(tmp_path):
    m, inputs = tiny_transformer()
    p = capture(m, inputs)
    art = save_program(p, tmp_path / "a", CPU)
    ex = Executor(art)
    ids = torch.randint(0, 50, (2, 16))
    out = ex(ids.numpy())
    assert set(out) == {"tokens", "logits"}
    assert_close_to_eager(m(ids), out, rel_l2=1e-5)
    entry = ex.manifest["graphs"]["main"]
    assert entry["check"]["rel_l2"] <= 1e-4 and entry["inputs"][0]["dtype"] == "int64"


def test_executor_checks_inputs(tmp_path):
    m, inputs = tiny_transformer()
    ex = Executor(save_program(capture(m, inputs), tmp_path / "a", CPU))
    with pytest.raises(TypeError, match="must be int64"):
        ex(np.zeros((2, 16), dtype=np.float32))
    with pytest.raises(ValueError, match=r"shape \[2, 16\]"):
        ex(np.zeros((3, 16), dtype=np.int64))
    with pytest.raises(TypeError, match="expected 1 inputs"):
        ex()


def test_dynamic_batch(tmp_path):
    m, (ids,) = tiny_transformer()
    p = capture(m, (ids,), dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=64)},))
    ex = Executor(save_program(p, tmp_path / "a", CPU))
    assert isinstance(ex.inputs[0]["shape"][0], str)
    for b in (1, 5):
        x = torch.randint(0, 50, (b, 16))
        assert_close_to_eager(m(x), ex(x.numpy()), rel_l2=1e-5)


def test_multi_graph_plan_same_on_torch_and_executor(tmp_path):
    full, program = two_graph_program()
    ex = Executor(save_program(program, tmp_path / "a", CPU))
    runner = program.runner()
    xs = [torch.randn(2, 8) for _ in range(4)]
    for x in xs:
        a = runner([x])[0]
        b = ex(x.numpy())
        assert_close_to_eager(a, b, rel_l2=1e-5)
    assert ex.trace == runner.trace == ["full", "reuse", "reuse", "full"]
    # the reuse steps really used the cached feature of step 0
    expected = full.shallow(xs[1]) + full.deep(xs[0])
    ex.reset()
    ex(xs[0].numpy())
    assert_close_to_eager(expected, ex(xs[1].numpy()), rel_l2=1e-5)


def test_executor_runs_without_torch(tmp_path):
    m, inputs = tiny_transformer()
    art = save_program(capture(m, inputs), tmp_path / "a", CPU)
    np.save(tmp_path / "ids.npy", inputs[0].numpy())
    out = run_torch_free(f"""
        import numpy as np, pared, sys
        ex = pared.load({art!r})
        y = ex(np.load({str(tmp_path / 'ids.npy')!r}))
        assert "torch" not in sys.modules
        np.save({str(tmp_path / 'y.npy')!r}, y["logits"])
        print("ok")
    """)
    assert out.strip() == "ok"
    assert_close_to_eager(m(*inputs)["logits"], np.load(tmp_path / "y.npy"), rel_l2=1e-5)


def test_missing_provider_is_a_clear_error(tmp_path):
    m, inputs = tiny_transformer()
    art = save_program(capture(m, inputs), tmp_path / "a", CPU)
    import json, os
    from pared.backends.artifact import MANIFEST
    mp = os.path.join(art, MANIFEST)
    man = json.load(open(mp))
    man["target"] = get_target("cuda").to_json()
    json.dump(man, open(mp, "w"))
    import onnxruntime
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ArtifactError, match="needs CUDAExecutionProvider"):
        Executor(art)


def _residual_layer_norm_onnx(path):
    """Add(x, r) -> LayerNormalization: the pattern ORT's SkipLayerNormFusion rewrites."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    d = 16
    x, r = (helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 4, d]) for n in ("x", "r"))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 4, d])
    inits = [numpy_helper.from_array(np.linspace(0.5, 1.5, d).astype(np.float32), "g"),
             numpy_helper.from_array(np.linspace(-0.1, 0.1, d).astype(np.float32), "b")]
    nodes = [helper.make_node("Add", ["x", "r"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "g", "b"], ["y"], axis=-1, epsilon=1e-5)]
    g = helper.make_graph(nodes, "g", [x, r], [y], inits)
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))


def test_target_leaves_out_its_slow_fusions(tmp_path):
    """The cpu target's sessions run Add + LayerNormalization, not ORT's slower fused
    SkipLayerNormalization; a target without the list gets the fusion. Same numbers."""
    import onnx

    from pared.backends.onnxruntime.runtime import make_session
    src = tmp_path / "m.onnx"
    _residual_layer_norm_onnx(src)
    rng = np.random.default_rng(0)
    feed = {n: rng.standard_normal((2, 4, 16)).astype(np.float32) for n in ("x", "r")}
    outs, ops = {}, {}
    for name, disabled in (("cpu", None), ("all_fusions", [])):
        target = get_target("cpu").to_json()
        if disabled is not None:
            target["ort_disabled_optimizers"] = disabled
        opt = tmp_path / f"{name}.onnx"
        outs[name] = make_session(str(src), target, optimized_model_path=str(opt)).run(None, feed)[0]
        ops[name] = [n.op_type for n in onnx.load(str(opt)).graph.node]
    assert "SkipLayerNormalization" not in ops["cpu"] and "LayerNormalization" in ops["cpu"]
    assert "SkipLayerNormalization" in ops["all_fusions"]
    np.testing.assert_allclose(outs["cpu"], outs["all_fusions"], rtol=1e-5, atol=1e-5)


class _TwinOutputs(torch.nn.Module):
    """Two outputs that are one value once the exporter's optimizer merges common subexpressions,
    and one that is the graph's input unchanged."""

    def forward(self, x):
        return torch.relu(x) * 2, torch.relu(x) * 2, x, x + 1


def test_outputs_keep_their_names_when_the_optimizer_merges_them(tmp_path):
    x = torch.randn(3, 4)
    p = capture(_TwinOutputs().eval(), (x,))
    ex = Executor(save_program(p, tmp_path / "a", CPU))
    out = ex(x.numpy())
    import onnx
    model = onnx.load(str(tmp_path / "a" / ex.manifest["graphs"]["main"]["file"]))
    assert [o.name for o in model.graph.output] == list(p.main.output_names)
    assert [i.name for i in model.graph.input] == list(p.main.input_names)
    assert_close_to_eager(_TwinOutputs()(x), out, rel_l2=1e-6)


def test_lowering_writes_the_graph_the_exporters_own_optimizer_writes(tmp_path):
    """export_onnx runs onnxscript's optimizer passes itself (optimize_onnx, SlicesSplit left out for
    its cost): on a graph that rule does not touch, the file is the one torch.onnx.export's own
    optimizer writes, node for node and name for name (fails if onnxscript's pass list drifts)."""
    import onnx

    from pared.backends.common import retrace
    from pared.backends.onnxruntime.lower import export_onnx
    m, inputs = tiny_transformer()
    g = capture(m, inputs).main
    export_onnx(g, str(tmp_path / "ours.onnx"))
    with torch.no_grad():
        theirs = torch.onnx.export(retrace(g), (), dynamo=True, optimize=True, input_names=list(g.input_names),
                                   output_names=list(g.output_names), verbose=False, report=False)
    theirs.save(str(tmp_path / "theirs.onnx"))
    a, b = (onnx.load(str(tmp_path / f"{n}.onnx")).graph for n in ("ours", "theirs"))
    assert [(n.op_type, list(n.input), list(n.output)) for n in a.node] == \
        [(n.op_type, list(n.input), list(n.output)) for n in b.node]
    assert [i.name for i in a.input] == [i.name for i in b.input] and \
        [o.name for o in a.output] == [o.name for o in b.output]
