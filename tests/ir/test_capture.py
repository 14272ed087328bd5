import pytest
import torch
from torch import nn

from pared.ir.capture import capture
from pared.ir.errors import CaptureError
from pared.ir.regions import match
from pared.testing import assert_close_to_eager, assert_unchanged, state_snapshot, tiny_transformer


class Nested(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, scale=None, flag=True):
        y = self.lin(x) * scale
        return {"y": y, "aux": (y.sum(), y.mean())} if flag else y


def test_capture_flattens_inputs_and_outputs():
    m = Nested().eval()
    x, s = torch.randn(3, 4), torch.tensor(2.0)
    p = capture(m, (x,), kwargs={"scale": s, "flag": True})
    assert p.main.input_names == ("x", "scale")
    assert p.main.output_names == ("y", "aux.0", "aux.1")
    assert p.output_structure["kind"] == "dict"
    assert_close_to_eager(m(x, scale=s), p(x, s))
    placeholders = [n for n in p.main.module.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 2  # the bool flag is baked in


def test_capture_decomposes_to_core_aten():
    m, inputs = tiny_transformer()
    p = capture(m, inputs)
    ops = p.main.op_counts()
    assert not any("linear" in k for k in ops), ops  # linear decomposes to addmm/mm
    assert any("addmm" in k or "mm" in k for k in ops)


def test_capture_does_not_mutate_model():
    m, inputs = tiny_transformer()
    m.train()
    snap = state_snapshot(m)
    capture(m, inputs)
    assert_unchanged(m, snap)
    assert m.training


def test_regions_tree_and_patterns():
    m, inputs = tiny_transformer()
    p = capture(m, inputs)
    regions = p.regions()
    assert {"blocks.0", "blocks.1", "blocks.0.qkv", "blocks.0.mlp.0", "norm", "head"} <= set(regions)
    b0 = regions["blocks.0"]
    assert "blocks.0.qkv" in b0.children and "blocks.0.mlp" in b0.children
    assert b0.inputs and b0.outputs and "blocks.0.qkv.weight" in b0.params
    assert [r.path for r in p.select_regions("blocks.*")] == ["blocks.0", "blocks.1"]
    assert [r.path for r in p.select_regions("blocks.**.qkv")] == ["blocks.0.qkv", "blocks.1.qkv"]
    # an outer region contains its children's nodes
    assert set(regions["blocks.0.qkv"].nodes) <= set(b0.nodes)


@pytest.mark.parametrize("pattern,path,ok", [
    ("blocks.*", "blocks.3", True), ("blocks.*", "blocks.3.attn", False), ("blocks.**", "blocks.3.attn", True),
    ("blocks.**.attn", "blocks.3.attn", True), ("blocks.**.attn", "blocks.attn", True),
    ("blocks.?", "blocks.3", True), ("blocks.?", "blocks.12", False), ("head", "heads", False),
])
def test_region_patterns(pattern, path, ok):
    assert match(pattern, path) is ok


class DataDependent(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # the user line the error must name
            return x * 2
        return x


def test_capture_error_names_expression_and_user_line():
    with pytest.raises(CaptureError) as e:
        capture(DataDependent(), (torch.randn(3),))
    msg = str(e.value)
    assert "data-dependent expression" in msg
    assert "test_capture.py" in msg and "if x.sum() > 0" in msg
    assert "try:" in msg
    assert "\n" not in msg


def test_capture_error_for_non_module():
    with pytest.raises(CaptureError, match="nn.Module"):
        capture(lambda x: x, (torch.randn(2),))


def test_capture_rejects_bad_example_inputs():
    with pytest.raises(CaptureError, match="example_inputs"):
        capture(Nested(), {"x": 1})


def test_outputs_that_are_none_stay_in_the_structure_and_a_constant_output_is_refused(tmp_path):
    """A None output (a loss or cache not computed) is no graph output; the structure keeps it, so
    the Executor gives the same nesting back. Any other non-tensor output is refused."""
    import pared

    class WithNone(nn.Module):
        def forward(self, x):
            return x + 1, None, {"a": x * 2, "b": None}

    prog = capture(WithNone(), (torch.randn(2),))
    assert prog.main.output_names == ("output_0", "output_2.a")
    assert prog.output_structure["items"][1] == {"kind": "none"}
    x = torch.randn(2)
    ex = pared.load(pared.optimize(WithNone(), (torch.randn(2),), target="cpu", bench_repeats=1)
                    .save(str(tmp_path / "a")))
    got = ex(x.numpy())
    assert got[1] is None and got[2]["b"] is None
    assert_close_to_eager((x + 1, x * 2), (got[0], got[2]["a"]), rel_l2=1e-6)

    class WithNumber(nn.Module):
        def forward(self, x):
            return x + 1, 3

    with pytest.raises(CaptureError, match="returns a non-tensor value 3"):
        capture(WithNumber(), (torch.randn(2),))
