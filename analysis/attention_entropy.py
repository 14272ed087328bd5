"""Attention entropy: how spread out each head's attention is, per layer, head, query token
and call, the attention mass each key token receives, and a global/local head taxonomy
(ToProVAR, "ToProVAR: Efficient Visual Autoregressive Modeling via Tri-Dimensional Entropy-Aware
Semantic Analysis and Sparsity Optimization"; the entropy H(q_i) = -sum_j a_ij log a_ij of an
attention row).

For every attention site of every analysed graph (a softmax over the last axis whose result
feeds a matmul, or a fused scaled_dot_product_attention) the calibration run (analysis.recorder)
hands over the attention probabilities a [batch, heads, queries, keys]:
    softmax site: its value;
    fused SDPA:   recomputed from the tapped q and k (and mask) as softmax(q kᵀ·scale + mask) with
                  SDPA's own defaults (scale 1/sqrt(E), is_causal's lower-triangular mask, grouped
                  k heads repeated); the graph that ships is not changed.
Recorded per site, aggregated (not every row):
    entropy[call][head]               mean H over the batch and query rows (nats)
    entropy_percentiles[call][head]   the percentiles (option) of H over those rows
    head_entropy[head], head_normalized = head_entropy / log(keys) (1: uniform over the keys)
    head_kind[head]                   'local' (normalized < local_threshold), 'global'
                                      (> global_threshold) or 'mixed'; layer_kind: every head's
                                      kind when they agree, else 'mixed'
    query_entropy[query]              mean H of each query token over batch, heads and calls
    received[head][key]               attention mass each key receives: the column sum of a over
                                      the query rows, mean over batch rows and calls (a row sums
                                      to 1, so a key row sums to `queries`)
    group_received                    the same column sums over named query ranges only (option
                                      `query_groups`, e.g. ("cls", 0, 1): [CLS] -> patches;
                                      text -> vision for a VLA)

Reads: calibration. Writes: AttentionEntropyProfile (a record; nothing on nodes).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from pared.analysis.recorder import PerGraph, Tap, analysed_graphs, record
from pared.ir.errors import OptionError, PassError
from pared.ir.program import Program
from pared.ir.regions import match, node_module_path, region_of
from pared.ir.transform import Analysis, PassContext, Record, check_range, register_pass

_aten = torch.ops.aten
_NAME = "attention_entropy"
_SOFTMAX = {_aten._softmax.default, _aten._safe_softmax.default, _aten.softmax.int}
#: fused attention ops whose probabilities are recomputed from q and k
_SDPA = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
         "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
         "_scaled_dot_product_cudnn_attention"}
#: ops between a softmax and the matmul that applies it to the values
_PASS_THROUGH = {"view", "_unsafe_view", "reshape", "expand", "clone", "_to_copy", "contiguous", "alias",
                 "dropout", "native_dropout", "getitem", "to", "where"}   # where: the fully-masked-row guard
_MATMULS = {"bmm", "mm", "matmul", "baddbmm"}
_KINDS = ("local", "mixed", "global")


# -- record ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class AttentionSite:
    """One attention site (a softmax, or a fused SDPA) of one graph, over the calibration run."""
    layer: str                          # the innermost module holding it (region path)
    node: str                           # the softmax node, or the fused attention node
    source: str                         # "softmax" (read) or "sdpa" (recomputed from q and k)
    heads: int                          # 1 when the probabilities carry no head axis
    queries: int
    keys: int
    calls: tuple[int, ...]              # the call indices at which it ran
    entropy: tuple[tuple[float, ...], ...]                        # [call][head] mean H (nats)
    entropy_percentiles: tuple[tuple[tuple[float, ...], ...], ...]  # [call][head][percentile]
    head_entropy: tuple[float, ...]     # [head] mean H over the run
    head_normalized: tuple[float, ...]  # [head] head_entropy / log(keys)
    head_kind: tuple[str, ...]          # [head] 'local' | 'mixed' | 'global'
    layer_kind: str                     # the heads' common kind, else 'mixed'
    query_entropy: tuple[float, ...]    # [query] mean H over batch, heads and calls
    received: tuple[tuple[float, ...], ...]   # [head][key] column sums, mean over batch and calls
    group_received: tuple[tuple[str, tuple[tuple[float, ...], ...]], ...] = ()  # (group, [head][key])

    def group(self, name: str) -> tuple[tuple[float, ...], ...]:
        for g, rows in self.group_received:
            if g == name:
                return rows
        raise KeyError(f"no query group {name!r} at {self.layer}; it has {[g for g, _ in self.group_received]}")


@dataclass(frozen=True)
class GraphEntropy:
    graph: str
    calls: int                          # calls of the calibration run
    sites: tuple[AttentionSite, ...]    # in graph order


@dataclass(frozen=True)
class AttentionEntropyProfile(PerGraph, Record):
    percentiles: tuple[float, ...]
    local_threshold: float
    global_threshold: float
    query_groups: tuple[tuple[str, int, int], ...]
    graphs: tuple[GraphEntropy, ...]    # one per analysed graph with attention

    def site(self, layer: str, graph: str | None = None) -> AttentionSite:
        for s in self.graph(graph).sites:
            if s.layer == layer or s.node == layer:
                return s
        raise KeyError(f"no attention site {layer!r}; the graph has {[s.layer for s in self.graph(graph).sites]}")


# -- finding the sites -----------------------------------------------------------------------
def _op(n: fx.Node) -> str:
    return getattr(n.target, "__name__", str(n.target)).split(".")[0]


def fed_matmul(n: fx.Node) -> fx.Node | None:
    """The matmul whose first operand `n`'s value reaches through shape-only ops (attention
    probabilities -> the matmul with the values), or None."""
    todo, seen = [n], set()
    while todo:
        cur = todo.pop()
        for u in cur.users:
            if u in seen or u.op != "call_function":
                continue
            seen.add(u)
            name = _op(u)
            if name in _MATMULS and u.args and u.args[-2 if name == "baddbmm" else 0] is cur:
                return u
            if name in _PASS_THROUGH:
                todo.append(u)
    return None


def _feeds_matmul(n: fx.Node) -> bool:
    return fed_matmul(n) is not None


@dataclass(frozen=True)
class _Site:
    node: fx.Node
    source: str
    q: fx.Node | None = None
    k: fx.Node | None = None
    mask: fx.Node | None = None
    causal: bool = False
    scale: float | None = None

    @property
    def taps(self) -> tuple[fx.Node, ...]:
        if self.source == "softmax":
            return (self.node,)
        return tuple(x for x in (self.q, self.k, self.mask) if x is not None)


def find_attention(gm: fx.GraphModule) -> list[_Site]:
    """The attention sites of a graph, in graph order: softmaxes over the last axis whose
    result feeds a matmul, and fused scaled_dot_product_attention nodes (with their q, k,
    mask, is_causal and scale)."""
    sites = []
    for n in gm.graph.nodes:
        if n.op != "call_function":
            continue
        if n.target in _SOFTMAX:
            v = n.meta.get("val")
            rank = v.dim() if isinstance(v, torch.Tensor) else None
            dim = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", -1)
            if rank is not None and rank >= 2 and dim in (-1, rank - 1) and _feeds_matmul(n):
                sites.append(_Site(n, "softmax"))
        elif _op(n) in _SDPA:
            norm = n.normalized_arguments(gm, normalize_to_only_use_kwargs=True)
            kw = dict(norm.kwargs) if norm is not None else {}
            if norm is None:        # positional fallback: (q, k, v, mask?, ...)
                kw = {"query": n.args[0], "key": n.args[1]}
            mask = kw.get("attn_mask", kw.get("attn_bias"))
            scale = kw.get("scale")
            sites.append(_Site(n, "sdpa", kw["query"], kw["key"], mask if isinstance(mask, fx.Node) else None,
                               bool(kw.get("is_causal", False)), float(scale) if scale is not None else None))
    return sites


def sdpa_probabilities(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None = None, *,
                       is_causal: bool = False, scale: float | None = None) -> torch.Tensor:
    """The attention probabilities scaled_dot_product_attention computes internally:
    softmax(q kᵀ·scale + mask) over the keys, SDPA's defaults (scale 1/sqrt(E); is_causal: the
    lower-triangular mask; a bool mask keeps True; grouped k heads repeated to q's). Fully
    masked rows are all zero (as SDPA's safe softmax)."""
    q, k = q.float(), k.float()
    if q.dim() >= 3 and k.dim() >= 3 and k.shape[-3] != q.shape[-3] and q.shape[-3] % k.shape[-3] == 0:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    s = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.shape[-1]))
    if is_causal:
        lq, lk = s.shape[-2:]
        s = s.masked_fill(~torch.ones(lq, lk, dtype=torch.bool).tril(), float("-inf"))
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.float()
    return torch.nan_to_num(torch.softmax(s, dim=-1), nan=0.0)


def entropy_rows(a: torch.Tensor) -> torch.Tensor:
    """H = -sum_j a_j log a_j over the last axis (0 log 0 = 0), in float64."""
    return torch.special.entr(a.double()).sum(-1)


# -- accumulating ------------------------------------------------------------------------------
class _Acc:
    """What one site gathers over the run."""

    def __init__(self, site: _Site, groups: tuple[tuple[str, int, int], ...]):
        self.site, self.groups = site, groups
        self.shape: tuple[int, int, int] | None = None
        self.rows: dict[int, list[np.ndarray]] = {}      # call -> [rows, heads] entropies
        self.received = None                             # [heads, keys] sum over batch rows
        self.group_sums: dict[str, Any] = {}
        self.query = None                                # [queries] sum over batch and heads
        self.batches = 0

    def add(self, call: int, a: torch.Tensor, graph: str) -> None:
        if a.dim() < 2:
            return
        heads = a.shape[-3] if a.dim() >= 4 else 1
        nq, nk = a.shape[-2], a.shape[-1]
        a = a.reshape(-1, heads, nq, nk)
        if self.shape is None:
            self.shape = (heads, nq, nk)
            self.received = torch.zeros(heads, nk, dtype=torch.float64)
            self.query = torch.zeros(nq, dtype=torch.float64)
            self.group_sums = {g: torch.zeros(heads, nk, dtype=torch.float64)
                               for g, lo, hi in self.groups if hi <= nq}
        elif self.shape != (heads, nq, nk):
            raise PassError(f"pass '{_NAME}': graph '{graph}': the attention at {self.site.node.format_node()} has "
                            f"shape [heads, queries, keys] {list(self.shape)} at one call and "
                            f"{[heads, nq, nk]} at call {call}; token counts must stay fixed over the run")
        h = entropy_rows(a)                                       # [batch, heads, queries]
        self.rows.setdefault(call, []).append(h.permute(0, 2, 1).reshape(-1, heads).numpy())
        a64 = a.double()
        self.received += a64.sum(2).sum(0)
        for g, lo, hi in self.groups:
            if g in self.group_sums:
                self.group_sums[g] += a64[:, :, lo:hi].sum(2).sum(0)
        self.query += h.sum((0, 1))
        self.batches += a.shape[0]

    def finish(self, layer: str, percentiles: tuple[float, ...], lo: float, hi: float) -> AttentionSite:
        heads, nq, nk = self.shape
        calls = sorted(self.rows)
        per_call = {c: np.concatenate(self.rows[c]) for c in calls}
        ent = tuple(tuple(float(x) for x in per_call[c].mean(0)) for c in calls)
        pct = tuple(tuple(tuple(float(x) for x in np.percentile(per_call[c][:, j], percentiles)) if percentiles else ()
                          for j in range(heads)) for c in calls)
        everything = np.concatenate([per_call[c] for c in calls])
        head_h = everything.mean(0)
        norm = head_h / math.log(nk) if nk > 1 else np.zeros_like(head_h)
        kinds = tuple("local" if x < lo else "global" if x > hi else "mixed" for x in norm)
        layer_kind = kinds[0] if len(set(kinds)) == 1 else "mixed"

        def rows(t: torch.Tensor) -> tuple[tuple[float, ...], ...]:
            return tuple(tuple(float(x) for x in r) for r in (t / self.batches))
        return AttentionSite(
            layer, self.site.node.name, self.site.source, heads, nq, nk, tuple(calls), ent, pct,
            tuple(float(x) for x in head_h), tuple(float(x) for x in norm), kinds, layer_kind,
            tuple(float(x) for x in self.query / (self.batches * heads)), rows(self.received),
            tuple((g, rows(t)) for g, t in self.group_sums.items()))


# -- the analysis ------------------------------------------------------------------------------
@register_pass(_NAME)
class AttentionEntropy(Analysis):
    """Per layer, head, query and call: attention entropy, mass received, head kinds (see module
    docstring)."""

    record = AttentionEntropyProfile

    @dataclass(frozen=True, kw_only=True)
    class Options:
        graphs: tuple[str, ...] | str | None = None    # graphs to analyse (default: every graph the plan calls)
        layers: tuple[str, ...] | str = ("**",)        # region patterns of the attention sites to measure
        percentiles: tuple[float, ...] = (10.0, 50.0, 90.0)   # of H over each head's rows, per call
        local_threshold: float = 0.5    # a head with normalized entropy (H / log keys) below this is local
        global_threshold: float = 0.8   # ... above this, global; in between, mixed
        query_groups: tuple[tuple[str | int, ...], ...] = ()  # (name, start, stop) query ranges whose
        #                                                       attention to each key is kept apart

        def __post_init__(self):
            for f in ("graphs", "layers"):
                v = getattr(self, f)
                if v is not None:
                    object.__setattr__(self, f, (v,) if isinstance(v, str) else tuple(v))
            pct = tuple(float(p) for p in self.percentiles)
            for p in pct:
                check_range(_NAME, "percentiles", p, lo=0, hi=100)
            object.__setattr__(self, "percentiles", pct)
            check_range(_NAME, "local_threshold", self.local_threshold, lo=0, hi=1)
            check_range(_NAME, "global_threshold", self.global_threshold, lo=0, hi=1)
            if self.local_threshold > self.global_threshold:
                raise OptionError(f"pass '{_NAME}': option 'local_threshold' ({self.local_threshold}) must not "
                                  f"exceed 'global_threshold' ({self.global_threshold})")
            groups = []
            for g in self.query_groups:
                g = tuple(g)
                if len(g) != 3 or not isinstance(g[0], str) or not all(
                        isinstance(x, int) and not isinstance(x, bool) for x in g[1:]) or not 0 <= g[1] < g[2]:
                    raise OptionError(f"pass '{_NAME}': option 'query_groups' takes (name, start, stop) with "
                                      f"0 <= start < stop (query token indices), got {list(g)!r}")
                groups.append(g)
            if len({g[0] for g in groups}) != len(groups):
                raise OptionError(f"pass '{_NAME}': option 'query_groups' names a group twice: "
                                  f"{[g[0] for g in groups]}")
            object.__setattr__(self, "query_groups", tuple(groups))

    def analyze(self, program: Program, ctx: PassContext) -> AttentionEntropyProfile:
        o = self.options
        names = analysed_graphs(program, o.graphs, _NAME)
        if ctx.calibration is None:
            raise PassError(f"pass '{_NAME}' needs a calibration run: pass calibration= a list of input tuples "
                            "or a loop callable that runs one request through the model")
        found: dict[str, list[tuple[str, _Site]]] = {}
        for name in names:
            gm = program.graphs[name].module
            chosen = []
            for s in find_attention(gm):
                paths = [p for p, _ in node_module_path(s.node)] or [""]
                if any(match(pat, p) for pat in o.layers for p in paths):
                    chosen.append((region_of(s.node), s))
            if chosen:
                found[name] = chosen
        if not found:
            raise PassError(f"pass '{_NAME}': found no attention (a softmax over the last axis feeding a matmul, or "
                            f"scaled_dot_product_attention) matching layers {list(o.layers)} in graphs {names}")
        accs = {(g, s.node.name): _Acc(s, o.query_groups) for g, ss in found.items() for _, s in ss}
        # a fused site is computed once its last input (in graph order) arrives
        triggers: dict[tuple[str, str], list[_Acc]] = {}
        for g, ss in found.items():
            order = {n: i for i, n in enumerate(program.graphs[g].module.graph.nodes)}
            for _, s in ss:
                last = max(s.taps, key=order.__getitem__)
                triggers.setdefault((g, last.name), []).append(accs[(g, s.node.name)])
        latest: dict[tuple[str, str], torch.Tensor] = {}

        def on_value(tap: Tap, v: torch.Tensor) -> None:
            latest[(tap.graph, tap.node)] = v
            for acc in triggers.get((tap.graph, tap.node), ()):
                s = acc.site
                if s.source == "softmax":
                    a = torch.nan_to_num(v, nan=0.0)    # fully masked rows: what the guard after it makes them
                else:
                    get = lambda n: latest[(tap.graph, n.name)] if n is not None else None  # noqa: E731
                    a = sdpa_probabilities(get(s.q), get(s.k), get(s.mask), is_causal=s.causal, scale=s.scale)
                acc.add(tap.call, a.detach(), tap.graph)

        ctx.progress(f"{_NAME}: recording {len(accs)} attention sites in {len(found)} graph(s)")
        taps = {g: [t.name for _, s in ss for t in s.taps] for g, ss in found.items()}
        calls = len(record(program, ctx.calibration, taps, on_value))
        graphs = []
        for g, ss in found.items():
            sites = tuple(accs[(g, s.node.name)].finish(layer, o.percentiles, o.local_threshold, o.global_threshold)
                          for layer, s in ss if accs[(g, s.node.name)].shape is not None)
            graphs.append(GraphEntropy(g, calls, sites))
        prof = AttentionEntropyProfile(o.percentiles, o.local_threshold, o.global_threshold, o.query_groups,
                                       tuple(graphs))
        for ge in graphs:
            for s in ge.sites:
                ctx.log.debug("%s: %s %s heads %s (normalized H %s)", _NAME, ge.graph, s.layer, s.head_kind,
                              ", ".join(f"{x:.2f}" for x in s.head_normalized))
        ctx.log.info("%s: %d attention sites in %d graph(s) over %d calls", _NAME,
                     sum(len(g.sites) for g in graphs), len(graphs), calls)
        return prof
