"""latency: one entry per layer x format, finite and positive, measured once per shape
(by lowering one-layer models through the backend), at the calibration's rows;
read-only; serializable; bad options. No assertion on the timing values themselves
(the machine is shared and noisy)."""
import json
import math

import pytest
import torch
from torch import nn

from pared.analysis.latency import LatencyProfile
from pared.backends.measure import default_profiler
from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.transform import PassContext
from pared.registry import get_pass


class _MLP(nn.Module):
    """Three linear layers, two of one shape; the first's input dim (48) is no multiple of
    the w4 block size (32)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(48, 64)
        self.b = nn.Linear(64, 64)
        self.c = nn.Linear(64, 64)

    def forward(self, x):
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


@pytest.fixture(scope="module")
def measured():
    import pared.backends.lower as lower
    torch.manual_seed(0)
    m = _MLP().eval()
    prog = capture(m, (torch.randn(4, 48),))
    g = torch.Generator().manual_seed(1)
    # the example has 4 rows; calibration calls have 6, 6 and 3: the layers are timed at 6
    cal = [(torch.randn(r, 48, generator=g),) for r in (6, 6, 3)]
    ctx = PassContext(calibration=cal, measure=default_profiler())
    calls = []
    real = lower.lower_program

    def counting(program, *a, **k):
        calls.append(len(program.main.module.graph.nodes))
        return real(program, *a, **k)

    lower.lower_program = counting
    try:
        res = get_pass("latency")(formats=["w8a8", "w4"], repeats=5, min_time=0.2)(prog, ctx)
    finally:
        lower.lower_program = real
    return prog, res, res.program.records.of(LatencyProfile), calls


def test_an_entry_per_layer_and_format(measured):
    prog, res, prof, _ = measured
    assert res.modified is False and res.program.main is prog.main and not prog.records     # read-only
    assert (prof.graph, prof.target, prof.backend, prof.threads) == ("main", "cpu", "onnxruntime", 1)
    assert 5 <= prof.repeats <= 100                          # rounds: at least `repeats`, more up to min_time
    assert [x.layer for x in prof.layers] == ["a", "b", "c"]
    a, b = prof.layer("a"), prof.layer("b")
    assert (a.in_features, a.out_features, a.tokens, a.bias) == (48, 64, 6, True)    # rows from calibration
    assert a.formats == ("fp32", "w8a8") and b.formats == ("fp32", "w8a8", "w4")
    assert prof.skipped == (("a", "w4: input dim 48 not a multiple of block_size 32"),)
    for lay in prof.layers:
        assert len(lay.latency_s) == len(lay.formats)
        assert all(math.isfinite(t) and t > 0 for t in lay.latency_s)
        assert math.isfinite(lay.overhead_s) and lay.overhead_s > 0
        assert all(0 <= lay.cost(f) <= lay.latency(f) for f in lay.formats)
    with pytest.raises(KeyError, match="no layer 'd' in the LatencyProfile"):
        prof.layer("d")


def test_one_measurement_per_shape(measured):
    _, _, prof, calls = measured
    b, c = prof.layer("b"), prof.layer("c")
    assert prof.shapes == 2 and b.shape == c.shape
    assert (b.latency_s, b.overhead_s) == (c.latency_s, c.overhead_s)
    # lowered: shape (48, 64) in fp32, w8a8 and the overhead model; (64, 64) in fp32, w8a8, w4 and overhead
    assert len(calls) == 3 + 4


def test_record_serializes(measured):
    _, _, prof, _ = measured
    d = json.loads(json.dumps(prof.to_json()))
    assert d["type"] == "LatencyProfile" and d["shapes"] == 2
    assert d["layers"][1]["formats"] == ["fp32", "w8a8", "w4"] and len(d["layers"][1]["latency_s"]) == 3


@pytest.mark.parametrize("opts, message", [
    ({"formats": ["w2"]}, "option 'formats' takes candidates from \\['w8a8', 'w4', 'w8'\\]"),
    ({"formats": ["fp32"]}, "option 'formats' takes candidates from .*fp32 is always measured"),
    ({"block_size": 48}, "option 'block_size' must be a power of two"),
    ({"repeats": 1}, "option 'repeats' must be in \\[3, inf\\]"),
    ({"threads": -1}, "option 'threads' must be in \\[0, inf\\]"),
    ({"min_time": -1.0}, "option 'min_time' must be in \\[0, 600\\]"),
    ({"repeat": 5}, "unknown option 'repeat'; did you mean 'repeats'"),
])
def test_bad_options(opts, message):
    with pytest.raises(OptionError, match=f"pass 'latency'.*{message}"):
        get_pass("latency")(**opts)


def test_without_a_profiler_it_says_what_to_inject():
    prog = capture(_MLP().eval(), (torch.randn(4, 48),))
    with pytest.raises(PassError, match="pass 'latency' .* needs a measurement service.*"
                                        "measure=pared.backends.measure.default_profiler\\(\\)"):
        get_pass("latency")(repeats=3, min_time=0.0)(prog, PassContext())
