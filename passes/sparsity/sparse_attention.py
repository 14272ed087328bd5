"""Entropy-guided attention sparsity: heads whose attention is local (low entropy) attend to a
window of neighbouring tokens, or to their top-k keys; the rest stay dense (ToProVAR's layer /
head dimension, "ToProVAR: Efficient Visual Autoregressive Modeling via Tri-Dimensional
Entropy-Aware Semantic Analysis and Sparsity Optimization", on the models pared has).

Which heads: the AttentionEntropyProfile (analysis/attention_entropy.py, computed on demand on
the calibration run) gives each head its normalized entropy H / log(keys). A head is local when
it is below option `max_normalized` (default: the profile's own 'local' class), or when option
`heads` names it ({layer pattern: [head, ...]}), or, with option `target` (a goal on the
calibration run, {agreement: 0.99}), the most heads that still meet it, lowest entropy first (a
binary search over how many; assumed monotone: more local heads never measure better).

Before (one attention site, heads h = 0..H-1, queries = keys = N tokens):
    P_h = softmax(scale · q_h k_hᵀ + bias),  out_h = P_h v_h                   [B, N, N] per head
After, mode `window` (block-local attention, the work shrinks):
    the grid tokens [start, end) of a gh × gw grid are cut into non-overlapping wh × ww windows
    (Swin's partition: views and a permute, no gather); for a local head each grid query
    attends the keys of its own window plus the tokens outside the grid (a [CLS], text,
    a readout: "global" tokens), and each global query still attends every key:
        out_h[i] = softmax(scale · q_h[i] · k_h[W(i) ∪ G]ᵀ + bias) v_h[W(i) ∪ G]
    The local heads' score and value matmuls cost nW · w · (w + |G|) instead of N², as
    [B · heads · windows, w, w] batched matmuls. Dense heads compute what they did.
After, mode `topk` (masks-only): a local head keeps the k largest scores of each query row
    and masks the others to -inf before the softmax. The dense score matmul still runs, so the
    graph does not shrink here; the record says so ("masks-only") beside the FLOPs a kernel
    that gathers the k kept keys would spend on the value side.

Finding the site (no model code is changed): each profiled softmax over the last axis whose
input comes from a batched matmul q @ kᵀ (through views, multiplications by a number and the
addition of a bias) and whose result feeds a batched matmul with v, [B·H, N, d] each, as
torch.export decomposes attention (and SDPA's math form). A bias that folds to zero (ViT's
all-true mask) is dropped; one over the keys only ([B, 1, 1, N], text padding) is windowed with
the keys; any other bias is refused in window mode, naming its node. Lowering: views, permutes,
slices, cat, bmm and softmax (topk: topk and masked_fill): no custom op.

Reads: AttentionEntropyProfile (not when `heads` names every local head), calibration (with
`target`). Writes: an AttentionSparsityDecisions record (per site: its local heads and their
normalized entropy, the keys a local query sees, the site's attention FLOPs before and after;
the graph FLOPs before and after; the goal and its trials), `pared.ir.created_by` and
`pared.ir.region` on every inserted node. Invariant: each graph computes what the eager model
computes with an additive -inf mask outside each local head's window (or top-k) up to float
rounding (pared.testing.sparse_attention_bias); no local head leaves the program unchanged; a
site rewritten already is left alone.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from pared.analysis.attention_entropy import AttentionEntropyProfile, fed_matmul
from pared.analysis.cost import graph_flops
from pared.analysis.metrics import compare_outputs
from pared.analysis.recorder import replay
from pared.ir import meta
from pared.ir.errors import OptionError, PassError
from pared.ir.goal import Goal
from pared.ir.program import Program
from pared.ir.regions import match, region_of
from pared.ir.rewrite import eliminate_dead_code, splice
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, Record, RewritePass, check_range, register_pass
from pared.passes.sparsity.layer_skip import TARGET_METRICS
from pared.passes.sparsity.tokens import SOFTMAX, constant_value, graph_names, packet, val_shape

_NAME = "sparse_attention"
MODES = ("window", "topk")
_SHAPE_ONLY = {"view", "_unsafe_view", "reshape", "clone", "contiguous", "alias"}


@dataclass(frozen=True)
class SiteSparsity:
    """One attention site's decision."""
    graph: str
    layer: str                          # region path of the attention
    node: str                           # its softmax, as the profile names it
    heads: int
    local: tuple[int, ...]              # the heads made local
    normalized: tuple[float, ...]       # [head] normalized entropy from the profile (() with explicit heads)
    keys: int                           # keys a dense query sees
    local_keys: int                     # keys a local grid query sees (window + global tokens, or k)
    attention_flops: int                # the site's score and value matmuls, dense, one call
    attention_flops_after: int          # the same after (topk: what a kernel gathering k keys would spend)


@dataclass(frozen=True)
class AttentionSparsityDecisions(Record):
    mode: str
    lowering: str                       # "block-local" (window: the graph does less work) | "masks-only" (topk)
    grid: tuple[int, int] | None
    window: tuple[int, int] | None
    tokens: tuple[int, int] | None      # the grid tokens [start, end)
    k: int | None
    sites: tuple[SiteSparsity, ...]
    graph_flops: tuple[tuple[str, int, int], ...]       # (graph, before, after) from analysis.cost
    target: tuple[tuple[str, float], ...] = ()
    trials: tuple[tuple[int, tuple[tuple[str, float], ...]], ...] = ()   # (local heads, measured metrics)

    @property
    def local_heads(self) -> int:
        return sum(len(s.local) for s in self.sites)

    @property
    def attention_flops_ratio(self) -> float:
        before = sum(s.attention_flops for s in self.sites)
        return sum(s.attention_flops_after for s in self.sites) / before if before else 1.0


def _pair(v: Any, what: str, lo: int = 1) -> tuple[int, int] | None:
    if v is None:
        return None
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and
            all(isinstance(i, int) and not isinstance(i, bool) and i >= lo for i in v)):
        raise OptionError(f"pass '{_NAME}': option '{what}' takes two integers >= {lo}, got {v!r}")
    return int(v[0]), int(v[1])


@register_pass(_NAME)
class SparseAttention(RewritePass):
    """Local heads attend to a window (or their top-k keys); the rest stay dense (see module docstring)."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        mode: str = "window"                # window (block-local, the work shrinks) | topk (masks-only)
        max_normalized: float | None = None  # local: normalized entropy below this (None: the profile's class)
        heads: Any = None                   # instead: {layer pattern: [head, ...]} made local, no profile read
        target: Any = None                  # instead: a goal on the calibration run; the most local heads
                                            # (lowest entropy first) that still meet it
        grid: tuple[int, int] | None = None     # the token grid [rows, cols]; None: a square token count,
                                                # or a square after one leading token ([CLS])
        tokens: tuple[int, int] | None = None   # the grid tokens [start, end); None: as grid is inferred
        window: tuple[int, int] | None = None   # window [rows, cols] dividing the grid; None: half each side
        k: int = 8                          # topk: keys kept per query row
        layers: tuple[str, ...] = ("**",)   # region patterns of the attention sites considered
        graphs: tuple[str, ...] = ()        # graph name patterns (default: every graph the plan calls)

        def __post_init__(self):
            if self.mode not in MODES:
                raise OptionError(f"pass '{_NAME}': option 'mode' must be one of {list(MODES)}, got {self.mode!r}")
            given = [f for f in ("max_normalized", "heads", "target") if getattr(self, f) is not None]
            if len(given) > 1:
                raise OptionError(f"pass '{_NAME}': give at most one of options 'max_normalized', 'heads' and "
                                  f"'target'; got {' and '.join(given)}")
            if self.max_normalized is not None:
                check_range(_NAME, "max_normalized", self.max_normalized, lo=0.0, hi=1.0)
            if self.heads is not None:
                if not isinstance(self.heads, dict) or not all(
                        isinstance(k, str) and isinstance(v, (list, tuple)) and
                        all(isinstance(h, int) and not isinstance(h, bool) and h >= 0 for h in v)
                        for k, v in self.heads.items()):
                    raise OptionError(f"pass '{_NAME}': option 'heads' takes {{layer pattern: [head, ...]}}, "
                                      f"got {self.heads!r}")
                object.__setattr__(self, "heads", tuple((k, tuple(sorted(set(v)))) for k, v in self.heads.items()))
            object.__setattr__(self, "target", Goal.parse(self.target, f"pass '{_NAME}': option 'target'",
                                                          TARGET_METRICS))
            object.__setattr__(self, "grid", _pair(self.grid, "grid"))
            object.__setattr__(self, "window", _pair(self.window, "window"))
            if self.tokens is not None:
                t = _pair(self.tokens, "tokens", lo=0)
                if t[0] >= t[1]:
                    raise OptionError(f"pass '{_NAME}': option 'tokens' takes a range [start, end) with "
                                      f"start < end, got {self.tokens!r}")
                object.__setattr__(self, "tokens", t)
                if self.grid is None:
                    raise OptionError(f"pass '{_NAME}': option 'tokens' needs option 'grid' (its rows and cols)")
            if self.grid is not None and self.tokens is not None and \
                    self.grid[0] * self.grid[1] != self.tokens[1] - self.tokens[0]:
                raise OptionError(f"pass '{_NAME}': option 'grid' {list(self.grid)} has {self.grid[0] * self.grid[1]}"
                                  f" tokens but option 'tokens' {list(self.tokens)} spans "
                                  f"{self.tokens[1] - self.tokens[0]}")
            if self.grid is not None and self.window is not None and \
                    (self.grid[0] % self.window[0] or self.grid[1] % self.window[1]):
                raise OptionError(f"pass '{_NAME}': option 'window' {list(self.window)} does not divide the grid "
                                  f"{list(self.grid)}")
            check_range(_NAME, "k", self.k, lo=1)
            for f in ("layers", "graphs"):
                v = getattr(self, f)
                object.__setattr__(self, f, (v,) if isinstance(v, str) else tuple(v))

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        sites = _candidates(program, ctx, o)
        if o.target is None:
            return _apply(program, ctx, o, {key: s.local for key, s in sites.items()}, sites)
        return _search(program, ctx, o, sites)


# -- which heads ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Candidate:
    graph: str
    layer: str
    node: str
    heads: int
    normalized: tuple[float, ...]
    local: tuple[int, ...]


def _candidates(program: Program, ctx: PassContext, o: Any) -> dict[tuple[str, str], _Candidate]:
    """Every attention site the options consider, keyed (graph, softmax node), with the heads
    the options make local (all of its heads ranked, for a target)."""
    names = graph_names(program, o.graphs, _NAME)
    out: dict[tuple[str, str], _Candidate] = {}
    if o.heads is not None:
        used = set()
        for name in names:
            gm = program.graphs[name].module
            for sm in _softmaxes(gm):
                layer = region_of(sm)
                if not any(match(p, layer) for p in o.layers):
                    continue
                hs = sorted({h for pat, v in o.heads if match(pat, layer) and used.add(pat) is None for h in v})
                if hs:
                    heads = _heads_of(sm)
                    bad = [h for h in hs if h >= heads]
                    if bad:
                        raise OptionError(f"pass '{_NAME}': option 'heads': {layer} has {heads} heads, no head "
                                          f"{bad[0]}")
                    out[(name, sm.name)] = _Candidate(name, layer, sm.name, heads, (), tuple(hs))
        done = {n.meta.get(meta.REGION, "") for name in names for n in program.graphs[name].module.graph.nodes
                if n.meta.get(meta.CREATED_BY) == _NAME}
        used |= {pat for pat, _ in o.heads if any(match(pat, lay) for lay in done)}     # sparse already
        missing = [pat for pat, _ in o.heads if pat not in used]
        if missing:
            layers = sorted({region_of(sm) for n in names for sm in _softmaxes(program.graphs[n].module)})
            raise OptionError(f"pass '{_NAME}': option 'heads': {missing[0]!r} matches no attention layer; the "
                              f"graphs' attention layers are {layers}")
        return out
    prof: AttentionEntropyProfile = ctx.require(AttentionEntropyProfile, _NAME, program)
    for ge in prof.graphs:
        if ge.graph not in names:
            continue
        for s in ge.sites:
            if not any(match(p, s.layer) for p in o.layers):
                continue
            if o.max_normalized is not None:
                local = tuple(h for h in range(s.heads) if s.head_normalized[h] < o.max_normalized)
            else:
                local = tuple(h for h in range(s.heads) if s.head_kind[h] == "local")
            out[(ge.graph, s.node)] = _Candidate(ge.graph, s.layer, s.node, s.heads, tuple(s.head_normalized), local)
    return out


def _search(program: Program, ctx: PassContext, o: Any, sites: dict) -> PassResult:
    """The most local heads, lowest normalized entropy first, whose sparsity still meets the goal
    on the calibration run (a binary search over their count)."""
    if ctx.calibration is None:
        raise PassError(f"pass '{_NAME}': option 'target' needs a calibration run to measure the goal on")
    ranked = sorted(((c.normalized[h], key, h) for key, c in sites.items() for h in range(c.heads)),
                    key=lambda t: (t[0], t[1], t[2]))
    if not ranked:
        raise OptionError(f"pass '{_NAME}': no attention site to make sparse (option 'layers' {list(o.layers)})")
    ref = replay(program, ctx.calibration)
    trials: dict[int, tuple] = {}

    def chosen(m: int) -> dict:
        sel: dict = {key: [] for key in sites}
        for _, key, h in ranked[:m]:
            sel[key].append(h)
        return {key: tuple(sorted(v)) for key, v in sel.items()}

    def met(m: int) -> bool:
        res = _apply(program, ctx, o, chosen(m), sites, quiet=True)
        measured = compare_outputs(ref, replay(res.program, ctx.calibration))
        trials[m] = tuple((k, round(float(measured[k]), 6)) for k in o.target.metrics)
        ctx.progress(f"{_NAME}: {m} of {len(ranked)} heads local: " + ", ".join(f"{k} {v:.4g}" for k, v in trials[m]))
        return o.target.met(measured)
    lo, hi = 0, len(ranked)                     # 0 local heads meets any goal
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if met(mid):
            lo = mid
        else:
            hi = mid - 1
    if lo == 0:
        ctx.log.info("%s: no local head meets %s on the calibration run: nothing changed", _NAME, o.target.terms)
        return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"local_heads": 0,
                                                                                "trials": len(trials)})
    res = _apply(program, ctx, o, chosen(lo), sites)
    rec = res.program.records["AttentionSparsityDecisions"]
    rec = dataclasses.replace(rec, target=o.target.terms, trials=tuple(sorted(trials.items())))
    return PassResult(res.program.replace(records={**res.program.records, "AttentionSparsityDecisions": rec}),
                      modified=True, stats=dict(res.stats, trials=len(trials)))


# -- the rewrite ---------------------------------------------------------------------------------
def _apply(program: Program, ctx: PassContext, o: Any, local: dict, sites: dict, quiet: bool = False) -> PassResult:
    by_graph: dict[str, list] = {}
    for key, hs in local.items():
        if hs:
            by_graph.setdefault(key[0], []).append((sites[key], hs))
    new_graphs = dict(program.graphs)
    done: list[SiteSparsity] = []
    flops: list[tuple[str, int, int]] = []
    layout = None
    for name, todo in by_graph.items():
        g = program.graphs[name]
        gm = g.copy_module()
        nodes = {n.name: n for n in gm.graph.nodes}
        before = graph_flops(g.module)
        changed = 0
        for cand, hs in todo:
            sm = nodes.get(cand.node)
            if sm is None:
                raise PassError(f"pass '{_NAME}': graph '{name}': the profile's attention {cand.layer} "
                                f"({cand.node}) is not in the graph any more; run attention_entropy again")
            if sm.meta.get(meta.CREATED_BY) == _NAME:
                continue                                        # rewritten already
            att = attention_site(gm, sm, name, cand.layer)
            if o.mode == "window":
                layout = _layout(o, att, name, cand.layer)
                fn, local_keys, after = _window_fn(att, hs, *layout)
            else:
                if o.k >= att.keys:
                    raise OptionError(f"pass '{_NAME}': option 'k' ({o.k}) keeps every one of the {att.keys} keys "
                                      f"of {cand.layer}")
                fn, local_keys, after = _topk_fn(att, hs, o.k)
            args = [att.q, att.kt, att.v] + ([att.bias] if att.bias is not None else [])
            ex = [torch.zeros(val_shape(a), dtype=a.meta["val"].dtype) for a in args]
            (out,) = splice(gm, fn, args, ex, _NAME, cand.layer)
            att.pv.replace_all_uses_with(out)
            changed += 1
            done.append(SiteSparsity(name, cand.layer, cand.node, att.heads, tuple(hs), cand.normalized, att.keys,
                                     local_keys, att.flops, after))
        if changed:
            eliminate_dead_code(gm)
            gm.recompile()
            new_graphs[name] = g.with_module(gm)
            flops.append((name, before, graph_flops(gm)))
    if not done:
        return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"local_heads": 0})
    prior = program.records.get("AttentionSparsityDecisions")
    grid, window, tokens = (layout[0], layout[1], layout[2]) if layout is not None else (None, None, None)
    rec = AttentionSparsityDecisions(o.mode, "block-local" if o.mode == "window" else "masks-only", grid, window,
                                     tokens, o.k if o.mode == "topk" else None,
                                     (prior.sites if prior is not None else ()) + tuple(done),
                                     (prior.graph_flops if prior is not None else ()) + tuple(flops))
    if not quiet:
        ctx.log.info("%s: %d local heads over %d attention sites (%s); attention FLOPs %.2fx of dense%s", _NAME,
                     rec.local_heads, len(done), o.mode, rec.attention_flops_ratio,
                     " (masks-only: a kernel gathering the kept keys would spend that; the graph's dense "
                     "matmuls still run)" if o.mode == "topk" else "")
    new_prog = program.replace(graphs=new_graphs, records={**program.records, "AttentionSparsityDecisions": rec})
    return PassResult(new_prog, modified=True, stats={"local_heads": rec.local_heads, "sites": len(done),
                                                      "attention_flops_ratio": round(rec.attention_flops_ratio, 4)})


# -- finding an attention site ---------------------------------------------------------------------
def _op(n: Any) -> str:
    return packet(n) if isinstance(n, fx.Node) and n.op == "call_function" else ""


def _softmaxes(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and n.target in SOFTMAX
            and n.meta.get(meta.CREATED_BY) != _NAME and fed_matmul(n) is not None]


def _heads_of(sm: fx.Node) -> int:
    s = val_shape(sm)
    return s[1] if len(s) == 4 else 1


@dataclass
class AttentionSite:
    q: fx.Node          # [B·H, N, d] (scaled as the graph scales it)
    kt: fx.Node         # [B·H, d, N]
    v: fx.Node          # [B·H, N, dv]
    pv: fx.Node         # the value matmul, replaced
    bias: fx.Node | None    # broadcastable to [B, H, N, N]; None when absent or zero
    scale: float        # applied to q kᵀ after the matmul
    batch: int
    heads: int
    queries: int
    keys: int
    d: int
    dv: int

    @property
    def flops(self) -> int:
        return 2 * self.batch * self.heads * self.queries * self.keys * (self.d + self.dv)


def attention_site(gm: fx.GraphModule, sm: fx.Node, graph: str, layer: str, who: str = _NAME) -> AttentionSite:
    """The attention around softmax `sm`: its q, kᵀ and v operands, bias and sizes (token_reuse
    reads it too, naming itself as `who` in errors)."""
    where = f"pass '{who}': graph '{graph}': attention {layer} ({sm.format_node()})"
    shape = val_shape(sm)
    dim = sm.args[1] if len(sm.args) > 1 else sm.kwargs.get("dim", -1)
    if len(shape) not in (3, 4) or dim not in (-1, len(shape) - 1):
        raise PassError(f"{where}: not a softmax over the keys of [batch(, heads), queries, keys] scores")
    heads = shape[1] if len(shape) == 4 else 1
    batch, nq, nk = shape[0], shape[-2], shape[-1]
    qk, scale, biases = _scores(sm.args[0], where)
    pv = fed_matmul(sm)
    if qk is None or _op(qk) != "bmm" or pv is None or _op(pv) != "bmm":
        raise PassError(f"{where}: expected the batched matmuls q @ kᵀ before and p @ v after the softmax, as "
                        "torch.export decomposes attention; found " + (qk.format_node() if qk is not None else
                                                                        "no score matmul"))
    q, kt = qk.args[0], qk.args[1]
    v = pv.args[1]
    if val_shape(q)[:2] != (batch * heads, nq) or val_shape(kt)[0::2] != (batch * heads, nk) or \
            val_shape(v)[:2] != (batch * heads, nk):
        raise PassError(f"{where}: the attention matmuls are not [batch·heads, tokens, dim] "
                        f"(q {list(val_shape(q))}, kᵀ {list(val_shape(kt))}, v {list(val_shape(v))})")
    bias = None
    for b in biases:
        val = constant_value(gm, b)
        if val is not None and bool((val == 0).all()):
            continue                                    # a mask that masks nothing
        if bias is not None:
            raise PassError(f"{where}: more than one bias is added to the scores ({bias.name}, {b.name})")
        bias = b
    if bias is not None:
        bs = val_shape(bias)
        if len(bs) > 4 or any(s not in (1, t) for s, t in zip(bs[::-1], (nk, nq, heads, batch))):
            raise PassError(f"{where}: its bias {bias.format_node()} (shape {list(bs)}) does not broadcast to "
                            f"[batch, heads, queries, keys] = {[batch, heads, nq, nk]}")
    return AttentionSite(q, kt, v, pv, bias, scale, batch, heads, nq, nk, val_shape(q)[2], val_shape(v)[2])


def _scores(n: Any, where: str) -> tuple[fx.Node | None, float, list[fx.Node]]:
    """Walk from the softmax's input back to the score matmul: (matmul, scale, biases added)."""
    scale, biases = 1.0, []
    while isinstance(n, fx.Node):
        name = _op(n)
        if name in ("bmm", "matmul", "mm", "baddbmm"):
            return n, scale, biases
        if name in _SHAPE_ONLY:
            n = n.args[0]
        elif name in ("mul", "div") and len(n.args) == 2 and isinstance(n.args[1], (int, float)):
            scale = scale * n.args[1] if name == "mul" else scale / n.args[1]
            n = n.args[0]
        elif name == "add" and len(n.args) == 2 and all(isinstance(a, fx.Node) for a in n.args) and \
                n.kwargs.get("alpha", 1) == 1:
            a, b = n.args
            if _reaches_matmul(b) and not _reaches_matmul(a):
                a, b = b, a
            biases.append(b)
            n = a
        else:
            raise PassError(f"{where}: the scores pass through {n.format_node()}, which sparse_attention does not "
                            "follow (it follows views, multiplications by a number and an added bias)")
    return None, scale, biases


def _reaches_matmul(n: fx.Node) -> bool:
    while isinstance(n, fx.Node):
        name = _op(n)
        if name in ("bmm", "matmul", "mm", "baddbmm"):
            return True
        if name in _SHAPE_ONLY or name in ("mul", "div", "add"):
            n = n.args[0]
        else:
            return False
    return False


def _layout(o: Any, att: AttentionSite, graph: str, layer: str) -> tuple:
    """(grid, window, tokens, globals) for a window-mode site."""
    where = f"pass '{_NAME}': graph '{graph}': attention {layer}"
    n = att.queries
    if att.queries != att.keys:
        raise PassError(f"{where} has {att.queries} queries and {att.keys} keys; window mode windows self-attention "
                        "over one token grid")
    if o.grid is not None:
        grid = o.grid
        tokens = o.tokens if o.tokens is not None else (n - grid[0] * grid[1], n)
        if tokens[0] < 0 or tokens[1] > n:
            raise OptionError(f"pass '{_NAME}': option 'grid' {list(grid)} ({grid[0] * grid[1]} tokens) does not fit "
                              f"the {n} tokens of {layer}" if o.tokens is None else
                              f"pass '{_NAME}': option 'tokens' {list(tokens)} runs past the {n} tokens of {layer}")
    else:
        side = next((int(math.isqrt(n - lead)) for lead in (0, 1) if math.isqrt(n - lead) ** 2 == n - lead), None)
        if side is None:
            raise OptionError(f"{where} has {n} tokens, neither a square nor a square after one [CLS]; give "
                              "options 'grid' (rows, cols) and 'tokens' (the grid's [start, end))")
        grid, tokens = (side, side), (n - side * side, n)
    window = o.window
    if window is None:
        if grid[0] % 2 or grid[1] % 2:
            raise OptionError(f"pass '{_NAME}': the grid {list(grid)} of {layer} has an odd side; give option "
                              f"'window' (rows, cols) dividing it, e.g. [{grid[0]}, 1] or [1, {grid[1]}]")
        window = (grid[0] // 2, grid[1] // 2)
    if grid[0] % window[0] or grid[1] % window[1]:
        raise OptionError(f"pass '{_NAME}': option 'window' {list(window)} does not divide the grid {list(grid)} "
                          f"of {layer}")
    if window == grid:
        raise OptionError(f"pass '{_NAME}': option 'window' {list(window)} is the whole grid: nothing is sparse")
    if att.bias is not None and len(val_shape(att.bias)) >= 2 and val_shape(att.bias)[-2] != 1:
        raise PassError(f"{where}: its bias {att.bias.format_node()} (shape {list(val_shape(att.bias))}) differs per "
                        "query; window mode windows a bias over the keys only ([batch, 1, 1, keys]); use mode 'topk'")
    return grid, window, tokens


def _runs(hs: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted head indices as [start, end) runs."""
    out: list[list[int]] = []
    for h in hs:
        if out and out[-1][1] == h:
            out[-1][1] = h + 1
        else:
            out.append([h, h + 1])
    return [(a, b) for a, b in out]


def _take(t: torch.Tensor, runs: list[tuple[int, int]]) -> torch.Tensor:
    parts = [t[:, a:b] for a, b in runs]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


def _put(heads: int, local: Sequence[int], lt: torch.Tensor, dt: torch.Tensor | None) -> torch.Tensor:
    """Local heads' [B, L, ...] and dense heads' [B, D, ...] back in head order."""
    if dt is None:
        return lt
    pos, parts = {}, []
    for i, h in enumerate(local):
        pos[h] = ("l", i)
    dense = [h for h in range(heads) if h not in pos]
    for i, h in enumerate(dense):
        pos[h] = ("d", i)
    h = 0
    while h < heads:                                   # runs of heads from one side, in order
        side, i = pos[h]
        j = h
        while j + 1 < heads and pos[j + 1][0] == side and pos[j + 1][1] == pos[j][1] + 1:
            j += 1
        parts.append((lt if side == "l" else dt)[:, i:i + j - h + 1])
        h = j + 1
    return torch.cat(parts, dim=1)


def _window_fn(att: AttentionSite, local: tuple[int, ...], grid: tuple[int, int], window: tuple[int, int],
               tokens: tuple[int, int]) -> tuple[Any, int, int]:
    B, H, N, d, dv, scale = att.batch, att.heads, att.queries, att.d, att.dv, att.scale
    gh, gw = grid
    wh, ww = window
    start, end = tokens
    nw, w = (gh // wh) * (gw // ww), wh * ww
    G = N - (end - start)
    L = len(local)
    lruns = _runs(local)
    dense = [h for h in range(H) if h not in local]
    druns = _runs(dense)
    bshape = val_shape(att.bias) if att.bias is not None else None

    def part(t: torch.Tensor) -> torch.Tensor:           # [B, L, N, c] grid tokens -> [B·L·nw, w, c]
        c = t.shape[-1]
        t = t[:, :, start:end].reshape(B, L, gh // wh, wh, gw // ww, ww, c)
        return t.permute(0, 1, 2, 4, 3, 5, 6).reshape(B * L * nw, w, c)

    def unpart(t: torch.Tensor) -> torch.Tensor:         # [B·L·nw, w, c] -> [B, L, gh·gw, c]
        c = t.shape[-1]
        t = t.reshape(B, L, gh // wh, gw // ww, wh, ww, c)
        return t.permute(0, 1, 2, 4, 3, 5, 6).reshape(B, L, gh * gw, c)

    def glob(t: torch.Tensor, axis: int) -> torch.Tensor:   # the tokens outside the grid along `axis`
        parts = [t.narrow(axis, 0, start)] if start else []
        if end < N:
            parts.append(t.narrow(axis, end, N - end))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=axis)

    def attend(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, *bias: torch.Tensor) -> torch.Tensor:
        q, kt, v = q.reshape(B, H, N, d), kt.reshape(B, H, d, N), v.reshape(B, H, N, dv)
        b = bias[0].reshape((1,) * (4 - len(bshape)) + bshape) if bias else None
        od = None
        if druns:
            s = (_take(q, druns) @ _take(kt, druns)) * scale
            if b is not None:
                s = s + (_take(b, druns) if b.shape[1] == H else b)
            od = torch.softmax(s, dim=-1) @ _take(v, druns)
        ql, ktl, vl = _take(q, lruns), _take(kt, lruns), _take(v, lruns)
        bl = (_take(b, lruns) if b.shape[1] == H else b) if b is not None else None
        kl = ktl.transpose(-1, -2)
        qw, kw, vw = part(ql), part(kl), part(vl)
        s = (qw @ kw.transpose(-1, -2)) * scale                               # [B·L·nw, w, w]
        if bl is not None:                                                     # over the keys only
            bk = bl.expand(B, L, 1, N).transpose(-1, -2)                       # [B, L, N, 1]
            s = s + part(bk).transpose(-1, -2)
        if G:
            kg, vg = glob(kl, 2), glob(vl, 2)                                  # [B, L, G, .]
            sg = (qw.reshape(B, L, nw * w, d) @ kg.transpose(-1, -2)) * scale  # [B, L, nw·w, G]
            if bl is not None:
                sg = sg + glob(bl.expand(B, L, 1, N), 3)
            s = torch.cat([s, sg.reshape(B * L * nw, w, G)], dim=-1)
        p = torch.softmax(s, dim=-1)
        ow = p[..., :w] @ vw
        if G:
            ow = ow + (p[..., w:].reshape(B, L, nw * w, G) @ vg).reshape(B * L * nw, w, dv)
        ow = unpart(ow)                                                        # [B, L, gh·gw, dv]
        parts = []
        if G:                                                                  # global queries: every key
            sq = (glob(ql, 2) @ ktl) * scale                                   # [B, L, G, N]
            if bl is not None:
                sq = sq + bl
            og = torch.softmax(sq, dim=-1) @ vl
            if start:
                parts.append(og[:, :, :start])
            parts.append(ow)
            if end < N:
                parts.append(og[:, :, start:])
        else:
            parts.append(ow)
        ol = torch.cat(parts, dim=2) if len(parts) > 1 else ow
        return _put(H, local, ol, od).reshape(B * H, N, dv)

    per = (nw * w * (w + G) + G * N) * (d + dv)
    after = 2 * B * (L * per + (H - L) * N * N * (d + dv))
    return attend, w + G, after


def _topk_fn(att: AttentionSite, local: tuple[int, ...], k: int) -> tuple[Any, int, int]:
    B, H, N, M, d, dv, scale = att.batch, att.heads, att.queries, att.keys, att.d, att.dv, att.scale
    lruns = _runs(local)
    druns = _runs([h for h in range(H) if h not in local])
    bshape = val_shape(att.bias) if att.bias is not None else None

    def attend(q: torch.Tensor, kt: torch.Tensor, v: torch.Tensor, *bias: torch.Tensor) -> torch.Tensor:
        s = (q.reshape(B, H, N, d) @ kt.reshape(B, H, d, M)) * scale
        if bias:
            s = s + bias[0].reshape((1,) * (4 - len(bshape)) + bshape)
        sl = _take(s, lruns)
        kth = sl.topk(k, dim=-1).values[..., k - 1:k]
        sl = sl.masked_fill(sl < kth, float("-inf"))
        s = _put(H, local, sl, _take(s, druns) if druns else None)
        return (torch.softmax(s, dim=-1) @ v.reshape(B, H, M, dv)).reshape(B * H, N, dv)

    L = len(local)
    after = 2 * B * N * (H * M * d + (L * k + (H - L) * M) * dv)
    return attend, k, after
