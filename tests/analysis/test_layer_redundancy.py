"""layer_redundancy: EfficientVLA's I(l) = 1 - mean cos(x_l, x_l+1) per block, checked against
eager block hooks; per call over a sampler loop; multi-graph programs; bad input."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pared.analysis.layer_redundancy import LayerRedundancyProfile
from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.plan import Call, Plan, Select, Table
from pared.ir.program import Program
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.testing import check_analysis, tiny_dit, tiny_sampler_loop, tiny_vit


def _profile(program, calibration, **opts) -> LayerRedundancyProfile:
    return check_analysis(get_pass("layer_redundancy")(**opts), program, PassContext(calibration=calibration))


def _eager_cosines(model, blocks, drive) -> list[list[torch.Tensor]]:
    """Per block, per call: the cosine of each token of its input and output (hooks)."""
    seen: list[list[torch.Tensor]] = [[] for _ in blocks]
    hs = [b.register_forward_hook(lambda mod, a, out, i=i: seen[i].append(
        F.cosine_similarity(a[0].double(), out.double(), dim=-1).flatten())) for i, b in enumerate(blocks)]
    try:
        with torch.no_grad():
            drive(model)
    finally:
        for h in hs:
            h.remove()
    return seen


def test_vit_blocks_match_eager_hooks():
    m, (x,) = tiny_vit()
    calls = [(x,), (x * 0.5,)]
    prof = _profile(capture(m, (x,)), calls)
    g = prof.graph("main")
    assert [b.block for b in g.blocks] == ["blocks.0", "blocks.1", "blocks.2"] and g.calls == 2
    eager = _eager_cosines(m, m.blocks, lambda mm: [mm(*c) for c in calls])
    for b, cos in zip(g.blocks, eager):
        assert b.importance == pytest.approx(1 - float(torch.cat(cos).mean()), rel=1e-6, abs=1e-9)
        assert b.call_importance == pytest.approx([1 - float(c.mean()) for c in cos], rel=1e-6, abs=1e-9)
        assert b.cos_min == pytest.approx(float(torch.cat(cos).min()), abs=1e-9)
        assert b.tokens == 3 * 17 and b.calls == (0, 1)
    assert [b.importance for b in g.ranked()] == sorted(b.importance for b in g.blocks)
    assert prof.to_json()["type"] == "LayerRedundancyProfile"


def test_per_step_importance_over_a_sampler_loop():
    m, (x, t) = tiny_dit()
    prof = _profile(capture(m, (x, t)), tiny_sampler_loop(x, 4))
    g = prof.graph()
    assert len(g.blocks) == 6 and g.calls == 4
    eager = _eager_cosines(m, m.blocks, lambda mm: tiny_sampler_loop(x, 4)(mm))
    for b, cos in zip(g.blocks, eager):
        assert b.call_importance == pytest.approx([1 - float(c.mean()) for c in cos], rel=1e-6, abs=1e-9)
        assert b.calls == (0, 1, 2, 3)
    only = _profile(capture(m, (x, t)), tiny_sampler_loop(x, 2), regions="blocks.1")
    assert [b.block for b in only.graph().blocks] == ["blocks.1"]


def test_multi_graph_programs_are_keyed_by_graph_and_call():
    m, (x,) = tiny_vit()
    a, b = capture(m, (x,), name="a"), capture(m, (x,), name="b")
    plan = Plan(inputs=("x",), outputs=("y",), body=Select(Table(("a", "b"), default="a"), (
        ("a", Call("a", ("in:x",), ("y",))), ("b", Call("b", ("in:x",), ("y",))))))
    prog = Program({"a": a.main, "b": b.main}, plan)
    calls = [(x,), (x * 2,), (x * 0.5,)]
    prof = _profile(prog, calls)
    one = _profile(capture(m, (x,)), calls).graph()
    pa, pb = prof.graph("a"), prof.graph("b")
    assert pa.blocks[0].calls == (0, 2) and pb.blocks[0].calls == (1,)
    for i in range(3):
        assert pa.blocks[i].call_importance == pytest.approx(
            [one.blocks[i].call_importance[0], one.blocks[i].call_importance[2]], rel=1e-6)
        assert pb.blocks[i].call_importance == pytest.approx([one.blocks[i].call_importance[1]], rel=1e-6)
    assert np.mean(pa.blocks[0].call_importance) == pytest.approx(pa.blocks[0].importance, rel=1e-9)


class _Residual(torch.nn.Module):
    def __init__(self, f: torch.nn.Module):
        super().__init__()
        self.f = f

    def forward(self, x):
        return x + self.f(x)


class _BackboneAndLoopedHead(torch.nn.Module):
    """Two block stacks: a small backbone run once and a larger head run twice in one graph (a
    sampler unrolled into a policy): the head's blocks have no single input, the backbone's do."""

    def __init__(self):
        super().__init__()
        self.backbone = torch.nn.ModuleList([_Residual(torch.nn.Linear(8, 8)) for _ in range(2)])
        self.head = torch.nn.ModuleList([_Residual(torch.nn.Sequential(
            torch.nn.Linear(8, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))) for _ in range(3)])

    def forward(self, x):
        for b in self.backbone:
            x = b(x)
        for _ in range(2):
            for b in self.head:
                x = b(x)
        return x


def test_the_default_stack_is_one_whose_blocks_have_a_single_input():
    torch.manual_seed(0)
    m = _BackboneAndLoopedHead().eval()
    x = torch.randn(4, 8)
    prog = capture(m, (x,))
    g = _profile(prog, [(x,)]).graph()
    assert [b.block for b in g.blocks] == ["backbone.0", "backbone.1"]
    with torch.no_grad():
        y = m.backbone[0](x)
        want = 1 - float(F.cosine_similarity(y, m.backbone[1](y), dim=-1).mean())
    assert g.blocks[1].importance == pytest.approx(want, rel=1e-5)
    with pytest.raises(PassError, match="no block with an input and an output of one shape"):
        _profile(prog, [(x,)], regions="head.*")


def test_bad_options_and_inputs_raise():
    m, (x,) = tiny_vit()
    prog = capture(m, (x,))
    with pytest.raises(OptionError, match="option 'graphs': no graph 'nope'"):
        _profile(prog, [(x,)], graphs="nope")
    with pytest.raises(OptionError, match="unknown option 'region'; did you mean 'regions'"):
        get_pass("layer_redundancy")(region="blocks.*")
    with pytest.raises(PassError, match="needs a calibration run"):
        _profile(prog, None)
    with pytest.raises(PassError, match="no region matches 'layers.\\*'"):
        _profile(prog, [(x,)], regions="layers.*")
    lin = capture(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.raises(PassError, match="no repeated blocks"):
        _profile(lin, [(torch.randn(2, 4),)])
