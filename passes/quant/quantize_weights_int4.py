"""Quantize the weights of memory-bound linear layers to 4 bits, block-wise
(weight-only INT4, as in "AWQ: Activation-aware Weight Quantization for LLM
Compression and Acceleration", Lin et al., MLSys 2024, without its scaling search:
round-to-nearest per block of `block_size` input channels).

Before:  y = aten.addmm(b, x, permute(W [N, K], [1, 0]))                   float32
After:   wd = dequantize_per_channel(Wq [N*K/bs, bs] uint8 codes 0..15, s [N*K/bs], z [N*K/bs] int32, axis 0)
         y  = aten.addmm(b, x, t(view(wd, [N, K])))           (aten.mm without a bias)
The activation stays float; the batched form bmm(x, expand(W^T)) -> view -> add(b)
becomes the same on x flattened to 2-D (as in quantize_linears).

How ONNX Runtime runs it: ORT's int4 kernel is the contrib op MatMulNBits
(com.microsoft; packed 4-bit codes, a scale and optional zero point per block,
float activations). The standard spelling ORT fuses into it is an INT4
DequantizeLinear with `block_size` feeding a MatMul, but torch's ONNX exporter
cannot write that: torch has no int4 tensor it exports, and the exporter
translates no blocked dequantize (quantized_decomposed's per-channel-group op has
no translation). The block structure is therefore written as a per-channel
dequantize of the codes viewed as [N*K/bs, bs] (one "channel" per block), which
exports as DequantizeLinear(uint8, axis 0) -> Reshape -> Transpose -> MatMul/Gemm,
and the ORT backend's lowering step (backends/onnxruntime/matmul_nbits.py)
replaces each such chain, found by its `_int4_<i>_w` initializer, with one
MatMulNBits holding the same codes packed two per byte, the same scales and zero
points and the Gemm's bias. Emitting MatMulNBits there directly (rather than an
INT4 DequantizeLinear for ORT to fuse) leaves nothing to an ORT fusion with its
own preconditions; the post-export check (int8_check) then proves the optimized
graph holds one MatMulNBits per int4 layer and no DequantizeLinear feeding a
float matmul. MatMulNBits is run at accuracy level 0 (float activations), so the
artifact computes what the torch graph computes up to summation order.

When int4 pays: a MatMulNBits dequantizes its weight block by block in float,
so it saves memory traffic, not arithmetic; at compute-bound shapes it ran 0.75-
0.94x fp32 (issue 5). A layer is quantized only when its arithmetic intensity,
2MKN / 4(MK + MN + KN) FLOP/byte with fp32 operands, is below the target's ridge
point peak_flops / mem_bandwidth (the roofline of analysis/cost.py's target
figures), unless `force: true`.

Reads: the target (ctx.target; pared's default Target figures without one).
Writes: a WeightQuantPlan record (per layer: shape, rows, intensity, bytes before
and after), int4 codes, scales and zero points as buffers `_int4_<i>_{w,s,z}`,
`pared.ir.region` on the inserted nodes. Invariant: the torch graph computes
x @ dequant(codes) exactly as the MatMulNBits lowering does; layers whose input
dim is not a multiple of block_size, excluded ones and compute-bound ones stay
float. Runs on every graph of a program (no calibration needed).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
import torch.fx as fx

from pared.ir import meta
from pared.ir.errors import OptionError
from pared.ir.formats import FORMATS, LinearSpec
from pared.ir.patterns import Site, find_sites
from pared.ir.program import Graph, Program, get_attr
from pared.ir.regions import match
from pared.ir.rewrite import add_constant, attr_targets, eliminate_dead_code, share_equal_constants, splice
from pared.ir.target import Target
from pared.ir.transform import (PRESERVE_ALL, PassContext, PassResult, Record, RewritePass, check_block_size,
                              register_pass)
from pared.passes.quant.common import (WEIGHT_ONLY_PREFIX, quantize_weight_blocks, weight_only_bytes)
from pared.passes.quant.convert import apply, keep_decision, register_converter
from pared.passes.quant.quantize_linears import created_between

_aten = torch.ops.aten
_qd = torch.ops.quantized_decomposed


@dataclass(frozen=True)
class LayerWeightQuant:
    """One linear layer given block-wise weight-only codes (int4 here; mixed_precision also emits int8)."""
    node: str                     # the matmul node in the source graph
    region: str                   # innermost module path
    weight: str                   # get_attr target of the float weight it replaces
    in_features: int
    out_features: int
    rows: int                     # M: rows of the activation per call
    intensity: float              # FLOP per byte with fp32 operands
    fp32_bytes: int
    quant_bytes: int              # codes + scales (+ zero points)
    buffer: str                   # the `_int4_<i>` prefix of its constants (`_int8w_<i>` at 8 bits)
    bits: int = 4


@dataclass(frozen=True)
class WeightQuantPlan(Record):
    """What quantize_weights_int4 decided."""
    bits: int                     # 4
    block_size: int
    symmetric: bool
    ridge: float                  # the target's peak_flops / mem_bandwidth (FLOP/byte)
    forced: bool                  # compute-bound layers were quantized too
    layers: tuple[LayerWeightQuant, ...]
    skipped: tuple[tuple[str, str], ...] = ()   # (region, why) of the linear layers left float


def _as_patterns(value) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@register_pass("quantize_weights_int4")
class QuantizeWeightsInt4(RewritePass):
    """Weight-only block-wise INT4 for memory-bound linear layers (see module docstring)."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        block_size: int = 32             # weights per scale along the input dim (power of two >= 16: MatMulNBits)
        symmetric: bool = True           # True: scale per block, zero point 8; False: scale and zero point per block
        layers: tuple[str, ...] | str = ("**",)  # region patterns of the linear layers to consider
        exclude: tuple[str, ...] | str = ()      # region patterns whose layers stay float
        force: bool = False              # quantize compute-bound layers too (the cost model is not asked)

        def __post_init__(self):
            check_block_size("quantize_weights_int4", "block_size", self.block_size)
            object.__setattr__(self, "layers", _as_patterns(self.layers))
            object.__setattr__(self, "exclude", _as_patterns(self.exclude))
            if not self.layers:
                raise OptionError("pass 'quantize_weights_int4': option 'layers' is empty; give region patterns "
                                  "(default '**': every linear layer)")

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        ridge = ridge_point(ctx.target)
        new_graphs = dict(program.graphs)
        layers: list[LayerWeightQuant] = []
        skipped: list[tuple[str, str]] = []
        for name, g in program.graphs.items():
            todo = []
            for s in find_sites(g.module, batched=not any(g.dynamic_dims)):
                why = _skip_reason(g.module, s, o, ridge)
                if why:
                    skipped.append((s.region, why))
                    ctx.log.debug("quantize_weights_int4: %s (%s) stays float: %s", s.node, s.region, why)
                else:
                    todo.append(s)
            if todo:
                new_graphs[name], done = quantize_sites_weight_only(g, todo, o.block_size, o.symmetric, self.name)
                layers += done
        # variants of one graph hold the same layers: list each weight once, store its codes once
        layers = list({lq.weight: lq for lq in layers}.values())
        skipped = list(dict.fromkeys(skipped))
        share_equal_constants([(new_graphs[n].module, attr_targets(new_graphs[n].module)
                                - attr_targets(program.graphs[n].module)) for n in program.graphs])
        stats = {"quantized": len(layers), **_count_reasons(skipped)}
        if not layers:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats=stats)
        plan = WeightQuantPlan(4, o.block_size, o.symmetric, ridge, o.force, tuple(layers), tuple(skipped))
        new = program.replace(graphs=new_graphs, records={**program.records, "WeightQuantPlan": plan})
        before, after = sum(lq.fp32_bytes for lq in layers), sum(lq.quant_bytes for lq in layers)
        ctx.log.info("quantize_weights_int4: %d linear layers to int4 (block %d, %s), %d left float; "
                     "%.2f MB of weights -> %.2f MB", len(layers), o.block_size,
                     "symmetric" if o.symmetric else "asymmetric", len(skipped), before / 1e6, after / 1e6)
        return PassResult(new, modified=True, stats=stats)


def ridge_point(target) -> float:
    """FLOP per byte above which a layer is compute-bound on `target` (a Target, its
    JSON dict, or None for pared's default figures)."""
    if target is None:
        fields = {f: getattr(Target, f) for f in ("peak_flops", "mem_bandwidth")}
    elif isinstance(target, dict):
        fields = {f: target.get(f, getattr(Target, f)) for f in ("peak_flops", "mem_bandwidth")}
    else:
        fields = {f: getattr(target, f) for f in ("peak_flops", "mem_bandwidth")}
    return float(fields["peak_flops"]) / float(fields["mem_bandwidth"])


def site_shape(gm: fx.GraphModule, s: Site) -> tuple[int, int, int]:
    """(M rows per call, K in, N out) of a linear layer (symbolic dims count 1)."""
    nodes = {n.name: n for n in gm.graph.nodes}
    xs = nodes[s.x].meta["val"].shape
    w = get_attr(gm, s.weight)
    k, n = (int(w.shape[1]), int(w.shape[0])) if s.transposed else (int(w.shape[0]), int(w.shape[1]))
    rows = math.prod(int(d) if isinstance(d, int) else 1 for d in xs[:-1])
    return rows, k, n


def intensity(rows: int, k: int, n: int) -> float:
    """Arithmetic intensity of x [M, K] @ W [K, N] with fp32 operands (FLOP per byte moved)."""
    return 2.0 * rows * k * n / (4.0 * (rows * k + rows * n + k * n))


def _skip_reason(gm: fx.GraphModule, s: Site, o, ridge: float) -> str | None:
    regions = s.regions or (s.region,)
    if not any(match(p, r) for p in o.layers for r in regions):
        return "not selected"
    if any(match(p, r) for p in o.exclude for r in regions):
        return "excluded"
    rows, k, n = site_shape(gm, s)
    if k % o.block_size:
        return "indivisible"
    if not o.force and intensity(rows, k, n) >= ridge:
        return "compute_bound"
    return None


def _count_reasons(skipped: list[tuple[str, str]]) -> dict[str, int]:
    out = {"compute_bound": 0, "excluded": 0, "indivisible": 0}
    for _, why in skipped:
        if why in out:
            out[why] += 1
    return out


def _weight_only_linear(n_out: int, k: int, bits: int, has_bias: bool, out_shape: tuple[int, ...] | None):
    """The weight-only layer as a torch function (traced into the graph by splice)."""
    def linear(x, q, s, z, *bias):
        if out_shape is not None:
            flat = _aten.clone.default(x, memory_format=torch.contiguous_format).view(-1, x.shape[-1])
            return linear2d(flat, q, s, z, *bias).view(out_shape)
        return linear2d(x, q, s, z, *bias)

    def linear2d(x, q, s, z, *bias):
        wd = _qd.dequantize_per_channel.default(q, s, z, 0, 0, 2 ** bits - 1, torch.uint8)
        w_kn = _aten.t.default(wd.view(n_out, k))
        if has_bias:
            return _aten.addmm.default(bias[0], x, w_kn)
        return _aten.mm.default(x, w_kn)
    return linear


def quantize_sites_weight_only(src: Graph, sites: list[Site], block_size: int, symmetric: bool, by: str,
                               bits: int = 4) -> tuple[Graph, list[LayerWeightQuant]]:
    """Rewrite the given linear layers of one graph to block-wise `bits`-bit (4 or 8)
    weight-only codes: annotate each as w4 / w8, validate, convert (the policy shared by
    quantize_weights_int4, mixed_precision and the latency analysis; the ORT backend lowers
    both widths to MatMulNBits). Returns the new graph (the source is not touched) and a
    record per layer."""
    fmt = {4: "w4", 8: "w8"}[bits]
    specs = {s.out: LinearSpec(fmt, by, s.region, block_size=block_size, symmetric=symmetric) for s in sites}
    return apply(src, specs, None, by)


@register_converter("weight_only")
def convert_weight_only(src: Graph, items: list[tuple[str, LinearSpec, Site]],
                        by: str) -> tuple[Graph, list[LayerWeightQuant]]:
    """The weight-only decisions `items` of one graph (convert's converter)."""
    gm = src.copy_module()
    nodes = {n.name: n for n in gm.graph.nodes}
    index = {b: _next_index(gm, b) for b in WEIGHT_ONLY_PREFIX}
    done = []
    for _, spec, s in items:
        bits, block_size, symmetric = FORMATS[spec.format].weight_bits, spec.block_size, spec.symmetric
        node, x = nodes[s.out], nodes[s.x]
        rows, k, n_out = site_shape(gm, s)
        w = get_attr(gm, s.weight).detach()
        w_nk = w if s.transposed else w.t()
        q, scale, zp = quantize_weight_blocks(w_nk, block_size, symmetric, bits)
        prefix = f"{WEIGHT_ONLY_PREFIX[bits]}{index[bits]}"
        consts = [(f"{prefix}_w", q), (f"{prefix}_s", scale), (f"{prefix}_z", zp)]
        attrs = [add_constant(gm, target, value, by, before=node) for target, value in consts]
        args = [x] + attrs
        examples = [torch.zeros(tuple(int(d) for d in x.meta["val"].shape), dtype=torch.float32), q, scale, zp]
        if s.bias is not None:
            with gm.graph.inserting_before(node):
                b = gm.graph.get_attr(s.bias)
            b.meta["val"] = get_attr(gm, s.bias)
            args.append(b)
            examples.append(get_attr(gm, s.bias).detach())
        (y,) = splice(gm, _weight_only_linear(n_out, k, bits, s.bias is not None, s.out_shape), args, examples, by)
        for new in created_between(attrs[0], y):
            new.meta[meta.REGION] = s.region
        node.replace_all_uses_with(y)
        keep_decision(y, spec)
        index[bits] += 1
        done.append(LayerWeightQuant(s.node, s.region, s.weight, k, n_out, rows, intensity(rows, k, n_out),
                                     4 * k * n_out, weight_only_bytes(k, n_out, bits, block_size, symmetric),
                                     prefix, bits))
    eliminate_dead_code(gm)
    gm.graph.lint()
    # a fresh module holds only what the graph still reads: the float weights go
    gm = fx.GraphModule(gm, gm.graph, gm.__class__.__name__)
    return src.with_module(gm), done


def _next_index(gm: fx.GraphModule, bits: int) -> int:
    i = 0
    while hasattr(gm, f"{WEIGHT_ONLY_PREFIX[bits]}{i}_w"):
        i += 1
    return i
