"""activation_sparsity: |x| quantiles and TEAL thresholds, WINA score thresholds per linear input,
checked against the eager inputs (forward pre-hooks) to the histograms' resolution; exact zeros;
multi-graph programs; bad options."""
import numpy as np
import pytest
import torch
from torch import nn

from pared.analysis.activation_sparsity import ActivationSparsityProfile, LogHistogram
from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.plan import Call, Plan, Select, Table
from pared.ir.program import Program
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.testing import check_analysis, tiny_transformer


def _profile(program, calibration, **opts) -> ActivationSparsityProfile:
    return check_analysis(get_pass("activation_sparsity")(**opts), program, PassContext(calibration=calibration))


def _eager_inputs(model, calls) -> dict[str, np.ndarray]:
    """Every nn.Linear's input over the calls, flattened to [rows, in_features], by module path."""
    seen: dict[str, list] = {}
    hs = [mod.register_forward_pre_hook(lambda mod, a, name=name: seen.setdefault(name, []).append(
        a[0].detach().double().reshape(-1, a[0].shape[-1]))) for name, mod in model.named_modules()
        if isinstance(mod, nn.Linear)]
    try:
        with torch.no_grad():
            for c in calls:
                model(*c)
    finally:
        for h in hs:
            h.remove()
    return {k: torch.cat(v).numpy() for k, v in seen.items()}


def _calls(n=3):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 50, (2, 16), generator=g),) for _ in range(n)]


def test_teal_and_wina_thresholds_match_the_eager_inputs():
    m, (ids,) = tiny_transformer()
    calls = _calls()
    prof = _profile(capture(m, (ids,)), calls, sparsities=[0.25, 0.5, 0.9], quantiles=[0.0, 0.5, 0.99, 1.0])
    tol = 2 * prof.relative_resolution        # quantiles are exact to a bin's width
    assert prof.relative_resolution == pytest.approx(10 ** 0.001 - 1)
    eager = _eager_inputs(m, calls)
    lins = prof.graph("main").linears
    assert {x.layer for x in lins} == set(eager) and len(lins) == 9
    mods = dict(m.named_modules())
    for lin in lins:
        x = np.abs(eager[lin.layer])
        w = mods[lin.layer].weight.detach().double()
        assert (lin.in_features, lin.out_features) == (w.shape[1], w.shape[0]) and lin.calls == (0, 1, 2)
        np.testing.assert_allclose(lin.abs_x.thresholds, np.quantile(x, [0.25, 0.5, 0.9]), rtol=tol)
        np.testing.assert_allclose(lin.abs_x.quantiles, np.quantile(x, [0.0, 0.5, 0.99, 1.0]), rtol=tol)
        assert lin.abs_x.count == x.size and lin.abs_x.mean == pytest.approx(x.mean(), rel=1e-9)
        assert lin.abs_x.max == pytest.approx(x.max(), rel=1e-9) and lin.abs_x.zero_fraction == 0.0
        # zeroing |x| <= t_p zeroes a fraction p of the calibration inputs (to the resolution)
        assert np.mean(x <= lin.abs_x.thresholds[1]) == pytest.approx(0.5, abs=0.01)
        score = x * w.norm(dim=0).numpy()[None]
        np.testing.assert_allclose(lin.wina.thresholds, np.quantile(score, [0.25, 0.5, 0.9]), rtol=tol)
        np.testing.assert_allclose(lin.column_norm_range, (w.norm(dim=0).min(), w.norm(dim=0).max()), rtol=1e-6)
    assert prof.teal_threshold("blocks.0.qkv", 0.5) == prof.linear("blocks.0.qkv").abs_x.thresholds[1]
    assert prof.to_json()["type"] == "ActivationSparsityProfile"


class _ReluMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 32), nn.Linear(32, 8)

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def test_exact_zeros_after_a_relu_and_unmeasured_layers():
    torch.manual_seed(0)
    m = _ReluMLP().eval()
    x = torch.randn(64, 8)
    prof = _profile(capture(m, (x,)), [(x,)], exclude="up")
    (down,) = prof.graph().linears
    h = torch.relu(m.up(x)).detach().numpy()
    zeros = float(np.mean(h == 0))
    assert down.layer == "down" and down.abs_x.zero_fraction == pytest.approx(zeros) and 0.3 < zeros < 0.7
    for p, t in zip(prof.sparsities, down.abs_x.thresholds):
        assert (t == 0.0) == (p * (h.size - 1) < zeros * h.size - 1) or p * (h.size - 1) >= zeros * h.size - 1
        assert t == pytest.approx(np.quantile(np.abs(h), p), rel=2 * prof.relative_resolution)


def test_log_histogram_quantiles_against_numpy():
    v = torch.cat([torch.zeros(100), torch.rand(5000).double() ** 3 * 50]).abs()
    hist = LogHistogram(1000)
    for chunk in v.split(777):
        hist.add(chunk)
    for q in (0.0, 0.01, 0.02, 0.3, 0.5, 0.77, 1.0):
        assert hist.quantile(q) == pytest.approx(float(np.quantile(v.numpy(), q)), rel=5e-3, abs=1e-12)


def test_multi_graph_programs_are_keyed_by_graph_and_call():
    m, (ids,) = tiny_transformer()
    a, b = capture(m, (ids,), name="a"), capture(m, (ids,), name="b")
    outs = tuple(f"o{i}" for i in range(len(a.main.output_names)))
    plan = Plan(inputs=("ids",), outputs=outs, body=Select(Table(("a", "b", "a"), default="a"), (
        ("a", Call("a", ("in:ids",), outs)), ("b", Call("b", ("in:ids",), outs)))))
    prog = Program({"a": a.main, "b": b.main}, plan, a.output_structure)
    calls = _calls(3)
    prof = _profile(prog, calls)
    la, lb = prof.linear("head", "a"), prof.linear("head", "b")
    assert la.calls == (0, 2) and lb.calls == (1,)
    x = np.abs(_eager_inputs(m, calls[1:2])["head"])
    assert lb.abs_x.count == x.size
    np.testing.assert_allclose(lb.abs_x.thresholds, np.quantile(x, prof.sparsities), rtol=2 * prof.relative_resolution)


def test_bad_options_raise():
    with pytest.raises(OptionError, match="option 'sparsities' must be in \\(0, 1\\), got 1.0"):
        get_pass("activation_sparsity")(sparsities=[0.5, 1.0])
    with pytest.raises(OptionError, match="option 'quantiles' must be in \\[0, 1\\], got 50.0"):
        get_pass("activation_sparsity")(quantiles=[50])
    with pytest.raises(OptionError, match="option 'bins_per_decade' must be in \\[10, 100000\\]"):
        get_pass("activation_sparsity")(bins_per_decade=2)
    with pytest.raises(OptionError, match="did you mean 'sparsities'"):
        get_pass("activation_sparsity")(sparsity=[0.5])
    m, (ids,) = tiny_transformer()
    prog = capture(m, (ids,))
    with pytest.raises(PassError, match="found no linear layer matching layers \\['nothing.\\*'\\]"):
        _profile(prog, _calls(1), layers="nothing.*")
    with pytest.raises(PassError, match="needs a calibration run"):
        _profile(prog, None)
