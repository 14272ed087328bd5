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


class _Mask(nn.Module):
    """HunyuanVideo's token-refiner mask: a pairwise bool mask, then a scalar written into a slice
    (aten.copy of a scalar broadcast to the slice, aten.where on bool values); plus a where on int16."""

    def forward(self, x, mask, counts):
        b = mask.bool()
        pair = b.unsqueeze(1) & b.unsqueeze(2)
        pair[:, :, 0] = True
        small = torch.where(pair, counts.to(torch.int16), torch.zeros_like(counts, dtype=torch.int16))
        return x * pair, small.to(torch.float32)


def test_broadcast_copy_and_where_on_bool_and_int16_follow_each_mask(tmp_path):
    """The exporter's aten.copy did not broadcast (a rank-0 result ORT refused) and ORT's CPU Where
    has no bool or int16 kernel: pared's translations, on masks the export never saw."""
    m = _Mask().eval()
    g = torch.Generator().manual_seed(0)

    def call(seed):
        g.manual_seed(seed)
        return (torch.randn(2, 5, 5, generator=g), (torch.rand(2, 5, generator=g) > 0.5).long(),
                torch.randint(-300, 300, (2, 5, 5), generator=g))

    opt = pared.optimize(m, call(0), target="cpu", bench_repeats=1)
    ex = pared.load(opt.save(str(tmp_path / "a")))
    for seed in range(1, 5):
        args = call(seed)
        with torch.no_grad():
            want = [t.numpy() for t in m(*args)]
        got = ex.run_flat(*[a.numpy() for a in args])
        for w, o in zip(want, got):
            np.testing.assert_array_equal(o, w, err_msg=f"inputs {seed}")


def test_a_file_ort_refuses_is_named_with_its_node_and_module(monkeypatch):
    """A translation whose result ONNX Runtime refuses (here a made-up one, as the exporter's
    aten.copy once was): the error names the ONNX node, the torch op, the module, and ORT's words."""
    from pared.backends.onnxruntime import lower

    def bad(x):
        from onnxscript import opset18 as op
        return op.Unsqueeze(op.ReduceSum(x, keepdims=0), op.Constant(value_ints=[3]))   # rank 0: no axis 3

    table = lower.custom_translations
    monkeypatch.setattr(lower, "custom_translations", lambda: {**table(), torch.ops.pared_test.twice.default: bad})
    with pytest.raises(BackendError) as err:
        pared.optimize(_Model().eval(), (torch.randn(2, 4),), target="cpu", bench_repeats=1)
    msg = str(err.value)
    assert "ONNX node 'node_twice'" in msg and "pared_test.twice" in msg and "module 'inner'" in msg, msg
    assert "ORT says" in msg and "named above" not in msg
