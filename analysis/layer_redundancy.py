"""Layer redundancy: how little each transformer block changes its tokens (EfficientVLA,
"EfficientVLA: Training-Free Acceleration and Compression for Vision-Language-Action Models",
layer importance I(l) = 1 - mean cos(x_l, x_{l+1})).

For every repeated block of every analysed graph (the largest group of ModuleList siblings
of one module type whose blocks each have one input of their output's shape, or the regions
the option names) the
calibration run (analysis.recorder) hands over the block's input x_l and output x_{l+1} (its
primary data path: the one input of the output's shape). Per token (a row of the last axis):

    cos(x_l, x_{l+1}) = <x_l, x_{l+1}> / (|x_l| |x_{l+1}|)       (torch's cosine_similarity, eps 1e-8)
    importance        = 1 - mean cos over every token of every batch row and call
    call_importance   = the same per call (per denoising step for an iterative model)

A block whose output the next one barely changes has a low I(l): the candidates layer_skip
removes first (not necessarily consecutive ones).

Reads: calibration. Writes: LayerRedundancyProfile (a record; nothing on nodes).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pared.analysis.recorder import PerGraph, Tap, analysed_graphs, record
from pared.analysis.redundancy import block_regions, primary_io
from pared.ir.errors import PassError
from pared.ir.program import Program
from pared.ir.regions import Region
from pared.ir.transform import Analysis, PassContext, Record, register_pass

_NAME = "layer_redundancy"


@dataclass(frozen=True)
class BlockRedundancy:
    block: str                          # region path
    input: str                          # node of x_l
    output: str                         # node of x_{l+1}
    tokens: int                         # tokens (rows of the last axis) per call
    importance: float                   # 1 - mean cos over the run
    cos_min: float                      # the least similar token's cosine
    calls: tuple[int, ...]              # the call indices at which it ran
    call_importance: tuple[float, ...]  # per call: 1 - mean cos


@dataclass(frozen=True)
class GraphLayers:
    graph: str
    calls: int
    blocks: tuple[BlockRedundancy, ...]     # in graph order
    skipped: tuple[tuple[str, str], ...] = ()   # (block, why) for blocks without a primary input

    def ranked(self) -> tuple[BlockRedundancy, ...]:
        """The blocks, least important (lowest I) first."""
        return tuple(sorted(self.blocks, key=lambda b: b.importance))


@dataclass(frozen=True)
class LayerRedundancyProfile(PerGraph, Record):
    graphs: tuple[GraphLayers, ...]

    def block(self, path: str, graph: str | None = None) -> BlockRedundancy:
        for b in self.graph(graph).blocks:
            if b.block == path:
                return b
        raise KeyError(f"no block {path!r}; the graph has {[b.block for b in self.graph(graph).blocks]}")


def token_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine of each token (row of the last axis) of `a` with the same token of `b`, float64."""
    d = a.shape[-1]
    return F.cosine_similarity(a.reshape(-1, d).double(), b.reshape(-1, d).double(), dim=-1, eps=1e-8)


def _stack(program: Program, graph: str) -> list[Region]:
    """The repeated blocks of a graph: the largest group of ModuleList siblings of one module type
    (by node count) whose every block has a primary input (redundancy.primary_io), else
    redundancy.block_regions' choice. (A block run several times in one graph, such as a
    denoising head unrolled into a policy, has no single input: the group behind it is passed
    over for, say, the backbone's layers.)"""
    gm = program.graphs[graph].module
    groups: dict[tuple[str, str], list[Region]] = {}
    for p, r in program.regions(graph).items():
        head, _, last = p.rpartition(".")
        if last.isdigit():
            groups.setdefault((head, r.module_type), []).append(r)
    for rs in sorted((v for v in groups.values() if len(v) >= 2), key=lambda rs: -sum(len(r.nodes) for r in rs)):
        if all(primary_io(gm, r) is not None for r in rs):
            return sorted(rs, key=lambda r: int(r.path.rpartition(".")[2]))
    return block_regions(program, None, graph)


@register_pass(_NAME)
class LayerRedundancy(Analysis):
    """Per block: 1 - mean cosine between its input and output tokens (see module docstring)."""

    record = LayerRedundancyProfile

    @dataclass(frozen=True, kw_only=True)
    class Options:
        graphs: tuple[str, ...] | str | None = None    # graphs to analyse (default: every graph the plan calls)
        regions: str | None = None      # region pattern of the blocks (default: the repeated blocks)

        def __post_init__(self):
            if self.graphs is not None:
                object.__setattr__(self, "graphs", (self.graphs,) if isinstance(self.graphs, str)
                                   else tuple(self.graphs))

    def analyze(self, program: Program, ctx: PassContext) -> LayerRedundancyProfile:
        o = self.options
        names = analysed_graphs(program, o.graphs, _NAME)
        if ctx.calibration is None:
            raise PassError(f"pass '{_NAME}' needs a calibration run: pass calibration= a list of input tuples "
                            "or a loop callable that runs one request through the model")
        plan: dict[str, list[tuple[str, str, str]]] = {}
        skipped: dict[str, list[tuple[str, str]]] = {}
        why_none = []
        for name in names:
            gm = program.graphs[name].module
            try:
                blocks = block_regions(program, o.regions, name) if o.regions else _stack(program, name)
            except PassError as e:
                why_none.append(f"{name}: {e}")
                continue
            for b in blocks:
                io = primary_io(gm, b)
                if io is None:
                    skipped.setdefault(name, []).append((b.path, "no input of its output's shape"))
                else:
                    plan.setdefault(name, []).append((b.path, io[0].name, io[1].name))
        if not plan:
            raise PassError(f"pass '{_NAME}': no block with an input and an output of one shape in graphs {names} "
                            "(a block run more than once in one graph has several inputs: name another stack "
                            "with `regions`)" + (f" ({'; '.join(why_none)})" if why_none else ""))
        # per (graph, block): call -> [sum of cosines, tokens, min]
        sums: dict[tuple[str, str], dict[int, list[float]]] = {(g, b): {} for g, bs in plan.items() for b, _, _ in bs}
        by_output = {(g, out): (b, inp) for g, bs in plan.items() for b, inp, out in bs}
        latest: dict[tuple[str, str], torch.Tensor] = {}

        def on_value(tap: Tap, v: torch.Tensor) -> None:
            latest[(tap.graph, tap.node)] = v
            hit = by_output.get((tap.graph, tap.node))
            if hit is None:
                return
            block, inp = hit
            c = token_cosines(latest[(tap.graph, inp)], v)
            acc = sums[(tap.graph, block)].setdefault(tap.call, [0.0, 0, 1.0])
            acc[0] += float(c.sum())
            acc[1] += int(c.numel())
            acc[2] = min(acc[2], float(c.min()))

        ctx.progress(f"{_NAME}: recording {sum(len(v) for v in plan.values())} blocks in {len(plan)} graph(s)")
        taps = {g: [n for _, i, o_ in bs for n in (i, o_)] for g, bs in plan.items()}
        calls = len(record(program, ctx.calibration, taps, on_value))
        graphs = []
        for g, bs in plan.items():
            out = []
            for b, inp, outn in bs:
                per = sums[(g, b)]
                if not per:
                    continue
                cs = sorted(per)
                total, n = sum(per[c][0] for c in cs), sum(per[c][1] for c in cs)
                out.append(BlockRedundancy(b, inp, outn, per[cs[0]][1], 1.0 - total / n, min(per[c][2] for c in cs),
                                           tuple(cs), tuple(1.0 - per[c][0] / per[c][1] for c in cs)))
            graphs.append(GraphLayers(g, calls, tuple(out), tuple(skipped.get(g, ()))))
            low = ", ".join(f"{b.block} {b.importance:.3g}" for b in graphs[-1].ranked()[:3])
            ctx.log.info("%s: graph '%s': %d blocks over %d calls, lowest I: %s", _NAME, g, len(out), calls, low)
        return LayerRedundancyProfile(tuple(graphs))
