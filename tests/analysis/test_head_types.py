"""analysis/head_types.py: heads whose attention pattern is known by construction (scores
zero, the mask alone decides) come out with the masses, profile, periodicity and types that
pattern gives."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pared import testing
from pared.analysis.head_types import HeadTypes, periodicity
from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.stream import Streamer
from pared.ir.transform import PassContext
from pared.registry import get_pass

T, DH = 2, 4
NEG = -1e4


class PatternStep(nn.Module):
    """One layer, four heads whose attention is fixed by the mask (q = k = 0):
    head 0 (veil): the first frame and the previous one; head 1 (wave): frames at distance
    3, 6, 9, ...; head 2 (anchor): every cached frame alike; head 3: its own frame only.
    Every head also sees its own frame (the Streamer's contract)."""

    def __init__(self):
        super().__init__()
        self.v = nn.Linear(8, 8)

    def forward(self, x, frame_pos, kv_cache, cache_pos, cache_valid):
        b = x.shape[0]
        pos, valid = cache_pos[0], cache_valid[0]                          # [H, C]
        d = frame_pos.reshape(1) - pos
        allow = torch.stack([((pos == 0) | (d == 1))[0], (torch.remainder(d, 3) == 0)[1], torch.ones_like(valid[2]),
                             torch.zeros_like(valid[3])]) & valid
        bias = torch.where(allow, torch.zeros_like(pos), torch.full_like(pos, NEG))
        mask = torch.cat([bias[:, None, :].expand(4, T, -1), torch.zeros(4, T, T)], 2)[None]
        v = self.v(x).view(b, T, 4, 2).transpose(1, 2)                        # [B, H, T, 2]
        kv = torch.stack([torch.zeros_like(v), v])[None]                        # [1, 2, B, H, T, 2]
        q = torch.zeros_like(v)
        a = F.scaled_dot_product_attention(q, torch.cat([kv_cache[0, 0], q], 2), torch.cat([kv_cache[0, 1], v], 2),
                                           attn_mask=mask)
        return x + a.transpose(1, 2).reshape(b, T, 8), kv


def _stream(frames=20, b=2):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(b, T, 8, generator=g), torch.tensor([float(f)]), torch.tensor([1.0])) for f in range(frames)]


@pytest.fixture(scope="module")
def analysed():
    m = Streamer(PatternStep(), layers=1, heads=4, head_dim=2, tokens_per_frame=T, capacity_frames=16)
    calls = _stream()
    prog = capture(m, calls[0])
    res = get_pass("head_types")(recent=1, min_frames=10, max_distance=12, dummy_share=0.25)(
        prog, PassContext(calibration=calls))
    return res.program.records["HeadTypes"], calls


def test_masses_follow_the_pattern(analysed):
    rec, _ = analysed
    assert isinstance(rec, HeadTypes)
    # counted calls: frames 10..19 (the cache holds >= 10 frames); the window of 16 drops frame 0 after 16
    # head 3 looks only at its own frame
    assert rec.p_current[0][3] == pytest.approx(1.0) and rec.dummy_cost[0][3] == pytest.approx(0.0, abs=1e-6)
    # head 0: frame 0 (while cached), the previous frame and its own frame, T tokens each
    f = np.arange(10, 20)
    share = np.where(f <= 16, 1 / 3, 0.0)           # frame 0 is cached until frame 16 is generated
    assert rec.p_first[0][0] == pytest.approx(share.mean(), abs=1e-4)
    assert rec.p_recent[0][0] == pytest.approx(np.where(f <= 16, 1 / 3, 1 / 2).mean(), abs=1e-4)
    assert rec.p_mid[0][0] == pytest.approx(0.0, abs=1e-6)
    # head 2: every cached frame alike, so the middle carries most of it
    assert rec.p_mid[0][2] > 0.7
    # the profile of head 1 has mass at distances 3, 6, 9, 12 only
    prof = np.array(rec.profile[0][1])
    assert set(np.flatnonzero(prof[1:] > 1e-6) + 1) == {3, 6, 9, 12}


def test_types_and_periodicity(analysed):
    rec, _ = analysed
    assert rec.types[0] == ("veil", "wave", "anchor", "dummy")
    assert rec.period[0][1] == pytest.approx(3.0) and rec.periodicity[0][1] >= 0.5
    assert rec.periodicity[0][0] < 0.5 and rec.periodicity[0][2] < 0.5
    assert rec.counts() == {"anchor": 1, "wave": 1, "veil": 1, "dummy": 1}
    assert rec.calls == 10
    assert periodicity(np.array([0, 0, 1, 0, 0, 1, 0, 0, 1, 0, 0, 1.0])) == (pytest.approx(1.0), 3.0)
    assert periodicity(np.ones(8)) == (0.0, 0.0)


def test_kv_policy_reads_the_types(analysed):
    rec, calls = analysed
    m = Streamer(PatternStep(), layers=1, heads=4, head_dim=2, tokens_per_frame=T, capacity_frames=16)
    prog = capture(m, calls[0]).with_record(rec)
    res = get_pass("kv_policy")(policy="pyramid")(prog, PassContext())
    lay = res.program.records["KVStream"].kv_layout()
    assert [p.middle for p in lay.policies[0]] == ["merged", "periodic", "strided", "none"]
    assert lay.policies[0][3].frames == 0


def test_errors_say_what_is_missing():
    m, ex = testing.tiny_streamer()
    prog = capture(m, ex)
    with pytest.raises(PassError, match="no call of the calibration stream had 6 frames"):
        get_pass("head_types")()(prog, PassContext(calibration=testing.tiny_stream_calls(3)))
    with pytest.raises(PassError, match="needs a calibration run"):
        get_pass("head_types")()(prog, PassContext())
    dit, inputs = testing.tiny_dit()
    with pytest.raises(PassError, match="needs a streamed KV cache"):
        get_pass("head_types")()(capture(dit, inputs), PassContext(calibration=[inputs]))
    with pytest.raises(OptionError, match="must exceed first_frames \\+ recent"):
        get_pass("head_types")(min_frames=3)


def test_kv_drop_drops_the_lowest_cost_heads_and_their_attention_work(analysed):
    rec, calls = analysed
    m = Streamer(PatternStep(), layers=1, heads=4, head_dim=2, tokens_per_frame=T, capacity_frames=16)
    prog = capture(m, calls[0]).with_record(rec)
    res = get_pass("kv_drop")(share=0.25)(prog, PassContext())
    dec = res.program.records["KVDropDecisions"]
    assert dec.heads == ((0, 3),) and dec.costs == (pytest.approx(0.0, abs=1e-6),)
    # head 3 computes over its own T tokens instead of 16 frames + its own: 1/17 of its work
    assert dec.attention_flops_after / dec.attention_flops_before == pytest.approx((3 * 17 + 1) / (4 * 17))
    lay = res.program.records["KVStream"].kv_layout()
    assert lay.policies[0][3].frames == 0 and lay.policies[0][0].frames == 16
    run = res.program.runner()
    ref = testing.eager_stream(m.step, lay, calls, 2)
    with torch.no_grad():
        for i, c in enumerate(calls):
            torch.testing.assert_close(run(list(c))[0], ref[i], atol=1e-6, rtol=1e-6)
    # the dropped head's scores are [.., T queries, T keys]: one matmul of the rewritten site has T keys
    gm = res.program.graphs["step"].module
    made = [n for n in gm.graph.nodes if n.meta.get("pared.ir.created_by") == "kv_drop"]
    assert any(n.target == torch.ops.aten.slice.Tensor and n.args[2] == -T for n in made)
