"""Cache the sub-blocks of a diffusion action head across its denoising steps
(BAC, "Block-wise Adaptive Caching for Diffusion Policies", ICLR'26; EfficientVLA,
"Training-Free Acceleration and Compression for Vision-Language-Action Models").

The head's blocks each hold sub-blocks (attention, MLP). Each sub-block has its own
set of *update steps*: there it computes and its output is written to state; at
every other step its output is read from state (what it computed at its last
update), and everything only it needed is not computed.

Before:  o = blocks.b.attn(h)                        at every step
After:   step in updates(blocks.b.attn):  o = blocks.b.attn(h); state.o = o
         otherwise:                       o = state.o

Schedules (the update steps per sub-block, step 0 always among them):
  interval  every `interval` steps, the same for all sub-blocks (EfficientVLA's
            fixed-interval reuse of attention/MLP outputs).
  bac       per sub-block, from the calibration run: S[a, t] is the mean cosine
            similarity of its output at step a and at step t. With update steps
            u_0 = 0 < u_1 < ... < u_{M-1}, the output computed at u_i stands for the steps
            [u_i, u_{i+1}), worth sum_t S[u_i, t]; a dynamic program picks the M updates
            of largest total similarity. With `groups: g` the sub-blocks share update
            steps in g groups (merged greedily by the similarity a shared schedule
            loses), so a request switches among at most 2^g variants instead of one per
            distinct step (each variant is a graph with its own prepacked weights; many
            of them cost more than their FLOPs save on the CPU). Bubbling Union: the `bubble` fraction of
            sub-blocks with the largest caching error (mean 1 - S over their steps) also
            update whenever an MLP (FFN) after them updates, so an FFN never reads a
            stale upstream feature it is sensitive to.

The schedule is static: a table Select per call of the head, over one variant graph
per distinct set of reused sub-blocks. It applies to a sampler captured whole (a
`pared.ir.denoise.Denoiser`: the steps are the iterations of the plan's steps loop)
or to a denoiser the user calls once per step (the steps are calls).

Reads: calibration (bac); the DenoiseLoop record when there is one. Writes:
ActionCachePlan; graphs `head.full` and `head.reuse<k>`, a table Select per call of
the head. Invariant: a schedule that updates every sub-block at every step gives the
uncached outputs exactly.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx

from pared.analysis.recorder import record
from pared.analysis.redundancy import block_regions
from pared.ir import meta
from pared.ir.errors import OptionError, PassError
from pared.ir.plan import Call, Select, StateBuffer, Table
from pared.ir.program import Graph, Program
from pared.ir.records import Record
from pared.ir.rewrite import eliminate_dead_code, narrow_split_linears
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, RewritePass, check_range, register_pass
from pared.passes.cache.common import graph_flops, graphs_to_cache, refreshes, state_name
from pared.passes.cache.interval_cache import calls_of

SCHEDULES = ("bac", "interval")


@dataclass(frozen=True)
class ActionCachePlan(Record):
    """What action_cache decided for one head graph.

    Attributes:
        blocks: the cached sub-blocks (region paths), in graph order.
        updates: per sub-block, its update steps.
        schedule: the variant per step; variants: variant -> the sub-blocks it reuses.
        similarity: per sub-block, the mean cosine similarity of a reused output to the one
            the step would compute (calibration; empty for `interval` without calibration).
        bubbled: the sub-blocks Bubbling Union made update with downstream FFNs.
        flops: variant graph -> estimated FLOPs per call.
    """

    method: str
    graph: str
    steps: int
    blocks: tuple[str, ...]
    updates: tuple[tuple[int, ...], ...]
    schedule: tuple[str, ...]
    variants: tuple[tuple[str, tuple[str, ...]], ...]
    similarity: tuple[float, ...] = ()
    bubbled: tuple[str, ...] = ()
    flops: tuple[tuple[str, int], ...] = ()
    groups: tuple[int, ...] = ()         # option groups: the group of each sub-block (empty: one each)


# -- the schedule --------------------------------------------------------------------
def segment_value(S: np.ndarray, a: int, b: int) -> float:
    """Similarity kept when the output computed at step a stands for steps a..b-1."""
    return float(S[a, a:b].sum())


def bac_updates(S: np.ndarray, m: int) -> tuple[int, ...]:
    """The m update steps (step 0 first) maximizing sum_i sum_{t in [u_i, u_i+1)} S[u_i, t].

    Args:
        S: [K, K] similarity, S[a, t] for a <= t (S[t, t] = 1).
        m: updates, 1 <= m <= K.
    """
    k = S.shape[0]
    m = max(1, min(m, k))
    # best[j][s]: the best value over steps [s, K) with j updates, the first at s
    best = np.full((m + 1, k + 1), -np.inf)
    nxt = np.zeros((m + 1, k + 1), dtype=int)
    for s in range(k):
        best[1][s] = segment_value(S, s, k)
        nxt[1][s] = k
    for j in range(2, m + 1):
        for s in range(k):
            for s2 in range(s + 1, k):
                v = segment_value(S, s, s2) + best[j - 1][s2]
                if v > best[j][s]:
                    best[j][s], nxt[j][s] = v, s2
    out, s, j = [], 0, m
    while s < k and j >= 1:
        out.append(int(s))
        s, j = int(nxt[j][s]), j - 1
    return tuple(out)


def kept_similarity(S: np.ndarray, updates: Sequence[int]) -> float:
    """Mean over steps of S[u(t), t], u(t) the last update at or before t."""
    k = S.shape[0]
    ups = sorted(set(updates))
    vals = [S[max(u for u in ups if u <= t), t] for t in range(k)]
    return float(np.mean(vals))


def grouped_updates(S: np.ndarray, m: int, groups: int) -> tuple[list[int], list[tuple[int, ...]]]:
    """Sub-blocks that share update steps, so a request runs few distinct variants: start with
    each sub-block alone and merge, `len(S) - groups` times, the two groups whose one schedule
    (bac_updates on their summed similarity) keeps the most similarity summed over their
    members (the least lost by the merge).

    Args:
        S: [n, K, K] per sub-block similarity. m: updates per group. groups: how many remain.
    Returns:
        (the group of each sub-block, numbered in order of first member; each group's updates).
    """
    n = S.shape[0]
    members = [[i] for i in range(n)]

    def value(ms: list[int]) -> tuple[float, tuple[int, ...]]:
        ups = bac_updates(S[ms].sum(0), m)
        return sum(kept_similarity(S[i], ups) for i in ms), ups
    cache = {(i,): value([i]) for i in range(n)}
    while len(members) > max(1, groups):
        best = None
        for a in range(len(members)):
            for b in range(a + 1, len(members)):
                key = tuple(sorted(members[a] + members[b]))
                if key not in cache:
                    cache[key] = value(list(key))
                loss = cache[tuple(members[a])][0] + cache[tuple(members[b])][0] - cache[key][0]
                if best is None or loss < best[0] - 1e-12:
                    best = (loss, a, b)
        _, a, b = best
        members[a] = sorted(members[a] + members[b])
        del members[b]
    members.sort(key=min)
    group_of = [next(g for g, ms in enumerate(members) if i in ms) for i in range(n)]
    return group_of, [cache[tuple(ms)][1] for ms in members]


def bubbling_union(blocks: Sequence[str], updates: list[set[int]], errors: Sequence[float], is_ffn: Sequence[bool],
                   fraction: float) -> list[str]:
    """BAC's Bubbling Union, in place on `updates`: the `fraction` of sub-blocks with the largest
    caching error also update at every update step of each FFN after them. Returns those bubbled."""
    n = len(blocks)
    count = int(math.floor(fraction * n + 1e-9))
    if count <= 0:
        return []
    order = sorted(range(n), key=lambda i: -errors[i])[:count]
    high = set(i for i in order if errors[i] > 0)
    bubbled = []
    for i in sorted(high):
        downstream = [updates[j] for j in range(i + 1, n) if is_ffn[j]]
        if not downstream:
            continue
        before = set(updates[i])
        for u in downstream:
            updates[i] |= u
        if updates[i] != before:
            bubbled.append(blocks[i])
    return bubbled


# -- graph surgery -------------------------------------------------------------------------
def _nodes(gm: fx.GraphModule) -> dict[str, fx.Node]:
    return {n.name: n for n in gm.graph.nodes}


def cached_variant(src: Graph, reuse: Sequence[tuple[str, str]], emit: Sequence[tuple[str, str]],
                   examples: dict[str, torch.Tensor], by: str, narrow: bool = True) -> Graph:
    """`src` with each reused node's value read from a new input, and each emitted node's value
    as an extra output; what only the reused nodes needed is removed, down to the rows of a
    linear whose split output they alone read (`narrow_split_linears`: adaLN's shift and scale of
    a reused sub-block, while its gate is still read).

    Args:
        reuse / emit: (name, node name) pairs; a reused value becomes input `cache.<name>`, an
            emitted one output `cache.<name>`.
        examples: name -> an example value (for lowering's re-trace).
        narrow: narrow the linears whose split output is now read in part (False: an ablation).
    """
    gm = src.copy_module()
    nodes = _nodes(gm)
    last_ph = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    extra = [nodes[node] for _, node in emit]
    outs = out_node.args[0]
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    out_node.args = (tuple(outs + extra),)
    for name, node in reuse:
        with gm.graph.inserting_after(last_ph):
            ph = gm.graph.placeholder(f"cache_{name}".replace(".", "_"))
        ph.meta["val"] = nodes[node].meta.get("val")
        ph.meta[meta.CREATED_BY] = by
        nodes[node].replace_all_uses_with(ph)
        last_ph = ph
    eliminate_dead_code(gm)
    # a reused sub-block's adaLN shift and scale are no longer read, only its gate: the modulation's
    # linear computes only the pieces still read (the same values)
    if narrow:
        narrow_split_linears(gm, by)
    gm.graph.lint()
    gm.recompile()
    batch = next((d[0][1] for d in src.dynamic_dims if d and d[0][0] == 0), None)
    dyn = tuple(src.dynamic_dims) + tuple(((0, batch),) if batch else () for _ in reuse) if any(src.dynamic_dims) \
        else ()
    return src.with_module(gm, input_names=src.input_names + tuple(f"cache.{n}" for n, _ in reuse),
                           output_names=src.output_names + tuple(f"cache.{n}" for n, _ in emit),
                           example_inputs=tuple(src.example_inputs) + tuple(examples[n] for n, _ in reuse),
                           dynamic_dims=dyn)


def sub_blocks(program: Program, graph: str, regions: str | None, parts: Sequence[str],
               pass_name: str) -> list[tuple[str, str]]:
    """(region path, its output node) of each cached sub-block, in graph order."""
    found = []
    all_regions = program.regions(graph)
    for blk in block_regions(program, regions, graph):
        for child in blk.children:
            if child.rpartition(".")[2] not in parts:
                continue
            r = all_regions[child]
            if len(r.outputs) != 1:
                raise PassError(f"pass '{pass_name}': sub-block {child!r} of graph {graph!r} has {len(r.outputs)} "
                                "outputs read outside it; a cached sub-block needs one (its feature)")
            found.append((child, r.outputs[0]))
    if not found:
        raise OptionError(f"pass '{pass_name}' option 'parts': the blocks of graph {graph!r} have no sub-block "
                          f"named one of {list(parts)}; their children: "
                          f"{sorted({c.rpartition('.')[2] for b in block_regions(program, regions, graph) for c in b.children})}")
    order = {n.name: i for i, n in enumerate(program.graphs[graph].module.graph.nodes)}
    return sorted(found, key=lambda p: order[p[1]])


def step_similarity(program: Program, graph: str, nodes: Sequence[str], calibration: Any, stepped: bool,
                    steps: int) -> np.ndarray:
    """[sub-block, K, K]: mean cosine similarity of each node's value at step a and step t over the
    calibration run (per call of the program when the steps are a loop inside it)."""
    feats: dict[tuple[int, str], list[np.ndarray]] = {}
    seen: dict[tuple[int, str], int] = {}

    def on_value(tap, v):
        if stepped:
            i = seen.get((tap.call, tap.node), 0)
            seen[(tap.call, tap.node)] = i + 1
            key = (tap.call, i)
        else:
            key = (0, tap.call)
        feats.setdefault(key, {})[tap.node] = v.detach().double().reshape(-1).numpy()

    record(program, calibration, {graph: list(nodes)}, on_value)
    runs = sorted({c for c, _ in feats})
    S = np.zeros((len(nodes), steps, steps))
    n = np.zeros((steps, steps))
    for c in runs:
        have = [i for i in range(steps) if (c, i) in feats]
        for a in have:
            for t in have:
                if t < a:
                    continue
                n[a, t] += 1
                for b, node in enumerate(nodes):
                    x, y = feats[(c, a)][node], feats[(c, t)][node]
                    d = np.linalg.norm(x) * np.linalg.norm(y)
                    S[b, a, t] += float(x @ y / d) if d > 0 else 1.0
    if not n[0, steps - 1]:
        raise PassError(f"action_cache: the calibration run reached {len(set(i for _, i in feats))} of the {steps} "
                        f"steps of graph {graph!r}; calibrate on whole requests")
    return S / np.maximum(n, 1)[None]


def _subset(calibration: Any, n: int) -> Any:
    if callable(calibration) or calibration is None or len(calibration) <= n:
        return calibration
    idx = np.linspace(0, len(calibration) - 1, n).round().astype(int)
    return [calibration[i] for i in idx]


@register_pass("action_cache")
class ActionCache(RewritePass):
    """BAC / EfficientVLA sub-block caching across denoising steps (see module docstring)."""

    capture_needs = frozenset({"loop"})   # the denoising steps as a steps loop of the plan

    @dataclass(frozen=True, kw_only=True)
    class Options:
        schedule: str = "bac"          # bac (calibrated DP + Bubbling Union) | interval (fixed, EfficientVLA)
        updates: int | None = None     # bac: update steps per sub-block, step 0 included (default: half the steps)
        groups: int | None = None      # bac: sub-blocks share update steps in this many groups (fewer variants);
        #                                None: a schedule per sub-block
        bubble: float = 0.5            # bac: fraction of sub-blocks (largest caching error) that bubble; 0: none
        interval: int = 2              # interval: update every N steps
        parts: str = "attn,mlp"        # the child modules of each block that are cached
        ffn: str = "mlp"               # which of the parts are FFNs (Bubbling Union)
        regions: str | None = None     # the blocks (pattern); default: the repeated blocks
        steps: int | None = None       # steps per request; default: the steps loop's, or the calibration run's
        calibration_calls: int = 64    # bac: program calls of the calibration run used for S
        narrow: bool = True            # a variant's modulation linears keep only the rows still read (a reused
        #                                sub-block's gate, not its shift and scale); False: the ablation

        def __post_init__(self):
            if self.schedule not in SCHEDULES:
                raise OptionError(f"pass 'action_cache' option 'schedule': must be one of {list(SCHEDULES)}, "
                                  f"got {self.schedule!r}")
            if self.updates is not None:
                check_range("action_cache", "updates", self.updates, lo=1)
            check_range("action_cache", "bubble", self.bubble, lo=0.0, hi=1.0)
            if self.groups is not None:
                check_range("action_cache", "groups", self.groups, lo=1)
                if self.schedule != "bac":
                    raise OptionError("pass 'action_cache' option 'groups' belongs to schedule 'bac' (interval "
                                      "updates every sub-block at the same steps already)")
            check_range("action_cache", "interval", self.interval, lo=1)
            check_range("action_cache", "calibration_calls", self.calibration_calls, lo=1)
            if self.steps is not None:
                check_range("action_cache", "steps", self.steps, lo=1)
            if not [p for p in self.parts.split(",") if p.strip()]:
                raise OptionError("pass 'action_cache' option 'parts': name at least one sub-block, e.g. 'attn,mlp'")

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        names = graphs_to_cache(program, self.name)
        stepped_graphs = program.plan.stepped_graphs()
        parts = tuple(p.strip() for p in o.parts.split(",") if p.strip())
        ffn = tuple(p.strip() for p in o.ffn.split(",") if p.strip())
        new, stats = program, {"graphs": 0, "reuse_fraction": 0.0}
        for gname in names:
            steps = o.steps or stepped_graphs.get(gname) or calls_of(ctx, None, self.name, program)
            blocks = sub_blocks(program, gname, o.regions, parts, self.name)
            paths = [p for p, _ in blocks]
            similarity: tuple[float, ...] = ()
            bubbled: list[str] = []
            groups: tuple[int, ...] = ()
            if o.schedule == "interval":
                ups = [{i for i in range(steps) if refreshes(i, o.interval, 1)} for _ in blocks]
            else:
                if ctx.calibration is None:
                    raise PassError("pass 'action_cache' (schedule 'bac'): needs a calibration run to measure each "
                                    "sub-block's step-to-step similarity; give calibration=, or use schedule "
                                    "'interval'")
                ctx.progress(f"action_cache: step similarity of {len(blocks)} sub-blocks of {gname!r}")
                S = step_similarity(program, gname, [n for _, n in blocks], _subset(ctx.calibration,
                                    o.calibration_calls), gname in stepped_graphs, steps)
                m = o.updates or max(1, (steps + 1) // 2)
                if o.groups is not None and o.groups < len(blocks):
                    group_of, group_ups = grouped_updates(S, m, o.groups)
                    ups = [set(int(u) for u in group_ups[g]) for g in group_of]
                    groups = tuple(group_of)
                else:
                    ups = [set(int(u) for u in bac_updates(S[b], m)) for b in range(len(blocks))]
                errors = [1.0 - kept_similarity(S[b], sorted(ups[b])) for b in range(len(blocks))]
                bubbled = bubbling_union(paths, ups, errors, [p.rpartition(".")[2] in ffn for p in paths], o.bubble)
                similarity = tuple(round(kept_similarity(S[b], sorted(ups[b])), 6) for b in range(len(blocks)))
            new, table, variants = self._rewrite(new, gname, blocks, ups, steps)
            if not variants:
                continue
            flops = tuple((f"{gname}.{v}", graph_flops(new.graphs[f"{gname}.{v}"]))
                          for v in ["full", *[v for v, _ in variants]])
            rec = ActionCachePlan(o.schedule, gname, steps, tuple(paths), tuple(tuple(sorted(u)) for u in ups), table,
                                  tuple(variants), similarity, tuple(bubbled), flops, groups)
            new = new.with_record(rec, gname)
            stats["graphs"] += 1
            stats["reuse_fraction"] = round(sum(steps - len(u) for u in ups) / (steps * len(blocks)), 4)
            stats["variants"] = 1 + len(variants)
            ctx.log.info("action_cache (%s): %d sub-blocks of %s, %.0f%% of their step outputs reused, %d variants",
                         o.schedule, len(blocks), gname, 100 * stats["reuse_fraction"], 1 + len(variants))
        if not stats["graphs"]:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats=stats)
        return PassResult(new, modified=True, preserved=(), stats=stats)

    def _rewrite(self, program: Program, gname: str, blocks: list[tuple[str, str]], ups: list[set[int]],
                 steps: int):
        """The program with the head's calls as a table Select over its cached variants."""
        src = program.graphs[gname]
        reused_at = [tuple(p for (p, _), u in zip(blocks, ups) if i not in u) for i in range(steps)]
        if not any(reused_at):
            return program, (), ()
        labels: dict[tuple[str, ...], str] = {(): "full"}
        for r in reused_at:
            if r not in labels:
                labels[r] = f"reuse{len(labels)}"
        node_of = dict(blocks)
        # example values of every sub-block output (for the variants' re-trace)
        probe = cached_variant(src, (), blocks, {}, self.name)
        with torch.no_grad():
            outs = probe.run(*probe.example_inputs)
        examples = {p: outs[len(src.output_names) + k].detach().clone() for k, (p, _) in enumerate(blocks)}
        variants = {}
        for r, lab in labels.items():
            # a computed sub-block writes its output when a later step of the request reuses it
            emit = [(p, node_of[p]) for p, _ in blocks if p not in r]
            variants[lab] = cached_variant(src, [(p, node_of[p]) for p in r], emit, examples, self.name,
                                           narrow=self.options.narrow)
        st = {p: f"state:{state_name(program, self.name, gname, p)}" for p, _ in blocks}

        def node(call: Call, graph_of) -> Select:
            cases = []
            for r, lab in labels.items():
                computed = [p for p, _ in blocks if p not in r]
                cases.append((lab, Call(graph_of(lab), call.inputs + tuple(st[p] for p in r),
                                        call.outputs + tuple(st[p] for p in computed), call.device)))
            return Select(Table(tuple(labels[r] for r in reused_at), "full"), tuple(cases))
        new = program.expand(gname, variants, node, by=self.name,
                             state=[StateBuffer(r[6:]) for r in st.values()])
        table = tuple(labels[r] for r in reused_at)
        return new, table, tuple((lab, r) for r, lab in labels.items() if r)
