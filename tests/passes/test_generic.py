"""dead_code_elimination and constant_folding: structure, numerics, no-op, idempotence, options."""
import pytest
import torch
from torch import nn

from pared.ir import meta
from pared.ir.capture import capture
from pared.ir.errors import OptionError
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.testing import ScaledLinear, assert_close_to_eager, op_count, tiny_transformer, with_dead_code

torch.manual_seed(0)


def test_dce_removes_unused_nodes():
    m, inputs = tiny_transformer()
    p = with_dead_code(capture(m, inputs))
    assert op_count(p, "aten.exp") == 1
    before = p.main.module.code
    res = get_pass("dead_code_elimination")()(p, PassContext())
    assert res.modified and res.stats["removed"] == 2
    assert op_count(res.program, "aten.exp") == 0
    assert p.main.module.code == before  # input program untouched
    assert_close_to_eager(m(*inputs), res.program(*inputs), rel_l2=0)


def test_dce_noop_and_idempotent():
    m, inputs = tiny_transformer()
    p = capture(m, inputs)
    res = get_pass("dead_code_elimination")()(p, PassContext())
    assert res.modified is False and res.program is p and res.stats["removed"] == 0
    # twice: a second run on DCE's own output finds nothing more
    first = get_pass("dead_code_elimination")()(with_dead_code(p), PassContext())
    assert first.modified and first.stats["removed"] == 2
    again = get_pass("dead_code_elimination")()(first.program, PassContext())
    assert again.modified is False and again.program is first.program and again.stats["removed"] == 0


def test_constant_folding_folds_parameter_only_subgraphs():
    m = ScaledLinear().eval()
    x = torch.randn(4, 8)
    p = capture(m, (x,))
    assert op_count(p, "aten.exp") == 2  # exp(log_scale), and softplus decomposes to exp/log1p/where
    res = get_pass("constant_folding")()(p, PassContext())
    assert res.modified and res.stats["folded"] == 2
    q = res.program
    assert op_count(q, "aten.exp") == 0 and op_count(q, "aten.log1p") == 0
    folded = [n for n in q.main.module.graph.nodes if n.op == "get_attr" and meta.FOLDED_FROM in n.meta]
    assert sorted(n.meta[meta.FOLDED_FROM] for n in folded) == [("bias_raw",), ("log_scale",)]
    # the weight transpose (a view of one parameter) is left for the backend
    assert op_count(q, "aten.permute") == 1
    assert_close_to_eager(m(x), q(x), rel_l2=1e-6)
    # input unchanged and parameters shared, not copied
    assert op_count(p, "aten.exp") == 2
    assert q.main.module.lin.weight is p.main.module.lin.weight
    # twice: nothing more
    again = get_pass("constant_folding")()(q, PassContext())
    assert again.modified is False and again.program is q


def test_constant_folding_noop_on_model_without_constants():
    m, inputs = tiny_transformer()
    p = capture(m, inputs)
    folded = get_pass("constant_folding")()(p, PassContext())
    # pos[:, :16] slicing is a view of one parameter: not folded
    assert folded.modified is False and folded.program is p


def test_constant_folding_respects_max_bytes():
    class Big(nn.Module):
        def __init__(self):
            super().__init__()
            self.v = nn.Parameter(torch.randn(1, 64))

        def forward(self, x):
            return x + (self.v * 2).expand(64, 64).contiguous()

    m = Big()
    p = capture(m, (torch.randn(64, 64),))
    small = get_pass("constant_folding")(max_bytes=1024)(p, PassContext())
    # v*2 (256 B) folds; the 16 KiB expanded copy does not
    assert small.stats["folded"] == 1
    assert_close_to_eager(m(p.main.example_inputs[0]), small.program(*p.main.example_inputs))


@pytest.mark.parametrize("opts,msg", [({"max_bytes": -1}, "must be in"), ({"max_byte": 1}, "did you mean 'max_bytes'"),
                                      ({"max_bytes": "1MB"}, "expects int")])
def test_constant_folding_bad_options(opts, msg):
    with pytest.raises(OptionError, match=msg):
        get_pass("constant_folding")(**opts)


def test_dce_takes_no_options():
    with pytest.raises(OptionError, match="takes no options"):
        get_pass("dead_code_elimination")(aggressive=True)
