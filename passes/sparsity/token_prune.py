"""Keep the tokens that matter and drop the rest after one transformer block (EfficientVLA's
visual-token selection, "EfficientVLA: Training-Free Acceleration and Compression for
Vision-Language-Action Models"; attention received from [CLS] as EViT scores it).

Before:  (block l, N tokens: [prefix | candidates c0..c(n-1) | suffix])
         x_{l+1} = block_l(x_l)                      P_l = softmax(q kᵀ + mask), [B, H, N, N]
         x_{l+2} = block_{l+1}(x_{l+1})  ...          every later block on N tokens
After:   x_{l+1} = block_l(x_l)
         s = score(P_l, x_{l+1})                      one number per candidate
         K = the `keep` candidates of highest s (in their original order)
         x' = [prefix | x_{l+1}[K] | suffix]          N - n + keep tokens
         block_{l+1}(x', mask[K]) ...                 every later op sized for the kept count
Scores (option `score`), from the block's own attention probabilities averaged over heads:
  relevance            attention the query tokens (option `queries`; default every token that is
                       not a candidate: the instruction, the [CLS]) pay each candidate, summed over
                       those queries: EfficientVLA's task relevance (instruction -> vision), EViT's
                       [CLS] attention
  received             attention each candidate receives, averaged over every query
  relevance_diversity  EfficientVLA's selection: keep - d candidates by relevance, then d more
                       (d = round(diversity * keep)) one at a time, each the candidate least similar
                       (cosine of x_{l+1}) to any kept so far, so the kept set covers the image
Token Transforming ("Token Transforming: A Unified and Training-Free Token Compression Framework
for Vision Transformer Acceleration"), option `mode: transform`: the same kept set, but no token
is lost: T [keep, n] is the selection plus, for each dropped candidate j, a row of softmax over the
kept tokens k of cos(x_j, x_k) / temperature; x' = (T / rowsum(T)) @ candidates (a matmul).
Every block's token count is static (keep is fixed per graph). Lowering: top-k, one-hot masks
(eq against arange), a cumulative sum and a matmul give the kept positions in order; one gather
takes the tokens; a later attention mask over the old token count ([B, 1, 1, N], text padding)
is gathered with the same positions. No scatter, no sort, no custom op: it lowers to ONNX
Runtime and TVM as it is. Reads of single tokens after the blocks stay valid where they read
the prefix or the suffix (a readout token read as x[:, -1]); reading a candidate is refused.

Finding the site (no model code is changed): the blocks are token_merge's (the outermost module
holding one attention softmax); the block's output is its second residual add after the softmax
(x + attn, then + mlp). The token axis is followed from there (passes/sparsity/tokens.py, as token_merge follows it), so
views and reshapes are re-sized and ops that read the token axis other than per token are
refused, naming the node. A graph whose outputs carry the token axis (a DiT's dense output)
cannot drop tokens: it is left alone when option `graphs` is unset, refused when it names it.

How many: option `keep` (candidates kept), `ratio` (a fraction of them), or `target`, a goal on the
calibration run ({agreement: 0.99}, {cosine: 0.999}, ...: ir/goal.py, measured against the
unpruned program's outputs): the fewest kept that still meet it, by a binary search over keep.

Reads: calibration (with `target`). Writes: a TokenPruneDecisions record (per graph: the block,
score, candidate range, queries, kept count, tokens in and out, FLOPs before and after from
analysis.cost and the selection's own; the goal and its trials), `pared.ir.created_by` and `pared.ir.region` on every
inserted node. Invariant: each graph computes what the eager model computes when the same
candidates are dropped after that block (pared.testing.PruneTokensRef, an argsort form) up to float
rounding; keep >= the candidates leaves the program unchanged; a graph already pruned is left
alone.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from pared.analysis.cost import graph_flops, node_flops
from pared.analysis.metrics import compare_outputs
from pared.analysis.recorder import replay
from pared.analysis.search import smallest_meeting
from pared.ir import meta
from pared.ir.errors import OptionError, PassError
from pared.ir.goal import Goal
from pared.ir.program import Graph, Program
from pared.ir.regions import match
from pared.ir.rewrite import eliminate_dead_code
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, Record, RewritePass, check_range, register_pass
from pared.passes.sparsity.layer_skip import TARGET_METRICS
from pared.passes.sparsity.tokens import (BATCH, TOK, Atoms, NotPerToken, check_reads_outside, detect_protect,
                                          find_blocks, finish, follow_tokens, graph_names, has_tok,
                                          residual_add, revalue, second_residual, splice_in, val_shape)

_NAME = "token_prune"
SCORES = ("relevance", "received", "relevance_diversity")
MODES = ("select", "transform")


@dataclass(frozen=True)
class GraphPrune:
    """What token_prune decided and did in one graph."""
    graph: str
    block: str                          # tokens are dropped after this block
    score: str
    mode: str                           # select | transform
    tokens: tuple[int, int]             # the candidate range [start, end)
    queries: tuple[tuple[int, int], ...]   # the query rows relevance sums over
    keep: int                           # candidates kept
    by_diversity: int                   # of them, picked for diversity
    tokens_in: int                      # tokens leaving the block
    tokens_out: int                     # tokens every later block sees
    flops_before: int                   # one call of the graph (analysis.cost)
    flops_after: int                    # the same, the selection included
    select_flops: int                   # the selection's own ops


@dataclass(frozen=True)
class TokenPruneDecisions(Record):
    graphs: tuple[GraphPrune, ...]
    target: tuple[tuple[str, float], ...] = ()          # the goal, when keep was searched for
    trials: tuple[tuple[int, tuple[tuple[str, float], ...]], ...] = ()   # (keep, measured metrics)

    @property
    def flops_ratio(self) -> float:
        """FLOPs after / before, over every graph pruned."""
        before = sum(g.flops_before for g in self.graphs)
        return sum(g.flops_after for g in self.graphs) / before if before else 1.0


def _range(v: Any, what: str) -> tuple[int, int]:
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(i, int) and not isinstance(i, bool)
                                                                  for i in v) and 0 <= v[0] < v[1]):
        raise OptionError(f"pass '{_NAME}': option '{what}' takes a token range [start, end) with "
                          f"0 <= start < end, got {v!r}")
    return int(v[0]), int(v[1])


@register_pass(_NAME)
class PruneTokens(RewritePass):
    """Keep the top-scored candidate tokens after one block (see module docstring)."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        keep: int | None = None             # candidates kept
        ratio: float | None = None          # instead of keep: this fraction of the candidates, in (0, 1]
        after: int | str = 0                # the block tokens are dropped after: its index in the graph's
                                            # blocks (0 first, -1 last) or its region path (blocks.1)
        tokens: tuple[int, int] | None = None   # candidate range [start, end); None: every token but the
                                                # leading parameter tokens ([CLS]) token_merge detects
        score: str = "relevance"            # relevance | received | relevance_diversity (SCORES)
        queries: tuple[tuple[int, int], ...] | None = None  # relevance: the query rows, as ranges
                                                              # (None: every token not a candidate)
        diversity: float = 0.5              # relevance_diversity: the fraction of keep picked for diversity
        graphs: tuple[str, ...] = ()        # graph name patterns (default: every graph the plan calls)
        mode: str = "select"                # select: drop the others; transform: Token Transforming, each
                                            # dropped token spread over the kept by softmax(cos / temperature)
        temperature: float = 0.1            # transform: the softmax temperature over cosine similarity
        target: Any = None                  # instead of keep / ratio: a goal on the calibration run
                                            # ({agreement: 0.99}, {cosine: 0.999}, ...): the fewest kept
                                            # candidates that still meet it (a binary search over keep)

        def __post_init__(self):
            given = [k for k in ("keep", "ratio", "target") if getattr(self, k) is not None]
            if len(given) != 1:
                raise OptionError(f"pass '{_NAME}': give one of option 'keep' (candidate tokens kept), 'ratio' "
                                  "(a fraction of them) or 'target' (a goal like {agreement: 0.99})" +
                                  (f"; got {' and '.join(given)}" if given else ""))
            object.__setattr__(self, "target", Goal.parse(self.target, f"pass '{_NAME}': option 'target'",
                                                          TARGET_METRICS))
            if self.keep is not None:
                check_range(_NAME, "keep", self.keep, lo=1)
            if self.ratio is not None:
                check_range(_NAME, "ratio", self.ratio, lo=0.0, hi=1.0, lo_open=True)
            if not isinstance(self.after, (int, str)) or isinstance(self.after, bool) or self.after == "":
                raise OptionError(f"pass '{_NAME}': option 'after' takes a block index or a region path "
                                  f"(blocks.1), got {self.after!r}")
            if self.tokens is not None:
                object.__setattr__(self, "tokens", _range(self.tokens, "tokens"))
            if self.score not in SCORES:
                import difflib
                close = difflib.get_close_matches(str(self.score), SCORES, 1)
                raise OptionError(f"pass '{_NAME}': option 'score' must be one of {list(SCORES)}, got "
                                  f"{self.score!r}" + (f"; did you mean {close[0]!r}?" if close else ""))
            if self.queries is not None:
                qs = self.queries
                if isinstance(qs, (list, tuple)) and len(qs) == 2 and all(isinstance(i, int) for i in qs):
                    qs = (qs,)                                  # one range given bare
                if not isinstance(qs, (list, tuple)) or not qs:
                    raise OptionError(f"pass '{_NAME}': option 'queries' takes token ranges [[start, end], ...], "
                                      f"got {self.queries!r}")
                object.__setattr__(self, "queries", tuple(_range(q, "queries") for q in qs))
                if self.score == "received":
                    raise OptionError(f"pass '{_NAME}': option 'queries' goes with score 'relevance' or "
                                      "'relevance_diversity'; 'received' averages over every query")
            check_range(_NAME, "diversity", self.diversity, lo=0.0, hi=1.0, hi_open=True)
            if self.mode not in MODES:
                raise OptionError(f"pass '{_NAME}': option 'mode' must be one of {list(MODES)}, got {self.mode!r}")
            check_range(_NAME, "temperature", self.temperature, lo=0.0, lo_open=True)
            object.__setattr__(self, "graphs", (self.graphs,) if isinstance(self.graphs, str) else tuple(self.graphs))

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        if o.target is None:
            return self._prune(program, ctx, o)
        return self._search(program, ctx, o)

    def _search(self, program: Program, ctx: PassContext, o: Any) -> PassResult:
        """The fewest candidates kept whose pruning still meets the goal on the calibration run:
        a binary search over keep (assumed monotone: keeping more never measures worse), each
        trial a replay of the calibration run against the unpruned program's."""
        if ctx.calibration is None:
            raise PassError(f"pass '{_NAME}': option 'target' needs a calibration run to measure the goal on")
        probe = self._prune(program, ctx, dataclasses.replace(o, target=None, keep=1))
        if not probe.modified:
            return probe
        n = probe.program.records["TokenPruneDecisions"].graphs[-1]
        n = n.tokens[1] - n.tokens[0]
        ref = replay(program, ctx.calibration)
        trials: dict[int, tuple] = {}

        def met(keep: int) -> bool:
            res = self._prune(program, ctx, dataclasses.replace(o, target=None, keep=keep))
            measured = compare_outputs(ref, replay(res.program, ctx.calibration))
            trials[keep] = tuple((m, round(float(measured[m]), 6)) for m in o.target.metrics)
            ctx.progress(f"{_NAME}: keeping {keep} of {n}: " + ", ".join(f"{m} {v:.4g}" for m, v in trials[keep]))
            return o.target.met(measured)
        lo = smallest_meeting(met, 1, n)            # keep = n (nothing dropped) meets any goal
        if lo >= n:
            ctx.log.info("%s: no keep below %d meets %s on the calibration run: nothing dropped", _NAME, n,
                         o.target.terms)
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"pruned_graphs": 0,
                                                                                    "trials": len(trials)})
        res = self._prune(program, ctx, dataclasses.replace(o, target=None, keep=lo))
        rec = res.program.records["TokenPruneDecisions"]
        rec = dataclasses.replace(rec, target=o.target.terms, trials=tuple(sorted(trials.items())))
        return PassResult(res.program.replace(records={**res.program.records, "TokenPruneDecisions": rec}),
                          modified=True, stats=dict(res.stats, trials=len(trials), keep=lo))

    def _prune(self, program: Program, ctx: PassContext, o: Any) -> PassResult:
        names = graph_names(program, o.graphs, _NAME)
        new_graphs = dict(program.graphs)
        done: list[GraphPrune] = []
        unfit: dict[str, str] = {}
        fitted = False
        for name in names:
            g = program.graphs[name]
            if any(n.meta.get(meta.CREATED_BY) == _NAME for n in g.module.graph.nodes):
                ctx.log.debug("%s: graph '%s' is pruned already", _NAME, name)
                fitted = True
                continue
            try:
                out = _prune_graph(g, name, o, ctx)
            except _Unfit as e:
                if o.graphs:                       # the user named this graph: say why it cannot be pruned
                    raise (OptionError if e.option else PassError)(str(e)) from None
                ctx.log.debug("%s: %s: left alone", _NAME, e)
                unfit[name] = str(e)
                continue
            fitted = True
            if out is not None:
                new_graphs[name], rec = out
                done.append(rec)
        if not fitted:
            raise OptionError(f"pass '{_NAME}': no graph fits the options: " + "; ".join(unfit.values()))
        if not done:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"pruned_graphs": 0})
        prior = program.records.get("TokenPruneDecisions")
        rec = TokenPruneDecisions((prior.graphs if prior is not None else ()) + tuple(done))
        for g in done:
            ctx.log.info("%s: graph '%s': after %s, %d -> %d tokens (%s, %d of candidates %s kept), FLOPs %.3g -> "
                         "%.3g (%.2fx)", _NAME, g.graph, g.block, g.tokens_in, g.tokens_out, g.score, g.keep,
                         list(g.tokens), g.flops_before, g.flops_after, g.flops_after / max(g.flops_before, 1))
        stats = {"pruned_graphs": len(done), "tokens_in": done[0].tokens_in, "tokens_out": done[0].tokens_out,
                 "flops_ratio": round(rec.flops_ratio, 4)}
        new = program.replace(graphs=new_graphs, records={**program.records, "TokenPruneDecisions": rec})
        return PassResult(new, modified=True, stats=stats)


class _Unfit(Exception):
    """A graph the options do not fit (no such block, too few tokens, dense outputs): left alone
    unless option 'graphs' names it."""

    def __init__(self, msg: str, option: bool = True):
        super().__init__(msg)
        self.option = option


def _pick_block(blocks: list, after: int | str) -> Any:
    if isinstance(after, int):
        return blocks[after] if -len(blocks) <= after < len(blocks) else None
    hits = [b for b in blocks if match(after, b.path)]
    return hits[0] if len(hits) == 1 else None if not hits else hits


def _prune_graph(g: Graph, name: str, o: Any, ctx: PassContext) -> tuple[Graph, GraphPrune] | None:
    where = f"pass '{_NAME}': graph '{name}'"
    if any(n.op == "call_function" and "val" not in n.meta for n in g.module.graph.nodes):
        gm = g.copy_module()          # a pass before left nodes without values (taylor_cache's forecast)
        revalue(gm, g.example_inputs, name, _NAME)
        g = g.with_module(gm)
    gm = g.copy_module()
    eliminate_dead_code(gm)
    blocks = find_blocks(gm, name, _NAME, strict=False)
    blk = _pick_block(blocks, o.after) if blocks else None
    if isinstance(blk, list):
        raise OptionError(f"pass '{_NAME}': option 'after': {o.after!r} matches {len(blk)} blocks of graph "
                          f"'{name}' ({', '.join(b.path for b in blk)}); name one")
    if blk is None:
        raise _Unfit(f"pass '{_NAME}': option 'after': graph '{name}' has no attention block {o.after!r}" +
                     (f" (its blocks: {', '.join(b.path for b in blocks)})" if blocks else ""))
    first = residual_add(gm, blk)
    if first is None:
        raise PassError(f"{where}: block {blk.path} has no residual add after its attention "
                        f"({blk.softmax.format_node()}); token_prune expects transformer blocks x + attn(...)")
    x_shape = val_shape(first[0])
    second = second_residual(gm, blk, first[0], x_shape)
    seed = second[0] if second is not None else first[0]
    b0, n0 = x_shape[0], x_shape[1]
    probs_shape = val_shape(blk.softmax)
    if any(g.dynamic_dims):
        raise PassError(f"{where} has dynamic dims {list(g.dynamic_dims)}; token pruning fixes the token count, "
                        "so capture with static shapes")
    if probs_shape is None or probs_shape[-2:] != (n0, n0) or len(probs_shape) not in (3, 4) or \
            (probs_shape[0] * (probs_shape[1] if len(probs_shape) == 4 else 1)) % b0:
        raise PassError(f"{where}: block {blk.path}: its attention {blk.softmax.format_node()} is not "
                        f"[batch(, heads), {n0}, {n0}] over the residual stream's {n0} tokens")

    # the candidates and the queries
    if o.tokens is not None:
        start, end = o.tokens
        if end > n0:
            raise _Unfit(f"pass '{_NAME}': option 'tokens': [{start}, {end}) runs past the {n0} tokens of "
                         f"graph '{name}' after {blk.path}")
    else:
        x_first = residual_add(gm, blocks[0])
        protect = detect_protect(x_first[1])[0] if x_first is not None and val_shape(x_first[0]) == x_shape else 0
        start, end = protect, n0
    n = end - start
    keep = o.keep if o.keep is not None else max(1, round(o.ratio * n))
    if keep >= n:
        ctx.log.info("%s: graph '%s': keep %d of %d candidates: nothing to drop", _NAME, name, keep, n)
        return None
    queries = o.queries if o.queries is not None else \
        tuple(r for r in ((0, start), (end, n0)) if r[0] < r[1])
    for q in queries:
        if q[1] > n0:
            raise OptionError(f"pass '{_NAME}': option 'queries': [{q[0]}, {q[1]}) runs past the {n0} tokens "
                              f"of graph '{name}'")
    if o.score != "received" and not queries:
        raise OptionError(f"pass '{_NAME}': score {o.score!r} needs query tokens and every token of graph "
                          f"'{name}' is a candidate; give option 'queries' or use score 'received'")
    k_div = round(o.diversity * keep) if o.score == "relevance_diversity" else 0
    k_div = min(k_div, keep - 1)                # at least one by relevance seeds the diverse picks

    try:
        at = follow_tokens(gm, seed, n0, b0)
    except NotPerToken as e:
        raise PassError(f"{where}: {e}; dropping tokens would change what it computes") from None
    out_node = next(n_ for n_ in gm.graph.nodes if n_.op == "output")
    for i, v in enumerate(out_node.args[0]):
        if isinstance(v, fx.Node) and has_tok(at.dims.get(v)):
            raise _Unfit(f"{where}: output {g.output_names[i]!r} ({v.format_node()}) carries the token axis; "
                         "dropping tokens would change its shape (a dense output needs every token: use "
                         "token_merge, whose ToMe-SD form unmerges)", option=False)
    dropped = n - keep
    check_reads_outside(at, start, end, dropped, _NAME, name, "the candidate range",
                        "that pruning drops from; leave the tokens it reads out of the range")

    before = graph_flops(g.module)
    fn = _prune_fn(b0, n0, start, end, keep, k_div, o.score, queries,
                   o.temperature if o.mode == "transform" else None)
    ex = [torch.zeros(x_shape), torch.full(probs_shape, 1.0 / n0)]
    new_nodes, (pruned, index) = splice_in(gm, fn, [seed, blk.softmax], ex, blk.path, by=_NAME)
    seed.replace_all_uses_with(pruned, delete_user_cb=lambda u: u not in new_nodes)
    at.dims[pruned] = at.dims[seed]
    gathered: dict = {}

    def gather_mask(gm_: fx.GraphModule, node: fx.Node, fixed: fx.Node, at_: Atoms, name_: str) -> None:
        if fixed not in gathered:
            gathered[fixed] = _gather_fixed(gm_, node, fixed, index, at_, n0, b0, blk.path, name_)
        node.args = tuple(gathered[fixed] if a is fixed else a for a in node.args)

    new_graph = finish(gm, g, at, {pruned: n0 - dropped}, name, _NAME, gather_mask)
    sel_flops = sum(node_flops(nd) for nd in gm.graph.nodes if nd.meta.get(meta.CREATED_BY) == _NAME)
    rec = GraphPrune(name, blk.path, o.score, o.mode, (start, end), queries if o.score != "received" else (), keep, k_div,
                     n0, n0 - dropped, before, graph_flops(gm), sel_flops)
    return new_graph, rec


def _prune_fn(batch: int, n0: int, start: int, end: int, keep: int, k_div: int, score: str,
              queries: tuple, temperature: float | None = None) -> Any:
    """The selection (see module docstring): scores, top-k (+ diverse picks), positions in order, one
    gather; with a temperature (mode transform) the kept tokens are T @ candidates instead."""
    n = end - start

    def prune(x: torch.Tensor, probs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c = x.shape[2]
        p = probs.reshape(batch, -1, n0, n0).mean(1)                      # [B, Nq, Nk], mean over heads
        if score == "received":
            s = p.mean(1)[:, start:end]
        else:
            ar = torch.arange(n0)
            rows = sum(((ar >= a) & (ar < b)).to(x.dtype) for a, b in queries)   # 1 on the query rows
            s = (p * rows[None, :, None]).sum(1)[:, start:end]            # [B, n]
        cand = torch.arange(n)
        kept = (s.topk(keep - k_div, dim=-1).indices[..., None] == cand).to(x.dtype).sum(1)   # [B, n] 0/1
        if k_div or temperature is not None:
            f = x[:, start:end]
            f = f / f.norm(dim=-1, keepdim=True).clamp_min(1e-12)
            sim = f @ f.transpose(1, 2)                                   # [B, n, n] cosine
            for _ in range(k_div):
                near = (sim - 4.0 * (1.0 - kept[:, None, :])).max(-1).values   # nearest kept (cos >= -1)
                pick = (near + 4.0 * kept).argmin(-1)                     # the least covered candidate
                kept = kept + (pick[:, None] == cand).to(x.dtype)
        order = kept.cumsum(-1) * kept - 1.0                              # place among the kept, -1 dropped
        sel = (order[:, None, :] == torch.arange(keep).to(x.dtype)[None, :, None]).to(x.dtype)   # [B, keep, n]
        idx = (sel @ cand.to(x.dtype)[:, None])[..., 0].to(torch.long) + start                 # [B, keep]
        parts = [idx]
        if start:
            parts.insert(0, torch.arange(start).expand(batch, start))
        if end < n0:
            parts.append(torch.arange(end, n0).expand(batch, n0 - end))
        index = torch.cat(parts, dim=1) if len(parts) > 1 else idx
        if temperature is None:
            return x.gather(1, index[..., None].expand(batch, index.shape[1], c)), index
        # Token Transforming: each dropped candidate spreads over the kept ones by softmax(cos / T);
        # a kept token becomes the weighted mean of itself and what it absorbed
        w = torch.softmax(sim / temperature - 1e4 * (1.0 - kept[:, None, :]), dim=-1) * (1.0 - kept)[..., None]
        t = sel + sel @ w.transpose(1, 2)                                 # [B, keep, n]: T, many-to-many
        moved = (t / t.sum(-1, keepdim=True)) @ x[:, start:end]
        out = [x[:, :start]] if start else []
        out += [moved] + ([x[:, end:]] if end < n0 else [])
        return torch.cat(out, dim=1) if len(out) > 1 else moved, index
    return prune


def _gather_fixed(gm: fx.GraphModule, node: fx.Node, fixed: fx.Node, index: fx.Node, at: Atoms, n0: int, b0: int,
                  region: str, name: str) -> fx.Node:
    """`fixed` (a value from before the site that spans the token axis: an attention mask over
    the old count) gathered along its token dims with the kept positions."""
    shape = val_shape(fixed)
    out_dims = at.dims[node]
    lead = len(out_dims) - len(shape)
    tok_axes = [j for j in range(len(shape)) if shape[j] == n0 and j + lead >= 0 and TOK in out_dims[j + lead]]
    bat_axes = [j for j in range(len(shape)) if j + lead >= 0 and BATCH in out_dims[j + lead]]
    if not tok_axes:
        raise PassError(f"pass '{_NAME}': graph '{name}': {node.format_node()} combines {fixed.name} (shape "
                        f"{list(shape)}) with the token axis in a way pruning cannot follow")
    bax = bat_axes[0] if bat_axes else None
    if bax is None and b0 > 1:
        raise PassError(f"pass '{_NAME}': graph '{name}': {fixed.name} (shape {list(shape)}) spans the token axis "
                        f"but not the batch, and the {b0} rows of a batch keep different tokens")

    def gather(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        k = index.shape[1]
        if bax is not None and t.shape[bax] != b0:
            t = t.expand(*[b0 if j == bax else -1 for j in range(t.dim())])
        for ax in tok_axes:
            view = [1] * t.dim()
            view[ax] = k
            if bax is not None:
                view[bax] = b0
                idx = index.reshape(view)
            else:
                idx = index[0].reshape(view)
            target = list(t.shape)
            target[ax] = k
            t = t.gather(ax, idx.expand(target))
        return t
    ex = [torch.zeros(shape, dtype=fixed.meta["val"].dtype), torch.zeros(val_shape(index), dtype=torch.long)]
    new_nodes, (out,) = splice_in(gm, gather, [fixed, index], ex, region, by=_NAME)
    return out
