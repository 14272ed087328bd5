"""Reuse the keys and values of visual tokens whose image patches did not change since the
previous control step (VLA-Cache, "VLA-Cache: Towards Efficient Vision-Language-Action Model
via Adaptive Token Caching in Robotic Manipulation", 2025).

A robot policy runs its backbone on one camera frame per control step, and most patches of the
frame are where they were a step ago. For those, the keys and values each attention layer
computes are (nearly) those of the previous step; VLA-Cache keeps them and recomputes only the
tokens that changed, plus the task-relevant ones (the instruction's attention falls on them, and
reusing them cost the authors ten points of success).

Before (blocks l = 0..L-1 over N tokens: [prefix | visual v_0..v_(n-1) | suffix]):
    x_{l+1} = x_l + attn(ln(x_l)) ...; every block on N rows
After, on a warm call that reuses k tokens:
    sim_j    = cos(patch_j(image) - c, patch_j(previous image) - c)      (1 where the patch is equal)
    relevant = the `relevant` visual tokens of highest text -> vision attention at the previous call
    order    = the visual tokens by priority: relevant first, then the most changed (1 - sim); ties
               by token index (pairwise comparisons, no sort)
    rows_l   = [prefix | order[: n - k_l] | suffix]                      k_l = round(k * alpha_l)
    block l runs on rows_l only; its keys / values are those rows' followed by the reused tokens'
    rows of the previous call's (a Gather and a Concat; the text padding mask gathered into the
    same key order), so every query still sees all N keys; rows dropped at block l stay dropped
    below it (alpha_l does not fall with depth), so the graph shrinks block by block
Outputs unchanged; new outputs for the Plan's state: the frame's patches, the text -> vision
relevance (mean over blocks, or the last `relevance_blocks`, and heads of the instruction rows'
attention on each visual key), and per block its keys, values and where each token's key sits in
them.

Vision blocks (option `vision_blocks`, an extension: VLA-Cache reuses in the language model
only): the vision encoder's blocks, whose tokens are the backbone's visual tokens one for one
(no pooling between), reuse as the backbone's first block does; their rows are put back at
their token positions after the last of them (a one-hot matmul, zeros for the reused rows,
which the backbone does not read), so a reused token is computed nowhere in the encoder.

The Plan (per call of the graph G):
    Select(table: call 0 -> G.cold, later -> Seq(G.probe -> reusable count,
                                                 Select(bins on the count -> G.cold | G.r<k> ...)))
G.cold is the graph plus the state outputs. G.probe counts the visual tokens that are static
(sim >= `threshold`) and not relevant (the least over a batch); the bins take the largest level
k <= that count, so every token a warm variant reuses is static. Shapes stay static per
variant (ONNX Runtime, TVM): one graph per level.

Layer-adaptive reuse (`layers: entropy`, VLA-Cache's per-layer ratio from attention
concentration): on the calibration run, c_l = 1 - H_l / log(N) (H_l the mean entropy of block
l's attention rows); alpha_l = the running maximum of c_l / max(c) (deeper blocks whose attention
is more concentrated reuse more; a block never reuses fewer than the block above it).
`layers: uniform`: alpha = 1; or a list of alpha_l.

Finding the sites (no model code is changed): the blocks are token_merge's (the outermost module
holding one attention softmax); option `blocks` (a region pattern) picks them, by default the
last run of consecutive blocks over one residual-stream shape; the attention's q, kᵀ, v and bias
are sparse_attention's; the token axis is followed as token_prune follows it (views resized, ops
that mix tokens refused, naming the node). Reads of single tokens after the blocks must read the
prefix or the suffix (a readout token x[:, -1]).

Reads: calibration (attention entropies, with `layers: entropy`). Writes: a TokenReuseDecisions
record; graphs G.cold, G.probe, G.r<k> in place of G; state buffers token_reuse.<G>.*.
Invariant: a warm call whose frame equals the previous one returns the cold call's outputs (up
to float rounding); in general each warm variant computes pared.testing.ReuseTokensRef's eager
emulation of VLA-Cache.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.fx as fx

from pared.analysis.cost import graph_flops
from pared.analysis.recorder import record
from pared.ir import meta
from pared.ir.errors import OptionError, PassError
from pared.ir.plan import Bins, Call, Select, Seq, StateBuffer, Table
from pared.ir.program import Graph, Program
from pared.ir.regions import match
from pared.ir.rewrite import eliminate_dead_code
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, Record, RewritePass, check_range, register_pass
from pared.passes.sparsity.sparse_attention import attention_site
from pared.passes.sparsity.tokens import (TOK, Atoms, NotPerToken, check_reads_outside, find_blocks, follow_tokens,
                                          graph_names, packet, residual_add, resize, revalue, second_residual,
                                          splice_in, val_shape)

_NAME = "token_reuse"
LAYER_MODES = ("entropy", "uniform")


@dataclass(frozen=True)
class ReuseLevel:
    label: str                     # the variant's label, r<k>
    reuse: int                     # visual tokens reused at the last block
    per_block: tuple[int, ...]     # reused at each block (the vision blocks first)
    flops: int                     # of the variant graph (analysis.cost)


@dataclass(frozen=True)
class TokenReuseDecisions(Record):
    graph: str
    blocks: tuple[str, ...]
    tokens: tuple[int, int]              # the visual tokens [start, end) of the residual stream
    queries: tuple[int, int]             # the instruction rows whose attention gives relevance
    input: str
    patch: int
    threshold: float
    center: float
    relevant: int                        # visual tokens always recomputed (by relevance)
    alphas: tuple[float, ...]            # per-block share of a level's reuse
    concentration: tuple[float, ...]     # per block: 1 - H / log N on the calibration run (entropy mode)
    levels: tuple[ReuseLevel, ...]
    cold_flops: int
    probe_flops: int
    vision_blocks: tuple[str, ...] = ()  # blocks of the vision encoder reusing as the backbone's first does

    def flops_ratio(self, label: str) -> float:
        """The cold graph's FLOPs over a level's (its speedup bound)."""
        lv = next(lv for lv in self.levels if lv.label == label)
        return self.cold_flops / max(lv.flops + self.probe_flops, 1)


def _pair(v: Any, what: str) -> tuple[int, int] | None:
    if v is None:
        return None
    if not (isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and not isinstance(x, bool)
                                                                   for x in v) and 0 <= v[0] < v[1]):
        raise OptionError(f"pass '{_NAME}': option '{what}' must be [start, end) token indices, got {v!r}")
    return int(v[0]), int(v[1])


@register_pass(_NAME)
class ReuseTokens(RewritePass):
    """VLA-Cache's cross-frame reuse of static visual tokens (see module docstring)."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        tokens: tuple[int, int] | None = None     # the visual tokens [start, end) of the residual stream (required)
        input: str = "image"                      # the graph input holding the frame [B, C, H, W]
        patch: int | None = None                  # the patch size of one visual token (required)
        threshold: float = 0.996                  # a patch is static at this cosine similarity or above
        center: float = 0.5                       # subtracted from pixels before the cosine (mid-grey of [0, 1])
        relevant: float | int = 0.25              # visual tokens always recomputed: a share of them, or a count
        queries: tuple[int, int] | None = None    # instruction rows for relevance (default: the prefix)
        relevance_blocks: int | None = None       # the last blocks whose attention gives relevance (default: all)
        levels: tuple[int, ...] | None = None     # reuse counts of the variants (default quarters..3/4 by eighths)
        layers: Any = "entropy"                   # 'entropy', 'uniform', or one share per block
        blocks: str | None = None                 # region pattern of the blocks (default: the last run)
        vision_blocks: str | None = None          # the vision encoder's blocks, reusing as the first block does
        vision_tokens: tuple[int, int] | None = None   # the visual tokens in their stream (default: all)
        graphs: tuple[str, ...] | str = ()        # graph patterns (default: those with matching blocks)
        calibration_samples: int = 32             # calibration inputs for the attention entropies

        def __post_init__(self):
            object.__setattr__(self, "tokens", _pair(self.tokens, "tokens"))
            object.__setattr__(self, "queries", _pair(self.queries, "queries"))
            object.__setattr__(self, "vision_tokens", _pair(self.vision_tokens, "vision_tokens"))
            object.__setattr__(self, "graphs", (self.graphs,) if isinstance(self.graphs, str) else tuple(self.graphs))
            if self.tokens is None:
                raise OptionError(f"pass '{_NAME}': option 'tokens' is required: the [start, end) positions of the "
                                  "visual tokens in the residual stream (e.g. [12, 76] for 12 text tokens first)")
            if not isinstance(self.patch, int) or isinstance(self.patch, bool) or self.patch < 1:
                raise OptionError(f"pass '{_NAME}': option 'patch' is required: the pixel size of one visual "
                                  f"token's patch (a positive integer), got {self.patch!r}")
            check_range(_NAME, "threshold", self.threshold, lo=-1.0, hi=1.0)
            n = self.tokens[1] - self.tokens[0]
            r = self.relevant
            if isinstance(r, bool) or not isinstance(r, (int, float)) or r < 0 or \
                    (isinstance(r, float) and r > 1) or (isinstance(r, int) and r >= n):
                raise OptionError(f"pass '{_NAME}': option 'relevant' must be a share in [0, 1] or a count below "
                                  f"the {n} visual tokens, got {r!r}")
            if self.levels is not None:
                lv = (self.levels,) if isinstance(self.levels, int) else tuple(self.levels)
                object.__setattr__(self, "levels", lv)
                if not lv or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in lv) or \
                        list(lv) != sorted(set(lv)):
                    raise OptionError(f"pass '{_NAME}': option 'levels' must be ascending distinct positive token "
                                      f"counts, got {list(lv)}")
            ly = self.layers
            if isinstance(ly, str):
                if ly not in LAYER_MODES:
                    raise OptionError(f"pass '{_NAME}': option 'layers' must be one of {list(LAYER_MODES)} or a "
                                      f"list of per-block shares, got {ly!r}")
            else:
                if not isinstance(ly, (list, tuple)) or \
                        not all(isinstance(a, (int, float)) and not isinstance(a, bool) for a in ly):
                    raise OptionError(f"pass '{_NAME}': option 'layers' must be one of {list(LAYER_MODES)} or a "
                                      f"list of per-block shares, got {ly!r}")
                ly = tuple(float(a) for a in ly)
                object.__setattr__(self, "layers", ly)
                if not ly or any(not 0 <= a <= 1 for a in ly) or list(ly) != sorted(ly):
                    raise OptionError(f"pass '{_NAME}': option 'layers': per-block shares must be in [0, 1] and "
                                      f"not fall with depth (a token dropped stays dropped), got {list(ly)}")
            check_range(_NAME, "calibration_samples", self.calibration_samples, lo=1)
            if self.relevance_blocks is not None:
                check_range(_NAME, "relevance_blocks", self.relevance_blocks, lo=1)

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        names = [n for n in graph_names(program, o.graphs, self.name) if not program.graphs[n].made_by(self.name)]
        if not names:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"graphs": 0})
        new, done, why = program, [], []
        for name in names:
            g = program.graphs[name]
            site = _find(g, name, o, bool(o.graphs), why)
            if site is None:
                continue
            new, rec = _rewrite(new, name, site, o, ctx)
            if rec is None:
                continue
            new = new.with_record(rec, name)
            done.append(rec)
        if not done and not why:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"graphs": 0})
        if not done:
            if len(why) == 1:
                raise why[0]
            raise (OptionError if all(isinstance(e, OptionError) for e in why) else PassError)(
                f"pass '{_NAME}': no graph fits: " + "; ".join(str(e).split(": ", 1)[1] for e in why))
        return PassResult(new, modified=True, stats={"graphs": len(done),
                                                     "variants": sum(len(r.levels) for r in done)})


# -- finding the blocks ---------------------------------------------------------------------------
@dataclass
class _Chain:
    """Consecutive blocks over one residual stream, and where its visual tokens sit in it."""
    blocks: tuple[str, ...]
    n0: int
    start: int
    end: int
    heads: tuple[int, ...]


@dataclass
class _Site:
    blocks: tuple[str, ...]       # the backbone's blocks (the last chain)
    n0: int
    b0: int
    heads: tuple[int, ...]
    image: int                    # the graph input index of the frame
    vision: _Chain | None = None  # the vision encoder's blocks (option vision_blocks)

    @property
    def all_blocks(self) -> tuple[str, ...]:
        return (self.vision.blocks if self.vision else ()) + self.blocks


def _find(g: Graph, name: str, o: Any, strict: bool, why: list | None = None) -> _Site | None:
    """The blocks token_reuse rewrites in graph `name` (None: it does not fit and `graphs` did not
    name it; the reason goes to `why`)."""
    where = f"pass '{_NAME}': graph '{name}'"

    def unfit(msg: str, option: bool = True):
        err = (OptionError if option else PassError)(f"{where}: {msg}")
        if strict:
            raise err
        if why is not None:
            why.append(err)
        return None
    if o.input not in g.input_names:
        return unfit(f"option 'input': {o.input!r} is not an input of the graph (inputs: {list(g.input_names)})")
    if any(g.dynamic_dims):
        return unfit("has dynamic dims; token reuse fixes the token counts per variant, so capture with static "
                     "shapes", option=False)
    gm = g.module
    blocks = [b for b in find_blocks(gm, name, _NAME, strict=False)]
    shapes = {}
    for b in blocks:
        first = residual_add(gm, b)
        shapes[b.path] = val_shape(first[0]) if first is not None else None
    if o.blocks is not None:
        chosen = [b for b in blocks if match(o.blocks, b.path)]
        if not chosen:
            return unfit(f"option 'blocks': {o.blocks!r} matches none of its blocks "
                         f"({', '.join(b.path for b in blocks) or 'none'})")
    else:
        chosen = []
        for b in blocks:                 # the last run of consecutive blocks over one stream shape
            if chosen and shapes[b.path] != shapes[chosen[-1].path]:
                chosen = []
            if shapes[b.path] is not None:
                chosen.append(b)
    if not chosen:
        return unfit("has no attention blocks with a residual stream")
    shape = shapes[chosen[0].path]
    if shape is None or len(shape) != 3 or any(shapes[b.path] != shape for b in chosen):
        return unfit(f"the blocks {[b.path for b in chosen]} do not share one [batch, tokens, channels] residual "
                     "stream", option=False)
    b0, n0 = shape[0], shape[1]
    start, end = o.tokens
    if end > n0:
        return unfit(f"option 'tokens': [{start}, {end}) runs past the {n0} tokens of its blocks' stream")
    img = g.example_inputs[g.input_names.index(o.input)]
    if img.dim() != 4 or img.shape[2] % o.patch or img.shape[3] % o.patch or \
            (img.shape[2] // o.patch) * (img.shape[3] // o.patch) != end - start:
        return unfit(f"option 'patch': input {o.input!r} of shape {list(img.shape)} in {o.patch}-pixel patches "
                     f"does not give the {end - start} visual tokens [{start}, {end}) (one patch per token, row "
                     "by row)")
    q = o.queries or (0, start)
    if q[1] > start and q[0] < end:
        return unfit(f"option 'queries': the instruction rows {list(q)} overlap the visual tokens "
                     f"[{start}, {end})" if o.queries else "the visual tokens start at 0: give option 'queries' "
                     "(the instruction rows whose attention marks relevant tokens)")
    vision = None
    if o.vision_blocks is not None:
        vis = [b for b in blocks if match(o.vision_blocks, b.path)]
        if not vis:
            return unfit(f"option 'vision_blocks': {o.vision_blocks!r} matches none of its blocks "
                         f"({', '.join(b.path for b in blocks)})")
        order = {b.path: i for i, b in enumerate(blocks)}
        if any(b in chosen for b in vis) or max(order[b.path] for b in vis) > min(order[b.path] for b in chosen):
            return unfit(f"option 'vision_blocks': the vision blocks {[b.path for b in vis]} must all run before "
                         f"the backbone's {[b.path for b in chosen]}")
        vshape = shapes[vis[0].path]
        if vshape is None or len(vshape) != 3 or vshape[0] != b0 or any(shapes[b.path] != vshape for b in vis):
            return unfit(f"the vision blocks {[b.path for b in vis]} do not share one [{b0}, tokens, channels] "
                         "residual stream", option=False)
        vs, ve = o.vision_tokens or (0, vshape[1])
        if ve > vshape[1] or ve - vs != end - start:
            return unfit(f"option 'vision_tokens': [{vs}, {ve}) of the vision blocks' {vshape[1]} tokens must be "
                         f"the backbone's {end - start} visual tokens, one for one (no pooling in between)")
        vision = _Chain(tuple(b.path for b in vis), vshape[1], vs, ve, _heads(vis, vshape[1], b0, where))
    return _Site(tuple(b.path for b in chosen), n0, b0, _heads(chosen, n0, b0, where), g.input_names.index(o.input),
                 vision)


def _heads(blocks: Sequence[Any], n0: int, b0: int, where: str) -> tuple[int, ...]:
    heads = []
    for b in blocks:
        s = val_shape(b.softmax)
        if s is None or s[-2:] != (n0, n0):
            raise PassError(f"{where}: block {b.path}: its attention {b.softmax.format_node()} is not over the "
                            f"stream's {n0} tokens")
        heads.append(s[1] if len(s) == 4 else s[0] // b0)
    return tuple(heads)


# -- the tensor code spliced into the graphs ------------------------------------------------------
def patches_of(image: torch.Tensor, p: int, center: float) -> torch.Tensor:
    """[B, C, H, W] -> [B, (H/p)(W/p), C p p], row by row over the patch grid, centred."""
    b, c, h, w = image.shape
    t = image.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return t.reshape(b, (h // p) * (w // p), c * p * p) - center


def patch_similarity(cur: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
    """Per patch the cosine of the centred pixels, 1 where the patch is unchanged: [B, n]."""
    cos = (cur * prev).sum(-1) / (cur.norm(dim=-1) * prev.norm(dim=-1)).clamp_min(1e-12)
    same = (cur - prev).abs().amax(-1) == 0
    return torch.where(same, torch.ones_like(cos), cos)


def stable_rank(score: torch.Tensor) -> torch.Tensor:
    """Per row, each entry's place in descending order, ties by lower index first (a stable
    argsort's): [B, n] int64. Pairwise comparisons, no sort: deterministic on every backend."""
    n = score.shape[-1]
    ar = torch.arange(n)
    above = score[:, None, :] > score[:, :, None]                            # [B, j, i]: s_i > s_j
    tie = (score[:, None, :] == score[:, :, None]) & (ar[None, :] < ar[:, None])[None]
    return (above | tie).sum(-1)


def order_of(rank: torch.Tensor) -> torch.Tensor:
    """The indices in rank order: [B, n] int64 (the inverse permutation of `rank`)."""
    n = rank.shape[-1]
    onehot = (rank[:, None, :] == torch.arange(n)[None, :, None]).to(torch.float32)   # [B, place, j]
    return (onehot @ torch.arange(n).to(torch.float32)[:, None])[..., 0].to(torch.long)


def relevant_mask(relevance: torch.Tensor, k: int) -> torch.Tensor:
    """1.0 on the k visual tokens of highest relevance per row (ties: lower index): [B, n]."""
    return (stable_rank(relevance) < k).to(relevance.dtype)


def _probe_fn(o: Any, n_rel: int):
    def probe(image: torch.Tensor, prev: torch.Tensor, relevance: torch.Tensor) -> torch.Tensor:
        sim = patch_similarity(patches_of(image, o.patch, o.center), prev)
        free = (sim >= o.threshold).to(sim.dtype) * (1.0 - relevant_mask(relevance, n_rel))
        return free.sum(-1).amin(0, keepdim=True)                          # [1]: the least over the batch
    return probe


def _order_fn(o: Any, n_rel: int):
    """(the visual tokens by priority: relevant first, then the most changed; the frame's patches)."""
    def order(image: torch.Tensor, prev: torch.Tensor, relevance: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cur = patches_of(image, o.patch, o.center)
        prio = 4.0 * relevant_mask(relevance, n_rel) + (1.0 - patch_similarity(cur, prev))
        return order_of(stable_rank(prio)), cur
    return order


def _gather_fn(b0: int, n0: int, start: int, end: int, visual: int):
    """The stream's rows [prefix | the first `visual` tokens of the order | suffix], and their positions."""
    def gather(x: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        parts = [order[:, :visual] + start]
        if start:
            parts.insert(0, torch.arange(start).expand(b0, start))
        if end < n0:
            parts.append(torch.arange(end, n0).expand(b0, n0 - end))
        index = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        return x.gather(1, index[..., None].expand(b0, index.shape[1], x.shape[2])), index
    return gather


def _unscatter_fn(n0: int):
    """A chain's last rows put back at their token positions of the full stream (zeros elsewhere:
    the next chain reads only the rows computed here)."""
    def unscatter(y: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        onehot = (index[:, :, None] == torch.arange(n0)).to(y.dtype)                   # [B, R, N]
        return onehot.transpose(1, 2) @ y
    return unscatter


def _shrink_fn(keep: int, suffix: int):
    def shrink(x: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = x.shape[1]
        xs = torch.cat([x[:, :keep], x[:, r - suffix:]], dim=1) if suffix else x[:, :keep]
        i0 = index.shape[1]
        ix = torch.cat([index[:, :keep], index[:, i0 - suffix:]], dim=1) if suffix else index[:, :keep]
        return xs, ix
    return shrink


def _take(t: torch.Tensor, axis: int, index: torch.Tensor, heads: int) -> torch.Tensor:
    """t [B*h, ., .] indexed along `axis` by per-row positions index [B, k] (the same for each
    head): one Gather for a batch of one, a GatherElements otherwise."""
    b, k = index.shape
    if b == 1:
        return t.index_select(axis, index[0])
    ix = index[:, None, :].expand(b, heads, k).reshape(b * heads, k)
    shape = list(t.shape)
    shape[axis] = k
    ix = ix[:, None, :] if axis == 2 else ix[:, :, None]
    return t.gather(axis, ix.expand(shape))


def _keys_fn(start: int, visual: int, reuses: bool):
    """Block l's key order: its recomputed rows (`visual` of the visual tokens among them), then
    the reused tokens; gives (the reused tokens' positions [B, k] when it `reuses`, the inverse
    of the key order: where each token's key sits [B, N])."""
    def keys(index: torch.Tensor, order: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if not reuses:
            return (order_of(index),)
        reused = order[:, visual:] + start
        return reused, order_of(torch.cat([index, reused], dim=1))
    return keys


def _kv_fn(axis: int, heads: int):
    """A block's keys (kᵀ [B*h, d, N], axis 2) or values ([B*h, N, d], axis 1): its recomputed
    rows, then the reused tokens' rows of the previous call's, at `src` (where the previous call
    put them). A Gather and a Concat: no scatter, no matmul; the result is the next call's state
    as it is."""
    def kv(new: torch.Tensor, src: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        return torch.cat([new, _take(prev, axis, src, heads)], dim=axis)
    return kv


def _src_fn(prev_pos: torch.Tensor, reused: torch.Tensor) -> torch.Tensor:
    """Where the previous call put the reused tokens' keys: [B, k]."""
    return prev_pos.gather(1, reused)


def _bias_fn(b0: int):
    """An additive attention bias [.., N] (text padding) with its keys in the block's order."""
    def bias(t: torch.Tensor, *parts: torch.Tensor) -> torch.Tensor:
        perm = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]                   # the key order
        if b0 == 1:
            return t.index_select(t.dim() - 1, perm[0])
        t = t.expand(b0, *t.shape[1:])
        return t.gather(t.dim() - 1, perm.reshape([b0] + [1] * (t.dim() - 2) + [perm.shape[1]]).expand(t.shape))
    return bias


def _relevance_fn(b0: int, queries: tuple[int, int], tokens: tuple[int, int], blocks: int, reordered: bool):
    """Mean over `blocks` blocks and their heads of the instruction rows' attention on each visual
    key. `reordered` (a warm variant): each block's probabilities come with the inverse of its key
    order, which puts the keys back in token order."""
    def relevance(*args: torch.Tensor) -> torch.Tensor:
        probs, inverses = args[:blocks], args[blocks:] if reordered else ()
        acc = None
        for i, p in enumerate(probs):
            p = p.reshape(b0, -1, p.shape[-2], p.shape[-1])
            col = p[:, :, queries[0]:queries[1]].sum(2).mean(1)                             # [B, N]
            if reordered:
                col = col.gather(1, inverses[i])
            r = col[:, tokens[0]:tokens[1]]
            acc = r if acc is None else acc + r
        return acc / blocks
    return relevance


def _identity_fn(b0: int, n0: int):
    """Where each token's key sits in a cold call: in token order, [B, N] (`like` only anchors
    the splice)."""
    def identity(like: torch.Tensor) -> torch.Tensor:
        return torch.arange(n0).expand(b0, n0) + like[:, :1].to(torch.long) * 0
    return identity


def _patches_fn(o: Any):
    def patches(image: torch.Tensor) -> torch.Tensor:
        return patches_of(image, o.patch, o.center)
    return patches


# -- the variants ---------------------------------------------------------------------------------
def _blocks_in(gm: fx.GraphModule, name: str, paths: Sequence[str]) -> list:
    by = {b.path: b for b in find_blocks(gm, name, _NAME, strict=False)}
    return [by[p] for p in paths]


def _stream(gm: fx.GraphModule, blk: Any, name: str) -> tuple[fx.Node, fx.Node]:
    """(the block's input on the residual stream, its output)."""
    first = residual_add(gm, blk)
    second = second_residual(gm, blk, first[0], val_shape(first[0])) if first is not None else None
    if second is None:
        raise PassError(f"pass '{_NAME}': graph '{name}': block {blk.path} is not x + attn(..) then + mlp(..)")
    return first[1], second[0]


def _add_outputs(gm: fx.GraphModule, nodes: Sequence[fx.Node]) -> None:
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (tuple(out.args[0]) + tuple(nodes),)


def _add_inputs(gm: fx.GraphModule, names: Sequence[str], examples: Sequence[torch.Tensor]) -> list[fx.Node]:
    last = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    out = []
    for nm, ex in zip(names, examples):
        with gm.graph.inserting_after(last):
            ph = gm.graph.placeholder(nm)
        ph.meta["val"] = ex
        out.append(ph)
        last = ph
    return out


def _cold(src: Graph, name: str, site: _Site, o: Any) -> tuple[Graph, list[str]]:
    """The graph plus its state outputs: the frame's patches, the relevance, each block's kᵀ and v."""
    gm = src.copy_module()
    eliminate_dead_code(gm)
    blocks = _blocks_in(gm, name, site.all_blocks)
    atts = [attention_site(gm, b.softmax, name, b.path, _NAME) for b in blocks]
    image = [n for n in gm.graph.nodes if n.op == "placeholder"][site.image]
    ex_img = src.example_inputs[site.image]
    _, (pt,) = splice_in(gm, _patches_fn(o), [image], [torch.zeros(ex_img.shape)], blocks[0].path, _NAME)
    probs = [b.softmax for b in blocks[len(blocks) - _relevance_count(o, site):]]
    _, (rel,) = splice_in(gm, _relevance_fn(site.b0, o.queries or (0, o.tokens[0]), o.tokens, len(probs), False), probs,
                          [torch.zeros(val_shape(p)) for p in probs], site.blocks[-1], _NAME)
    n_keys = [val_shape(b.softmax)[-1] for b in blocks]
    poss = {nk: splice_in(gm, _identity_fn(site.b0, nk), [rel], [torch.zeros(val_shape(rel))], site.blocks[-1],
                          _NAME)[1][0] for nk in sorted(set(n_keys))}
    _add_outputs(gm, [pt, rel] + [a.kt for a in atts] + [a.v for a in atts] + [poss[nk] for nk in n_keys])
    eliminate_dead_code(gm)
    gm.recompile()
    names = _state_names(len(blocks))
    return src.with_module(gm, output_names=src.output_names + tuple(names)), names


def _relevance_count(o: Any, site: _Site) -> int:
    """How many of the last backbone blocks' attention the relevance averages."""
    return min(o.relevance_blocks or len(site.blocks), len(site.blocks))


def _state_names(n_blocks: int) -> list[str]:
    """patches, relevance, then per block its keys, values and where each token's key sits."""
    return ["patches", "relevance"] + [f"{x}{i}" for x in "kvp" for i in range(n_blocks)]


def _warm(src: Graph, name: str, site: _Site, o: Any, reuse: Sequence[int], n_rel: int,
          state_ex: Sequence[torch.Tensor]) -> Graph:
    """The variant reusing reuse[l] visual tokens at block l (see module docstring); `reuse` runs
    over the vision blocks, then the backbone's."""
    where = f"pass '{_NAME}': graph '{name}'"
    start, end = o.tokens
    b0 = site.b0
    chains = ([site.vision] if site.vision else []) + [_Chain(site.blocks, site.n0, start, end, site.heads)]
    gm = src.copy_module()
    eliminate_dead_code(gm)
    blocks = _blocks_in(gm, name, site.all_blocks)
    streams = [_stream(gm, b, name) for b in blocks]
    atts = [attention_site(gm, b.softmax, name, b.path, _NAME) for b in blocks]
    state_names = _state_names(len(blocks))
    phs = _add_inputs(gm, [f"token_reuse_{s}" for s in state_names], state_ex)
    nb = len(blocks)
    prev_pt, prev_rel, ks, vs, ps = phs[0], phs[1], phs[2:2 + nb], phs[2 + nb:2 + 2 * nb], phs[2 + 2 * nb:]
    image = [n for n in gm.graph.nodes if n.op == "placeholder"][site.image]
    n = end - start
    _, (order, cur) = splice_in(gm, _order_fn(o, n_rel), [image, prev_pt, prev_rel],
                                [torch.zeros(src.example_inputs[site.image].shape), state_ex[0], state_ex[1]],
                                blocks[0].path, _NAME)
    ats, counts_of = [], []
    inverses: dict = {}                                 # block -> its key order's inverse (blocks that reuse)
    first = 0
    for ci, ch in enumerate(chains):
        idx = range(first, first + len(ch.blocks))
        first += len(ch.blocks)
        suffix = ch.n0 - ch.end
        rows = [ch.n0 - reuse[i] for i in idx]
        x0 = streams[idx[0]][0]
        d = val_shape(x0)[2]
        new_nodes, (xg, index) = splice_in(gm, _gather_fn(b0, ch.n0, ch.start, ch.end, n - reuse[idx[0]]),
                                           [x0, order], [torch.zeros(val_shape(x0)), torch.zeros(b0, n, dtype=torch.long)],
                                           blocks[idx[0]].path, _NAME)
        x0.replace_all_uses_with(xg, delete_user_cb=lambda u: u not in new_nodes)
        seeds, counts, indices = [xg], {xg: rows[0]}, [index]
        for j in range(1, len(idx)):
            x_in = streams[idx[j]][0]
            if rows[j] == rows[j - 1]:
                indices.append(indices[-1])
                continue
            new_nodes, (xs, ix) = splice_in(gm, _shrink_fn(rows[j] - suffix, suffix), [x_in, index],
                                            [torch.zeros(b0, rows[j - 1], d), torch.zeros(b0, rows[0], dtype=torch.long)],
                                            blocks[idx[j]].path, _NAME)
            x_in.replace_all_uses_with(xs, delete_user_cb=lambda u: u not in new_nodes)
            seeds.append(xs)
            counts[xs] = rows[j]
            indices.append(ix)
        # keys and values: the recomputed rows, then the reused tokens' from the previous call
        orders: dict = {}
        biases: dict = {}
        for j, i in enumerate(idx):
            a, r, h, k = atts[i], rows[j], ch.heads[j], reuse[i]
            if indices[j] not in orders:
                _, orders[indices[j]] = splice_in(gm, _keys_fn(ch.start, n - k, k > 0), [indices[j], order],
                                                  [torch.zeros(b0, r, dtype=torch.long),
                                                   torch.zeros(b0, n, dtype=torch.long)], blocks[i].path, _NAME)
            got = orders[indices[j]]
            reused, inverse = (got[0], got[1]) if k > 0 else (None, got[0])
            inverses[i] = inverse
            k_full, v_full, new_kv = a.kt, a.v, set()
            if k > 0:
                kt_s, v_s = val_shape(a.kt), val_shape(a.v)
                ix = torch.zeros(b0, k, dtype=torch.long)
                _, (at_prev,) = splice_in(gm, _src_fn, [ps[i], reused], [torch.zeros(b0, ch.n0, dtype=torch.long), ix],
                                      blocks[i].path, _NAME)
                new_kv, (k_full,) = splice_in(gm, _kv_fn(2, h), [a.kt, at_prev, ks[i]],
                                              [torch.zeros(kt_s[0], kt_s[1], r), ix, torch.zeros(kt_s)],
                                              blocks[i].path, _NAME)
                _, (v_full,) = splice_in(gm, _kv_fn(1, h), [a.v, at_prev, vs[i]],
                                         [torch.zeros(v_s[0], r, v_s[2]), ix, torch.zeros(v_s)], blocks[i].path, _NAME)
            qk = next(u for u in a.kt.users if packet(u) in ("bmm", "matmul") and u not in new_kv)
            qk.args = tuple(k_full if x is a.kt else x for x in qk.args)
            a.pv.args = tuple(v_full if x is a.v else x for x in a.pv.args)
            if a.bias is not None:                          # the text padding mask, keys in the same order
                if (a.bias, indices[j]) not in biases:
                    parts = [indices[j]] + ([reused] if k > 0 else [])
                    _, (biases[(a.bias, indices[j])],) = splice_in(
                        gm, _bias_fn(b0), [a.bias, *parts],
                        [torch.zeros(val_shape(a.bias)), torch.zeros(b0, r, dtype=torch.long)] +
                        ([torch.zeros(b0, k, dtype=torch.long)] if k > 0 else []), blocks[i].path, _NAME)
                add = _bias_add(blocks[i].softmax, a.bias, where)
                add.args = tuple(biases[(a.bias, indices[j])] if x is a.bias else x for x in add.args)
            ks[i], vs[i], ps[i] = k_full, v_full, inverse          # the state outputs
        if ci < len(chains) - 1:                       # a chain before the backbone: its rows back in place
            y = streams[idx[-1]][1]
            new_nodes, (y_full,) = splice_in(gm, _unscatter_fn(ch.n0), [y, indices[-1]],
                                             [torch.zeros(b0, rows[-1], d), torch.zeros(b0, rows[-1], dtype=torch.long)],
                                             blocks[idx[-1]].path, _NAME)
            y.replace_all_uses_with(y_full, delete_user_cb=lambda u: u not in new_nodes)
        ats.append((Atoms(ch.n0, b0, {}, {}, {}), seeds, ch))
        counts_of.append(counts)

    # the token axis through each chain (the keys / values stay at N rows)
    created = {nd for nd in gm.graph.nodes if nd.meta.get(meta.CREATED_BY) == _NAME}
    within = set(gm.graph.nodes) - created
    try:
        for at, seeds, _ in ats:
            for sd in seeds:
                follow_tokens(gm, sd, at.n0, b0, at=at, within=within)
    except NotPerToken as e:
        raise PassError(f"{where}: {e}; recomputing only some tokens would change what it computes") from None
    out_node = next(nd for nd in gm.graph.nodes if nd.op == "output")
    for at, _, ch in ats:
        for i, v in enumerate(out_node.args[0]):
            if isinstance(v, fx.Node) and v in at.dims and any(TOK in dd for dd in at.dims[v]):
                raise PassError(f"{where}: output {src.output_names[i]!r} ({v.format_node()}) carries the token "
                                "axis; token reuse computes only some tokens' rows")
        check_reads_outside(at, ch.start, ch.end, reuse[-1], _NAME, name, "the visual tokens",
                            "which a warm call does not all compute")

    first_b = len(blocks) - _relevance_count(o, site)
    rows = [site.n0 - k for k in reuse[first_b:]]
    probs = [b.softmax for b in blocks[first_b:]]
    invs = [inverses.get(first_b + i) for i in range(len(probs))]
    _, (rel,) = splice_in(gm, _relevance_fn(b0, o.queries or (0, start), o.tokens, len(probs), True), probs + invs,
                          [torch.zeros(_probs_shape(p, rows[i])) for i, p in enumerate(probs)] +
                          [torch.zeros(b0, site.n0, dtype=torch.long) for _ in invs],
                          site.blocks[-1], _NAME)
    _add_outputs(gm, [cur, rel] + list(ks) + list(vs) + list(ps))
    for (at, _, _), counts in zip(ats, counts_of):
        resize(gm, at, counts, name, _NAME)
    eliminate_dead_code(gm)
    gm.recompile()
    examples = tuple(src.example_inputs) + tuple(state_ex)
    revalue(gm, examples, name, _NAME)
    out = src.with_module(gm, input_names=src.input_names + tuple(f"state.{s}" for s in state_names),
                          output_names=src.output_names + tuple(state_names), example_inputs=examples,
                          dynamic_dims=())
    for nm, got, want in zip(src.output_names, out.run(*examples), src.run(*src.example_inputs)):
        if tuple(got.shape) != tuple(want.shape):
            raise PassError(f"{where}: output {nm!r} changed shape {list(want.shape)} -> {list(got.shape)} (internal)")
    return out


def _bias_add(softmax: fx.Node, bias: fx.Node, where: str) -> fx.Node:
    """The add that puts `bias` on the scores this softmax normalizes."""
    n = softmax.args[0]
    while isinstance(n, fx.Node) and n.op == "call_function":
        if packet(n) == "add" and bias in n.args:
            return n
        if packet(n) in ("bmm", "matmul", "mm", "baddbmm"):
            break
        n = n.args[0]
    raise PassError(f"{where}: the attention bias {bias.format_node()} is not added on the scores of "
                    f"{softmax.format_node()}")


def _probs_shape(p: fx.Node, rows: int) -> tuple[int, ...]:
    s = val_shape(p)
    return s[:-2] + (rows, s[-1])


def _probe(o: Any, site: _Site, src: Graph, state_ex: Sequence[torch.Tensor], n_rel: int) -> Graph:
    from pared.ir.capture import capture

    class Probe(torch.nn.Module):
        def forward(self, image, prev, relevance):
            return _probe_fn(o, n_rel)(image, prev, relevance)
    ex = (src.example_inputs[site.image], state_ex[0], state_ex[1])
    g = capture(Probe(), ex, name="probe").main
    return g.with_module(g.module, input_names=("image", "patches", "relevance"), output_names=("reusable",))


# -- layer-adaptive reuse ----------------------------------------------------------------------------
def _concentration(program: Program, name: str, site: _Site, calib: Any, samples: int) -> tuple:
    """Per block 1 - H / log(N): H the mean entropy of its attention rows over up to `samples`
    calibration calls (the program run with its own Plan, the blocks' softmaxes tapped)."""
    if calib is None or not callable(calib) and not len(calib):
        raise PassError(f"pass '{_NAME}': option layers='entropy' measures each block's attention on the "
                        "calibration run: pass calibration= a list of input tuples (or give layers: uniform)")
    if not callable(calib):
        calib = list(calib)[::max(1, len(calib) // samples)][:samples]
    blocks = _blocks_in(program.graphs[name].module, name, site.blocks)
    which = {b.softmax.name: i for i, b in enumerate(blocks)}
    acc = [[0.0, 0] for _ in blocks]

    def on_value(tap: Any, p: torch.Tensor) -> None:
        p = p.double().clamp_min(1e-30)
        a = acc[which[tap.node]]
        a[0] += float(-(p * p.log()).sum(-1).mean())
        a[1] += 1
    record(program, calib, {name: list(which)}, on_value)
    return tuple(float(1.0 - (s / max(k, 1)) / math.log(site.n0)) for s, k in acc)


def _alphas(o: Any, conc: tuple | None, n_blocks: int, name: str) -> tuple[float, ...]:
    if o.layers == "uniform":
        return (1.0,) * n_blocks
    if isinstance(o.layers, tuple):
        if len(o.layers) != n_blocks:
            raise OptionError(f"pass '{_NAME}': option 'layers' gives {len(o.layers)} shares but graph '{name}' "
                              f"has {n_blocks} blocks")
        return o.layers
    top = max(max(conc), 1e-12)
    out, run = [], 0.0
    for c in conc:
        run = max(run, max(c, 0.0) / top)
        out.append(run)
    return tuple(out)


def _rewrite(program: Program, name: str, site: _Site, o: Any,
             ctx: PassContext) -> tuple[Program, TokenReuseDecisions | None]:
    src = program.graphs[name]
    start, end = o.tokens
    n = end - start
    n_rel = o.relevant if isinstance(o.relevant, int) else int(round(o.relevant * n))
    free = n - n_rel
    levels = o.levels or tuple(sorted({k for k in (round(n * f / 8) for f in range(2, 7)) if 1 <= k <= free}))
    if not levels or levels[-1] > free:
        raise OptionError(f"pass '{_NAME}': option 'levels' {list(levels)}: at most {free} visual tokens can be "
                          f"reused ({n} visual, {n_rel} always recomputed as relevant)")
    conc = _concentration(program, name, site, ctx.calibration, o.calibration_samples) \
        if o.layers == "entropy" else None
    alphas = _alphas(o, conc, len(site.blocks), name)
    cold, state_names = _cold(src, name, site, o)
    cold_out = cold.run(*src.example_inputs)
    state_ex = [t.detach().clone() for t in cold_out[len(src.output_names):]]
    variants = {"cold": cold, "probe": _probe(o, site, src, state_ex, n_rel)}
    lv = []
    for k in levels:
        back = tuple(int(round(k * a)) for a in alphas)
        reuse = (back[0],) * (len(site.vision.blocks) if site.vision else 0) + back   # vision: as block 0
        if reuse[-1] == 0:
            continue
        g = _warm(src, name, site, o, reuse, n_rel, state_ex)
        variants[f"r{k}"] = g
        lv.append(ReuseLevel(f"r{k}", k, reuse, graph_flops(g.module)))
    if not lv:
        ctx.log.info("token_reuse: graph '%s': no level reuses a token (levels %s, block shares %s): left alone",
                     name, list(levels), [round(a, 3) for a in alphas])
        return program, None
    prefix = f"{_NAME}.{program.origin(name)}"
    st = [f"state:{prefix}.{s}" for s in state_names]
    probe_ref = f"{prefix}.reusable"

    def node(c: Call, graph_of) -> Select:
        image_ref = c.inputs[site.image]
        full = Call(graph_of("cold"), c.inputs, c.outputs + tuple(st), c.device)
        cases = [("full", full)] + [(lv_.label, Call(graph_of(lv_.label), c.inputs + tuple(st), c.outputs + tuple(st),
                                                     c.device)) for lv_ in lv]
        bins = Select(Bins(probe_ref, tuple(float(lv_.reuse) for lv_ in lv), tuple(lab for lab, _ in cases)),
                      tuple(cases))
        warm = Seq((Call(graph_of("probe"), (image_ref, st[0], st[1]), (probe_ref,), c.device), bins))
        return Select(Table(("cold",), "warm"), (("cold", full), ("warm", warm)))

    new = program.expand(name, variants, node, by=_NAME, state=[StateBuffer(s[6:]) for s in st])
    rec = TokenReuseDecisions(name, site.blocks, (start, end), o.queries or (0, start), o.input, o.patch,
                              o.threshold, o.center, n_rel, alphas, conc or (), tuple(lv), graph_flops(cold.module),
                              graph_flops(variants["probe"].module), site.vision.blocks if site.vision else ())
    ctx.log.info("token_reuse: graph '%s': %d blocks, visual tokens [%d, %d), %d relevant always recomputed; "
                 "levels %s (per-block shares %s); FLOPs cold %.2fM, %s", name, len(site.blocks), start, end, n_rel,
                 [x.reuse for x in lv], [round(a, 2) for a in alphas], rec.cold_flops / 1e6,
                 ", ".join(f"{x.label} {rec.flops_ratio(x.label):.2f}x" for x in lv))
    return new, rec
