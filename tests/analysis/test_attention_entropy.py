"""attention_entropy: entropy per layer/head/query/call, mass received and head kinds, checked
against the eager attention probabilities; fused SDPA recomputed from q and k; multi-graph
programs; bad options."""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pared.analysis.attention_entropy import AttentionEntropyProfile, sdpa_probabilities
from pared.ir.capture import _flatten, capture
from pared.ir.errors import OptionError, PassError
from pared.ir.plan import Call, Plan, Select, Table
from pared.ir.program import Program
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.testing import check_analysis, tiny_transformer, tiny_vit


def _profile(program, calibration, **opts) -> AttentionEntropyProfile:
    ctx = PassContext(calibration=calibration)
    return check_analysis(get_pass("attention_entropy")(**opts), program, ctx)


def _eager_probs(model, calls) -> list[list[torch.Tensor]]:
    """Per call, per block: the softmax TinyBlock computes, [batch, heads, N, N] (from its own
    norm1 and qkv, hooked on the block's input)."""
    out: list[list[torch.Tensor]] = []

    def hook(mod, args):
        x = args[0]
        b, n, d = x.shape
        q, k, _ = mod.qkv(mod.norm1(x)).reshape(b, n, 3, mod.heads, d // mod.heads).permute(2, 0, 3, 1, 4)
        out[-1].append(torch.softmax(q @ k.transpose(-1, -2) / (d // mod.heads) ** 0.5, dim=-1))
    hs = [blk.register_forward_pre_hook(hook) for blk in model.blocks]
    try:
        with torch.no_grad():
            for args in calls:
                out.append([])
                model(*args)
    finally:
        for h in hs:
            h.remove()
    return out


def _entropy(a: torch.Tensor) -> torch.Tensor:
    a = a.double()
    return -(a * torch.where(a > 0, a.log(), torch.zeros_like(a))).sum(-1)


def test_matches_the_eager_attention_of_a_tiny_transformer():
    m, (ids,) = tiny_transformer()
    g = torch.Generator().manual_seed(3)
    calls = [(ids,), (torch.randint(0, 50, (2, 16), generator=g),)]
    prof = _profile(capture(m, (ids,)), calls, query_groups=[["first", 0, 1], ["rest", 1, 16]],
                    percentiles=[25, 50, 75])
    sites = prof.graph("main").sites
    assert [s.layer for s in sites] == ["blocks.0", "blocks.1"]
    assert prof.graph().calls == 2
    eager = _eager_probs(m, calls)
    for li, s in enumerate(sites):
        assert (s.source, s.heads, s.queries, s.keys, s.calls) == ("softmax", 4, 16, 16, (0, 1))
        for c in range(2):
            a = eager[c][li]                                    # [2, 4, 16, 16]
            h = _entropy(a)                                     # [2, 4, 16]
            np.testing.assert_allclose(s.entropy[c], h.mean((0, 2)).numpy(), rtol=1e-5)
            rows = h.permute(0, 2, 1).reshape(-1, 4).numpy()
            np.testing.assert_allclose(s.entropy_percentiles[c], np.percentile(rows, [25, 50, 75], axis=0).T,
                                       rtol=1e-5)
        both = torch.cat([eager[0][li], eager[1][li]])          # [4, 4, 16, 16]: calls x batch
        h = _entropy(both)
        np.testing.assert_allclose(s.head_entropy, h.mean((0, 2)).numpy(), rtol=1e-5)
        np.testing.assert_allclose(s.head_normalized, h.mean((0, 2)).numpy() / math.log(16), rtol=1e-5)
        np.testing.assert_allclose(s.query_entropy, h.mean((0, 1)).numpy(), rtol=1e-5)
        np.testing.assert_allclose(s.received, both.double().sum(2).mean(0).numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(s.group("first"), both.double()[:, :, 0].mean(0).numpy(), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(np.add(s.group("first"), s.group("rest")), s.received, rtol=1e-6)
        assert np.allclose(np.sum(s.received, 1), 16)         # each query row sums to 1
    js = prof.to_json()
    assert js["type"] == "AttentionEntropyProfile" and len(js["graphs"][0]["sites"]) == 2


def test_head_taxonomy_follows_the_thresholds():
    m, (x,) = tiny_vit()
    prog = capture(m, (x,))
    norm = _profile(prog, [(x,)]).graph().sites[0].head_normalized
    cut = sorted(norm)[1]               # one head below, the rest at or above
    s = _profile(prog, [(x,)], local_threshold=cut, global_threshold=cut).graph().sites[0]
    assert s.head_kind == tuple("local" if v < cut else "global" if v > cut else "mixed" for v in norm)
    assert s.head_kind.count("local") == 1 and s.layer_kind == "mixed"
    s = _profile(prog, [(x,)], local_threshold=0.0, global_threshold=0.0).graph().sites[0]
    assert set(s.head_kind) == {"global"} and s.layer_kind == "global"


class _FusedAttention(nn.Module):
    """Causal multi-head attention through F.scaled_dot_product_attention, 2 k/v heads shared by
    4 query heads (GQA), a custom scale."""

    def __init__(self, dim: int = 32):
        super().__init__()
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def qk(self, x):
        b, n, _ = x.shape
        q = self.q(x).reshape(b, n, 4, 8).transpose(1, 2)
        k, v = self.kv(x).reshape(b, n, 2, 2, 8).permute(2, 0, 3, 1, 4)
        return q, k, v

    def forward(self, x):
        q, k, v = self.qk(x)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=0.2, enable_gqa=True)
        return self.out(a.transpose(1, 2).flatten(2))


def test_fused_sdpa_is_recomputed_from_q_and_k_and_agrees_with_the_decomposed_softmax():
    torch.manual_seed(0)
    m = _FusedAttention().eval()
    x = torch.randn(2, 6, 32)
    with torch.no_grad():
        fused = _flatten(torch.export.export(m, (x,), strict=False), (x,), {}, "main")   # SDPA kept
    ops = {str(n.target) for n in fused.main.module.graph.nodes}
    assert any("scaled_dot_product" in o for o in ops), ops
    calls = [(x,), (x.flip(1),)]
    got = _profile(fused, calls).graph().sites
    assert len(got) == 1 and got[0].source == "sdpa" and (got[0].heads, got[0].keys) == (4, 6)
    # eager: the probabilities SDPA uses, written out
    with torch.no_grad():
        ents = []
        for (xc,) in calls:
            q, k, _ = m.qk(xc)
            k = k.repeat_interleave(2, dim=1)
            s = (q @ k.transpose(-1, -2)) * 0.2
            s = s.masked_fill(~torch.ones(6, 6, dtype=torch.bool).tril(), float("-inf"))
            ents.append(_entropy(torch.softmax(s, -1)))
            assert torch.allclose(sdpa_probabilities(*m.qk(xc)[:2], is_causal=True, scale=0.2), torch.softmax(s, -1))
    for c in range(2):
        np.testing.assert_allclose(got[0].entropy[c], ents[c].mean((0, 2)).numpy(), rtol=1e-5)
    assert got[0].query_entropy[0] == pytest.approx(0.0, abs=1e-9)     # causal: the first query sees one key
    # the same model captured as pared captures it (SDPA decomposed to a softmax): the same numbers
    dec = _profile(capture(m, (x,)), calls).graph().sites
    assert dec[0].source == "softmax"
    np.testing.assert_allclose(dec[0].entropy, got[0].entropy, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dec[0].received, got[0].received, rtol=1e-5, atol=1e-7)


def _two_graphs():
    """tiny_vit captured twice ('a', 'b') under a plan that runs a, b, b, a, ... by call index."""
    m, (x,) = tiny_vit()
    a, b = capture(m, (x,), name="a"), capture(m, (x,), name="b")
    plan = Plan(inputs=("x",), outputs=("y",),
                body=Select(Table(("a", "b", "b"), default="a"), (
                    ("a", Call("a", ("in:x",), ("y",))), ("b", Call("b", ("in:x",), ("y",))))))
    return m, x, Program({"a": a.main, "b": b.main}, plan)


def test_multi_graph_programs_are_keyed_by_graph_and_call():
    m, x, prog = _two_graphs()
    calls = [(x * s,) for s in (1.0, 0.5, 2.0, -1.0)]
    prof = _profile(prog, calls)
    assert [g.graph for g in prof.graphs] == ["a", "b"]
    a, b = prof.graph("a").sites[0], prof.graph("b").sites[0]
    assert a.calls == (0, 3) and b.calls == (1, 2)
    one = _profile(capture(m, (x,)), calls).graph().sites[0]      # every call on one graph
    np.testing.assert_allclose(a.entropy, [one.entropy[0], one.entropy[3]], rtol=1e-6)
    np.testing.assert_allclose(b.entropy, [one.entropy[1], one.entropy[2]], rtol=1e-6)
    only_b = _profile(prog, calls, graphs="b")
    assert [g.graph for g in only_b.graphs] == ["b"]


def test_bad_options_and_inputs_raise():
    with pytest.raises(OptionError, match="'local_threshold' \\(0.9\\) must not exceed 'global_threshold'"):
        get_pass("attention_entropy")(local_threshold=0.9, global_threshold=0.5)
    with pytest.raises(OptionError, match="option 'query_groups' takes \\(name, start, stop\\)"):
        get_pass("attention_entropy")(query_groups=[["cls", 1, 1]])
    with pytest.raises(OptionError, match="option 'percentiles' must be in \\[0, 100\\]"):
        get_pass("attention_entropy")(percentiles=[150])
    m, (x,) = tiny_vit()
    prog = capture(m, (x,))
    with pytest.raises(OptionError, match="option 'graphs': no graph 'nope'"):
        _profile(prog, [(x,)], graphs=["nope"])
    with pytest.raises(PassError, match="needs a calibration run"):
        _profile(prog, None)
    with pytest.raises(PassError, match="found no attention"):
        _profile(prog, [(x,)], layers="head")
