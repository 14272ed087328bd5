"""temporal_redundancy: what it records, checked against eager hooks; bad input."""
import math

import pytest
import torch

from pared.analysis.redundancy import RedundancyProfile, block_regions
from pared.ir.capture import capture
from pared.ir.errors import PassError
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.testing import tiny_dit, tiny_sampler_loop


def _profile(calibration, **opts):
    m, (x, t) = tiny_dit()
    prog = capture(m, (x, t))
    ctx = PassContext(calibration=calibration(m, x) if callable(calibration) else calibration)
    res = get_pass("temporal_redundancy")(**opts)(prog, ctx)
    return m, x, prog, res, res.program.records.of(RedundancyProfile)


def test_finds_the_blocks_and_matches_eager_hooks():
    m, x, prog, res, prof = _profile(lambda m, x: tiny_sampler_loop(x, 6))
    assert res.modified is False and res.program.main is prog.main and res.program.plan is prog.plan
    assert prof.calls == 6
    paths = [r.path for r in prof.regions]
    assert [p for p in paths if p.count(".") == 1] == [f"blocks.{i}" for i in range(6)]
    assert "blocks.2.mlp" in paths
    # eager: hook blocks.2 over the same loop, compute the residual change by hand
    seen = []
    h = m.blocks[2].register_forward_hook(lambda mod, a, out: seen.append((a[0].detach().clone(), out.detach().clone())))
    try:
        with torch.no_grad():
            tiny_sampler_loop(x, 6)(m)
    finally:
        h.remove()
    res_prev, res_now = seen[2][1] - seen[2][0], seen[3][1] - seen[3][0]
    want = float((res_now - res_prev).abs().mean() / res_prev.abs().mean())
    got = prof.region("blocks.2").residual_rel_l1[3]
    assert math.isnan(prof.region("blocks.2").residual_rel_l1[0])
    assert got == pytest.approx(want, rel=1e-4)
    cos = float(torch.nn.functional.cosine_similarity(seen[3][1].flatten(), seen[2][1].flatten(), dim=0))
    assert prof.region("blocks.2").output_cos[3] == pytest.approx(cos, abs=1e-5)
    assert prof.region("blocks.2").flops > prof.region("blocks.2.mlp").flops > 0
    # serializable for the manifest and the report
    js = prof.to_json()
    assert js["type"] == "RedundancyProfile" and len(js["regions"]) == len(prof.regions)


def test_a_list_of_calls_is_a_calibration_run_too():
    m, (x, t) = tiny_dit()
    calls = [(x, torch.full((2,), float(s))) for s in (900, 800, 700)]
    _, _, _, _, prof = _profile(calls, regions="blocks.*")
    assert prof.calls == 3 and all(r.path.count(".") == 1 for r in prof.regions)
    assert all(0 <= v < 1 for r in prof.regions for v in r.residual_rel_l1[1:])


def test_bad_calibration_and_patterns_raise():
    with pytest.raises(PassError, match="needs a calibration run"):
        _profile(None)
    with pytest.raises(PassError, match="at least 2 consecutive calls"):
        m, (x, t) = tiny_dit()
        _profile([(x, t)])
    with pytest.raises(PassError, match="no region matches 'layers.\\*'"):
        _profile(lambda m, x: tiny_sampler_loop(x, 3), regions="layers.*")


def test_block_regions_needs_repeated_blocks():
    prog = capture(torch.nn.Linear(4, 4), (torch.randn(2, 4),))
    with pytest.raises(PassError, match="no repeated blocks"):
        block_regions(prog)


def test_the_primary_input_is_the_residual_stream_when_another_input_has_its_shape():
    """LTX-Video: each block reads rotary cos and sin of the hidden states' shape; the primary
    input is the one the output reaches back through its residual adds."""
    from pared.analysis.redundancy import primary_io

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 8)

        def forward(self, rope, h):                       # rope first: the order does not decide
            h = h + self.lin(h * rope)
            return h + self.lin(h)

    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.ModuleList(Block() for _ in range(3))

        def forward(self, x, rope):
            for b in self.blocks:
                x = b(rope, x)
            return x

    prog = capture(Model().eval(), (torch.randn(2, 5, 8), torch.randn(2, 5, 8)))
    gm = prog.main.module
    blocks = block_regions(prog)
    ins = [primary_io(gm, r)[0].name for r in blocks]
    assert ins[0] == "x" and "rope" not in ins, ins
