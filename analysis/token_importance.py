"""Token importance: which tokens the attention of each layer relies on and which are near
duplicates, over a calibration run (EfficientVLA's task relevance and diversity, "EfficientVLA:
Training-Free Acceleration and Compression for Vision-Language-Action Models"; ToMe's token
similarity, "Token Merging: Your ViT But Faster").

For every attention site of every analysed graph (analysis.attention_entropy.find_attention: a
softmax over the keys feeding a matmul, or a fused scaled_dot_product_attention whose
probabilities are recomputed from the tapped q and k), with P the probabilities [.., Nq, Nk]
and V the values it reads [.., Nk, d], averaged over batch rows and heads and over the calls:

    received[j]             mean over queries of P[q, j]: the attention token j draws
    relevance[g][j]         sum over the queries of group g (option `query_groups`, e.g. the
                            instruction tokens) of P[q, j]: EfficientVLA's task relevance
                            (instruction -> vision), EViT's [CLS] attention
    nearest_similarity[j]   max over the other tokens i of cos(V[j], V[i]): how close token j's
                            nearest duplicate is (ToMe merges the highest; EfficientVLA's
                            diversity keeps the lowest)
    stability               per group (and for `received`): the mean overlap (|A ∩ B| / k) of
                            each call's top-k tokens with the whole run's top-k, k =
                            round(keep_fraction * Nk): near 1, a fixed choice of tokens would
                            do; low, the choice must be made per input (as token_prune does)

Reads: calibration. Writes: TokenImportanceProfile (a record; nothing on nodes). The model that
ships is not changed (fused attention is recomputed on the side).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from pared.analysis.attention_entropy import fed_matmul, find_attention, sdpa_probabilities
from pared.analysis.recorder import PerGraph, Tap, analysed_graphs, record
from pared.ir.errors import OptionError, PassError
from pared.ir.program import Program
from pared.ir.regions import match, node_module_path, region_of
from pared.ir.transform import Analysis, PassContext, Record, check_range, register_pass

_NAME = "token_importance"


@dataclass(frozen=True)
class SiteTokens:
    layer: str                                  # region of the attention
    node: str                                   # the softmax / sdpa node
    tokens: int                                 # keys
    calls: int                                  # calls at which it ran
    received: tuple[float, ...]                 # per key
    relevance: tuple[tuple[str, tuple[float, ...]], ...]   # (group, per key)
    nearest_similarity: tuple[float, ...]       # per key (nan where the values were not found)
    mean_similarity: float                      # over every pair of distinct tokens
    stability: tuple[tuple[str, float], ...]    # ("received" or a group, mean top-k overlap per call)


@dataclass(frozen=True)
class GraphTokens:
    graph: str
    calls: int
    sites: tuple[SiteTokens, ...]


@dataclass(frozen=True)
class TokenImportanceProfile(PerGraph, Record):
    query_groups: tuple[tuple[str, int, int], ...]
    keep_fraction: float
    graphs: tuple[GraphTokens, ...]

    def site(self, layer: str, graph: str | None = None) -> SiteTokens:
        for s in self.graph(graph).sites:
            if s.layer == layer or s.node == layer:
                return s
        raise KeyError(f"no attention site {layer!r}; the graph has {[s.layer for s in self.graph(graph).sites]}")


def _values(site) -> fx.Node | None:
    """The values an attention's probabilities multiply: the second operand of the matmul they
    reach (attention_entropy.fed_matmul); for SDPA its `value` argument."""
    node = site.node
    if site.source != "softmax":
        return node.args[2] if len(node.args) > 2 and isinstance(node.args[2], fx.Node) else None
    mm = fed_matmul(node)
    if mm is None:
        return None
    v = mm.args[-1]
    return v if isinstance(v, fx.Node) else None


class _Acc:
    def __init__(self, groups: tuple, k_frac: float):
        self.groups, self.k_frac = groups, k_frac
        self.n = 0
        self.received = None
        self.relevance: dict[str, torch.Tensor] = {}
        self.nearest = None
        self.mean_sim = 0.0
        self.sim_n = 0
        self.per_call: dict[str, list[torch.Tensor]] = {}
        self.calls: set[int] = set()

    def add_probs(self, call: int, p: torch.Tensor) -> None:
        p = p.detach().double()
        p = p.reshape(-1, *p.shape[-2:])                     # [batch*heads, Nq, Nk]
        nq, nk = p.shape[-2:]
        pm = p.mean(0)                                        # [Nq, Nk]
        scores = {"received": pm.mean(0)}
        for g, a, b in self.groups:
            if b > nq:
                raise PassError(f"pass '{_NAME}': query group {g!r} [{a}, {b}) runs past the {nq} queries")
            scores[g] = pm[a:b].sum(0)
        if self.received is None:
            self.received = torch.zeros(nk, dtype=torch.float64)
            self.relevance = {g: torch.zeros(nk, dtype=torch.float64) for g, _, _ in self.groups}
        self.received += scores["received"]
        for g, _, _ in self.groups:
            self.relevance[g] += scores[g]
        for k, v in scores.items():
            self.per_call.setdefault(k, []).append(v)
        self.n += 1
        self.calls.add(call)

    def add_values(self, v: torch.Tensor) -> None:
        v = v.detach().double()
        v = v.reshape(-1, *v.shape[-2:])                      # [batch*heads, Nk, d]
        v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        sim = v @ v.transpose(-1, -2)                         # [X, Nk, Nk]
        nk = sim.shape[-1]
        eye = torch.eye(nk, dtype=torch.bool)
        near = sim.masked_fill(eye, -2.0).amax(-1).mean(0)    # [Nk]
        self.nearest = near if self.nearest is None else self.nearest + near
        if nk > 1:
            self.mean_sim += float(sim.masked_fill(eye, 0.0).sum((-1, -2)).mean() / (nk * (nk - 1)))
            self.sim_n += 1

    def finish(self, layer: str, node: str, graph_calls: int) -> SiteTokens:
        nk = self.received.shape[0]
        k = max(1, round(self.k_frac * nk))
        stab = []
        for name, rows in self.per_call.items():
            total = torch.stack(rows).sum(0)
            top = set(total.topk(k).indices.tolist())
            stab.append((name, round(sum(len(top & set(r.topk(k).indices.tolist())) for r in rows)
                                     / (k * len(rows)), 6)))
        near = (self.nearest / self.n).tolist() if self.nearest is not None else [float("nan")] * nk
        r6 = lambda t: tuple(round(float(x), 6) for x in t)       # noqa: E731
        return SiteTokens(layer, node, nk, len(self.calls), r6(self.received / self.n),
                          tuple((g, r6(self.relevance[g] / self.n)) for g, _, _ in self.groups), r6(near),
                          round(self.mean_sim / self.sim_n, 6) if self.sim_n else float("nan"), tuple(stab))


@register_pass(_NAME)
class TokenImportance(Analysis):
    """Per attention site: attention received and relevance per token, nearest-duplicate similarity,
    and how stable the top tokens are across calls (see module docstring)."""

    record = TokenImportanceProfile

    @dataclass(frozen=True, kw_only=True)
    class Options:
        graphs: tuple[str, ...] | str | None = None     # graphs to analyse (default: every graph the plan calls)
        layers: tuple[str, ...] | str = ("**",)         # region patterns of the attention sites
        query_groups: tuple[tuple[str | int, ...], ...] = ()   # (name, start, stop) query ranges: relevance per group
        keep_fraction: float = 0.25                     # the top-k stability's k, a fraction of the keys

        def __post_init__(self):
            for f in ("graphs", "layers"):
                v = getattr(self, f)
                if v is not None:
                    object.__setattr__(self, f, (v,) if isinstance(v, str) else tuple(v))
            groups = []
            for g in self.query_groups:
                if not (isinstance(g, (list, tuple)) and len(g) == 3 and isinstance(g[0], str)
                        and all(isinstance(x, int) for x in g[1:]) and 0 <= g[1] < g[2]):
                    raise OptionError(f"pass '{_NAME}': option 'query_groups' takes (name, start, stop) with "
                                      f"0 <= start < stop, got {g!r}")
                groups.append((g[0], int(g[1]), int(g[2])))
            if len({g[0] for g in groups}) != len(groups) or any(g[0] == "received" for g in groups):
                raise OptionError(f"pass '{_NAME}': option 'query_groups' names a group twice (or 'received', "
                                  f"which is taken): {[g[0] for g in groups]}")
            object.__setattr__(self, "query_groups", tuple(groups))
            check_range(_NAME, "keep_fraction", self.keep_fraction, lo=0.0, hi=1.0, lo_open=True)

    def analyze(self, program: Program, ctx: PassContext) -> TokenImportanceProfile:
        o = self.options
        names = analysed_graphs(program, o.graphs, _NAME)
        if ctx.calibration is None:
            raise PassError(f"pass '{_NAME}' needs a calibration run: pass calibration= a list of input tuples "
                            "or a loop callable that runs one request through the model")
        found: dict[str, list] = {}
        for name in names:
            gm = program.graphs[name].module
            chosen = [(region_of(s.node), s, _values(s)) for s in find_attention(gm)
                      if any(match(pat, p) for pat in o.layers for p in ([p for p, _ in node_module_path(s.node)]
                                                                          or [""]))]
            if chosen:
                found[name] = chosen
        if not found:
            raise PassError(f"pass '{_NAME}': found no attention matching layers {list(o.layers)} in graphs {names}")
        accs = {(g, s.node.name): _Acc(o.query_groups, o.keep_fraction) for g, ss in found.items() for _, s, _ in ss}
        probs_at: dict[tuple[str, str], list] = {}
        values_at: dict[tuple[str, str], list] = {}
        for g, ss in found.items():
            order = {n: i for i, n in enumerate(program.graphs[g].module.graph.nodes)}
            for _, s, v in ss:
                last = max(s.taps, key=order.__getitem__)
                probs_at.setdefault((g, last.name), []).append(s)
                if v is not None:
                    values_at.setdefault((g, v.name), []).append(accs[(g, s.node.name)])
        latest: dict[tuple[str, str], torch.Tensor] = {}

        def on_value(tap: Tap, v: torch.Tensor) -> None:
            latest[(tap.graph, tap.node)] = v
            for s in probs_at.get((tap.graph, tap.node), ()):
                if s.source == "softmax":
                    p = torch.nan_to_num(v, nan=0.0)
                else:
                    get = lambda n: latest[(tap.graph, n.name)] if n is not None else None  # noqa: E731
                    p = sdpa_probabilities(get(s.q), get(s.k), get(s.mask), is_causal=s.causal, scale=s.scale)
                accs[(tap.graph, s.node.name)].add_probs(tap.call, p)
            for acc in values_at.get((tap.graph, tap.node), ()):
                acc.add_values(v)

        taps = {g: sorted({t.name for _, s, v in ss for t in (*s.taps, *([v] if v is not None else []))})
                for g, ss in found.items()}
        ctx.progress(f"{_NAME}: recording {len(accs)} attention sites in {len(found)} graph(s)")
        calls = len(record(program, ctx.calibration, taps, on_value))
        graphs = tuple(GraphTokens(g, calls, tuple(accs[(g, s.node.name)].finish(layer, s.node.name, calls)
                                                   for layer, s, _ in ss if accs[(g, s.node.name)].n))
                       for g, ss in found.items())
        ctx.log.info("%s: %d attention sites in %d graph(s) over %d calls", _NAME,
                     sum(len(g.sites) for g in graphs), len(graphs), calls)
        return TokenImportanceProfile(o.query_groups, o.keep_fraction, graphs)
