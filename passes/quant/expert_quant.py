"""Give each expert of a mixture-of-experts layer its own weight precision, from
how often it is routed to and how much quantizing it alone hurts the output
(MoQa, "MoQa: Rethinking MoE Quantization with Multi-stage Data-model
Distribution Awareness": expert-level mixed precision from routing frequency
and per-expert sensitivity).

Before:  h = bmm(x, W1 [E, K, H]) (+b1) -> act -> bmm(., W2 [E, H, K]) (+b2)     float32 experts
After:   W1 = index_select(cat(dq(codes8, s8) [E8, K, H], dq(unpack(codes4), s4) [E4, K, H], W1f [Ef, K, H]), 0, perm)
         (the same for W2), feeding the same bmm; per group of experts at b bits
             dq(c, s) = ((float(c) - 2^(b-1)) * s).view(Eb, N, K).transpose(1, 2)
         symmetric block-wise codes along the input dim (`block_size` weights per
         float32 scale). 4-bit codes are stored two per uint8 byte and unpacked in
         the graph with integer arithmetic (hi = floor(p / 16), lo = p - 16 hi),
         which the ONNX exporter writes as Cast/Div/Floor/Mul/Sub (its BitShift /
         BitwiseAnd came out with uint8 and int8 operands ORT refused). The exporter's
         optimizer folds ops whose constant inputs hold <= 8192 elements, so the codes
         of all experts of one stacked weight share one flat buffer (dit_moe_mnist:
         32-64 KB, kept packed in the file; a toy model whose whole buffer is smaller
         gets it folded back to float, same numbers, no saving). ONNX Runtime then
         dequantizes the experts at every call and runs the same float MatMul:
         smaller weights, not faster (see benchmarks/quant_moe.py).

Deciding: on the calibration run, per layer l and expert e, the routing frequency
f_le (the share of the router's top-k picks that name e) and the sensitivity
s_le(b) = rel_l2² of the final output with only that expert's W1 and W2 quantized
to b bits (quantization noise of independent experts adds in power). The bits per
expert minimize sum f_le * s_le(b) (weighting "frequency", MoQa's; "none": sum
s_le(b), which already holds the routing of the calibration run) under the byte
budget, solved exactly by dynamic programming over the experts (mixed_precision's
`allocate`; the costs share a large common divisor, so the DP runs in whole units).

Every graph the Plan calls is quantized: variants of one model (cfg_skip's halves,
timestep buckets) share their expert weights, so the calibration run goes through
the whole Program (analysis.recorder), each expert gets one width, and the
variants share the packed codes. A cache variant that gathers a few experts
(expert_cache's `reuse`) is refused: run expert_quant before expert_cache.

Reads: calibration (ctx.calibration). Writes: an ExpertQuantPlan record (per
expert: frequency, sensitivity per width, chosen bits, bytes), buffers per stacked
weight: `_moeq_<i>_c` (every group's codes, flat uint8), `_moeq_<i>_s<bits>`
(scales), `_moeq_<i>_f` (float experts) and `_moeq_<i>_perm` (expert order).
Invariant: the graph computes x @ W with W equal, element for element, to the
reference dequantization of the stored codes (`dequantize`); routing, biases,
the router and the shared expert stay float. A model without stacked-expert MoE
layers is returned unchanged (stat moe_layers 0); so is a second run.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from pared.analysis.quant_sensitivity import compare_outputs
from pared.analysis.recorder import record, replay
from pared.ir import meta
from pared.ir.errors import OptionError, PassError
from pared.ir.formats import EXPERT_BITS, ExpertsSpec
from pared.ir.program import Graph, Program, get_attr
from pared.ir.rewrite import add_constant, attr_targets, eliminate_dead_code, share_equal_constants, splice
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, Record, RewritePass, check_range, register_pass
from pared.passes.cache.expert_cache import find_expert_stacks
from pared.passes.quant.common import quantize_weight_blocks
from pared.passes.quant.convert import apply, keep_decision, register_converter
from pared.passes.quant.mixed_precision import allocate

PREFIX = "_moeq_"
FLOAT = 32                      # "bits" of an expert kept in float32
_WIDTHS = EXPERT_BITS            # 32 (FLOAT) keeps an expert float
_DEFAULT_FRACTION = 0.2         # budget when neither weight_bytes nor avg_bits is given


@dataclass(frozen=True)
class ExpertQuant:
    """One expert's measurements and decision."""
    index: int
    frequency: float                                 # share of the layer's top-k picks naming this expert
    sensitivity: tuple[tuple[int, float], ...]       # (bits, rel_l2² of the output with only this expert quantized)
    bits: int                                        # chosen width (32: kept float)
    bytes: int                                       # its W1 + W2 at that width (codes + scales)
    fp32_bytes: int


@dataclass(frozen=True)
class ExpertLayerQuant:
    """One MoE layer."""
    region: str
    w1: str                                          # get_attr targets of the stacked weights replaced
    w2: str
    experts: tuple[ExpertQuant, ...]


@dataclass(frozen=True)
class ExpertQuantPlan(Record):
    """What expert_quant decided."""
    block_size: int
    weighting: str                                   # frequency | none
    candidates: tuple[int, ...]                      # the widths offered
    budget: int                                      # bytes allowed for the experts' weights
    bytes: int                                       # bytes chosen (codes + scales, float experts at 4 B)
    fp32_bytes: int                                  # the experts' weights in float32
    objective: float                                 # the minimized sum of (weighted) sensitivities
    calls: int                                       # calibration calls observed
    layers: tuple[ExpertLayerQuant, ...]
    measured: tuple[tuple[str, float], ...] = ()     # the whole choice on the calibration run (rel_l2, sqnr_db)

    @property
    def bits_count(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for lay in self.layers:
            for e in lay.experts:
                out[e.bits] = out.get(e.bits, 0) + 1
        return out


# -- the numbers ----------------------------------------------------------------
def _block(k: int, block_size: int) -> int:
    """The block along an input dim of k: block_size, or the whole dim when smaller (0: per output channel)."""
    return k if block_size == 0 or block_size >= k else block_size


def quantize_expert(w_kn: torch.Tensor, bits: int, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric block-wise codes of one expert's [K, N] weight.

    Returns:
        (codes uint8 [N * K / bs, bs] in [0, 2^bits - 1], scales float32 [N * K / bs, 1]).
    Raises:
        ValueError: when K is not a multiple of the block.
    """
    k = int(w_kn.shape[0])
    if bits == 2:
        # quantize_weight_blocks covers 4 and 8; 2 bits: levels -1, 0, 1 around zero point 2
        w = w_kn.detach().to(torch.float32).t().reshape(-1, _block(k, block_size))
        amax = w.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax, torch.ones_like(amax))
        codes = torch.clamp(torch.round(w / scale[:, None]) + 2, 0, 3).to(torch.uint8)
        return codes, scale.reshape(-1, 1)
    codes, scale, _ = quantize_weight_blocks(w_kn.t(), _block(k, block_size), True, bits)
    return codes.to(torch.uint8), scale.reshape(-1, 1).to(torch.float32)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, bits: int, k: int, n: int) -> torch.Tensor:
    """The reference dequantization: the [K, N] float weight of one expert's codes."""
    return ((codes.to(torch.float32) - float(2 ** (bits - 1))) * scales).view(n, k).t()


def expert_bytes(k: int, n: int, bits: int, block_size: int) -> int:
    """Bytes of one [K, N] expert weight at `bits`: codes (4 and 2 bits packed) and a float32 scale per block."""
    if bits == FLOAT:
        return 4 * k * n
    return (k * n * bits + 7) // 8 + 4 * n * (k // _block(k, block_size))


def pack(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes of `bits` < 8 packed 8 // bits to a byte along the last dim, the first in the lowest bits."""
    per = 8 // bits
    rows, width = codes.shape
    c = codes.to(torch.int32).view(rows, width // per, per)
    shifts = torch.tensor([1 << (bits * i) for i in range(per)], dtype=torch.int32)
    return (c * shifts).sum(-1).to(torch.uint8)


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """pack's inverse in integer arithmetic ONNX Runtime runs (no bitwise ops: the
    exporter's BitShift / BitwiseAnd output types disagree with ORT's)."""
    per, base = 8 // bits, 1 << bits
    rest = packed.to(torch.int32)
    parts = []
    for _ in range(per - 1):
        hi = torch.div(rest, base, rounding_mode="floor")
        parts.append(rest - hi * base)
        rest = hi
    parts.append(rest)
    return torch.stack(parts, -1).view(packed.shape[0], packed.shape[1] * per)


def fake_quantize(w: torch.Tensor, bits: int, block_size: int) -> torch.Tensor:
    """One expert's [K, N] weight quantized and dequantized (float32)."""
    if bits == FLOAT:
        return w.detach().to(torch.float32)
    codes, scales = quantize_expert(w, bits, block_size)
    return dequantize(codes, scales, bits, int(w.shape[0]), int(w.shape[1]))


def routing_frequency(indices: list[torch.Tensor], experts: int) -> np.ndarray:
    """Share of the top-k picks naming each expert, over every call (sums to 1)."""
    counts = np.zeros(experts, dtype=np.float64)
    for idx in indices:
        counts += np.bincount(idx.reshape(-1).to(torch.int64).numpy(), minlength=experts)[:experts]
    total = counts.sum()
    return counts / total if total > 0 else counts


def allocate_experts(errors: list[list[float]], costs: list[list[int]], budget: int) -> list[int]:
    """The option per expert minimizing the summed error within `budget` bytes (exact DP).

    Raises:
        ValueError: when even the smallest choice exceeds the budget.
    """
    choice, _ = allocate(costs, errors, budget)
    return choice


# -- the pass -------------------------------------------------------------------
@register_pass("expert_quant")
class QuantizeExperts(RewritePass):
    """MoQa-style expert-level weight precision (see module docstring)."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        bits: tuple[int, ...] = (4, 8)        # widths an expert may get: from 2, 4, 8 and 32 (keep float)
        weight_bytes: float | None = None     # budget: fraction of the experts' fp32 weight bytes (default 0.2)
        avg_bits: float | None = None         # budget instead as bits per expert weight, scales included
        block_size: int = 32                  # weights per scale along the input dim (0: one per output channel)
        weighting: str = "frequency"          # objective sum f*s (MoQa) | "none": sum s (already routing-aware)
        measure: bool = True                  # replay the final choice on the calibration run (record.measured)

        def __post_init__(self):
            bits = (self.bits,) if isinstance(self.bits, int) else tuple(self.bits)
            object.__setattr__(self, "bits", tuple(sorted(set(int(b) for b in bits))))
            if not self.bits or any(b not in _WIDTHS for b in self.bits):
                raise OptionError(f"pass 'expert_quant': option 'bits' must be a non-empty choice from "
                                  f"{list(_WIDTHS)} (32 keeps an expert float), got {list(bits)!r}")
            if self.weight_bytes is not None and self.avg_bits is not None:
                raise OptionError("pass 'expert_quant': options 'weight_bytes' and 'avg_bits' both set a budget; "
                                  "give one of them")
            if self.weight_bytes is not None:
                check_range("expert_quant", "weight_bytes", self.weight_bytes, lo=0, lo_open=True, hi=1)
            if self.avg_bits is not None:
                check_range("expert_quant", "avg_bits", self.avg_bits, lo=0, lo_open=True, hi=32)
            check_range("expert_quant", "block_size", self.block_size, lo=0)
            if self.block_size and self.block_size % 2:
                raise OptionError(f"pass 'expert_quant': option 'block_size' must be even (4-bit codes are "
                                  f"packed two per byte) or 0, got {self.block_size!r}")
            if self.weighting not in ("frequency", "none"):
                raise OptionError(f"pass 'expert_quant': option 'weighting' must be 'frequency' or 'none', "
                                  f"got {self.weighting!r}")

        def budget(self, fp32_bytes: int) -> int:
            if self.avg_bits is not None:
                return int(fp32_bytes * self.avg_bits / 32)
            frac = _DEFAULT_FRACTION if self.weight_bytes is None else self.weight_bytes
            return int(fp32_bytes * frac)

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        found = {name: find_expert_stacks(program.graphs[name].module)
                 for name in program.called_graphs()}
        found = {k: v for k, v in found.items() if v}
        if not found:
            ctx.log.info("expert_quant: no mixture-of-experts layer with stacked expert weights; nothing to do")
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"moe_layers": 0})
        if ctx.calibration is None:
            raise PassError("pass 'expert_quant' needs a calibration run (routing frequency and per-expert "
                            "sensitivity): pass calibration= to pared.optimize or the PassContext")
        # variants of one model (cfg_skip's halves, timestep buckets) share their expert weights: one
        # allocation for the model, applied to every variant. The graph with the most MoE layers is
        # the reference; the others' layers are found among its weights.
        gname = max(found, key=lambda n: len(found[n]))
        src = program.graphs[gname]
        gm = src.module
        stacks = found[gname]
        nodes = {n.name: n for n in gm.graph.nodes}
        weights = []                                   # per layer: (target W1, target W2, W1, W2)
        for s in stacks:
            t1, t2 = str(nodes[s.w1].target), str(nodes[s.w2].target)
            w1, w2 = get_attr(gm, t1).detach(), get_attr(gm, t2).detach()
            for t, w in ((t1, w1), (t2, w2)):
                k = int(w.shape[1])
                bs = _block(k, o.block_size)
                if k % bs:
                    raise PassError(f"pass 'expert_quant': layer {s.region!r} weight {t!r} has input dim {k}, not a "
                                    f"multiple of block_size {o.block_size}; set block_size to a divisor or 0")
                if min(o.bits) < 8 and bs % (8 // min(o.bits)):
                    raise PassError(f"pass 'expert_quant': layer {s.region!r} weight {t!r}: blocks of {bs} weights "
                                    f"do not pack {8 // min(o.bits)} codes a byte at {min(o.bits)} bits; set "
                                    "block_size to a multiple of 4")
            weights.append((t1, t2, w1, w2))
        layer_of = {(t1, t2): li for li, (t1, t2, _, _) in enumerate(weights)}
        per_graph = {name: _layers_of(program, name, sts, layer_of, gname) for name, sts in found.items()}
        for name in program.called_graphs():
            if name not in found:
                _layers_of(program, name, [], layer_of, gname)    # reads none of the expert weights
        fp32_total = sum(4 * (w1[0].numel() + w2[0].numel()) * int(w1.shape[0]) for _, _, w1, w2 in weights)
        budget = o.budget(fp32_total)
        least = sum(min(_cost(w1, w2, b, o.block_size) for b in o.bits) * int(w1.shape[0])
                    for _, _, w1, w2 in weights)
        if least > budget:
            raise PassError(f"pass 'expert_quant': option {'avg_bits' if o.avg_bits is not None else 'weight_bytes'}"
                            f" gives a budget of {budget} bytes; the smallest choice of bits {list(o.bits)} needs "
                            f"{least} ({least / fp32_total:.3f} of the fp32 {fp32_total}); raise it or offer fewer "
                            "bits")

        # -- measure: routing frequency, then one replay per (expert, width), through the whole Program
        picks: dict[str, list[torch.Tensor]] = {s.region: [] for s in stacks}
        region_of = {(name, s.indices): stacks[li].region for name, ls in per_graph.items() for li, s in ls}
        trace = record(program, ctx.calibration, {name: [s.indices for _, s in ls] for name, ls in per_graph.items()},
                       lambda tap, v: picks[region_of[(tap.graph, tap.node)]].append(v.detach().clone()))
        calls = len(trace)
        ref = replay(program, ctx.calibration)
        freq, sens = [], []
        # one width offered: nothing to decide, no replays (the record then holds no sensitivities)
        widths = [b for b in o.bits if b != FLOAT] if len(o.bits) > 1 else []
        total = max(1, len(stacks) * int(weights[0][2].shape[0]) * len(widths))
        done = 0
        for s, (t1, t2, w1, w2) in zip(stacks, weights):
            e_count = int(w1.shape[0])
            freq.append(routing_frequency(picks[s.region], e_count))
            layer = []
            for e in range(e_count):
                row = {FLOAT: 0.0}
                for b in widths:
                    q1, q2 = w1.clone(), w2.clone()
                    q1[e] = fake_quantize(w1[e], b, o.block_size)
                    q2[e] = fake_quantize(w2[e], b, o.block_size)
                    got = replay(_swapped(program, per_graph, {t1: q1, t2: q2}), ctx.calibration)
                    row[b] = compare_outputs(ref, got)["rel_l2"] ** 2
                    done += 1
                ctx.progress(f"expert_quant: sensitivity {done}/{total}")
                layer.append(row)
            sens.append(layer)

        # -- decide
        errors, costs, where = [], [], []
        for li, (_, _, w1, w2) in enumerate(weights):
            for e in range(int(w1.shape[0])):
                f = freq[li][e] if o.weighting == "frequency" else 1.0
                errors.append([f * sens[li][e].get(b, 0.0) for b in o.bits])
                costs.append([_cost(w1, w2, b, o.block_size) for b in o.bits])
                where.append((li, e))
        choice = allocate_experts(errors, costs, budget)
        bits_of = {where[i]: o.bits[j] for i, j in enumerate(choice)}

        # -- rewrite every graph holding the experts, one choice per layer; equal constants shared
        new_graphs = dict(program.graphs)
        for name, ls in per_graph.items():
            specs = {}
            for li, s in ls:
                per = tuple(bits_of[(li, e)] for e in range(int(weights[li][2].shape[0])))
                for j, node_name in enumerate((s.w1, s.w2)):
                    specs[node_name] = ExpertsSpec(per, o.block_size, f"{PREFIX}{2 * li + j}", self.name, s.region)
            new_graphs[name], _ = apply(program.graphs[name], specs, ctx.target, self.name)
        share_equal_constants([(new_graphs[n].module, attr_targets(new_graphs[n].module)
                                - attr_targets(program.graphs[n].module)) for n in per_graph])
        layers = []
        for li, (s, (t1, t2, w1, w2)) in enumerate(zip(stacks, weights)):
            per = [bits_of[(li, e)] for e in range(int(w1.shape[0]))]
            experts = tuple(ExpertQuant(e, float(freq[li][e]), tuple((b, float(sens[li][e][b])) for b in widths),
                                        per[e], _cost(w1, w2, per[e], o.block_size),
                                        _cost(w1, w2, FLOAT, o.block_size)) for e in range(len(per)))
            layers.append(ExpertLayerQuant(s.region, t1, t2, experts))
        chosen = sum(costs[i][j] for i, j in enumerate(choice))
        objective = float(sum(errors[i][j] for i, j in enumerate(choice)))
        measured: tuple[tuple[str, float], ...] = ()
        if o.measure:
            m = compare_outputs(ref, replay(program.replace(graphs=new_graphs), ctx.calibration))
            measured = (("rel_l2", m["rel_l2"]), ("sqnr_db", m["sqnr_db"]))
        plan = ExpertQuantPlan(o.block_size, o.weighting, o.bits, budget, chosen, fp32_total, objective, calls,
                               tuple(layers), measured)
        new = program.replace(graphs=new_graphs, records={**program.records, "ExpertQuantPlan": plan})
        counts = plan.bits_count
        stats = {"moe_layers": len(stacks), "experts": len(choice), **({"graphs": len(per_graph)} if len(
            program.graphs) > 1 else {}),
                 **{f"bits{b}": counts.get(b, 0) for b in o.bits}, "bytes": chosen, "fp32_bytes": fp32_total}
        ctx.log.info("expert_quant: %d MoE layers, %d experts -> %s; expert weights %.3f MB -> %.3f MB "
                     "(budget %.3f MB)%s", len(stacks), len(choice),
                     ", ".join(f"{counts.get(b, 0)} at {b if b != FLOAT else 'fp32'}" for b in o.bits),
                     fp32_total / 1e6, chosen / 1e6, budget / 1e6,
                     f", calibration rel_l2 {measured[0][1]:.2e}" if measured else "")
        return PassResult(new, modified=True, stats=stats)


def _layers_of(program: Program, name: str, stacks: list, layer_of: dict, ref: str) -> list[tuple[int, Any]]:
    """(reference layer index, stack) for each MoE layer of graph `name`.

    Raises:
        PassError: when the graph's experts are not the reference graph's (another model), or
            it reads the expert weights outside a recognized MoE layer (a cache variant that
            gathers a few experts): a choice of bits could not be applied to it.
    """
    gm = program.graphs[name].module
    nodes = {n.name: n for n in gm.graph.nodes}
    out = []
    for s in stacks:
        key = (str(nodes[s.w1].target), str(nodes[s.w2].target))
        if key not in layer_of:
            raise PassError(f"pass 'expert_quant': graph {name!r} holds experts {key[0]!r} that graph {ref!r} does "
                            "not; it allocates one budget over one model's experts. Run it on each model's "
                            "program")
        out.append((layer_of[key], s))
    matched = {n for _, s in out for n in (s.w1, s.w2)}
    stray = sorted(n.name for n in gm.graph.nodes if n.op == "get_attr" and n.name not in matched
                   and any(str(n.target) in k for k in layer_of))
    if stray:
        raise PassError(f"pass 'expert_quant': graph {name!r} reads the expert weights outside a stacked-expert "
                        f"layer ({stray[:3]}), as a cache variant that gathers experts does; run expert_quant "
                        "before expert_cache")
    return out


def _swapped(program: Program, per_graph: dict, tensors: dict[str, torch.Tensor]) -> Program:
    """`program` with every graph holding the experts reading `tensors` in place of the weights they name."""
    return program.replace(graphs={**program.graphs, **{
        name: program.graphs[name].with_module(_with_weights(program.graphs[name].module, tensors))
        for name in per_graph}})


def _cost(w1: torch.Tensor, w2: torch.Tensor, bits: int, block_size: int) -> int:
    """Bytes of one expert's W1 and W2 at `bits`."""
    return sum(expert_bytes(int(w.shape[1]), int(w.shape[2]), bits, block_size) for w in (w1, w2))


def _with_weights(gm: fx.GraphModule, tensors: dict[str, torch.Tensor]) -> fx.GraphModule:
    """The same graph reading `tensors` in place of the attributes they name (gm is not touched:
    GraphModule copies the module path to each attribute and shares the leaves)."""
    out = fx.GraphModule(gm, gm.graph, gm.__class__.__name__)
    for target, t in tensors.items():
        *path, leaf = target.split(".")
        mod = out
        for p in path:
            mod = getattr(mod, p)
        if isinstance(getattr(mod, leaf), torch.nn.Parameter):
            delattr(mod, leaf)
        mod.register_buffer(leaf, t) if leaf not in mod._buffers else setattr(mod, leaf, t)
    return out


def _dequantize_stack(groups: tuple[tuple[int, int, int, int], ...], k: int, n: int, reorder: bool):
    """The stacked [E, K, N] weight from its groups ((bits, experts, codes offset, row
    width) each; the codes of every quantized group lie in one flat uint8 buffer, the
    first argument, then the scales per quantized group, the float stack for 32 and
    the permutation), as a torch function traced into the graph."""
    def stack(*args):
        args = list(args)
        flat = args.pop(0)
        parts = []
        for bits, count, start, width in groups:
            if bits == FLOAT:
                parts.append(args.pop(0))
                continue
            rows = count * n * k // (width * 8 // bits)
            codes = flat[start:start + rows * width].view(rows, width)
            if bits < 8:
                codes = _unpack(codes, bits)
            w = (codes.to(torch.float32) - float(2 ** (bits - 1))) * args.pop(0)
            parts.append(w.view(count, n, k).transpose(1, 2))
        w = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        return torch.index_select(w, 0, args.pop(0)) if reorder else w
    return stack


@register_converter("experts")
def convert_experts(src: Graph, items: list[tuple[str, ExpertsSpec, None]], by: str) -> tuple[Graph, list]:
    """The expert-stack decisions `items` of one graph (convert's converter): each stacked weight
    becomes its codes, scales and their dequantization."""
    gm = src.copy_module()
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, spec, _ in items:
        node = nodes[name]
        w = get_attr(gm, str(node.target)).detach()
        wd = _replace_weight(gm, node, w, list(spec.bits), spec.block_size, spec.name, spec.region, by)
        keep_decision(wd, spec)
    eliminate_dead_code(gm)
    gm.graph.lint()
    # a fresh module holds only what the graph still reads: the float stacks go
    return src.with_module(fx.GraphModule(gm, gm.graph, gm.__class__.__name__)), []


def _replace_weight(gm: fx.GraphModule, node: fx.Node, w: torch.Tensor, per: list[int], block_size: int,
                    prefix: str, region: str, by: str) -> fx.Node:
    """Replace the stacked weight read by get_attr `node` with codes, scales and its dequantization."""
    e_count, k, n = (int(d) for d in w.shape)
    groups, consts, order, codes_flat, start = [], [], [], [], 0
    for bits in sorted(set(per)):
        members = [e for e in range(e_count) if per[e] == bits]
        order += members
        if bits == FLOAT:
            groups.append((bits, len(members), 0, 0))
            consts.append((f"{prefix}_f", w[members].clone()))
            continue
        cs, ss = zip(*(quantize_expert(w[e], bits, block_size) for e in members))
        codes = torch.cat(cs)
        codes = pack(codes, bits) if bits < 8 else codes
        groups.append((bits, len(members), start, int(codes.shape[1])))
        codes_flat.append(codes.reshape(-1))
        start += codes.numel()
        consts.append((f"{prefix}_s{bits}", torch.cat(ss)))
    # one codes buffer per stacked weight: the exporter's optimizer folds ops on constants of up to
    # 8192 elements, and a small group's codes alone would be unpacked to float in the file
    consts.insert(0, (f"{prefix}_c", torch.cat(codes_flat) if codes_flat else torch.zeros(0, dtype=torch.uint8)))
    reorder = order != list(range(e_count))
    if reorder:
        perm = torch.empty(e_count, dtype=torch.int64)
        perm[torch.tensor(order)] = torch.arange(e_count)
        consts.append((f"{prefix}_perm", perm))
    attrs = []
    for target, value in consts:
        a = add_constant(gm, target, value.contiguous(), by, before=node)
        a.meta[meta.REGION] = region
        attrs.append(a)
    (wd,) = splice(gm, _dequantize_stack(tuple(groups), k, n, reorder), attrs, [v for _, v in consts], by)
    cur = attrs[-1].next
    while cur is not wd.next:
        cur.meta[meta.REGION] = region
        cur = cur.next
    node.replace_all_uses_with(wd)
    return wd
