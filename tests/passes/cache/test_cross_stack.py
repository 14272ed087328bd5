"""Block caches on a model with two block stacks whose blocks carry two streams
(TinyTwoStack: dual-stream blocks, then single-stream ones, as Flux): the stacks
are found in order, a span may run across them (`regions` as a list of patterns),
and every stream the span hands on is cached, so a reuse computes none of its
blocks. Numerics against the eager meaning of the cache (TinyTwoStack's span /
residual / record)."""
import pytest
import torch

from pared.analysis.redundancy import block_regions, block_stacks
from pared.ir.capture import capture
from pared.ir.errors import PassError
from pared.ir.transform import PassContext
from pared.registry import get_pass
from pared.testing import op_count, tiny_two_stack

STEPS = 6
CROSS = "dual_blocks.*, single_blocks.*"


def _loop(x0, ctx, steps=STEPS):
    ts = torch.linspace(900, 0, steps)

    def loop(fn):
        x = x0.clone()
        for t in ts:
            out = fn(x, ctx, torch.full((x.shape[0],), float(t)))
            out = out[0] if isinstance(out, (tuple, list)) else out
            x = x - 0.1 * torch.as_tensor(out)
        return x
    return loop


def _cached(name, **opts):
    m, (x, ctx, t) = tiny_two_stack()
    prog = capture(m, (x, ctx, t))
    if name in ("interval_cache", "taylor_cache", "delta_cache"):
        opts = {"steps": STEPS, **opts}
    res = get_pass(name)(**opts)(prog, PassContext(calibration=_loop(x, ctx)))
    return m, (x, ctx), prog, res


def _eager(m, x, ctx, table, span, forecast=None):
    """The loop with the cache's meaning in eager PyTorch: full steps record both
    streams' residuals; reuse steps add them (interval_cache), or forecast them from
    the last two full steps (taylor_cache: `forecast` is the coefficient per step)."""
    ts = torch.linspace(900, 0, STEPS)
    x = x.clone()
    rec, hist = {}, []
    with torch.no_grad():
        for i, t in enumerate(ts):
            tt = torch.full((x.shape[0],), float(t))
            if table[i].startswith("full"):
                out = m(x, ctx, tt, span=span, record=rec)
                hist.append(rec["residual"])
            elif forecast is None:
                out = m(x, ctx, tt, span=span, residual=hist[-1])
            else:
                c = forecast[i]
                r = tuple(a + c * (a - b) for a, b in zip(hist[-1], hist[-2]))
                out = m(x, ctx, tt, span=span, residual=r)
            x = x - 0.1 * out
    return x


def test_block_stacks_are_found_in_the_order_they_run():
    m, args = tiny_two_stack()
    prog = capture(m, args)
    stacks = block_stacks(prog)
    assert [[r.path for r in s] for s in stacks] == [[f"dual_blocks.{i}" for i in range(3)],
                                                      [f"single_blocks.{i}" for i in range(3)]]
    assert [r.path for r in block_regions(prog, CROSS)] == [r.path for s in stacks for r in s]


def test_a_span_across_both_stacks_caches_both_streams():
    m, (x, ctx), prog, res = _cached("interval_cache", interval=2, regions=CROSS)
    p = res.program
    (span,) = p.records["CachePlan"].spans
    assert span.blocks == ("dual_blocks.1", "dual_blocks.2", "single_blocks.0", "single_blocks.1")
    assert len(span.streams) == 1                       # the text stream, beside the primary (image) one
    assert p.graphs["main.reuse"].input_names[-2:] == ("cache.blocks", "cache.blocks_s1")
    assert p.graphs["main.full"].output_names[-2:] == ("cache.blocks", "cache.blocks_s1")
    # the reuse runs no op of the span's 4 blocks, the full graph all of them
    assert _span_ops(p, "main.reuse", span) == 0 and _span_ops(p, "main.full", span) > 100
    runner = p.runner()
    got = _loop(x, ctx)(lambda *a: runner(list(a))[0])
    table = p.plan.selects()[0].selector.cases
    want = _eager(m, x, ctx, table, (1, 4))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert runner.trace == list(table) and "reuse" in table
    with torch.no_grad():
        assert (_loop(x, ctx)(m) - got).abs().max() > 1e-4     # caching changed something


def _span_ops(p, graph, span):
    regions = p.regions(graph)
    return sum(len(regions[b].nodes) for b in span.blocks if b in regions)


def test_one_stack_of_two_stream_blocks_caches_its_second_stream_too():
    """The default range (one stack, its inner blocks): before streams, a reuse computed the
    text stream through every cached dual block, and with it nearly all of their work."""
    m, (x, ctx), prog, res = _cached("interval_cache", interval=2)
    p = res.program
    (span,) = p.records["CachePlan"].spans
    assert span.blocks == ("dual_blocks.1",) and len(span.streams) == 1
    flops = dict(p.records["CachePlan"].flops)
    runner = p.runner()
    got = _loop(x, ctx)(lambda *a: runner(list(a))[0])
    want = _eager(m, x, ctx, p.plan.selects()[0].selector.cases, (1, 1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    no_streams = _single_stream_reuse_flops(prog)
    assert flops["main.reuse"] < no_streams


def _single_stream_reuse_flops(prog):
    """The reuse graph's FLOPs when only the primary stream is cached."""
    from pared.analysis.redundancy import block_regions as br
    from pared.passes.cache.common import graph_flops, make_span, reuse_spans
    g = prog.main
    span = make_span(g.module, "blocks", br(prog)[1:2], "test", streams=False)
    assert span.streams == ()
    return graph_flops(reuse_spans(g, [span], [torch.zeros(2, 8, 32)], "test"))


def test_taylor_forecasts_each_stream():
    m, (x, ctx), prog, res = _cached("taylor_cache", interval=3, regions=CROSS)
    p = res.program
    (span,) = p.records["CachePlan"].spans
    assert len(span.streams) == 1
    assert p.graphs["main.forecast"].input_names[-3:] == ("cache.delta", "cache.delta_s1", "coef")
    runner = p.runner()
    got = _loop(x, ctx)(lambda *a: runner(list(a))[0])
    rec = p.records["CachePlan"]
    want = _eager(m, x, ctx, rec.schedule, (1, 4), forecast=rec.calibration)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "forecast" in rec.schedule


@pytest.mark.parametrize("name,opts", [("magnitude_cache", {"threshold": 0.5, "first": 1, "last": -2}),
                                       ("delta_cache", {"interval": 2})])
def test_other_variant_caches_take_every_stream(name, opts):
    m, (x, ctx), prog, res = _cached(name, regions=CROSS, **opts)
    p = res.program
    # a span ending at the last block has one stream: the text stream is not read after the model's blocks
    streams = {s.name: len(s.streams) for s in p.records["CachePlan"].spans}
    assert streams == ({"blocks": 1} if name == "magnitude_cache" else {"delta_front": 1, "delta_rear": 0})
    for vname, names in p.records["CachePlan"].variants:
        cached = [n for n in p.graphs[f"main.{vname}"].input_names if n.startswith("cache.")]
        assert len(cached) == sum(streams[n] + 1 for n in names), (vname, cached)
    with torch.no_grad():
        plain = _loop(x, ctx)(m)
    runner = p.runner()
    got = _loop(x, ctx)(lambda *a: runner(list(a))[0])
    assert torch.isfinite(got).all() and (got - plain).abs().max() < 0.5 * plain.abs().max()


def test_residual_cache_keeps_one_stream():
    """FirstBlockCache's probe hands its variants the primary hidden state only."""
    m, (x, ctx), prog, res = _cached("residual_cache", threshold=0.05)
    (span,) = res.program.records["CachePlan"].spans
    assert span.streams == ()


def test_streams_of_one_shape_are_refused_as_ambiguous():
    m, args = tiny_two_stack(text=8)        # text tokens as many as image tokens: two [2, 8, 32] streams
    prog = capture(m, args)
    with pytest.raises(PassError, match=r"interval_cache.*'dual_blocks.1' gives .* of one shape \[2, 8, 32\]: "
                                        r"two streams of one size"):
        get_pass("interval_cache")(steps=STEPS, regions=CROSS)(prog, PassContext())


def test_a_pattern_of_the_list_that_matches_nothing_is_named():
    m, args = tiny_two_stack()
    prog = capture(m, args)
    with pytest.raises(PassError, match=r"no region matches 'single_block\.\*' \(in 'dual_blocks"):
        block_regions(prog, "dual_blocks.*, single_block.*")
    with pytest.raises(PassError, match=r"'dual_blocks.0' is matched by two of its patterns"):
        block_regions(prog, "dual_blocks.*, dual_blocks.0")


def test_output_reuse_caches_what_the_span_hands_on():
    """`reuse: output` (DeepCache's feature reuse): no residual; each value the span hands on is
    cached as it is and read back on reuse steps (here both streams of the last spanned block)."""
    m, (x, ctx), prog, res = _cached("interval_cache", interval=2, regions=CROSS, reuse="output")
    p = res.program
    (span,) = p.records["CachePlan"].spans
    assert span.input == "" and [i for i, _ in span.streams] == [""]
    assert _span_ops(p, "main.reuse", span) == 0
    table = p.plan.selects()[0].selector.cases
    last = m.single_blocks[1]
    seen = []
    ts = torch.linspace(900, 0, STEPS)
    xe = x.clone()
    with torch.no_grad():
        for i, t in enumerate(ts):
            if table[i] == "full":
                h = last.register_forward_hook(lambda mod, a, out: seen.append(out))
            else:
                h = last.register_forward_hook(lambda mod, a, out: seen[-1])
            xe = xe - 0.1 * m(xe, ctx, torch.full((x.shape[0],), float(t)))
            h.remove()
    runner = p.runner()
    got = _loop(x, ctx)(lambda *a: runner(list(a))[0])
    torch.testing.assert_close(got, xe, rtol=1e-5, atol=1e-5)
    residual = _cached("interval_cache", interval=2, regions=CROSS)[3].program.runner()
    assert (_loop(x, ctx)(lambda *a: residual(list(a))[0]) - got).abs().max() > 1e-5   # not the residual cache


def test_reuse_option_is_checked():
    with pytest.raises(Exception, match=r"pass 'interval_cache' option 'reuse': must be one of \['residual', 'output'\]"):
        get_pass("interval_cache")(reuse="features")
