"""token_importance: attention received, relevance per query group and nearest-duplicate
similarity per token, against the same quantities computed from the eager model's own
probabilities and values (TinyVLA's blocks return their attention); fused SDPA recomputed;
stability; bad options."""
import pytest
import torch
import torch.nn.functional as F

from pared.ir.capture import capture
from pared.ir.errors import OptionError, PassError
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.testing import check_analysis, tiny_vla, tiny_vla_inputs

CALIB = [tiny_vla_inputs(3, seed=s) for s in (11, 12, 13)]


def _eager(m, inputs):
    """Per block: (probabilities [B, H, N, N], values [B, H, N, d]) of one eager call."""
    got = []
    for blk in m.blocks:
        def hook(mod, args, out, got=got, blk=blk):
            x = args[0]
            b, n, d = x.shape
            qkv = blk.qkv(blk.norm1(x)).reshape(b, n, 3, blk.heads, d // blk.heads).permute(2, 0, 3, 1, 4)
            got.append((out[1], qkv[2]))
        blk.register_forward_hook(hook)
    with torch.no_grad():
        m(*inputs)
    return got


def test_matches_the_eager_probabilities_and_values():
    m, inputs = tiny_vla()
    prog = capture(m, inputs)
    rec = check_analysis(get_pass("token_importance")(query_groups=[["text", 0, 4]]), prog,
                         PassContext(calibration=CALIB))
    per_call = [_eager(tiny_vla()[0], x) for x in CALIB]
    for i, site in enumerate(rec.graph().sites):
        p = torch.stack([c[i][0].double().mean((0, 1)) for c in per_call])          # [calls, N, N]
        torch.testing.assert_close(torch.tensor(site.received, dtype=torch.float64), p.mean(1).mean(0), atol=1e-6, rtol=0)
        torch.testing.assert_close(torch.tensor(dict(site.relevance)["text"], dtype=torch.float64), p[:, 0:4].sum(1).mean(0),
                                   atol=1e-6, rtol=0)
        near = []
        for c in per_call:
            v = F.normalize(c[i][1].double(), dim=-1)
            s = (v @ v.transpose(-1, -2)).masked_fill(torch.eye(22, dtype=torch.bool), -2.0)
            near.append(s.amax(-1).reshape(-1, 22).mean(0))
        torch.testing.assert_close(torch.tensor(site.nearest_similarity, dtype=torch.float64), torch.stack(near).mean(0), atol=1e-6, rtol=0)
        assert site.tokens == 22 and site.calls == 3
        # stability: each call's top-6 (keep_fraction 0.25 of 22) against the whole run's top-6
        for name, rows in (("received", p.mean(1)), ("text", p[:, 0:4].sum(1))):
            top = set(rows.sum(0).topk(6).indices.tolist())
            want = sum(len(top & set(r.topk(6).indices.tolist())) for r in rows) / (6 * len(rows))
            assert abs(dict(site.stability)[name] - want) < 1e-6, (site.layer, name)


class _SDPA(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = torch.nn.Linear(16, 48)

    def forward(self, x):
        q, k, v = self.qkv(x).reshape(x.shape[0], x.shape[1], 3, 2, 8).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).sum()


def test_fused_attention_is_recomputed_on_the_side():
    torch.manual_seed(0)
    m = _SDPA().eval()
    x = torch.randn(2, 6, 16)
    prog = capture(m, (x,))
    res = get_pass("token_importance")()(prog, PassContext(calibration=[(x,)]))
    (site,) = res.program.records["TokenImportanceProfile"].graph().sites
    q, k, _ = m.qkv(x).reshape(2, 6, 3, 2, 8).permute(2, 0, 3, 1, 4)
    p = torch.softmax((q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(),
                                                                      float("-inf")), -1)
    torch.testing.assert_close(torch.tensor(site.received, dtype=torch.float64), p.double().mean((0, 1)).mean(0).detach(), atol=1e-6,
                               rtol=0)
    assert site.received[0] > site.received[-1]             # causal: the first key is seen by every query


@pytest.mark.parametrize("opts, message", [
    ({"query_groups": [["text", 4, 2]]}, "option 'query_groups' takes \\(name, start, stop\\)"),
    ({"query_groups": [["a", 0, 1], ["a", 1, 2]]}, "names a group twice"),
    ({"keep_fraction": 0.0}, "option 'keep_fraction' must be in \\(0, 1\\]"),
])
def test_bad_options(opts, message):
    with pytest.raises(OptionError, match=message):
        get_pass("token_importance")(**opts)


def test_a_group_past_the_tokens_and_no_calibration_are_refused():
    m, inputs = tiny_vla()
    prog = capture(m, inputs)
    with pytest.raises(PassError, match="query group 'far' \\[20, 40\\) runs past the 22 queries"):
        get_pass("token_importance")(query_groups=[["far", 20, 40]])(prog, PassContext(calibration=CALIB))
    with pytest.raises(PassError, match="needs a calibration run"):
        get_pass("token_importance")()(prog, PassContext())
