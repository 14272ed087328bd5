"""Reuse each routed expert's output across steps and refresh, per batch row,
the experts whose own inputs drifted most (MoECa, "branch-level feature reuse
across timesteps" for DiT-MoE: expert-aware refresh, attention and MoE caches
updated together).

Recognizes mixture-of-experts layers written with stacked expert weights (the
form DiT-MoE, grouped-GEMM MoEs and the `dit_moe_mnist` workload use):
    y_e = act(x @ W1[e] + b1[e]) @ W2[e] + b2[e]     for all e, as batched matmuls
then combined by the router's top-k gates; W1 and W2 may be parameters or computed
from parameters alone (expert_quant's codes dequantized in the graph), so it caches
a model whose experts were quantized first.

Before:  per MoE layer: every expert on every token; attention every step
After:   `full` steps: as before, and store per layer state.experts = y [E, T, d]
         (every expert's output per token) and each attention output state.attn
         (with refresh > 0 also state.prev = x and state.drift = 0)
         `reuse` steps: attention output read from state.attn (not computed);
         the router, the shared branches and the adaLN modulation run fresh, and
         the layer combines the cached expert outputs with the current gates.
         With refresh = k > 0, per batch row b and expert e the drift accumulates
             drift[b, e] += sum_{t routed to e} |x_t - prev_t| / sum_{t routed to e} |prev_t|
         and the k experts with the largest drift are recomputed for that row's
         tokens (gathered weights, [B, k, N, d]) and written into state.experts;
         their drift resets. That choice is made in the graph, per row, so no two
         rows (or CFG halves) share a decision or a cache entry.
Routing `frozen` (the default where the experts are not dense stacks, e.g. after moe_dispatch's
capacity slots; any MoE whose router top-k values weigh outputs computed from its indices):
`full` steps store each layer's top-k indices [T, k] and the routed outputs the gates multiply
([T, k, d]); `reuse` steps take the gates from their own router probabilities at those cached
indices (renormalized as the graph renormalizes top-k's values) and weigh the cached outputs,
so neither the experts nor their dispatch run, and the cache holds k outputs per token, not E.
It needs refresh 0 (there is no cached output of an expert a token did not choose).
Which steps are `full`: a static table (a full step every `interval` steps, as
FORA), or, with `threshold` / `target`, the adaptive rule of residual_cache on a
`probe` graph whose signal is the first attention's timestep-modulated input
(TeaCache's signal, `front: 0`, costs only the embeddings) or the first `front`
blocks' residual (FirstBlockCache; those blocks then run every step).

Every graph the Plan calls is cached (after expert_quant, the quantized graph;
after timestep_quant, every bucket: numeric variants share the caches).

Reads: nothing required. Writes: CachePlan; per graph G, graphs `G.full`,
`G.reuse` (and `G.probe`) and a table Select (or the probe + rule Select) in
place of each call of G. Invariant: interval 1 (static) or threshold 0 (adaptive)
is a no-op; refresh = E with attention off recomputes every expert (equal to
the uncached model up to float rounding).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from pared.analysis.redundancy import RedundancyProfile, block_regions, primary_io
from pared.ir import meta
from pared.ir.errors import OptionError, PassError
from pared.ir.plan import Call, Node, Rule, Select, Seq, StateBuffer, Table
from pared.ir.program import Graph, Program
from pared.ir.regions import Region, region_of
from pared.ir.rewrite import eliminate_dead_code, examples_of, splice
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, RewritePass, check_range, register_pass
from pared.passes.cache.common import (CachePlan, Span, cache_record, check_goal, first_blocks_probe, graph_flops,
                                       graphs_to_cache, refreshes, replace_with_input, search_threshold, with_outputs,
                                       with_search)
from pared.passes.cache.interval_cache import calls_of

_aten = torch.ops.aten
_VIEWS = {_aten.view.default, _aten.expand.default, _aten.reshape.default, _aten._unsafe_view.default,
          _aten.unsqueeze.default, _aten.clone.default, _aten.contiguous.default}


@dataclass(frozen=True)
class ExpertStack:
    """One MoE layer's stacked-expert computation, by node name."""
    region: str          # the MoE module's region
    tokens: str          # x [T, d]: the tokens every expert reads
    w1: str              # get_attr [E, d, h]
    b1: str | None       # get_attr [E, 1, h]
    act: tuple[str, ...]  # elementwise ops between the two matmuls
    w2: str              # get_attr [E, h, d]
    b2: str | None       # get_attr [E, 1, d]
    output: str          # y [E, T, d]: every expert's output per token
    indices: str         # the router's top-k expert indices [T, k]


def _base(n: fx.Node) -> fx.Node:
    while n.op == "call_function" and n.target in _VIEWS:
        n = n.args[0]
    return n


def _tokens(n: fx.Node) -> fx.Node:
    """The [T, d] value a batched matmul's left operand broadcasts over the experts."""
    while len(_shape(n)) != 2 and n.op == "call_function" and n.target in _VIEWS:
        n = n.args[0]
    return n


def _shape(n: fx.Node) -> tuple:
    v = n.meta.get("val")
    return tuple(v.shape) if isinstance(v, torch.Tensor) else ()


def _single_user(n: fx.Node) -> fx.Node | None:
    return next(iter(n.users)) if len(n.users) == 1 else None


def _param3(n: fx.Node) -> bool:
    return n.op == "get_attr" and len(_shape(n)) == 3


def _bias_of(add: fx.Node, h: fx.Node) -> fx.Node | None:
    """The [E, 1, *] parameter `add` adds to `h`, if it is such an add."""
    if add.op != "call_function" or add.target is not _aten.add.Tensor or len(add.args) != 2:
        return None
    other = add.args[1] if add.args[0] is h else add.args[0]
    return other if isinstance(other, fx.Node) and _param3(other) else None


def _constant_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """The nodes computed from parameters alone (no graph input upstream)."""
    const: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op == "get_attr" or (n.op == "call_function" and n.all_input_nodes
                                  and all(a in const for a in n.all_input_nodes)):
            const.add(n)
    return const


def find_expert_stacks(gm: fx.GraphModule, computed: bool = False) -> list[ExpertStack]:
    """Every `bmm(x, W1) (+b1) -> act -> bmm(., W2) (+b2)` chain over stacked
    [E, ., .] parameters, with the top-k routing of the same region. With `computed`,
    W1 and W2 may also be computed from parameters alone (expert_quant's codes,
    dequantized in the graph), so a cache pass finds the layers of a quantized model."""
    weightlike = _param3
    if computed:
        const = _constant_nodes(gm)
        weightlike = lambda n: len(_shape(n)) == 3 and n in const   # noqa: E731
    stacks = []
    for n in gm.graph.nodes:
        if n.op != "call_function" or n.target is not _aten.bmm.default:
            continue
        w1, x = _base(n.args[1]), _tokens(n.args[0])
        if not weightlike(w1) or len(_shape(x)) != 2 or weightlike(x):
            continue
        e = _shape(w1)[0]
        # walk forward: views, + b1, activation ops, views, bmm with W2, views, + b2
        cur, b1, act, w2, b2 = n, None, [], None, None
        while True:
            nxt = _single_user(cur)
            if nxt is None or nxt.op != "call_function":
                break
            if nxt.target in _VIEWS:
                cur = nxt
                continue
            if w2 is None and nxt.target is _aten.bmm.default and weightlike(_base(nxt.args[1])):
                w2 = _base(nxt.args[1])
                cur = nxt
                continue
            bias = _bias_of(nxt, cur)
            if bias is not None and _shape(bias)[0] == e:
                if w2 is None and b1 is None and not act:
                    b1 = bias
                elif w2 is not None and b2 is None:
                    b2 = bias
                else:
                    break
                cur = nxt
                continue
            if w2 is None and len([a for a in nxt.args if isinstance(a, fx.Node)]) == 1:
                act.append(nxt)          # elementwise activation (gelu, silu, relu...)
                cur = nxt
                continue
            break
        if w2 is None:
            continue
        out = cur
        while _shape(out)[:1] != (e,) or len(_shape(out)) != 3:
            out = out.args[0]
        region = region_of(n)
        topk = [m for m in gm.graph.nodes if m.op == "call_function" and m.target is _aten.topk.default
                and region_of(m) == region] if region else []
        if len(topk) != 1:
            raise PassError(f"pass 'expert_cache': the stacked experts at {n.format_node()} (region {region!r}) "
                            f"have {len(topk)} top-k routing ops in their region; expected one (the router's)")
        idx = [u for u in topk[0].users if u.target is operator.getitem and u.args[1] == 1]
        if not idx:
            raise PassError(f"pass 'expert_cache': the router's top-k in region {region!r} returns no indices")
        stacks.append(ExpertStack(region, x.name, w1.name, b1.name if b1 else None, tuple(a.name for a in act),
                                  w2.name, b2.name if b2 else None, out.name, idx[0].name))
    return stacks


@dataclass(frozen=True)
class RoutedCombine:
    """Where one MoE layer weighs its routed experts' outputs by the router's gates, by node name
    (any dispatch: dense stacked experts picked per token, or moe_dispatch's capacity slots)."""
    region: str          # the MoE module's region
    probs: str           # the router's probabilities [T, E] (top-k's input)
    values: str          # top-k's values (the gates before renormalization) [T, k]
    indices: str         # top-k's indices [T, k]
    picked: str          # the routed experts' outputs, one per (token, choice), as the gates multiply them
    experts: int         # E


def find_routed_combines(gm: fx.GraphModule) -> list[RoutedCombine]:
    """Every router top-k (over the last dim) whose values weigh, in a multiply of its region, a
    tensor computed from its indices: that tensor is the routed experts' outputs per (token,
    choice), whatever computed them."""
    found = []
    for topk in gm.graph.nodes:
        if topk.op != "call_function" or topk.target is not _aten.topk.default:
            continue
        dim = topk.args[2] if len(topk.args) > 2 else topk.kwargs.get("dim", -1)
        probs = topk.args[0]
        rank = len(_shape(probs))
        if dim not in (-1, rank - 1) or rank != 2:
            continue
        gets = {u.args[1]: u for u in topk.users if u.target is operator.getitem}
        if 0 not in gets or 1 not in gets:
            continue
        reach = {}
        for which in (0, 1):
            seen, todo = set(), [gets[which]]
            while todo:
                n = todo.pop()
                if n not in seen:
                    seen.add(n)
                    todo += list(n.users)
            reach[which] = seen
        region = region_of(topk)
        for m in gm.graph.nodes:
            if m.op != "call_function" or m.target is not _aten.mul.Tensor or region_of(m) != region:
                continue
            a, b = (x for x in (m.args + (None, None))[:2])
            if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
                continue
            for gate, picked in ((a, b), (b, a)):
                if gate in reach[0] and gate not in reach[1] and picked in reach[1]:
                    found.append(RoutedCombine(region, probs.name, gets[0].name, gets[1].name, picked.name,
                                               int(_shape(probs)[-1])))
                    break
            else:
                continue
            break
    return found


def _attention_regions(program: Program, gname: str, pattern: str | None) -> list[Region]:
    """Each block's attention sub-module (module type ending in 'Attention'), or the regions matching `pattern`."""
    if pattern:
        return block_regions(program, pattern, gname)
    blocks = block_regions(program, None, gname)
    regions = program.regions(gname)
    found = []
    for b in blocks:
        kids = [r for p, r in regions.items() if p.startswith(b.path + ".") and p.count(".") == b.path.count(".") + 1
                and r.module_type.endswith("Attention")]
        found += kids
    return found


@register_pass("expert_cache")
class CacheExperts(RewritePass):
    """MoECa-style expert-level caching (see module docstring)."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        interval: int = 4            # static schedule: a full step every N steps (1: never reuse)
        threshold: float | None = None  # adaptive schedule instead: reuse while the first blocks' residual
                                     # changed less than this (accumulated relative L1), as residual_cache
        target: dict | None = None   # adaptive, with the threshold searched for {psnr_db: X} or {speedup: X}
        #                              (both: a Pareto search, the search's trials and seed)
        front: int = 0               # adaptive: blocks that always run and give the signal (their residual);
                                     # 0: the signal is the first attention's modulated input (TeaCache)
        max_consecutive: int = 0     # adaptive: cap on reuses in a row (0: none)
        warmup: int = 2              # the first steps always compute in full
        refresh: int | None = None   # experts recomputed per batch row and layer on a reuse step
        #                              (default 1 with routing current, 0 with frozen: it needs current)
        routing: str | None = None   # reuse steps combine cached expert outputs by: "current" (the step's own
        #                              top-k over every expert's cached output: dense experts), "frozen" (each
        #                              token's experts of the last full step, weighed by the step's own router
        #                              probabilities; any dispatch, moe_dispatch's included); default: current
        #                              where dense stacked experts are found, else frozen
        attention: bool = True       # also reuse each block's attention output on reuse steps
        attention_regions: str | None = None  # pattern of the attention regions; default: each block's *Attention
        steps: int | None = None     # static schedule: steps per request; default: the calibration run's

        def __post_init__(self):
            check_range("expert_cache", "interval", self.interval, lo=1)
            check_range("expert_cache", "warmup", self.warmup, lo=1)
            if self.refresh is not None:
                check_range("expert_cache", "refresh", self.refresh, lo=0)
            if self.routing not in (None, "current", "frozen"):
                raise OptionError(f"pass 'expert_cache': option 'routing' must be 'current' or 'frozen', "
                                  f"got {self.routing!r}")
            if self.routing == "frozen" and self.refresh:
                raise OptionError("pass 'expert_cache': option 'refresh' recomputes experts whose inputs drifted, "
                                  "over every expert's cached output; routing 'frozen' caches only the chosen "
                                  "experts' outputs: set refresh: 0, or routing: current")
            check_range("expert_cache", "front", self.front, lo=0)
            check_range("expert_cache", "max_consecutive", self.max_consecutive, lo=0)
            if self.threshold is not None:
                check_range("expert_cache", "threshold", self.threshold, lo=0)
            check_goal("expert_cache", self.target)
            if self.steps is not None:
                check_range("expert_cache", "steps", self.steps, lo=1)

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        names = graphs_to_cache(program, self.name)
        adaptive = o.threshold is not None or o.target is not None
        table: tuple[str, ...] = ()
        if not adaptive:
            steps = calls_of(ctx, o.steps, self.name, program)
            table = tuple("full" if refreshes(i, o.interval, o.warmup) else "reuse" for i in range(steps))
            if "reuse" not in table:
                return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"reuse_steps": 0})
        elif o.target is None and o.threshold == 0:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"reuse_steps": 0})
        if not names:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"reuse_steps": 0})

        def build(th: float | None, table: tuple[str, ...]) -> tuple[Program, dict]:
            new = program
            for gname in names:
                new, stats = self._build(new, program, gname, th, table)
            return new, {**stats, "graphs": len(names)}
        if o.target is not None:
            th, points, front = search_threshold(self.name, lambda th: build(th, ())[0], program,
                                                 ctx.calibration, o.target, 1e-3, 2.0, progress=ctx.progress,
                                                 trials=ctx.trials)
            new, stats = build(th, ())
            new = with_search(new, points, front)
        else:
            new, stats = build(o.threshold, table)
        ctx.log.info("expert_cache: %d MoE layers (%d experts, routing %s, refresh %d per row), %d attention "
                     "caches, %s", stats["moe_layers"], stats["experts"], stats["routing"], stats["refresh"],
                     stats["attention_caches"],
                     f"{table.count('reuse')} of {len(table)} steps reuse" if table
                     else f"adaptive, threshold {new.records['CachePlan'].threshold:g}")
        return PassResult(new, modified=True, preserved=(RedundancyProfile,), stats=stats)

    def _build(self, new: Program, program: Program, gname: str, threshold: float | None,
               table: tuple[str, ...]) -> tuple[Program, dict]:
        """`new` with graph `gname` (of `program`) cached: a static `table` (threshold None) or the adaptive rule."""
        o = self.options
        src = program.graphs[gname]
        if any(src.dynamic_dims):
            raise PassError("pass 'expert_cache' needs a graph captured with static shapes (it splits the "
                            "tokens per batch row); capture without dynamic_shapes")
        stacks = find_expert_stacks(src.module, computed=True)
        routing = o.routing or ("current" if stacks else "frozen")
        refresh = o.refresh if o.refresh is not None else (1 if routing == "current" else 0)
        if routing == "current" and not stacks:
            raise PassError("pass 'expert_cache' found no mixture-of-experts layer with stacked expert weights "
                            "(bmm(x, W1[E,d,h]) -> act -> bmm(., W2[E,h,d]) over [E, ...] parameters, routed by "
                            "top-k); this model has none, or writes its experts in another form "
                            "(routing: frozen caches any top-k-weighed experts)")
        if routing == "frozen":
            stacks = find_routed_combines(src.module)
            if not stacks:
                raise PassError("pass 'expert_cache' found no mixture-of-experts layer: no router top-k whose "
                                "values weigh (multiply) outputs computed from its indices")
            if refresh:
                raise OptionError("pass 'expert_cache' option 'refresh' needs routing: current (dense stacked "
                                  "experts); this graph's experts are "
                                  + ("dispatched (moe_dispatch): set refresh: 0" if o.routing is None
                                     else "cached with routing: frozen: set refresh: 0"))
            e = stacks[0].experts
        else:
            e = _shape(_node(src.module, stacks[0].w1))[0]
        if refresh > e:
            raise OptionError(f"pass 'expert_cache' option 'refresh': {refresh} is more than the {e} experts "
                              "of a layer")
        attn = _attention_regions(program, gname, o.attention_regions) if o.attention else []
        probe = hidden = None
        if threshold is not None and o.front == 0:
            # TeaCache's signal: the timestep-modulated input of the first block's attention;
            # computing it costs the embeddings only, and every block stays cacheable
            first = _attention_regions(program, gname, o.attention_regions)
            io = primary_io(src.module, first[0]) if first else None
            if io is None:
                raise PassError("pass 'expert_cache' option 'front': 0 takes its signal from the first attention's "
                                "input, and this model has no attention region with one; set front: 1")
            probe = with_outputs(src, [("signal", io[0].name)], self.name)
        elif threshold is not None:
            # the first `front` blocks run every step (the probe); only the blocks after them are cached
            blocks = block_regions(program, None, gname)
            if o.front >= len(blocks):
                raise OptionError(f"pass 'expert_cache' option 'front': {o.front} blocks leave none of the "
                                  f"model's {len(blocks)} blocks to cache")
            front = [b.path + "." for b in blocks[:o.front]]
            stacks = [s for s in stacks if not any(s.region.startswith(f) for f in front)]
            attn = [r for r in attn if not any(r.path.startswith(f) for f in front)]
            if not stacks:
                raise PassError(f"pass 'expert_cache': no MoE layer follows the {o.front} probe block(s)")
            probe, hidden = first_blocks_probe(src, blocks, o.front, self.name)
        attn_io = []
        for r in attn:
            io = primary_io(src.module, r)
            if io is None:
                raise PassError(f"pass 'expert_cache': attention region {r.path!r} has no output shaped like its "
                                "input; name the attention modules with `attention_regions` or set attention: false")
            attn_io.append((r.path, io[1].name))
        if routing == "frozen":
            full, reuse = _frozen_variants(src, stacks, attn_io, self.name)
        else:
            full, reuse = self._variants(src, stacks, attn_io, refresh)
        k = len(stacks)
        origin = f"{self.name}.{program.origin(gname)}"
        state = [f"{origin}.{kind}{i}" for kind in _moe_state(refresh, routing) for i in range(k)] + \
            [f"{origin}.attn{i}" for i in range(len(attn_io))]
        st = tuple(f"state:{x}" for x in state)
        updated = st[:3 * k] if refresh else ()      # without refresh, reuse steps only read the caches
        variants = {"full": full, "reuse": reuse}
        if probe is not None:
            h: tuple[str, ...] = ()
            if hidden is not None:
                with torch.no_grad():
                    hid = probe.run(*probe.example_inputs)[1].detach().clone()
                full = replace_with_input(full, hidden, "hidden", hid, self.name)
                reuse = replace_with_input(reuse, hidden, "hidden", hid, self.name)
                h = (f"{origin}.hidden",)
            variants = {"probe": probe, "full": full, "reuse": reuse}
            rule = Rule(signal=f"{origin}.signal", compute="full", reuse="reuse", threshold=threshold,
                        metric="rel_l1", accumulate=True, warmup=o.warmup, max_consecutive=o.max_consecutive)

            def node(c: Call, graph_of) -> Node:
                return Seq((Call(graph_of("probe"), c.inputs, (f"{origin}.signal",) + h, c.device), Select(rule, (
                    ("full", Call(graph_of("full"), c.inputs + h, c.outputs + st, c.device)),
                    ("reuse", Call(graph_of("reuse"), c.inputs + st + h, c.outputs + updated, c.device))), origin)))
        else:
            def node(c: Call, graph_of) -> Node:
                return Select(Table(table, "full"), (
                    ("full", Call(graph_of("full"), c.inputs, c.outputs + st, c.device)),
                    ("reuse", Call(graph_of("reuse"), c.inputs + st, c.outputs + updated, c.device))))
        new = new.expand(gname, variants, node, by=self.name, state=[StateBuffer(x) for x in state])
        flops = tuple((f"{gname}.{v}", graph_flops(g)) for v, g in variants.items())
        spans = tuple(Span(f"experts{i}", (s.region,), "", s.picked) if routing == "frozen"
                      else Span(f"experts{i}", (s.region,), s.tokens, s.output) for i, s in enumerate(stacks)) + \
            tuple(Span(f"attn{i}", (p,), "", out) for i, (p, out) in enumerate(attn_io))
        rec = CachePlan("expert_cache", spans, (("reuse", tuple(sp.name for sp in spans)),), table, "full", flops,
                        threshold=threshold, graphs=(gname,))
        new = new.replace(records=cache_record(new, rec))
        stats = {"moe_layers": k, "attention_caches": len(attn_io), "experts": e, "refresh": refresh,
                 "routing": routing}
        if table:
            stats.update(reuse_steps=table.count("reuse"), steps=len(table))
        return new, stats

    def _variants(self, src: Graph, stacks: list[ExpertStack], attn_io: list[tuple[str, str]],
                  refresh: int) -> tuple[Graph, Graph]:
        batch = int(src.example_inputs[0].shape[0])
        by = self.name
        # -- full: the graph plus every cache as an output
        gm = src.copy_module()
        nodes = {n.name: n for n in gm.graph.nodes}
        zeros: list[fx.Node] = []
        for s in stacks:
            e, t, _ = _shape(nodes[s.output])
            if t % batch:
                raise PassError(f"pass 'expert_cache': layer {s.region!r} has {t} tokens, not a multiple of the "
                                f"batch {batch}")
            if not refresh:
                continue
            # the drift accumulator starts at zero on every full step
            zeros += splice(gm, _zeros_like_rows(batch, e), [nodes[s.tokens]],
                            examples_of([nodes[s.tokens]]), by)
        experts = [nodes[s.output] for s in stacks]
        if refresh:
            experts += [nodes[s.tokens] for s in stacks] + zeros
        outs_node = next(n for n in gm.graph.nodes if n.op == "output")
        outs = list(outs_node.args[0])
        outs_node.args = (tuple(outs + experts + [nodes[o] for _, o in attn_io]),)
        gm.graph.lint()
        gm.recompile()
        state_names = ([f"cache.{kind}{i}" for kind in _moe_state(refresh) for i in range(len(stacks))]
                       + [f"cache.attn{i}" for i in range(len(attn_io))])
        full = src.with_module(gm, output_names=src.output_names + tuple(state_names))
        with torch.no_grad():
            vals = full.run(*full.example_inputs)[len(src.output_names):]
        examples = [v.detach().clone() for v in vals]

        # -- reuse: caches in, attention read from them, experts refreshed per row
        gm = src.copy_module()
        nodes = {n.name: n for n in gm.graph.nodes}
        phs = _state_inputs(gm, state_names, examples, by)
        k = len(stacks)
        new_state = []
        for i, s in enumerate(stacks):
            if not refresh:
                nodes[s.output].replace_all_uses_with(phs[i])
                continue
            fn = _refresh_fn(nodes, s, batch, refresh)
            args = [nodes[s.tokens], nodes[s.indices], phs[i], phs[k + i], phs[2 * k + i],
                    nodes[s.w1], nodes[s.w2]] + [nodes[p] for p in (s.b1, s.b2) if p]
            y, x_now, drift = splice(gm, fn, args, examples_of(args), by)
            nodes[s.output].replace_all_uses_with(y)
            new_state.append((y, x_now, drift))
        for j, (_, out) in enumerate(attn_io):
            nodes[out].replace_all_uses_with(phs[len(_moe_state(refresh)) * k + j])
        outs_node = next(n for n in gm.graph.nodes if n.op == "output")
        outs = list(outs_node.args[0])
        outs_node.args = (tuple(outs + [y for y, _, _ in new_state] + [x for _, x, _ in new_state]
                                + [dr for _, _, dr in new_state]),)
        eliminate_dead_code(gm)
        gm.graph.lint()
        gm.recompile()
        reuse = src.with_module(gm, input_names=src.input_names + tuple(state_names),
                                output_names=src.output_names + tuple(n.replace("cache.", "next.")
                                                                      for n in state_names[:len(new_state) * 3]),
                                example_inputs=tuple(src.example_inputs) + tuple(examples),
                                dynamic_dims=())
        return full, reuse


def _moe_state(refresh: int, routing: str = "current") -> tuple[str, ...]:
    """The cache kinds per MoE layer: every expert's output, and when experts are
    refreshed, the previous step's tokens and the per-row drift that rank them; with
    frozen routing, each token's chosen experts and their outputs."""
    if routing == "frozen":
        return ("idx", "picked")
    return ("experts", "prev", "drift") if refresh else ("experts",)


def _state_inputs(gm: fx.GraphModule, names: list[str], examples: list[torch.Tensor], by: str) -> list[fx.Node]:
    """One placeholder per cache (`names`, dots made underscores) after the graph's inputs."""
    last_ph = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    phs = []
    for name, ex in zip(names, examples):
        with gm.graph.inserting_after(last_ph):
            ph = gm.graph.placeholder(name.replace(".", "_"))
        ph.meta["val"] = ex
        ph.meta[meta.CREATED_BY] = by
        phs.append(ph)
        last_ph = ph
    return phs


def _frozen_variants(src: Graph, layers: list[RoutedCombine], attn_io: list[tuple[str, str]],
                     by: str) -> tuple[Graph, Graph]:
    """full: the graph, also returning each layer's top-k indices and routed outputs (and the
    attention outputs); reuse: those read from the caches, the gates taken from the step's own
    router probabilities at the cached indices (renormalized as the graph renormalizes top-k's
    values), so the experts and their dispatch are dead code."""
    gm = src.copy_module()
    nodes = {n.name: n for n in gm.graph.nodes}
    caches = [nodes[c.indices] for c in layers] + [nodes[c.picked] for c in layers] + [nodes[o] for _, o in attn_io]
    outs_node = next(n for n in gm.graph.nodes if n.op == "output")
    outs_node.args = (tuple(outs_node.args[0]) + tuple(caches),)
    gm.graph.lint()
    gm.recompile()
    names = ([f"cache.idx{i}" for i in range(len(layers))] + [f"cache.picked{i}" for i in range(len(layers))]
             + [f"cache.attn{i}" for i in range(len(attn_io))])
    full = src.with_module(gm, output_names=src.output_names + tuple(names))
    with torch.no_grad():
        examples = [v.detach().clone() for v in full.run(*full.example_inputs)[len(src.output_names):]]

    gm = src.copy_module()
    nodes = {n.name: n for n in gm.graph.nodes}
    phs = _state_inputs(gm, names, examples, by)
    k = len(layers)
    for i, c in enumerate(layers):
        idx, picked = phs[i], phs[k + i]
        (gate,) = splice(gm, lambda probs, ix: probs.gather(-1, ix), [nodes[c.probs], idx],
                         examples_of([nodes[c.probs], idx]), by, region=c.region)
        nodes[c.values].replace_all_uses_with(gate)
        nodes[c.indices].replace_all_uses_with(idx)
        nodes[c.picked].replace_all_uses_with(picked)
    for j, (_, out) in enumerate(attn_io):
        nodes[out].replace_all_uses_with(phs[2 * k + j])
    eliminate_dead_code(gm)
    gm.graph.lint()
    gm.recompile()
    reuse = src.with_module(gm, input_names=src.input_names + tuple(names),
                            example_inputs=tuple(src.example_inputs) + tuple(examples), dynamic_dims=())
    return full, reuse


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)


def _zeros_like_rows(batch: int, experts: int):
    return lambda x: x.new_zeros(batch, experts)


def _refresh_fn(nodes: dict, s: ExpertStack, batch: int, refresh: int):
    """The reuse step of one MoE layer as a torch function (traced into the graph)."""
    acts = [nodes[a] for a in s.act]
    has_b1, has_b2 = s.b1 is not None, s.b2 is not None

    def step(x, idx, cached, prev, drift, w1, w2, *biases):
        bl = list(biases)
        b1 = bl.pop(0) if has_b1 else None
        b2 = bl.pop(0) if has_b2 else None
        e, t, d = cached.shape
        n = t // batch
        # per-row, per-expert drift of the inputs since the last step, over the tokens routed to it
        routed = torch.zeros(t, e, dtype=x.dtype).scatter(1, idx, 1.0).view(batch, n, e)
        change = (x - prev).abs().mean(-1).view(batch, n, 1)
        scale = prev.abs().mean(-1).view(batch, n, 1)
        step_drift = (routed * change).sum(1) / ((routed * scale).sum(1) + 1e-8)      # [B, E]
        drift = drift + step_drift
        sel = drift.topk(refresh, dim=-1).indices                                     # [B, k]
        flat = sel.reshape(-1)
        g1 = w1.index_select(0, flat).view(batch, refresh, *w1.shape[1:])             # [B, k, d, h]
        g2 = w2.index_select(0, flat).view(batch, refresh, *w2.shape[1:])             # [B, k, h, d]
        h = torch.matmul(x.view(batch, 1, n, d), g1)                                  # [B, k, N, h]
        if b1 is not None:
            h = h + b1.index_select(0, flat).view(batch, refresh, 1, -1)
        for a in acts:
            h = a.target(h, *a.args[1:], **a.kwargs)
        y = torch.matmul(h, g2)                                                       # [B, k, N, d]
        if b2 is not None:
            y = y + b2.index_select(0, flat).view(batch, refresh, 1, -1)
        tok = torch.arange(t).view(batch, 1, n)
        cached = cached.index_put((sel.view(batch, refresh, 1), tok), y)
        drift = drift.scatter(1, sel, 0.0)
        return cached, x, drift
    return step
