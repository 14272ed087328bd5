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
17 dB PSNR whatever the head count) rather than the error of dropping the heads. With option
`judge`, the goal is measured on the rollouts themselves, scored by the judge against the program
before's (kv_policy's option of the same name: accuracy_drop, error_rise, ...).

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
masked dense step, with fewer FLOPs.

Memory (option `compact`, default on). The state keeps rows only for the R (layer, head) pairs
that keep frames, layer-major (KVStream.rows): cache [1, 2, B, R, C, Dh], positions and validity
[1, R, C] (scores [1, R, F]), the layout of one "layer" of R heads (ir/kvcache.rows_layout), so
the init and append are KVInit / KVAppend of it; the append first picks the R rows out of the
step's new_kv [L, 2, B, H, T, Dh] (and its mass [L, H, C]; RowsKVAppend). In the step, every
head keeping nothing (dropped now or by its policy) attends to its own frame only; a layer's
other heads read cat([its rows of the state, their own K/V], 2) instead of heads sliced out of
cat([kv_cache[layer, j], own], 2), and positions and validity are gathered back to [L, H, C]
(a padding row for the heads without one) for the bias. The step must read its history in that
form (cat through reshapes and scalings; else a PassError names the node: run with compact:
false). Without `compact` the state keeps one capacity for every head: its memory shrinks only
when the largest remaining policy is smaller. A compact state takes no later kv_policy or
kv_drop (drop every head in one kv_drop).

With heavy-hitter heads (a scored layout, kv_policy) the step also reports each cache slot's
attention mass; a split site reports it from the kept heads' probabilities, zero for the dropped.

Reads: the KVStream record; HeadTypes (unless `heads` is given). Writes: the step graph (each
attention site with a dropped head rewritten; `pared.ir.created_by = kv_drop`; with `compact`
its cache inputs retyped), kv.init, kv.append and the state declarations (the new layout), the
KVStream record (layout, rows), a KVDropDecisions record (the heads, their costs, the attention
FLOPs per frame and the state's rows and bytes before and after).
Invariant: the same outputs as the dense step with the dropped heads' slots invalid (tests:
against eager frame lists, pared.testing.eager_stream).
"""
from __future__ import annotations

import dataclasses
import operator
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
from pared.ir.kvcache import HeadPolicy, KVLayout, rows_layout, state_bytes
from pared.ir.program import Program
from pared.ir.records import Record
from pared.ir.rewrite import add_constant, eliminate_dead_code
from pared.ir.stream import CACHE, POS, VALID, stream_record
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, RewritePass, check_range, register_pass
from pared.passes.kv.kv_policy import (JUDGED_METRICS, TARGET_METRICS, check_judge, goal_trials, judge_name,
                                       with_layout)
from pared.passes.kv.mass import MASS_LAYER, slot_mass
from pared.passes.sparsity.sparse_attention import _runs, attention_site
from pared.passes.sparsity.tokens import packet, val_shape

NAME = "kv_drop"
aten = torch.ops.aten


@dataclass(frozen=True)
class KVDropDecisions(Record):
    """The heads kv_drop dropped ([layer, head] pairs), their Dummy Forcing cost (None where
    named by option), and the step's attention FLOPs per call over a cache of `frames` frames
    before and after; the cache state's (layer, head) rows and its bytes for one stream (batch 1:
    cache, positions, validity, scores) before and after (rows after < before where compacted).
    With option `target`: the goal and each trial (heads dropped, ((metric, value), ...)) in the
    order tried."""

    heads: tuple[tuple[int, int], ...]
    costs: tuple[float | None, ...]
    frames: int
    attention_flops_before: int
    attention_flops_after: int
    sites_rewritten: int
    target: tuple[tuple[str, float], ...] = ()
    trials: tuple[tuple[int, tuple[tuple[str, float], ...]], ...] = ()
    state_rows_before: int = 0
    state_rows_after: int = 0
    state_bytes_before: int = 0
    state_bytes_after: int = 0
    judge: str = ""


@register_pass(NAME)
class KVDrop(RewritePass):
    """Drop the history of the heads that barely use it (see module docstring)."""

    ref_options = ("judge",)

    @dataclass(frozen=True, kw_only=True)
    class Options:
        share: float = 0.5                      # of all (layer, head) pairs, lowest cost first
        heads: list | tuple | None = None       # [[layer, head], ...] instead of the share
        target: Any = None                      # instead of share: drop the most heads (lowest cost first) that
                                                # still meet this goal on the calibration stream, e.g. {psnr_db: 30}
        compact: bool = True                    # the cache state keeps rows only for the (layer, head) pairs
                                                # that keep frames (the dropped heads' memory is freed)
        judge: Any = None                       # with target: measure it on free-running rollouts,
                                                # judge(reference, candidate) -> {metric: value} (kv_policy's)

        def __post_init__(self):
            check_judge(NAME, self.judge, self.target)
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
                                                              TARGET_METRICS + JUDGED_METRICS if self.judge
                                                              else TARGET_METRICS))

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
        made = drop_heads(program, rec, costs, o.compact, ctx.log)
        if made is None:
            if o.target is None:
                return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"dropped_heads": 0})
            # a goal no head count meets: the program is unchanged, the record says what was measured
            frames = rec.kv_layout().frames
            ctx.log.info("%s: dropping even the cheapest head misses the goal %s; %s", NAME, o.target.terms,
                         "; ".join(f"{n} head(s): {dict(m)}" for n, m in trials))
            dec = KVDropDecisions((), (), frames, 0, 0, 0, o.target.terms, trials, judge=judge_name(o.judge))
            return PassResult(program.with_record(dec), modified=True, preserved=PRESERVE_ALL,
                              stats={"dropped_heads": 0})
        out_prog, dec = made
        if o.target is not None:
            dec = dataclasses.replace(dec, target=o.target.terms, trials=trials, judge=judge_name(o.judge))
        out_prog = out_prog.with_record(dec)
        ctx.log.info("%s: %d of %d heads keep only the current frame; attention FLOPs per call %.2fx at %d frames; "
                     "cache state %d -> %d (layer, head) rows, %d -> %d bytes per stream",
                     NAME, len(dec.heads), L * H, dec.attention_flops_after / max(dec.attention_flops_before, 1),
                     dec.frames, dec.state_rows_before, dec.state_rows_after, dec.state_bytes_before,
                     dec.state_bytes_after)
        # HeadTypes stays: the statistics the choice was made from (measured on the dense step)
        return PassResult(out_prog, modified=True, preserved=(HeadTypes,),
                          stats={"dropped_heads": len(dec.heads),
                                 "attention_flops_ratio": round(dec.attention_flops_after
                                                                / max(dec.attention_flops_before, 1), 4),
                                 "sites": dec.sites_rewritten, "state_rows": dec.state_rows_after})

    def _search(self, program: Program, rec, ctx: PassContext, flat: list) -> tuple[int, tuple]:
        """The most heads (lowest cost first) whose dropping still meets the goal on the calibration
        stream against the program before, teacher-forced (every candidate driven with the inputs
        the program before received: goal_trials), by bisection (assumed monotone: dropping one
        more head never measures better); returns (heads to drop, trials)."""
        o = self.options
        if ctx.calibration is None:
            raise PassError(f"pass '{NAME}': option 'target' needs a calibration stream to measure the goal on")
        total = len(flat)
        met, trials = goal_trials(program, ctx, o.target, lambda n: f"{NAME}: {n} head(s) dropped", o.judge, NAME)

        def build(n: int) -> Program:
            made = drop_heads(program, rec, {(li, h): c for c, li, h in flat[:n]}, o.compact)
            return program if made is None else made[0]

        def meets(kept: int) -> bool:          # monotone in the heads kept: more kept, nearer the reference
            return met(total - kept, lambda: build(total - kept))
        return total - smallest_meeting(meets, 0, total), tuple(trials)


def drop_heads(program: Program, rec, costs: dict, compact: bool = True, log: Any = None
               ) -> tuple[Program, KVDropDecisions] | None:
    """`program` with the heads of `costs` ([layer, head] -> cost or None) keeping only the
    current frame (see the module doc), and its decisions record (without a goal); None when no
    head named there keeps anything now. With `compact`, the cache state keeps rows only for the
    heads that keep frames, and the step reads them (_CompactCache).

    Raises:
        PassError: when the state is already compact (an earlier kv_drop), or, with `compact`,
            when the step does not read its history as cat([kv_cache[layer, 0 | 1], own], 2).
    """
    L, H, T = rec.layers, rec.heads, rec.tokens_per_frame
    old = rec.kv_layout()
    dropped = {k for k in costs if old.policies[k[0]][k[1]].frames > 0}
    if not dropped:
        return None
    if rec.rows is not None:
        raise PassError(f"pass '{NAME}': an earlier kv_drop compacted the cache state to {len(rec.rows)} (layer, "
                        "head) rows; drop every head in one kv_drop, or run the earlier one with compact: false")
    new = KVLayout(tuple(tuple(HeadPolicy() if (li, h) in dropped else p for h, p in enumerate(row))
                         for li, row in enumerate(old.policies)), T)
    rows = tuple((li, h) for li in range(L) for h in range(H) if new.policies[li][h].frames > 0) if compact else None
    if rows == ():
        if log is not None:
            log.info("%s: no head keeps any frame; the cache state stays as it is (compact needs a row)", NAME)
        rows = None
    step = program.graphs[rec.step]
    gm = step.copy_module()
    sites = find_attention(gm)
    softmaxes = [s.node for s in sites if s.source == "softmax"]
    if len(softmaxes) != L:
        raise PassError(f"pass '{NAME}': the step graph {rec.step!r} has {len(softmaxes)} decomposed attention "
                        f"site(s) (softmax between two batched matmuls) for {L} layers")
    comp = _CompactCache(gm, program, rec, rows) if rows is not None else None
    before = after = 0
    rewritten = 0
    frames = new.frames
    for li, sm in enumerate(softmaxes):
        # a compact state has no row for a head keeping nothing (dropped now or by its policy):
        # every such head attends to its own frame only
        hs = sorted(h for h in range(H) if new.policies[li][h].frames == 0) if comp is not None else \
            sorted(h for (l2, h) in dropped if l2 == li)
        att = attention_site(gm, sm, rec.step, f"layer {li}", who=NAME)
        if att.heads != H:
            raise PassError(f"pass '{NAME}': attention of layer {li} has {att.heads} heads; the cache has {H}")
        per_key = 2 * att.batch * att.queries * (att.d + att.dv)
        before += per_key * H * (frames * T + T)
        after += per_key * ((H - len(hs)) * (frames * T + T) + len(hs) * T)
        if not hs:
            if comp is not None:
                comp.read_whole_layer(li)
            continue
        out = _split_site(gm, att, hs, T, li, comp)
        att.pv.replace_all_uses_with(out)
        rewritten += 1
    eliminate_dead_code(gm)
    changes = {}
    if comp is not None:
        changes = comp.finish(step.example_inputs)
    gm.recompile()
    program = program.with_graph(rec.step, step.with_module(gm, **changes))
    out_prog = with_layout(program, rec, new, f"{rec.policy}+{NAME}", NAME, rows)
    order = sorted(dropped)
    itemsize = torch.empty((), dtype=getattr(torch, next(
        s.dtype for s in program.plan.state if s.name == CACHE))).element_size()

    kept = new if rows is None else rows_layout(new, rows)
    return out_prog, KVDropDecisions(tuple(order), tuple(costs[k] for k in order), frames, before, after, rewritten,
                                     state_rows_before=L * H, state_rows_after=kept.layers * kept.heads,
                                     state_bytes_before=state_bytes(old, 1, rec.head_dim, itemsize),
                                     state_bytes_after=state_bytes(kept, 1, rec.head_dim, itemsize))


_RESHAPE = {"view", "_unsafe_view", "reshape", "expand", "clone", "contiguous", "alias"}


def _keeps_heads(n: fx.Node) -> bool:
    """An op a head group can replay on its own [B, h', ., .] part: it keeps batch and heads at
    dims 0 and 1 and reads no size."""
    name = packet(n)
    if name == "permute":
        return list(n.args[1])[:2] == [0, 1]
    if name == "transpose":
        return all(d % 4 >= 2 for d in n.args[1:3])
    if name in ("mul", "div"):
        return len(n.args) == 2 and isinstance(n.args[1], (int, float))
    return name in ("clone", "contiguous", "alias")


class _CompactCache:
    """The step graph's reads of a compact cache state (KVStream.rows): its kv_cache input becomes
    [1, 2, B, R, C, Dh] and cache_pos / cache_valid [1, R, C]. Every layer's history
    kv_cache[layer, j] ([B, H, C, Dh]) is found; a site reads its heads' rows instead (rows
    [r_l, r_l + k_l) of the state); positions and validity are gathered back to [L, H, C]
    (a padding row, position 0 and invalid, for heads without a row) for the bias, which is small."""

    def __init__(self, gm: fx.GraphModule, program: Program, rec, rows: tuple):
        self.g, self.rec, self.rows = gm.graph, rec, rows
        call = next(c for c in program.plan.calls() if c.graph == rec.step)
        phs = [n for n in self.g.nodes if n.op == "placeholder"]
        try:
            self.index = {s: call.inputs.index(f"state:{s}") for s in (CACHE, POS, VALID)}
        except ValueError:
            raise PassError(f"pass '{NAME}': the step graph {rec.step!r} does not read the cache state "
                            f"({CACHE}, {POS}, {VALID}); run with compact: false") from None
        self.cache, self.pos, self.valid = (phs[self.index[s]] for s in (CACHE, POS, VALID))
        self.first = {li: next(i for i, r in enumerate(rows) if r[0] == li) for li, _ in rows}
        self.kept = {li: sum(1 for r in rows if r[0] == li) for li, _ in rows}
        self.hist: dict[tuple[int, int], list[fx.Node]] = {}     # (layer, k or v) -> kv_cache[layer, j] nodes
        self.old: list[fx.Node] = []                              # every node reading the full cache
        for u in list(self.cache.users):
            self.old.append(u)
            if u.target == aten.sym_size.int and u.args[1] in (2, 4, 5):
                continue                                          # batch, capacity, head dim: the same
            if u.target != aten.select.int or u.args[1] != 0:
                raise PassError(f"pass '{NAME}': the step graph {rec.step!r} reads its cache as "
                                f"{u.format_node()}, expected kv_cache[layer, 0 | 1]; run with compact: false")
            for w in u.users:
                self.old.append(w)
                if w.target == aten.select.int and w.args[1] == 0:
                    self.hist.setdefault((u.args[2], w.args[2]), []).append(w)
        self.top = top = phs[-1].next                             # (constants may come before the inputs)
        with self.g.inserting_before(top):
            self.cap = self._call(aten.sym_size.int, self.cache, 4)
            self.layer0 = self._call(aten.select.int, self.cache, 0, 0)                  # [2, B, R, C, Dh]
        self._made: dict[tuple[int, int], fx.Node] = {}
        L, H = rec.layers, rec.heads
        at = {r: i for i, r in enumerate(rows)}
        idx = torch.tensor([at.get((li, h), len(rows)) for li in range(L) for h in range(H)], dtype=torch.int64)
        index = add_constant(gm, "_kv_drop_rows", idx, NAME, before=top)
        for ph in (self.pos, self.valid):
            users = list(ph.users)
            with self.g.inserting_before(top):
                flat = self._call(aten.select.int, ph, 0, 0)                              # [R, C]
                pad = self._call(aten.zeros_like.default, self._call(aten.slice.Tensor, flat, 0, 0, 1))
                full = self._call(aten.index_select.default, self._call(aten.cat.default, [flat, pad], 0), 0, index)
                full = self._call(aten.view.default, full, [L, H, -1])                    # [L, H, C]
            for u in users:
                u.replace_input_with(ph, full)

    def _call(self, target, *args, **kwargs) -> fx.Node:
        n = self.g.call_function(target, args, kwargs)
        n.meta[meta.CREATED_BY] = NAME
        return n

    def history(self, layer: int, j: int) -> fx.Node:
        """[B, k_l, C, Dh]: the K (j = 0) or V (1) rows of `layer`'s heads that keep frames."""
        key = (layer, j)
        if key not in self._made:
            a = self.first[layer]
            with self.g.inserting_before(self.top):
                n = self._call(aten.slice.Tensor, self._call(aten.select.int, self.layer0, 0, j), 1, a,
                               a + self.kept[layer])
            self._made[key] = n
        return self._made[key]

    def read_whole_layer(self, layer: int) -> None:
        """A layer whose every head has a row reads its history from them, as it read the full cache."""
        for j in (0, 1):
            for n in self.hist.get((layer, j), []):
                n.replace_all_uses_with(self.history(layer, j))

    def own_and_replay(self, node: fx.Node, layer: int, j: int, size: int, where: str) -> tuple[fx.Node, list]:
        """From a site's kᵀ (j = 0) or v (1) operand ([B·H, ...]) back to cat([kv_cache[layer, j],
        own], 2): (own [B, H, T, Dh], the ops after the cat that keep batch and heads in front,
        which each head group replays). Only reshapes may follow them, and the value they give
        is [B, H, ., .] with `size` at dim 2 (kᵀ: d) or 3 (v: dv), so the site's [B, H, ...] view
        of `node` is that value."""
        chain, n = [], node
        while isinstance(n, fx.Node) and n.op == "call_function" and n.target != aten.cat.default:
            name = packet(n)
            if not (name in _RESHAPE or name in ("permute", "transpose")
                    or name in ("mul", "div") and len(n.args) == 2 and isinstance(n.args[1], (int, float))):
                break
            chain.append(n)
            n = n.args[0]
        parts = n.args[0] if isinstance(n, fx.Node) and n.target == aten.cat.default else None
        dim = (n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)) if parts is not None else None
        if parts is None or len(parts) != 2 or dim not in (2, -2) or parts[0] not in self.hist.get((layer, j), []):
            raise PassError(f"{where}: its {'keys' if j == 0 else 'values'} ({node.format_node()}) are not "
                            f"cat([kv_cache[{layer}, {j}], own], 2) through reshapes and scalings; a compact state "
                            "needs that form: run with compact: false")
        for u in list(n.users):     # sizes the export shares between layers: C + T from the compact cache
            if u.target == aten.sym_size.int:
                with self.g.inserting_before(u.next):
                    tokens = self._call(aten.sym_size.int, parts[1], u.args[1]) if u.args[1] not in (2, -2) else \
                        self._call(operator.add, self.cap, self._call(aten.sym_size.int, parts[1], 2))
                u.replace_all_uses_with(tokens)
        chain.reverse()
        keep = 0
        while keep < len(chain) and _keeps_heads(chain[keep]):
            keep += 1
        x = chain[keep - 1] if keep else n
        shape = tuple(val_shape(x)) if "val" in x.meta else ()
        reshapes = chain[keep:]
        ok = len(shape) == 4 and shape[1] == self.rec.heads and shape[2 + j] == size and all(
            packet(r) in _RESHAPE and (packet(r) != "expand" or "val" in r.meta and "val" in r.args[0].meta
                                       and str(val_shape(r)) == str(val_shape(r.args[0])))
            for r in reshapes)
        if not ok:
            raise PassError(f"{where}: between cat([kv_cache[{layer}, {j}], own], 2) and the attention matmul, "
                            f"{[r.format_node() for r in reshapes]} is not a plain reshape of a [batch, heads, ...] "
                            "value; a compact state needs that form: run with compact: false")
        return parts[1], chain[:keep]

    def finish(self, examples: tuple) -> dict:
        """After dead code elimination: check nothing reads the full cache any more, retype the
        three inputs to the compact shapes; the step Graph's fields that change (its example
        inputs, given as `examples`)."""
        alive = set(self.g.nodes)
        for n in self.old:
            if n in alive and not (n.target == aten.sym_size.int and n.args[0] is self.cache):
                raise PassError(f"pass '{NAME}': after the rewrite the step graph {self.rec.step!r} still reads the "
                                f"full cache at {n.format_node()}; run with compact: false")
        R = len(self.rows)

        def compact(shape: tuple) -> tuple:     # [L, 2, B, H, C, Dh] -> [1, 2, B, R, C, Dh]; [L, H, C] -> [1, R, C]
            return (1, 2, shape[2], R, *shape[4:]) if len(shape) == 6 else (1, R, *shape[2:])
        ex = list(examples)
        for s, ph in ((CACHE, self.cache), (POS, self.pos), (VALID, self.valid)):
            i = self.index[s]
            ex[i] = torch.zeros(compact(tuple(ex[i].shape)), dtype=ex[i].dtype)
            v = ph.meta.get("val")
            if v is not None and getattr(v, "fake_mode", None) is not None:
                with v.fake_mode:
                    ph.meta["val"] = torch.empty(compact(tuple(v.shape)), dtype=v.dtype)
                ph.meta.pop("tensor_meta", None)
        return {"example_inputs": tuple(ex)}


def _split_site(gm: fx.GraphModule, att, dropped: list[int], T: int, layer: int,
                comp: _CompactCache | None = None) -> fx.Node:
    """Insert the two-group attention after the site's value matmul; returns its [B·H, N, dv] node.
    With `comp` (a compact state), the kept group reads its history from the state's rows and
    the dropped group the frame's own K/V only: neither reads the site's full [kv_cache ; own]."""
    g = gm.graph
    H, N, d, dv = att.heads, att.queries, att.d, att.dv
    kept = [h for h in range(H) if h not in dropped]
    end = sys.maxsize
    created = []

    def call(target, *args, **kwargs) -> fx.Node:
        n = g.call_function(target, args, kwargs)
        n.meta[meta.CREATED_BY] = NAME
        n.meta[meta.REGION] = f"layer {layer}"
        created.append(n)
        return n

    if comp is not None:
        where = f"pass '{NAME}': attention of layer {layer}"
        own_k, replay_k = comp.own_and_replay(att.kt, layer, 0, d, where)
        own_v, replay_v = comp.own_and_replay(att.v, layer, 1, dv, where)
    with g.inserting_before(att.pv.next):
        q4 = call(aten.view.default, att.q, [-1, H, N, d])
        if comp is None:
            s_k = call(aten.sym_size.int, att.kt, 2)
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

        def replay(ops: list, x: fx.Node) -> fx.Node:
            for op in ops:
                x = call(op.target, x, *op.args[1:], **op.kwargs)
            return x

        def group_kv(hs: list[int], own_only: bool) -> tuple[fx.Node, fx.Node]:
            """The group's kᵀ [B, h', d, S] and v [B, h', S, dv]."""
            if comp is None:
                kt, v = heads(kt4, hs), heads(v4, hs)
                if own_only:
                    kt = call(aten.slice.Tensor, kt, 3, -T, end)
                    v = call(aten.slice.Tensor, v, 2, -T, end)
                return kt, v
            k, v = heads(own_k, hs), heads(own_v, hs)
            if not own_only:        # the kept heads' rows of the state, then their own K/V
                k = call(aten.cat.default, [comp.history(layer, 0), k], 2)
                v = call(aten.cat.default, [comp.history(layer, 1), v], 2)
            return replay(replay_k, k), replay(replay_v, v)

        def attend(hs: list[int], own_only: bool) -> tuple[fx.Node, fx.Node]:
            q = heads(q4, hs)
            kt, v = group_kv(hs, own_only)
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
            if comp is None:
                dk = heads(kt4, dropped)                                       # [B, h_d, d, C + T]
                zero = call(aten.mul.Tensor, call(aten.slice.Tensor, call(aten.select.int, call(
                    aten.select.int, dk, 0, 0), 1, 0), 1, 0, -T), 0.0)        # [h_d, C]
            else:
                zero = call(aten.zeros.default, [len(dropped), comp.cap])
            kept_mass = slot_mass(call, kept_p, len(kept), N, T, rank=4) if kept else None
            mass = in_order(zero, kept_mass, 0)
            old_mass.replace_all_uses_with(mass)
            mass.meta[MASS_LAYER] = layer
    return out
