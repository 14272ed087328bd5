"""Merge similar tokens inside a transformer's blocks (ToMe, "Token Merging: Your ViT But
Faster", Bolya, Fu, Dai, Zhang, Feichtenhofer and Hoffman, ICLR 2023).

Before:  (block l, N tokens)
         h = x + attn(norm1(x))                    scores = q·kᵀ·c (+ mask)
         y = h + mlp(norm2(h))
After:   h = x + attn(norm1(x))                    scores = q·kᵀ·c + log s   (blocks after the first merge)
         h', s' = merge_r(h, s, mean_heads(k))     N -> N - r tokens; s: how many tokens each one stands for
         y = h' + mlp(norm2(h'))                   every later op sized for N - r tokens
merge_r is ToMe's bipartite soft matching: tokens alternate into sets A (even positions) and
B (odd); each A token finds its most similar B token by the cosine of the keys averaged over
heads; the r A tokens with the most similar partners are averaged into them, weighted by size
(x' = sum(s * x) / sum(s)); the first `protect` tokens ([CLS]) never merge and stay in front,
followed by the unmerged A tokens in order, then B. With `proportional_attention` the scores
of every block after the first merge get log(s) per key, so a merged token draws the attention
its tokens drew together.

Lowering: the merge is slices, a max, two top-k, one-hot masks (eq against arange) and
matmuls, a gather and a concat. The merged B tokens are b*s_b + D @ (a*s_a), D [batch, |B|, |A|]
the one-hot assignment of the merged A tokens to their partners, so nothing scatters (ToMe's
scatter_reduce, the known obstacle to exporting it, never appears) and no custom op is needed:
it lowers to ONNX Runtime (TopK, GatherElements, MatMul) and TVM as it is. r is fixed per block,
so every shape stays static.

Finding the sites in the captured graph (no model code is changed): a block is the outermost
module holding exactly one attention softmax; its scores come from the bmm whose output has
the token axis twice, and the keys are that bmm's second operand ([batch*heads, d, N]); the
merge goes after the block's first residual add after the softmax (the block's input plus a
value computed from the attention). The token axis is followed from the first block's input
through the rest of the graph (passes/sparsity/tokens.py): which dims of each value carry it
(`Atoms`), so that each later view / reshape / expand is re-sized for the merged count. Ops not known to act per token on the
token axis (a convolution over tokens, a slice of merged tokens, a graph output that carries
the token axis with unmerge: false) are refused, naming the
node. A mask added to the attention scores over the old token count is dropped where it is a
constant zero (transformers' ViT adds one) and refused otherwise.

ToMe-SD ("Token Merging for Fast Stable Diffusion", Bolya and Hoffman, CVPR-W 2023), for graphs
whose tokens leave the blocks dense (a DiT: an output carries the token axis, or an op after the
blocks reads it whole, as the unpatchify does); picked per graph by default (option `unmerge`):
Before:  (block l, N tokens)
         h = x + g1 * attn(mod1(norm1(x)))
         y = h + g2 * mlp(mod2(norm2(h)))
After:   m, u = match_r(x)                           once per block, from its input x
         h = x + u(g1 * attn(m(mod1(norm1(x)))))     attn on N - r tokens
         y = h + g2 * mlp(mod2(norm2(h)))            (branches: [attn, mlp]: the same m, u here too)
match_r is tomesd's bipartite_soft_matching_random2d: the (rows, cols) token grid (option `grid`;
square by default) gets one destination per stride window (top-left, or drawn once with `seed`);
each source finds its most similar destination by the cosine of x, and the r best-matched sources
are merged into theirs. m merges a branch's input (the last [batch, tokens, *] value every path of
the branch passes before its first matmul: after the norm and the adaLN modulation, where tomesd
merges) by tomesd's mean: a destination becomes the mean of itself and its sources, the merged set
is [unmerged sources | destinations]; u unmerges the branch output (after its gate, before the
residual add): every token takes its value in the merged set, a merged source its destination's.
Every block's output keeps all N tokens. Lowering: the grid's split is one constant index
(index_select → Gather); the matching is a matmul, a max, top-k and one-hot masks as above; the
merge is one matmul (assignment [B, nd, ns] @ sources) and a gather; the unmerge one gather. No
scatter, no custom op; r is fixed per block (capped at the sources), so shapes stay static. There
are no token sizes (tomesd has none): proportional attention is ToMe's only.

Reads: nothing (r is an option). Writes: a TokenMergeDecisions record (per graph and block: r,
tokens in and out, FLOPs before and after from analysis.cost, the merge's own FLOPs),
`pared.ir.created_by` and `pared.ir.region` (the block) on every inserted node.
For ToMe-SD its graphs are GraphUnmerge (the grid, stride, seed, destinations) and its blocks
BlockUnmerge (the branches merged and the tokens they ran on; tokens_in == tokens_out).
Invariant: a graph computes what the eager model patched with ToMe computes (the reference:
pared.testing.tome_merge, ToMe's own scatter_reduce form; for ToMe-SD pared.testing.tomesd_matching,
tomesd's own form) up to float rounding; where every
block's r is 0 the program comes back unchanged; a graph token_merge already rewrote is left
alone (a second run finds nothing more).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from pared.analysis.cost import graph_flops, node_flops, profile_graph
from pared.ir import meta
from pared.ir.errors import OptionError, PassError
from pared.ir.program import Graph, Program
from pared.ir.regions import match
from pared.ir.rewrite import eliminate_dead_code
from pared.ir.transform import (PRESERVE_ALL, PassContext, PassResult, Record, RewritePass, check_range,
                                register_pass)
from pared.passes.sparsity.tokens import (BATCH, ROWWISE, TOK, Atoms, Block, NotPerToken, ancestors, constant_value,
                                          descendants, detect_protect, find_blocks, finish, follow_tokens, has_tok,
                                          in_region, namespace, packet, reaches, residual_add, revalue,
                                          second_residual, splice_in, val_shape)

_aten = torch.ops.aten
_NAME = "token_merge"
#: the branches of a block ToMe-SD merges around
BRANCHES = ("attn", "mlp")


# -- records ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BlockMerge:
    """What token_merge decided for one block."""
    block: str                    # the block's region path
    r: int                        # tokens merged after its attention (0: none)
    r_requested: int              # what the options asked for (capped at ToMe's (tokens - protect) // 2)
    tokens_in: int
    tokens_out: int
    proportional_attention: bool  # log(size) added to its attention scores
    flops_before: int             # the block's ops (analysis.cost) before the rewrite
    flops_after: int              # the same ops after it (the merge excluded)
    merge_flops: int              # the merge inserted after its attention


@dataclass(frozen=True)
class GraphMerge:
    graph: str
    protect: int                  # leading tokens that never merge
    protect_from: str             # "option", or how it was detected
    tokens_in: int                # tokens entering the first block
    tokens_out: int               # tokens leaving the last block
    flops_before: int             # one call of the graph (analysis.cost)
    flops_after: int
    blocks: tuple[BlockMerge, ...]


@dataclass(frozen=True)
class TokenMergeDecisions(Record):
    method: str
    proportional_attention: bool
    graphs: tuple[GraphMerge, ...]

    @property
    def flops_ratio(self) -> float:
        """FLOPs after / before, over every graph rewritten."""
        before = sum(g.flops_before for g in self.graphs)
        return sum(g.flops_after for g in self.graphs) / before if before else 1.0


@dataclass(frozen=True)
class BlockUnmerge(BlockMerge):
    """ToMe-SD in one block: tokens_in == tokens_out; its branches ran on branch_tokens."""
    branches: tuple[str, ...]     # the branches merged ("attn", "mlp")
    branch_tokens: int            # tokens the merged branches run on (tokens_in - r)


@dataclass(frozen=True)
class GraphUnmerge(GraphMerge):
    """ToMe-SD in one graph: the partition of the token grid into destinations and sources."""
    grid: tuple[int, int]         # token rows, cols
    stride: tuple[int, int]       # one destination per window of this many rows, cols
    seed: int | None              # None: top-left destinations; else the seed of their draw
    dst_tokens: int               # destinations (never merged away); sources: tokens_in - dst_tokens


TOME_METHOD = "ToMe bipartite soft matching (size-weighted mean)"
SD_METHOD = "ToMe-SD merge -> branch -> unmerge (2D-grid bipartite matching on the block input, mean)"


# -- the pass --------------------------------------------------------------------------------
@register_pass("token_merge")
class MergeTokens(RewritePass):
    """ToMe bipartite soft matching after each block's attention (see module docstring)."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        # tokens merged in each selected block (ToMe's r), or a list with one value per selected block
        r: int | tuple[int, ...] | None = None
        # instead of r: this fraction of each selected block's unprotected input tokens, in (0, 0.5]
        ratio: float | None = None
        # leading tokens that never merge and keep their place ([CLS]); None: detected from the graph
        # (the leading tokens concatenated from parameters in front of the first block's input)
        protect: int | None = None
        # add log(token size) to the attention scores of every block after the first merge
        proportional_attention: bool = True
        # the blocks to merge in: indices (0 first, -1 last) or region patterns; empty: every block
        layers: tuple[int | str, ...] | str = ()
        # ToMe-SD (merge before a block's branches, unmerge their outputs back to every token) instead
        # of ToMe: None picks it per graph where the tokens leave the blocks dense (an output carries
        # the token axis, or an op after the blocks reads it whole: a DiT's unpatchify); True / False:
        # always / never (False refuses dense graphs, as ToMe cannot shorten their outputs)
        unmerge: bool | None = None
        # ToMe-SD: the branches merged in each block, "attn" (tomesd's default) and/or "mlp"
        branches: tuple[str, ...] | str = ("attn",)
        # ToMe-SD: the token grid (rows, cols); None: square when the token count is a square, else one row
        grid: tuple[int, int] | None = None
        # ToMe-SD: one destination token per window of (rows, cols) tokens, tomesd's (sy, sx)
        stride: tuple[int, int] | int = (2, 2)
        # ToMe-SD: None: each window's destination is its top-left token (tomesd's use_rand=False); an int:
        # a random one per window, drawn once with this seed and fixed in the graph (tomesd draws per call)
        seed: int | None = None

        def __post_init__(self):
            if (self.r is None) == (self.ratio is None):
                raise OptionError("pass 'token_merge': give option 'r' (tokens merged per block) or option "
                                  "'ratio' (a fraction of each block's tokens)" +
                                  (", not both" if self.r is not None else ""))
            if isinstance(self.r, (list, tuple)):
                object.__setattr__(self, "r", tuple(self.r))
                if not self.r:
                    raise OptionError("pass 'token_merge': option 'r' is an empty list; give one value per "
                                      "selected block, or one int for all")
                for i, v in enumerate(self.r):
                    check_range("token_merge", f"r[{i}]", v, lo=0)
            elif self.r is not None:
                check_range("token_merge", "r", self.r, lo=0)
            if self.ratio is not None:
                check_range("token_merge", "ratio", self.ratio, lo=0.0, hi=0.5, lo_open=True)
            if self.protect is not None:
                check_range("token_merge", "protect", self.protect, lo=0)
            object.__setattr__(self, "layers", (self.layers,) if isinstance(self.layers, str)
                               else tuple(self.layers))
            for v in self.layers:
                if isinstance(v, str) and not v:
                    raise OptionError("pass 'token_merge': option 'layers' holds an empty pattern")
            object.__setattr__(self, "branches", (self.branches,) if isinstance(self.branches, str)
                               else tuple(self.branches))
            if not self.branches or any(b not in BRANCHES for b in self.branches):
                raise OptionError(f"pass 'token_merge': option 'branches' must name some of {list(BRANCHES)}, "
                                  f"got {list(self.branches)}")
            stride = (self.stride, self.stride) if isinstance(self.stride, int) else tuple(self.stride)
            if len(stride) != 2 or any(v < 1 for v in stride):
                raise OptionError(f"pass 'token_merge': option 'stride' must be one or two positive ints "
                                  f"(rows, cols), got {self.stride}")
            object.__setattr__(self, "stride", stride)
            if self.grid is not None:
                object.__setattr__(self, "grid", tuple(self.grid))
                if len(self.grid) != 2 or any(v < 1 for v in self.grid):
                    raise OptionError(f"pass 'token_merge': option 'grid' must be two positive ints (rows, cols), "
                                      f"got {list(self.grid)}")
            if self.seed is not None:
                check_range("token_merge", "seed", self.seed, lo=0)
            if self.unmerge and self.protect:
                raise OptionError("pass 'token_merge': option 'protect' must be 0 with unmerge: true (ToMe-SD "
                                  "partitions every token on the grid; protected tokens are not supported there)")

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        new_graphs = dict(program.graphs)
        done: list[GraphMerge] = []
        for name in program.called_graphs():
            g = program.graphs[name]
            if any(n.meta.get(meta.CREATED_BY) == _NAME for n in g.module.graph.nodes):
                ctx.log.debug("token_merge: graph '%s' is merged already", name)
                continue
            out = _merge_graph(g, name, o, ctx)
            if out is not None:
                new_graphs[name], rec = out
                done.append(rec)
        merged = sum(1 for g in done for b in g.blocks if b.r)
        if not done:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"merged_blocks": 0})
        sd = [isinstance(g, GraphUnmerge) for g in done]
        method = SD_METHOD if all(sd) else TOME_METHOD if not any(sd) else f"{TOME_METHOD}; {SD_METHOD} where dense"
        rec = TokenMergeDecisions(method, o.proportional_attention and not all(sd), tuple(done))
        for g in done:
            ctx.log.info("token_merge: graph '%s': %d -> %d tokens over %d blocks (r %s, protect %d), FLOPs %.3g -> "
                         "%.3g (%.2fx)", g.graph, g.tokens_in, g.tokens_out, len(g.blocks),
                         [b.r for b in g.blocks], g.protect, g.flops_before, g.flops_after,
                         g.flops_after / max(g.flops_before, 1))
        stats = {"merged_blocks": merged, "graphs": len(done), "tokens_in": done[0].tokens_in,
                 "tokens_out": done[0].tokens_out, "flops_ratio": round(rec.flops_ratio, 4)}
        new = program.replace(graphs=new_graphs, records={**program.records, "TokenMergeDecisions": rec})
        return PassResult(new, modified=True, stats=stats)


# -- the schedule -----------------------------------------------------------------------------
def _selected(blocks: list[Block], layers: tuple) -> list[bool]:
    if not layers:
        return [True] * len(blocks)
    chosen = [False] * len(blocks)
    paths = [b.path for b in blocks]
    for v in layers:
        if isinstance(v, int):
            if not -len(blocks) <= v < len(blocks):
                raise OptionError(f"pass 'token_merge': option 'layers': block {v} is outside the model's "
                                  f"{len(blocks)} blocks ({paths[0]} ... {paths[-1]})")
            chosen[v % len(blocks)] = True
        else:
            hits = [i for i, p in enumerate(paths) if match(v, p)]
            if not hits:
                raise OptionError(f"pass 'token_merge': option 'layers': pattern '{v}' matches none of the "
                                  f"blocks ({', '.join(paths)})")
            for i in hits:
                chosen[i] = True
    return chosen


def _schedule(o: Any, chosen: list[bool], n0: int, protect: int) -> list[tuple[int, int, int, int]]:
    """Per block: (r requested, r, tokens in, tokens out)."""
    k = sum(chosen)
    if isinstance(o.r, tuple) and len(o.r) != k:
        raise OptionError(f"pass 'token_merge': option 'r' lists {len(o.r)} values for the {k} selected blocks; "
                          "give one per selected block, or one int for all")
    out, n, j = [], n0, 0
    for sel in chosen:
        req = 0
        if sel:
            if o.ratio is not None:
                req = int(o.ratio * max(n - protect, 0))
            else:
                req = o.r[j] if isinstance(o.r, tuple) else o.r
            j += 1
        a_free = (n + 1) // 2 - (protect + 1) // 2      # unprotected tokens of set A
        b_free = n // 2 - protect // 2
        cap = min(max(n - protect, 0) // 2, a_free) if b_free > 0 else 0
        r = max(0, min(req, cap))
        out.append((req, r, n, n - r))
        n -= r
    return out


# -- the rewrite ------------------------------------------------------------------------------
def _merge_graph(g: Graph, name: str, o: Any, ctx: PassContext) -> tuple[Graph, GraphMerge] | None:
    """Decide and rewrite one graph; None when nothing merges in it."""
    if any(n.op == "call_function" and "val" not in n.meta for n in g.module.graph.nodes):
        gm = g.copy_module()          # a pass before left nodes without values (taylor_cache's forecast)
        revalue(gm, g.example_inputs, name, _NAME)
        g = g.with_module(gm)
    blocks = find_blocks(g.module, name, _NAME)
    if not blocks:
        ctx.log.debug("token_merge: graph '%s' has no attention softmax", name)
        return None
    first = residual_add(g.module, blocks[0])
    if first is None:
        raise PassError(f"pass 'token_merge': graph '{name}': block {blocks[0].path} has no residual add after its "
                        f"attention ({blocks[0].softmax.format_node()}); token_merge expects transformer blocks "
                        "x + attn(...)")
    x0 = first[1]
    x_shape = val_shape(x0)
    n0 = val_shape(blocks[0].softmax)[-1]
    if any(g.dynamic_dims):
        raise PassError(f"pass 'token_merge': graph '{name}' has dynamic dims {list(g.dynamic_dims)}; token merging "
                        "fixes the token count per block, so capture with static shapes")
    if x_shape[1] != n0:
        raise PassError(f"pass 'token_merge': graph '{name}': the residual stream {x0.format_node()} has shape "
                        f"{list(x_shape)}; token_merge expects [batch, tokens, channels] with the attention's "
                        f"{n0} tokens on axis 1")
    dense = _dense(g.module, blocks, x0, n0, x_shape[0], g.output_names, name) if o.unmerge is None else None
    if o.unmerge or dense:
        if dense:
            ctx.log.debug("token_merge: graph '%s' is dense (%s): ToMe-SD", name, dense)
        return _unmerge_graph(g, name, o, ctx, x0, x_shape, n0)
    if o.protect is not None:
        protect, how = o.protect, "option"
    else:
        protect, how = detect_protect(x0)
    chosen = _selected(blocks, o.layers)
    sched = _schedule(o, chosen, n0, protect)
    if not any(r for _, r, _, _ in sched):
        ctx.log.info("token_merge: graph '%s': r is 0 in every block (%d tokens, protect %d): nothing to merge",
                     name, n0, protect)
        return None

    gm = g.copy_module()
    eliminate_dead_code(gm)
    blocks = find_blocks(gm, name, _NAME)
    by_name = {n.name: n for n in gm.graph.nodes}
    x0 = by_name[x0.name]
    try:
        at = follow_tokens(gm, x0, n0, x_shape[0])
    except NotPerToken as e:
        raise PassError(f"pass 'token_merge': graph '{name}': {e}; token merging would change what it computes") \
            from None
    _check_reads(at, protect, name)
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    for i, v in enumerate(out_node.args[0]):
        if isinstance(v, fx.Node) and has_tok(at.dims.get(v)):
            raise PassError(f"pass 'token_merge': graph '{name}': output {g.output_names[i]!r} ({v.format_node()}) "
                            f"carries the token axis; merging would change its shape. Dense outputs need ToMe-SD's "
                            "unmerge after each block's branches: leave option 'unmerge' unset (or true)")
    for blk in blocks:
        _locate(gm, blk, at, x_shape, name)

    before = profile_graph(g.module, name)
    prop = [o.proportional_attention and any(s[1] for s in sched[:i]) for i in range(len(blocks))]
    result_count: dict[fx.Node, int] = {}
    size_node = None
    for blk, (req, r, n_in, n_out), p_attn in zip(blocks, sched, prop):
        if p_attn:
            s_in = blk.softmax.args[0]
            ex = [torch.zeros(at.sizes(s_in, n_in)), torch.zeros(x_shape[0], n_in, 1)]
            new_nodes, (biased,) = splice_in(gm, _bias_fn(at.dims[s_in], x_shape[0]), [s_in, size_node], ex,
                                             blk.path, _NAME)
            s_in.replace_all_uses_with(biased, delete_user_cb=lambda u: u not in new_nodes)
            at.dims[biased] = at.dims[s_in]
            result_count[biased] = n_in
        if r:
            args = [blk.residual, blk.keys] + ([size_node] if size_node is not None else [])
            ex = [torch.zeros(x_shape[0], n_in, x_shape[2]), torch.zeros(at.sizes(blk.keys, n_in))]
            ex += [torch.zeros(x_shape[0], n_in, 1)] if size_node is not None else []
            fn = _merge_fn(x_shape[0], blk.heads, r, protect)
            new_nodes, (merged, size_node) = splice_in(gm, fn, args, ex, blk.path, _NAME)
            blk.residual.replace_all_uses_with(merged, delete_user_cb=lambda u: u not in new_nodes)
            at.dims[merged] = at.dims[blk.residual]
            result_count[merged] = n_out
    new_graph = finish(gm, g, at, result_count, name, _NAME, _drop_zero_mask)
    after = profile_graph(gm, name)
    merge_flops: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.meta.get(meta.CREATED_BY) == _NAME:
            merge_flops[n.meta[meta.REGION]] = merge_flops.get(n.meta[meta.REGION], 0) + node_flops(n)
    rows = []
    for blk, (req, r, n_in, n_out), p_attn in zip(blocks, sched, prop):
        rows.append(BlockMerge(blk.path, r, req, n_in, n_out, p_attn, _region_flops(before, blk.path),
                               _region_flops(after, blk.path), merge_flops.get(blk.path, 0)))
    rec = GraphMerge(name, protect, how, n0, sched[-1][3], graph_flops(g.module), graph_flops(gm), tuple(rows))
    for b in rows:
        ctx.log.debug("token_merge: %s/%s: r %d (asked %d), %d -> %d tokens, FLOPs %d -> %d + merge %d", name,
                      b.block, b.r, b.r_requested, b.tokens_in, b.tokens_out, b.flops_before, b.flops_after,
                      b.merge_flops)
    return new_graph, rec


def _region_flops(profile: Any, path: str) -> int:
    try:
        return profile.region(path).flops
    except KeyError:
        return 0


def _check_reads(at: Atoms, protect: int, name: str) -> None:
    for node, idx in at.reads.items():
        if idx < 0:
            raise OptionError(f"pass 'token_merge': graph '{name}' reads token {idx} (from the end) after the "
                              f"blocks ({node.format_node()}); merged tokens keep no place from the end, only "
                              "the first 'protect' tokens keep theirs")
        if idx >= protect:
            raise OptionError(f"pass 'token_merge': option 'protect': graph '{name}' reads token {idx} after the "
                              f"blocks ({node.format_node()}), but only the first {protect} token(s) are protected "
                              f"and keep their place; set protect: {idx + 1}")


def _locate(gm: fx.GraphModule, blk: Block, at: Atoms, x_shape: tuple, name: str) -> None:
    """Fill in a block's residual add, keys and heads (PassError when the block is not a ViT block)."""
    where = f"pass 'token_merge': graph '{name}': block {blk.path}"
    found = residual_add(gm, blk, x_shape)
    if found is None or found[0] not in at.dims:
        raise PassError(f"{where}: no residual add [batch, tokens, channels] after its attention "
                        f"({blk.softmax.format_node()})")
    blk.residual = found[0]
    if at.dims[blk.residual] != at.dims[found[1]] or at.dims[blk.residual][:2] != ((BATCH,), (TOK,)):
        raise PassError(f"{where}: the residual stream {blk.residual.format_node()} is not [batch, tokens, channels]")
    scores = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is _aten.bmm.default
              and in_region(n, blk.path) and n in at.dims and at.dims[n][-1] == (TOK,) and at.dims[n][-2] == (TOK,)]
    if len(scores) != 1:
        raise PassError(f"{where}: expected one bmm of queries and keys (output [batch*heads, tokens, tokens]), "
                        f"found {len(scores)}")
    keys = scores[0].args[1]
    kd = at.dims.get(keys)
    if kd is None or len(kd) != 3 or kd[2] != (TOK,) or not kd[0] or kd[0][0] != BATCH or \
            any(a in (TOK, BATCH) for a in kd[0][1:] + kd[1]):
        raise PassError(f"{where}: the keys {keys.format_node()} are not [batch*heads, d, tokens] (dims {kd})")
    blk.keys, blk.heads = keys, math.prod(kd[0][1:])
    s_in = blk.softmax.args[0]
    sd = at.dims.get(s_in)
    sm_dim = blk.softmax.args[1] if len(blk.softmax.args) > 1 else -1
    if sd is None or sd[-1] != (TOK,) or sm_dim % len(sd) != len(sd) - 1 or \
            sum(1 for d in sd if BATCH in d) != 1 or any(d and d[0] != BATCH and BATCH in d for d in sd):
        raise PassError(f"{where}: the softmax {blk.softmax.format_node()} does not normalize attention scores "
                        f"[batch(*heads), ..., keys] over the keys (dims {sd})")


def _merge_fn(batch: int, heads: int, r: int, protect: int) -> Any:
    """ToMe's bipartite soft matching and size-weighted merge, without scatter (see docstring)."""
    pa, pb = (protect + 1) // 2, protect // 2      # protected tokens in set A (even) and B (odd)

    def merge(x: torch.Tensor, keys: torch.Tensor, *size: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n, c = x.shape[1], x.shape[2]
        s = size[0] if size else torch.ones_like(x[:, :, :1])
        k = keys.reshape(batch, heads, keys.shape[1], n).mean(1).transpose(1, 2)   # [B, N, d], mean over heads
        k = k / k.norm(dim=-1, keepdim=True)
        ka, kb = k[:, 2 * pa::2], k[:, 2 * pb + 1::2]                              # unprotected A, B
        na, nb = ka.shape[1], kb.shape[1]
        best, partner = (ka @ kb.transpose(1, 2)).max(dim=-1)                      # [B, |A|]
        src = best.topk(r, dim=-1).indices                                          # the r merged A tokens
        merged = (src[..., None] == torch.arange(na)).to(x.dtype).sum(1)           # [B, |A|] 1: merged
        assign = ((partner[..., None] == torch.arange(nb)).to(x.dtype) * merged[..., None]).transpose(1, 2)
        xs = x * s
        xa, sa = xs[:, 2 * pa::2], s[:, 2 * pa::2]
        xb = xs[:, 2 * pb + 1::2] + assign @ xa                                     # [B, |B|, C]
        sb = s[:, 2 * pb + 1::2] + assign @ sa
        order = merged * na + torch.arange(na).to(x.dtype)                        # unmerged first, in order
        parts_x, parts_s = [xb], [sb]
        if na > r:
            keep = order.topk(na - r, dim=-1, largest=False).indices[..., None]    # [B, |A| - r, 1]
            parts_x.insert(0, xa.gather(1, keep.expand(batch, na - r, c)))
            parts_s.insert(0, sa.gather(1, keep))
        if protect:
            parts_x.insert(0, xs[:, :protect])
            parts_s.insert(0, s[:, :protect])
        so = torch.cat(parts_s, dim=1)
        return torch.cat(parts_x, dim=1) / so, so
    return merge


def _bias_fn(dims: tuple, batch: int) -> Any:
    """scores + log(size) per key, shaped to the scores' dims ([B, H, Nq, Nk] or [B*H, Nq, Nk])."""
    bpos = next(i for i, d in enumerate(dims) if BATCH in d)
    h = math.prod(dims[bpos][1:])
    ndim = len(dims)

    def add_log_size(scores: torch.Tensor, size: torch.Tensor) -> torch.Tensor:
        n = size.shape[1]
        logs = size[:, :, 0].log()                                                # [B, N]
        if h > 1:
            logs = logs[:, None, :].expand(batch, h, n).reshape(batch * h, n)
        shape = [1] * ndim
        shape[bpos], shape[-1] = batch * h, n
        return scores + logs.reshape(shape)
    return add_log_size


def _drop_zero_mask(gm: fx.GraphModule, node: fx.Node, fixed: fx.Node, at: Atoms, name: str) -> None:
    other = [a for a in node.args[:2] if isinstance(a, fx.Node) and a is not fixed]
    value = constant_value(gm, fixed)
    if node.target is not _aten.add.Tensor or len(other) != 1 or value is None or bool(value.any()) or \
            at.dims.get(other[0]) != at.dims[node]:
        raise PassError(f"pass 'token_merge': graph '{name}': {node.format_node()} adds {fixed.name} (shape "
                        f"{list(val_shape(fixed))}) over the token axis, which merging shortens; only a constant "
                        "zero mask can be dropped (an attention mask over padding cannot be merged)")
    node.replace_all_uses_with(other[0])


# -- ToMe-SD: merge -> branch -> unmerge ------------------------------------------------------
#: ops that mix tokens' features with weights: the merge goes before the first of them in a branch
_MATMULS = {"mm", "addmm", "bmm", "baddbmm", "matmul", "linear"}
_QDQ = {"quantize_per_tensor", "dequantize_per_tensor", "quantize_per_channel", "dequantize_per_channel"}


def _dense(gm: fx.GraphModule, blocks: list[Block], x0: fx.Node, n0: int, b0: int, output_names: Sequence[str],
           name: str) -> str | None:
    """Why the tokens leave the blocks dense (ToMe-SD's case), or None (ToMe can shorten them).

    Raises:
        PassError: an op inside a block reads the token axis other than per token.
    """
    try:
        at = follow_tokens(gm, x0, n0, b0)
    except NotPerToken as e:
        if any(in_region(e.node, b.path) for b in blocks):
            raise PassError(f"pass 'token_merge': graph '{name}': {e}; token merging would change what it "
                            "computes") from None
        return f"after the blocks, {e}"
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    for i, v in enumerate(out_node.args[0]):
        if isinstance(v, fx.Node) and has_tok(at.dims.get(v)):
            return f"output {output_names[i]!r} carries the token axis"
    for node, idx in at.reads.items():
        if idx < 0:             # merged tokens keep no place from the end; ToMe-SD keeps every token
            return f"after the blocks, {node.format_node()} reads token {idx} from the end"
    return None


def grid_partition(grid: tuple[int, int], stride: tuple[int, int], seed: int | None) -> tuple[list[int], list[int]]:
    """ToMe-SD's destination / source split of a (rows, cols) token grid (tomesd's
    bipartite_soft_matching_random2d): one destination per window of stride tokens (its top-left
    one, or one drawn with `seed` as tomesd draws them: randint(sy * sx) per window); tokens
    outside the whole windows are sources. Returns (destinations, sources), each in raster order."""
    h, w = grid
    sy, sx = min(stride[0], h), min(stride[1], w)
    hs, ws = h // sy, w // sx
    if seed is None:
        pick = torch.zeros(hs, ws, dtype=torch.int64)
    else:
        pick = torch.randint(sy * sx, (hs, ws, 1), generator=torch.Generator().manual_seed(seed))[..., 0]
    dst = sorted((i * sy + int(pick[i, j]) // sx) * w + j * sx + int(pick[i, j]) % sx
                 for i in range(hs) for j in range(ws))
    taken = set(dst)
    return dst, [k for k in range(h * w) if k not in taken]


def _sd_match_fn(batch: int, n: int, nd: int, r: int) -> Any:
    """The matching of one block, from its input x: (assign [B, nd, ns] one-hot of the merged
    sources to their destinations, where each of the n tokens reads its unmerged value from the
    merged set [unmerged sources | destinations] [B, n] int64, the kept sources [B, ns - r])."""
    ns = n - nd

    def match(x: torch.Tensor, perm: torch.Tensor, inv: torch.Tensor) -> tuple[torch.Tensor, ...]:
        dt = x.dtype
        m = x / x.norm(dim=-1, keepdim=True)
        mp = m.index_select(1, perm)
        mb, ma = mp[:, :nd], mp[:, nd:]
        best, partner = (ma @ mb.transpose(1, 2)).max(dim=-1)                     # [B, ns]
        src = best.topk(r, dim=-1).indices                                         # the r merged sources
        merged = (src[..., None] == torch.arange(ns)).to(dt).sum(1)               # [B, ns] 1: merged
        assign = ((partner[..., None] == torch.arange(nd)).to(dt) * merged[..., None]).transpose(1, 2)
        src_from = merged * ((ns - r) + partner.to(dt))
        keep = []
        if ns > r:
            order = merged * ns + torch.arange(ns).to(dt)                          # unmerged first, in order
            kept = order.topk(ns - r, dim=-1, largest=False).indices               # [B, ns - r]
            rank = ((kept[..., None] == torch.arange(ns)).to(dt) * torch.arange(ns - r).to(dt)[:, None]).sum(1)
            src_from = src_from + (1 - merged) * rank
            keep = [kept]
        dst_from = ((ns - r) + torch.arange(nd).to(dt)).expand(batch, nd)
        idx = torch.cat([dst_from, src_from], dim=1).index_select(1, inv).to(torch.int64)
        return (assign, idx, *keep)
    return match


def _sd_merge_fn(batch: int, n: int, nd: int, r: int) -> Any:
    """tomesd's merge (mode "mean"): each destination becomes the mean of itself and the sources
    merged into it; the merged set is [unmerged sources | destinations]."""
    ns = n - nd

    def merge(t: torch.Tensor, assign: torch.Tensor, perm: torch.Tensor, *keep: torch.Tensor) -> torch.Tensor:
        c = t.shape[2]
        tp = t.index_select(1, perm)
        tb, ta = tp[:, :nd], tp[:, nd:]
        tb = (tb + assign @ ta) / (1 + assign.sum(-1, keepdim=True))
        if not keep:
            return tb
        return torch.cat([ta.gather(1, keep[0][..., None].expand(batch, ns - r, c)), tb], dim=1)
    return merge


def _sd_unmerge_fn(batch: int, n: int) -> Any:
    """tomesd's unmerge: every token takes its value in the merged set (a merged source its destination's)."""
    def unmerge(y: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return y.gather(1, idx[..., None].expand(batch, n, y.shape[2]))
    return unmerge


def _branch(gm: fx.GraphModule, src: fx.Node, out: fx.Node, x_shape: tuple, where: str) -> tuple[set, fx.Node]:
    """The nodes of a residual branch from the stream `src` to its output `out`, and where to merge:
    the last value [batch, tokens, *] every path passes through before the first matmul (after the
    normalization and modulation, before the projections, as tomesd merges)."""
    within = (descendants(src) & ancestors(out)) | {out}
    pos = {n: i for i, n in enumerate(gm.graph.nodes)}
    nodes = sorted(within, key=pos.__getitem__)
    first_mm = next((pos[n] for n in nodes if n.op == "call_function" and
                     (packet(n) in _MATMULS or (namespace(n), packet(n)) in ROWWISE)), len(pos))
    point = src
    for n in nodes:
        s = val_shape(n)
        if pos[n] >= first_mm or n is out or s is None or len(s) != 3 or s[:2] != x_shape[:2]:
            continue
        if packet(n) in _QDQ:
            continue
        if not reaches(src, out, within, avoid=n):
            point = n
    for n in nodes:
        for u in n.users:
            if u not in within and n is not out and u.users:     # asserts (no users) only check dtypes
                raise PassError(f"{where}: {n.format_node()} inside the merged branch is also read by "
                                f"{u.format_node()} outside it; ToMe-SD merges only self-contained branches")
    return within, point


def _unmerge_graph(g: Graph, name: str, o: Any, ctx: PassContext, x0: fx.Node, x_shape: tuple,
                   n0: int) -> tuple[Graph, GraphMerge] | None:
    """ToMe-SD in one graph (see module docstring); None when r is 0 in every block."""
    from pared.ir.rewrite import add_constant
    protect, how = (o.protect, "option") if o.protect is not None else detect_protect(x0)
    if protect:
        raise PassError(f"pass 'token_merge': graph '{name}': ToMe-SD (its tokens leave the blocks dense) partitions "
                        f"every token on the grid, but the first {protect} token(s) are protected ({how}); set "
                        "protect: 0 to merge them too, or merge with ToMe (unmerge: false) where the output allows")
    if o.grid is not None:
        grid = o.grid
        if grid[0] * grid[1] != n0:
            raise OptionError(f"pass 'token_merge': option 'grid': {list(grid)} is {grid[0] * grid[1]} tokens, "
                              f"graph '{name}' has {n0}")
    else:
        side = math.isqrt(n0)
        grid = (side, side) if side * side == n0 else (1, n0)
    stride = (min(o.stride[0], grid[0]), min(o.stride[1], grid[1]))
    dst, srcs = grid_partition(grid, stride, o.seed)
    nd, ns = len(dst), len(srcs)
    blocks = find_blocks(g.module, name, _NAME)
    chosen = _selected(blocks, o.layers)
    k = sum(chosen)
    if isinstance(o.r, tuple) and len(o.r) != k:
        raise OptionError(f"pass 'token_merge': option 'r' lists {len(o.r)} values for the {k} selected blocks; "
                          "give one per selected block, or one int for all")
    sched, j = [], 0
    for sel in chosen:
        req = 0
        if sel:
            req = int(o.ratio * n0) if o.ratio is not None else (o.r[j] if isinstance(o.r, tuple) else o.r)
            j += 1
        sched.append((req, min(req, ns)))
    if not any(r for _, r in sched):
        ctx.log.info("token_merge: graph '%s': r is 0 in every block (%d tokens): nothing to merge", name, n0)
        return None

    gm = g.copy_module()
    eliminate_dead_code(gm)
    blocks = find_blocks(gm, name, _NAME)
    b0 = x_shape[0]
    at = Atoms(n0, b0, {}, {}, {})
    result_count: dict[fx.Node, int] = {}
    last_ph = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    perm_t = torch.tensor(dst + srcs, dtype=torch.int64)
    inv_t = torch.argsort(perm_t)
    perm = add_constant(gm, "_token_merge_perm", perm_t, _NAME, after=last_ph)
    inv = add_constant(gm, "_token_merge_inv", inv_t, _NAME, after=perm)
    perm.meta[meta.REGION] = inv.meta[meta.REGION] = blocks[0].path
    for blk, (req, r) in zip(blocks, sched):
        if not r:
            continue
        where = f"pass 'token_merge': graph '{name}': block {blk.path}"
        found = residual_add(gm, blk, x_shape)
        if found is None:
            raise PassError(f"{where}: no residual add [batch, tokens, channels] after its attention "
                            f"({blk.softmax.format_node()})")
        res1, x = found
        out1 = res1.args[0] if res1.args[1] is x else res1.args[1]
        branches = [("attn", x, out1)]
        if "mlp" in o.branches:
            second = second_residual(gm, blk, res1, x_shape)
            if second is None:
                raise PassError(f"{where}: option 'branches' holds 'mlp', but no second residual add "
                                f"(h + mlp(h)) follows {res1.format_node()}")
            branches.append(("mlp", res1, second[1]))
        if "attn" not in o.branches:
            branches = branches[1:]
        ex_x = torch.zeros(x_shape)
        new_nodes, (assign, idx, *keep) = splice_in(gm, _sd_match_fn(b0, n0, nd, r), [x, perm, inv],
                                                  [ex_x, perm_t, inv_t], blk.path, _NAME)
        for kind, src, out in branches:
            within, point = _branch(gm, src, out, x_shape, f"{where} ({kind})")
            if kind == "attn" and blk.softmax not in within:
                raise PassError(f"{where}: its attention {blk.softmax.format_node()} is not on the branch "
                                f"{x.name} -> {out.name} of the residual add {res1.format_node()}")
            c = val_shape(point)[2]
            ex = [torch.zeros(b0, n0, c), torch.zeros(b0, nd, ns), perm_t] + \
                 ([torch.zeros(b0, ns - r, dtype=torch.int64)] if keep else [])
            mnodes, (merged,) = splice_in(gm, _sd_merge_fn(b0, n0, nd, r), [point, assign, perm, *keep], ex,
                                          blk.path, _NAME)
            point.replace_all_uses_with(merged, delete_user_cb=lambda u: u in within and u not in mnodes)
            merged.meta["val"] = point.meta["val"]    # the old count while following (as every node's); revalue
            result_count[merged] = n0 - r
            try:
                follow_tokens(gm, merged, n0, b0, at=at, within=within)
            except NotPerToken as e:
                raise PassError(f"{where} ({kind}): {e}; token merging would change what it computes") from None
            if any(nd_ in within for nd_ in at.reads):
                raise PassError(f"{where} ({kind}): the branch reads single tokens "
                                f"({next(n for n in at.reads if n in within).format_node()}); ToMe-SD's merged "
                                "tokens have no fixed places")
            unodes, (unmerged,) = splice_in(gm, _sd_unmerge_fn(b0, n0), [out, idx],
                                          [torch.zeros(b0, n0 - r, x_shape[2]), torch.zeros(b0, n0, dtype=torch.int64)],
                                          blk.path, _NAME)
            out.replace_all_uses_with(unmerged, delete_user_cb=lambda u: u not in unodes)
            result_count[unmerged] = n0
        blk.residual = res1
    new_graph = finish(gm, g, at, result_count, name, _NAME, _drop_zero_mask)
    before, after = profile_graph(g.module, name), profile_graph(gm, name)
    merge_flops: dict[str, int] = {}
    for n in gm.graph.nodes:
        if n.meta.get(meta.CREATED_BY) == _NAME and meta.REGION in n.meta:
            merge_flops[n.meta[meta.REGION]] = merge_flops.get(n.meta[meta.REGION], 0) + node_flops(n)
    kinds = tuple(b for b in BRANCHES if b in o.branches)
    rows = tuple(BlockUnmerge(blk.path, r, req, n0, n0, False, _region_flops(before, blk.path),
                              _region_flops(after, blk.path), merge_flops.get(blk.path, 0) if r else 0,
                              kinds if r else (), n0 - r)
                 for blk, (req, r) in zip(blocks, sched))
    rec = GraphUnmerge(name, 0, how, n0, n0, graph_flops(g.module), graph_flops(gm), rows, grid, stride, o.seed, nd)
    for b in rows:
        ctx.log.debug("token_merge: %s/%s: ToMe-SD r %d (asked %d), branches %s on %d of %d tokens, FLOPs %d -> %d "
                      "+ merge %d", name, b.block, b.r, b.r_requested, b.branches, b.branch_tokens, b.tokens_in,
                      b.flops_before, b.flops_after, b.merge_flops)
    return new_graph, rec

