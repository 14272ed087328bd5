"""ir/cuts.py: candidate cuts, their live sets and bytes, the split and the compression of what
crosses, against the captured graph run whole."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from pared.ir import cuts
from pared.ir.capture import capture
from pared.testing import tiny_patchnet, tiny_transformer


def _prepared(model, inputs):
    prog = capture(model, inputs)
    g = prog.main
    gm = g.copy_module()
    cuts.propagate_shapes(gm, g.example_inputs)
    return g, gm


@pytest.fixture(scope="module")
def patchnet():
    m, x = tiny_patchnet()
    return (m, x, *_prepared(m, x))


def test_candidates_named_by_region_in_position_order(patchnet):
    m, x, g, gm = patchnet
    cs = cuts.candidate_cuts(gm, ("patch", "blocks.*", "blocks.*.mlp.0"))
    names = [c.name for c in cs]
    assert names == ["input", "after:patch#1", "after:blocks.0.mlp.0#1", "after:blocks.0#1",
                     "after:blocks.1.mlp.0#1", "after:blocks.1#1", "output"]
    assert [c.position for c in cs] == sorted(c.position for c in cs)
    assert cs[0].position == 0 and cs[-1].position == len(cuts.compute_nodes(gm))
    # bytes from the shapes: the image (1x3x32x32 fp32), 16 tokens x 32 after the patch embedding,
    # the MLP expansion (16 x 128) beside the residual stream, the output (1 x 4)
    assert cs[0].nbytes == 3 * 32 * 32 * 4
    assert cs[1].nbytes == 16 * 32 * 4
    assert cs[2].nbytes == 16 * 128 * 4 + 16 * 32 * 4
    assert cs[-1].nbytes == 4 * 4
    assert all(c.float_bytes == c.nbytes for c in cs)


def test_every_cut_splits_into_parts_that_compose_to_the_graph(patchnet):
    m, x, g, gm = patchnet
    ref = g.run(*g.example_inputs)
    for c in cuts.candidate_cuts(gm, ("**",)):
        first, second, live = cuts.split(gm, c.position)
        assert live == list(c.live)
        with torch.no_grad():
            h = first(*g.example_inputs)
            got = second(*h)
        assert len(h) == len(live)
        for a, b in zip(got, ref):
            assert torch.equal(a, b), f"cut {c.name}: the parts do not compute the graph"


def test_split_parts_share_the_parameters(patchnet):
    m, x, g, gm = patchnet
    first, second, _ = cuts.split(gm, cuts.candidate_cuts(gm, ("blocks.*",))[1].position)
    ptrs = lambda mod: {t.data_ptr() for t in mod.parameters()} | {t.data_ptr() for t in mod.buffers()}  # noqa: E731
    base = ptrs(gm)
    assert ptrs(first) <= base and ptrs(second) <= base and ptrs(first) and ptrs(second)


def test_live_set_of_a_dag_includes_values_read_later():
    """A skip connection: the value computed first and read last crosses every cut between."""
    class Skip(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            h = torch.relu(x)
            return self.b(self.a(h)) + h

    torch.manual_seed(0)
    _, gm = _prepared(Skip().eval(), (torch.randn(2, 8),))
    cs = {c.name: c for c in cuts.candidate_cuts(gm, ("a",))}
    assert len(cs["after:a#1"].live) == 2        # a's output and relu(x)


def test_a_module_called_twice_gives_a_cut_per_call():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Linear(8, 8)

        def forward(self, x):
            return self.f(torch.tanh(self.f(x)))

    torch.manual_seed(0)
    _, gm = _prepared(Twice().eval(), (torch.randn(2, 8),))
    names = [c.name for c in cuts.candidate_cuts(gm, ("f",))]
    assert names == ["input", "after:f#1", "output"] or names == ["input", "after:f#1", "after:f#2", "output"]
    assert "after:f#1" in names


@pytest.mark.parametrize("mode,bound", [("fp16", 2e-3), ("int8", 0.05)])
def test_compression_shrinks_the_bytes_and_stays_close(patchnet, mode, bound):
    m, x, g, gm = patchnet
    ref = g.run(*g.example_inputs)[0]
    c = cuts.candidate_cuts(gm, ("patch",))[1]
    first, second, live = cuts.split(gm, c.position)
    with torch.no_grad():
        crossing = list(first(*g.example_inputs))
    names = cuts.compress(first, second, mode, crossing)
    with torch.no_grad():
        sent = first(*g.example_inputs)
        got = second(*sent)[0]
    assert sum(t.numel() * t.element_size() for t in sent) == c.bytes_as(mode)
    if mode == "fp16":
        assert names == [n + "_fp16" for n in live] and all(t.dtype == torch.float16 for t in sent)
    else:
        assert names == [n + s for n in live for s in ("_q", "_scale")]
        assert sent[0].dtype == torch.int8 and sent[1].shape == (1,)
        # the receiver's value is q * s: within half a step of what was sent
        h = crossing[0]
        s = h.abs().max() / 127
        assert (sent[0].float() * sent[1] - h).abs().max() <= s / 2 + 1e-6
    rel = (got - ref).norm() / ref.norm()
    assert 0 < rel < bound


def test_compression_leaves_integer_values_alone():
    m, x = tiny_transformer()
    _, gm = _prepared(m, x)
    first, second, live = cuts.split(gm, 0)   # the token ids cross as they are
    names = cuts.compress(first, second, "fp16", list(x))
    assert names == live


def test_bad_positions_and_modes(patchnet):
    m, x, g, gm = patchnet
    with pytest.raises(ValueError, match="outside 0.."):
        cuts.live_at(gm, 10_000)
    with pytest.raises(ValueError, match="unknown compression 'bf16'"):
        cuts.candidate_cuts(gm)[1].bytes_as("bf16")


@pytest.mark.parametrize("mode", ["fp16", "int8"])
def test_codec_graphs_are_what_compress_adds(patchnet, mode):
    """codec_graph's encoder run on a cut's value sends what the compressed first part sends, and
    its decoder turns that into what the second part computes from (q * s, or the fp16 value)."""
    m, x, g, gm = patchnet
    c = cuts.candidate_cuts(gm, ("patch",))[1]
    first, second, _ = cuts.split(gm, c.position)
    with torch.no_grad():
        crossing = list(first(*g.example_inputs))
    cuts.compress(first, second, mode, crossing)
    enc, names, ex = cuts.codec_graph(mode, "send", 64)
    assert names == ("x",) and ex[0].shape == (64,)
    with torch.no_grad():
        sent = first(*g.example_inputs)
        mine = enc(crossing[0])
    assert len(mine) == len(sent) and all(torch.equal(a, b) for a, b in zip(mine, sent))
    dec, names, ex = cuts.codec_graph(mode, "recv", 64)
    assert names == (("x_fp16",) if mode == "fp16" else ("x_q", "x_scale"))
    with torch.no_grad():
        back = dec(*mine)[0]
    assert back.dtype == torch.float32
    want = sent[0].float() if mode == "fp16" else sent[0].float() * sent[1]
    assert torch.equal(back, want)
    with pytest.raises(ValueError, match="no codec for mode 'none'"):
        cuts.codec_graph("none", "send", 4)


def test_a_cut_off_graph_order_splits_and_composes():
    """first_set with `moved`: a first side that is no prefix (both of TwoBranchNet's reductions);
    its parts compose to the graph, as_moved gives the set back, and a set that is not closed
    under inputs is refused naming the node."""
    from pared.testing import two_branch_net
    m, x = two_branch_net()
    g, gm = _prepared(m, x)
    nodes = cuts.compute_nodes(gm)
    red = [n for n in nodes if any(p in ("red_a", "red_b") for p, _ in cuts.node_module_path(n))]
    assert len(red) == 4                                  # a weight transpose and an addmm each
    position, moved = cuts.as_moved(gm, set(red))
    assert position == 4 and moved                       # red_b comes after heavy in graph order
    side = cuts.first_set(gm, position, moved)
    assert side == set(red)
    assert cuts.as_moved(gm, {n.name for n in red}) == (position, moved)
    live = cuts.live_of(gm, side)
    assert [v.op for v in live] == ["call_function", "call_function"]    # x stays on the first side
    first, second, names = cuts.split(gm, position, moved)
    assert names == [v.name for v in live]
    with torch.no_grad():
        torch.testing.assert_close(second(*first(*x))[0], gm(*x)[0])
    # a prefix is the cut in graph order
    assert cuts.first_set(gm, 3) == set(nodes[:3]) and cuts.as_moved(gm, set(nodes[:3])) == (3, ())
    heavy_first = next(n for n in nodes if any(p == "heavy.0" for p, _ in cuts.node_module_path(n))
                       and n.op == "call_function" and "addmm" in n.name)
    with pytest.raises(ValueError, match=f"node {heavy_first.name} is on the first side but reads"):
        cuts.first_set(gm, 0, [heavy_first.name])
    with pytest.raises(ValueError, match="'nope' is no compute node"):
        cuts.first_set(gm, 1, ["nope"])
