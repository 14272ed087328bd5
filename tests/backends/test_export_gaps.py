"""Ops the dynamo exporter has no translation for: pared's own translations are exact, and an
op nobody translates is named in the error with its node and where the model computes it."""
import numpy as np
import pytest
import torch
from torch import nn

import pared
from pared.ir.errors import BackendError


@torch.library.custom_op("pared_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


class _Inner(nn.Module):
    def forward(self, x):
        return torch.ops.pared_test.twice(x) + 1


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.inner = _Inner()

    def forward(self, x):
        return self.inner(self.lin(x))


@pytest.mark.parametrize("target", ["cpu", pytest.param("tvm-cpu", marks=pytest.mark.slow)])
def test_an_op_without_translation_is_named_with_its_node_module_and_source(target):
    import inspect
    line = inspect.getsourcelines(_Inner.forward)[1]
    with pytest.raises(BackendError) as err:
        pared.optimize(_Model().eval(), (torch.randn(2, 4),), target=target, bench_repeats=1)
    msg = str(err.value)
    assert "twice" in msg and "node 'twice'" in msg and "module 'inner'" in msg
    assert f"_Inner.forward, {__file__}:{line}" in msg
    assert "named above" not in msg and "\x1b[" not in msg


def test_grouped_mm_translation_follows_the_offsets_of_each_call(tmp_path):
    """transformers' grouped matmul: per expert its rows (between two offsets), empty experts and
    rows past the last offset (zeros) included, on offsets the export never saw."""
    pytest.importorskip("transformers")
    import transformers.integrations.moe  # noqa: F401  (registers transformers::grouped_mm_fallback)

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(4, 8, 5))

        def forward(self, x, offs):
            return torch.ops.transformers.grouped_mm_fallback(x, self.w, offs)

    torch.manual_seed(0)
    m = Grouped().eval()
    x = torch.randn(12, 8)
    opt = pared.optimize(m, (x, torch.tensor([3, 6, 9, 12])), target="cpu", bench_repeats=1)
    ex = pared.load(opt.save(str(tmp_path / "a")))
    for offs in ([3, 6, 9, 12], [0, 5, 5, 12], [2, 2, 7, 9], [12, 12, 12, 12]):
        o = torch.tensor(offs)
        with torch.no_grad():
            want = m(x, o).numpy()
        got = ex.run_flat(x.numpy(), o.numpy())[0]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"offsets {offs}")
