"""Dummy Forcing's head dropping for streamed generation: the heads that barely use the history
keep only the current frame, and stop computing attention over the cache.

Which heads: the `share` of all (layer, head) pairs with the lowest Dummy Forcing cost
max(p_first, p_recent + p_mid) of the HeadTypes record (analysis/head_types.py, on the calibration
stream; Dummy Forcing drops 180 of Wan-1.3B's 360), or the pairs option `heads` names, or, with
`target: {goal}`, the most heads in that order whose dropping still meets the goal on the
calibration stream against the program before (psnr_db, cosine, rel_l2, ...; bisection over the
count, assumed monotone; the trials in KVDropDecisions). The goal is measured teacher-forced
(kv_policy.goal_trials): the inputs the program before received over the calibration stream are
recorded and replayed through it and through every candidate, the outputs compared call by call.
A streamed calibration rolls out free-running (each frame from the earlier outputs), so running
the loop itself through a candidate would compare two diverging trajectories (on video_ar 13 to
17 dB PSNR whatever the head count) rather than the error of dropping the heads.

Before: every head of the step attends to its cache slots and the frame's own tokens:
    P_h = softmax(scale · q_h [K_cache ; K_own]_hᵀ + bias_h),  out_h = P_h [V_cache ; V_own]_h
After, for a dropped head h (its cache policy becomes "nothing": ir/kvcache.HeadPolicy()):
    out_h = softmax(scale · q_h K_own,hᵀ + bias_h[own]) V_own,h
    the score and value matmuls cover the T own tokens instead of C + T; the other heads
    compute what they did (their policy unchanged). The graph splits each rewritten attention
    site into a kept-head and a dropped-head group (slices of the head axis, no gather), and
    puts the heads back in order.
Since a dropped head's cache slots are never valid, its masked keys had exactly zero weight
(exp underflows for the -1e4 bias in fp32): the rewrite computes the same numbers as the
masked dense step, with fewer FLOPs. The memory of the cache shrinks only when the largest
remaining policy is smaller (the state keeps one capacity for every head).

With heavy-hitter heads (a scored layout, kv_policy) the step also reports each cache slot's
attention mass; a split site reports it from the kept heads' probabilities, zero for the dropped.

Reads: the KVStream record; HeadTypes (unless `heads` is given). Writes: the step graph (each
attention site with a dropped head rewritten; `pared.ir.created_by = kv_drop`), kv.init,
kv.append and the state declarations (the new layout), the KVStream record, a KVDropDecisions
record (the heads, their costs, the attention FLOPs per frame before and after).
Invariant: the same outputs as the dense step with the dropped heads' slots invalid (tests:
against eager frame lists, pared.testing.eager_stream).
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from pared.analysis.attention_entropy import find_attention
from pared.analysis.head_types import HeadTypes
from pared.analysis.search import smallest_meeting
from pared.ir import meta
from pared.ir.errors import OptionError, PassError
from pared.ir.goal import Goal
from pared.ir.kvcache import HeadPolicy, KVLayout
from pared.ir.program import Program
from pared.ir.records import Record
from pared.ir.rewrite import eliminate_dead_code
from pared.ir.stream import stream_record
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, RewritePass, check_range, register_pass
from pared.passes.kv.kv_policy import TARGET_METRICS, goal_trials, with_layout
from pared.passes.kv.mass import MASS_LAYER, slot_mass
from pared.passes.sparsity.sparse_attention import _runs, attention_site

NAME = "kv_drop"
aten = torch.ops.aten


@dataclass(frozen=True)
class KVDropDecisions(Record):
    """The heads kv_drop dropped ([layer, head] pairs), their Dummy Forcing cost (None where
    named by option), and the step's attention FLOPs per call over a cache of `frames` frames
    before and after. With option `target`: the goal and each trial (heads dropped, ((metric,
    value), ...)) in the order tried."""

    heads: tuple[tuple[int, int], ...]
    costs: tuple[float | None, ...]
    frames: int
    attention_flops_before: int
    attention_flops_after: int
    sites_rewritten: int
    target: tuple[tuple[str, float], ...] = ()
    trials: tuple[tuple[int, tuple[tuple[str, float], ...]], ...] = ()


@register_pass(NAME)
class KVDrop(RewritePass):
    """Drop the history of the heads that barely use it (see module docstring)."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        share: float = 0.5                      # of all (layer, head) pairs, lowest cost first
        heads: list | tuple | None = None       # [[layer, head], ...] instead of the share
        target: Any = None                      # instead of share: drop the most heads (lowest cost first) that
                                                # still meet this goal on the calibration stream, e.g. {psnr_db: 30}

        def __post_init__(self):
            check_range(NAME, "share", self.share, lo=0, hi=1)
            if self.heads is not None:
                for p in self.heads:
                    if (not isinstance(p, (list, tuple)) or len(p) != 2
                            or not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in p)):
                        raise OptionError(f"pass '{NAME}': option 'heads' takes [layer, head] pairs of indices, "
                                          f"got {p!r}")
            if self.target is not None:
                if self.heads is not None:
                    raise OptionError(f"pass '{NAME}': give option 'heads' (which to drop) or 'target' (a goal), "
                                      "not both")
                object.__setattr__(self, "target", Goal.parse(self.target, f"pass '{NAME}': option 'target'",
                                                              TARGET_METRICS))

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        rec = stream_record(program, NAME)
        L, H = rec.layers, rec.heads
        costs: dict[tuple[int, int], float | None] = {}
        trials: tuple = ()
        if o.heads is not None:
            for li, h in o.heads:
                if li >= L or h >= H:
                    raise OptionError(f"pass '{NAME}': option 'heads' names [{li}, {h}]; the step has {L} layers of "
                                      f"{H} heads")
                costs[(li, h)] = None
        else:
            types = program.records.get("HeadTypes")
            if types is None:
                raise OptionError(f"pass '{NAME}': which heads to drop comes from each head's Dummy Forcing cost: run "
                                  "analysis 'head_types' before it, or give option 'heads'")
            flat = sorted(((types.dummy_cost[li][h], li, h) for li in range(L) for h in range(H)))
            if o.target is None:
                n = int(o.share * L * H + 1e-9)
            else:
                n, trials = self._search(program, rec, ctx, flat)
            for c, li, h in flat[:n]:
                costs[(li, h)] = c
        made = drop_heads(program, rec, costs)
        if made is None:
            if o.target is None:
                return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"dropped_heads": 0})
            # a goal no head count meets: the program is unchanged, the record says what was measured
            frames = rec.kv_layout().frames
            ctx.log.info("%s: dropping even the cheapest head misses the goal %s; %s", NAME, o.target.terms,
                         "; ".join(f"{n} head(s): {dict(m)}" for n, m in trials))
            dec = KVDropDecisions((), (), frames, 0, 0, 0, o.target.terms, trials)
            return PassResult(program.with_record(dec), modified=True, preserved=PRESERVE_ALL,
                              stats={"dropped_heads": 0})
        out_prog, dec = made
        if o.target is not None:
            dec = dataclasses.replace(dec, target=o.target.terms, trials=trials)
        out_prog = out_prog.with_record(dec)
        ctx.log.info("%s: %d of %d heads keep only the current frame; attention FLOPs per call %.2fx at %d frames",
                     NAME, len(dec.heads), L * H, dec.attention_flops_after / max(dec.attention_flops_before, 1),
                     dec.frames)
        # HeadTypes stays: the statistics the choice was made from (measured on the dense step)
        return PassResult(out_prog, modified=True, preserved=(HeadTypes,),
                          stats={"dropped_heads": len(dec.heads),
                                 "attention_flops_ratio": round(dec.attention_flops_after
                                                                / max(dec.attention_flops_before, 1), 4),
                                 "sites": dec.sites_rewritten})

    def _search(self, program: Program, rec, ctx: PassContext, flat: list) -> tuple[int, tuple]:
        """The most heads (lowest cost first) whose dropping still meets the goal on the calibration
        stream against the program before, teacher-forced (every candidate driven with the inputs
        the program before received: goal_trials), by bisection (assumed monotone: dropping one
        more head never measures better); returns (heads to drop, trials)."""
        o = self.options
        if ctx.calibration is None:
            raise PassError(f"pass '{NAME}': option 'target' needs a calibration stream to measure the goal on")
        total = len(flat)
        met, trials = goal_trials(program, ctx, o.target, lambda n: f"{NAME}: {n} head(s) dropped")

        def build(n: int) -> Program:
            made = drop_heads(program, rec, {(li, h): c for c, li, h in flat[:n]})
            return program if made is None else made[0]

        def meets(kept: int) -> bool:          # monotone in the heads kept: more kept, nearer the reference
            return met(total - kept, lambda: build(total - kept))
        return total - smallest_meeting(meets, 0, total), tuple(trials)


def drop_heads(program: Program, rec, costs: dict) -> tuple[Program, KVDropDecisions] | None:
    """`program` with the heads of `costs` ([layer, head] -> cost or None) keeping only the
    current frame (see the module doc), and its decisions record (without a goal); None when no
    head named there keeps anything now."""
    L, H, T = rec.layers, rec.heads, rec.tokens_per_frame
    old = rec.kv_layout()
    dropped = {k for k in costs if old.policies[k[0]][k[1]].frames > 0}
    if not dropped:
        return None
    new = KVLayout(tuple(tuple(HeadPolicy() if (li, h) in dropped else p for h, p in enumerate(row))
                         for li, row in enumerate(old.policies)), T)
    step = program.graphs[rec.step]
    gm = step.copy_module()
    sites = find_attention(gm)
    softmaxes = [s.node for s in sites if s.source == "softmax"]
    if len(softmaxes) != L:
        raise PassError(f"pass '{NAME}': the step graph {rec.step!r} has {len(softmaxes)} decomposed attention "
                        f"site(s) (softmax between two batched matmuls) for {L} layers")
    before = after = 0
    rewritten = 0
    frames = new.frames
    for li, sm in enumerate(softmaxes):
        hs = sorted(h for (l2, h) in dropped if l2 == li)
        att = attention_site(gm, sm, rec.step, f"layer {li}", who=NAME)
        if att.heads != H:
            raise PassError(f"pass '{NAME}': attention of layer {li} has {att.heads} heads; the cache has {H}")
        per_key = 2 * att.batch * att.queries * (att.d + att.dv)
        before += per_key * H * (frames * T + T)
        after += per_key * ((H - len(hs)) * (frames * T + T) + len(hs) * T)
        if not hs:
            continue
        out = _split_site(gm, att, hs, T, li)
        att.pv.replace_all_uses_with(out)
        rewritten += 1
    eliminate_dead_code(gm)
    gm.recompile()
    program = program.with_graph(rec.step, step.with_module(gm))
    out_prog = with_layout(program, rec, new, f"{rec.policy}+{NAME}", NAME)
    order = sorted(dropped)
    return out_prog, KVDropDecisions(tuple(order), tuple(costs[k] for k in order), frames, before, after, rewritten)


def _split_site(gm: fx.GraphModule, att, dropped: list[int], T: int, layer: int) -> fx.Node:
    """Insert the two-group attention after the site's value matmul; returns its [B·H, N, dv] node."""
    g = gm.graph
    H, N, d, dv = att.heads, att.queries, att.d, att.dv
    kept = [h for h in range(H) if h not in dropped]
    end = sys.maxsize
    created = []

    def call(target, *args) -> fx.Node:
        n = g.call_function(target, args)
        n.meta[meta.CREATED_BY] = NAME
        n.meta[meta.REGION] = f"layer {layer}"
        created.append(n)
        return n

    with g.inserting_before(att.pv.next):
        s_k = call(aten.sym_size.int, att.kt, 2)
        q4 = call(aten.view.default, att.q, [-1, H, N, d])
        kt4 = call(aten.view.default, att.kt, [-1, H, d, s_k])
        v4 = call(aten.view.default, att.v, [-1, H, s_k, dv])
        bias = att.bias
        b_heads = None
        if bias is not None:
            bs = bias.meta["val"].shape
            b_heads = bs[-3] if len(bs) >= 3 else 1

        def heads(x: fx.Node, hs: list[int]) -> fx.Node:
            parts = [call(aten.slice.Tensor, x, 1, a, b) for a, b in _runs(hs)]
            return parts[0] if len(parts) == 1 else call(aten.cat.default, parts, 1)

        def attend(hs: list[int], own_only: bool) -> tuple[fx.Node, fx.Node]:
            q, kt, v = heads(q4, hs), heads(kt4, hs), heads(v4, hs)
            if own_only:
                kt = call(aten.slice.Tensor, kt, 3, -T, end)
                v = call(aten.slice.Tensor, v, 2, -T, end)
            s = call(aten.matmul.default, q, kt)
            if att.scale != 1.0:
                s = call(aten.mul.Tensor, s, att.scale)
            if bias is not None:
                b = bias
                if len(bias.meta["val"].shape) == 4 and b_heads == H:
                    b = heads(b, hs)
                if own_only:
                    b = call(aten.slice.Tensor, b, -1, -T, end)
                s = call(aten.add.Tensor, s, b)
            p = call(aten._softmax.default, s, -1, False)
            return call(aten.matmul.default, p, v), p               # [B, h', N, dv], the probabilities

        def in_order(dropped_part: fx.Node, kept_part: fx.Node | None, dim: int) -> fx.Node:
            """The two groups' parts along `dim` put back in head order."""
            pos = {h: ("d", i) for i, h in enumerate(dropped)}
            pos.update({h: ("k", i) for i, h in enumerate(kept)})
            parts, h = [], 0
            while h < H:
                side, i = pos[h]
                j = h
                while j + 1 < H and pos[j + 1][0] == side and pos[j + 1][1] == pos[j][1] + 1:
                    j += 1
                src = dropped_part if side == "d" else kept_part
                parts.append(src if (j - h + 1) == (len(dropped) if side == "d" else len(kept))
                             else call(aten.slice.Tensor, src, dim, i, i + j - h + 1))
                h = j + 1
            return parts[0] if len(parts) == 1 else call(aten.cat.default, parts, dim)

        dropped_out, _ = attend(dropped, True)
        kept_out, kept_p = attend(kept, False) if kept else (None, None)
        out = call(aten.view.default, in_order(dropped_out, kept_out, 1), [-1, N, dv])
        # the step reports each slot's attention (heavy hitters, passes/kv/mass.py): the kept heads'
        # from their own probabilities, zero for the dropped ones (they read no slot)
        old_mass = next((n for n in g.nodes if n.meta.get(MASS_LAYER) == layer), None)
        if old_mass is not None:
            dk = heads(kt4, dropped)                                           # [B, h_d, d, C + T]
            zero = call(aten.mul.Tensor, call(aten.slice.Tensor, call(aten.select.int, call(
                aten.select.int, dk, 0, 0), 1, 0), 1, 0, -T), 0.0)            # [h_d, C]
            kept_mass = slot_mass(call, kept_p, len(kept), N, T, rank=4) if kept else None
            mass = in_order(zero, kept_mass, 0)
            old_mass.replace_all_uses_with(mass)
            mass.meta[MASS_LAYER] = layer
    return out
