"""Annotate -> validate -> convert (passes/quant/convert.py): the quantization passes write
their decisions as node annotations and one converter rewrites them."""
import dataclasses

import pytest
import torch

from pared.ir import meta
from pared.ir.capture import capture
from pared.ir.errors import PassError
from pared.ir.formats import ExpertsSpec, LinearSpec
from pared.ir.patterns import find_sites
from pared.ir.program import get_attr
from pared.ir.transform import PassContext
from pared.passes.quant import convert
from pared.registry import get_pass
from pared.testing import canonical_program_text, tiny_transformer

FULL = {"name": "box", "backend": "onnxruntime", "provider": "CPUExecutionProvider", "arch": "x86_64",
        "isa": ["avx2", "avx512_vnni"]}
AVX2 = {**FULL, "isa": ["avx2"]}


def _calibration(seed=1, n=4):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 50, (2, 16), generator=g),) for _ in range(n)]


def _program():
    m, (x,) = tiny_transformer()
    return m, x, capture(m, (x,))


def _decided(graph, key=meta.QUANT_CONVERTED):
    return {n.name: n.meta[key] for n in graph.module.graph.nodes if key in n.meta}


def test_quantize_linears_is_its_decisions_converted():
    # the pass's graph equals annotating its recorded decisions on the float graph and converting
    _, x, prog = _program()
    res = get_pass("quantize_linears")()(prog, PassContext(calibration=_calibration(), target=FULL))
    after = res.program.main
    kept = _decided(after)
    sites = find_sites(prog.main.module)
    assert len(kept) == len(sites) == 9
    # each decision sits on the node computing the converted layer's output, in its region
    assert {s.region for s in kept.values()} == {s.region for s in sites}
    assert all(s.format == "w8a8" and s.by == "quantize_linears" and s.act_range is not None for s in kept.values())
    by_region = {s.region: s for s in kept.values()}
    specs = {s.out: by_region[s.region] for s in sites}
    again, layers = convert.apply(prog.main, specs, FULL, "mine")
    assert len(layers) == 9
    a = res.program.main.module(x)
    b = again.module(x)
    for u, v in zip(a, b):
        assert torch.equal(u, v)
    assert canonical_program_text(res.program.replace(graphs={"main": again})) == \
        canonical_program_text(res.program)
    # nothing is left pending, and the input graph is not touched by annotating or converting
    assert not _decided(after, meta.QUANT_SPEC) and convert.pending(after) == []
    assert not _decided(prog.main) and not _decided(prog.main, meta.QUANT_SPEC)
    assert len(find_sites(prog.main.module)) == 9


def test_a_policy_of_ones_own_annotates_and_the_converter_does_the_rest():
    # quantize only the wide layers, the MLP's first to int4 weights, the rest dynamic w8a8
    m, x, prog = _program()
    g = prog.main
    specs = {}
    for s in find_sites(g.module):
        w = get_attr(g.module, s.weight)
        k = int(w.shape[1] if s.transposed else w.shape[0])
        if s.region.endswith("mlp.0"):
            specs[s.out] = LinearSpec("w4", "mine", s.region, block_size=16)
        elif k >= 32:
            specs[s.out] = LinearSpec("w8a8", "mine", s.region, dynamic=True, weight_qmax=63)
    new, layers = convert.apply(g, specs, AVX2, "mine")
    assert len(layers) == len(specs) >= 3
    targets = [str(n.target) for n in new.module.graph.nodes if n.op == "call_function"]
    assert sum("dynamic_linear" in t for t in targets) == sum(not s.format == "w4" for s in specs.values())
    assert sum("dequantize_per_channel" in t for t in targets) == sum(s.format == "w4" for s in specs.values())
    assert not find_sites(new.module)                  # nothing float left among the annotated
    with torch.no_grad():
        ref = g.module(x)
        got = new.module(x)
    rel = float(torch.linalg.norm(ref[1] - got[1]) / torch.linalg.norm(ref[1]))
    assert 0 < rel < 0.1
    # nothing pending: converting again changes nothing
    assert convert.pending(new) == []
    same, more = convert.convert(new, "mine")
    assert same is new and more == []


@pytest.mark.parametrize("change, message", [
    (dict(weight_qmax=127), "saturate this target's u8s8 kernels (exact up to 63)"),
    (dict(format="w5"), "format 'w5' is not a quantized format"),
    (dict(act_range=None), "exactly one of act_range (static) and dynamic"),
    (dict(act_range=(1.0, float("nan"))), "is not a finite [lo, hi]"),
    (dict(smooth=(1.0, 2.0), smooth_group="x"), "2 smoothing factors for 32 input channels"),
    (dict(outliers=(0, 40)), "outlier channels must be distinct indices in [0, 32)"),
    (dict(format="w4", act_range=None, block_size=24), "block_size 24 is not a power of two >= 16"),
    (dict(format="w4", act_range=None, block_size=64), "input dim 32 is not a multiple of block_size 64"),
])
def test_validate_refuses_decisions_that_cannot_run_naming_the_node(change, message):
    _, _, prog = _program()
    g = prog.main
    site = find_sites(g.module)[0]
    spec = dataclasses.replace(LinearSpec("w8a8", "mine", site.region, act_range=(-1.0, 1.0), weight_qmax=63),
                               **change)
    annotated = convert.annotate(g, {site.out: spec}, "mine")
    with pytest.raises(PassError) as e:
        convert.validate(annotated, AVX2, "mine")
    assert message in str(e.value) and f"node '{site.out}' ({site.region})" in str(e.value)
    # the same decision is fine where it can run (full-range codes with VNNI)
    if change == dict(weight_qmax=127):
        assert convert.validate(annotated, FULL, "mine") == 1


def test_u8_weights_keep_full_range_codes_where_the_target_takes_seven_bits():
    _, x, prog = _program()
    site = find_sites(prog.main.module)[0]
    spec = LinearSpec("w8a8", "mine", site.region, act_range=(-4.0, 4.0), weight_qmax=127, u8_weights=True)
    new, (lq,) = convert.apply(prog.main, {site.out: spec}, AVX2, "mine")
    assert lq.weight_storage == "uint8"
    w = [get_attr(new.module, n.target) for n in new.module.graph.nodes
         if n.op == "get_attr" and str(n.target).endswith("_w")]
    assert w and w[0].dtype == torch.uint8 and int((w[0].to(torch.int16) - 128).abs().max()) == 127


def test_annotating_a_node_that_is_not_a_linear_layer_is_refused():
    _, _, prog = _program()
    g = prog.main
    outs = {s.out for s in find_sites(g.module)}
    other = next(n.name for n in g.module.graph.nodes if n.op == "call_function" and n.name not in outs)
    annotated = convert.annotate(g, {other: LinearSpec("w8a8", "mine", act_range=(0.0, 1.0))}, "mine")
    with pytest.raises(PassError, match=f"node '{other}' is annotated w8a8 but is not a float linear layer"):
        convert.pending(annotated)
    with pytest.raises(PassError, match="has no such node"):
        convert.annotate(g, {"nope": LinearSpec("w8a8", "mine", act_range=(0.0, 1.0))}, "mine")


def test_expert_spec_problems_name_what_is_wrong():
    spec = ExpertsSpec((4, 3, 32), 24, "_x", "mine")
    problems = spec.problems(4, 64)
    assert "3 widths for 4 experts" in problems
    assert any("widths [3]" in p for p in problems)
    assert any("input dim 64 is not a multiple of block_size 24" in p for p in problems)
    assert ExpertsSpec((4, 8), 0, "_x", "mine").problems(2, 64) == []


def test_weight_only_decisions_stay_on_the_converted_graph():
    _, _, prog = _program()
    res = get_pass("quantize_weights_int4")(block_size=16, force=True)(prog, PassContext())
    kept = _decided(res.program.main)
    assert kept and all(s.format == "w4" and s.block_size == 16 and s.by == "quantize_weights_int4"
                        for s in kept.values())
    assert len(kept) == len(res.program.records["WeightQuantPlan"].layers)


def test_a_decision_without_a_weight_range_gets_the_targets():
    # 7 bits where ORT's u8s8 kernels would saturate (AVX2 only), the full range with VNNI
    _, _, prog = _program()
    site = find_sites(prog.main.module)[0]
    spec = LinearSpec("w8a8", "mine", site.region, dynamic=True)
    for target, qmax in ((AVX2, 63), (FULL, 127)):
        new, _ = convert.apply(prog.main, {site.out: spec}, target, "mine")
        (kept,) = _decided(new).values()
        codes = [get_attr(new.module, n.target) for n in new.module.graph.nodes
                 if n.op == "get_attr" and str(n.target).endswith("_w")]
        assert kept.weight_qmax == qmax and int(codes[0].abs().max()) == qmax
    # convert alone does not guess it: validate names what is missing
    with pytest.raises(PassError, match="weight_qmax is not set"):
        convert.validate(convert.annotate(prog.main, {site.out: spec}), AVX2, "mine")
