"""ir.rewrite: dead-code elimination through metadata checks; splicing a traced function."""
import pytest
import torch
import torch.fx as fx

from pared.ir import meta
from pared.ir.capture import capture
from pared.ir.rewrite import eliminate_dead_code, narrow_split_linears, splice
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.testing import op_count


class _Checks(torch.nn.Module):
    def forward(self, x):
        y = x.to(torch.float32) * 2
        (x + 1).to(torch.float32)       # dead, but torch.export keeps a metadata check on it
        return y


def test_dead_code_elimination_sees_through_metadata_checks():
    p = capture(_Checks(), (torch.randn(3),))
    assert op_count(p, "aten._assert_tensor_metadata.default") == 2 and op_count(p, "aten.add.Tensor") == 1
    gm = p.main.copy_module()
    assert eliminate_dead_code(gm) == 3          # two checks and the dead add
    assert [n.target for n in gm.graph.nodes if n.op == "call_function"] == [torch.ops.aten.mul.Tensor]
    # the pipeline pass does the same, and a second run finds nothing
    res = get_pass("dead_code_elimination")()(p, PassContext())
    assert res.modified and op_count(res.program, "aten.add.Tensor") == 0
    assert get_pass("dead_code_elimination")()(res.program, PassContext()).modified is False
    x = torch.randn(3)
    torch.testing.assert_close(res.program(x), _Checks()(x), rtol=0, atol=0)


class _Two(torch.nn.Module):
    def forward(self, x, y):
        a = x * 2
        b = a + 1
        return b * y


def test_splice_inserts_aten_ops_after_its_last_argument():
    gm = fx.symbolic_trace(_Two())
    nodes = {n.name: n for n in gm.graph.nodes}
    fn = lambda a, y: (a.sin() + y).topk(2, dim=-1).values.sum(-1, keepdim=True).expand_as(a)
    (r,) = splice(gm, fn, [nodes["mul"], nodes["y"]], [torch.zeros(3, 4), torch.zeros(3, 4)], "test")
    nodes["add"].replace_all_uses_with(r)
    eliminate_dead_code(gm)
    gm.graph.lint()                   # topological order holds: r precedes its new users
    gm.recompile()
    assert r.meta[meta.CREATED_BY] == "test" and r.target is torch.ops.aten.expand.default
    x, y = torch.randn(3, 4), torch.randn(3, 4)
    torch.testing.assert_close(gm(x, y), fn(x * 2, y) * y)


def test_splice_refuses_constants_and_wrong_arity():
    gm = fx.symbolic_trace(_Two())
    nodes = {n.name: n for n in gm.graph.nodes}
    with pytest.raises(ValueError, match="creates tensor constants"):
        splice(gm, lambda a: a + torch.tensor([1.0, 2.0, 3.0, 4.0]), [nodes["mul"]], [torch.zeros(3, 4)], "t")
    with pytest.raises(ValueError, match="takes 1 tensors, given 2"):
        splice(gm, lambda a: a + 1, [nodes["mul"], nodes["y"]], [torch.zeros(3, 4)], "t")


class _Modulated(torch.nn.Module):
    """adaLN-style: one linear's output split in three; `use` says which pieces are read."""

    def __init__(self, use=(0, 2), shared=False, bias=True):
        super().__init__()
        self.lin = torch.nn.Linear(8, 3 * 5, bias=bias)
        self.use, self.shared = use, shared

    def forward(self, x):
        y = self.lin(x)
        parts = y.split([5, 5, 5], dim=-1)
        out = sum(parts[i] * (i + 1) for i in self.use)
        return out + y.sum() if self.shared else out


def _addmm_widths(gm):
    return [n.meta["val"].shape[-1] for n in gm.graph.nodes
            if n.target in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default)]


@pytest.mark.parametrize("use, bias", [((0, 2), True), ((1,), True), ((2, 0), True), ((0, 2), False)])
def test_narrow_split_linears_computes_only_the_pieces_read(use, bias):
    m = _Modulated(use, bias=bias).eval()
    x = torch.randn(4, 8)
    gm = capture(m, (x,)).main.copy_module()
    assert _addmm_widths(gm) == [15]
    assert narrow_split_linears(gm, "test") == 1
    gm.graph.lint()
    gm.recompile()
    assert _addmm_widths(gm) == [5 * len(set(use))]
    sizes = [n.args[1] for n in gm.graph.nodes if n.target == torch.ops.aten.split_with_sizes.default]
    assert sizes == [[5] * len(set(use))]
    # the new constants are named by the pieces kept (variants keeping other pieces hold other names)
    kept = "_".join(map(str, sorted(set(use))))
    assert any(str(n.target).endswith(f"_narrowed_{kept}_weight") for n in gm.graph.nodes if n.op == "get_attr")
    assert all(n.meta[meta.CREATED_BY] == "test" for n in gm.graph.nodes
               if n.target in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default,
                               torch.ops.aten.split_with_sizes.default))
    with torch.no_grad():
        torch.testing.assert_close(gm(x)[0] if isinstance(gm(x), (tuple, list)) else gm(x), m(x),
                                   rtol=1e-6, atol=1e-6)
    assert narrow_split_linears(gm, "test") == 0            # nothing left to narrow


def test_narrow_split_linears_leaves_a_linear_read_whole():
    for m in (_Modulated((0, 1, 2)), _Modulated((0,), shared=True)):   # every piece read / the product read too
        gm = capture(m.eval(), (torch.randn(4, 8),)).main.copy_module()
        assert narrow_split_linears(gm, "test") == 0 and _addmm_widths(gm) == [15]
