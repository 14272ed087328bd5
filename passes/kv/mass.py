"""The step graph reports the attention each cache slot received (what heavy-hitter heads rank
frames by; ir/kvcache.py, "Scores").

report_mass adds one output to the step graph, `kv_mass` [L, H, C]: at each layer's attention
site (a softmax between two batched matmuls, one per layer in graph order), the probabilities
[B, H, N, C + T] summed over the batch and query rows, the frame's own T keys left out. Every
layer's [H, C] node carries the meta key MASS_LAYER (its layer), so a later rewrite of the site
(kv_drop) can rebuild it from what it computes instead. drop_mass removes the output again.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.fx as fx

from pared.analysis.attention_entropy import find_attention
from pared.ir import meta
from pared.ir.errors import PassError
from pared.ir.program import Program
from pared.ir.rewrite import eliminate_dead_code
from pared.ir.stream import MASS, KVStream
from pared.passes.sparsity.sparse_attention import attention_site

aten = torch.ops.aten
MASS_LAYER = "pared.kv_mass_layer"     # node meta: this [H, C] node is layer i's attention mass


def slot_mass(call, probs: fx.Node, heads: int, queries: int, tokens: int, rank: int | None = None) -> fx.Node:
    """[H', C] from probabilities viewable as [B, H', N, C + T] (of `rank` dimensions, default
    from the node's meta; call(target, *args) makes a node)."""
    rank = rank if rank is not None else len(probs.meta["val"].shape)
    keys = call(aten.sym_size.int, probs, rank - 1)
    p4 = call(aten.view.default, probs, [-1, heads, queries, keys])
    m = call(aten.sum.dim_IntList, p4, [0, 2])
    return call(aten.slice.Tensor, m, 1, 0, -tokens)


def report_mass(program: Program, rec: KVStream, who: str) -> tuple[Program, KVStream]:
    """`program` whose step graph also returns kv_mass (see the module doc), the step's calls in
    the plan binding it, and `rec` naming it."""
    if rec.mass:
        return program, rec
    step = program.graphs[rec.step]
    gm = step.copy_module()
    g = gm.graph
    sms = [s.node for s in find_attention(gm) if s.source == "softmax"]
    if len(sms) != rec.layers:
        split = any(n.meta.get(meta.CREATED_BY) == "kv_drop" for n in g.nodes)
        raise PassError(f"pass '{who}': heavy hitters read each layer's attention, and the step graph {rec.step!r} "
                        f"has {len(sms)} softmax attention site(s) for {rec.layers} layers"
                        + ("; kv_drop split them: apply the heavy policy before kv_drop" if split else ""))
    out_node = next(n for n in g.nodes if n.op == "output")
    masses = []
    for li, sm in enumerate(sms):
        att = attention_site(gm, sm, rec.step, f"layer {li}", who=who)
        if att.heads != rec.heads:
            raise PassError(f"pass '{who}': attention of layer {li} has {att.heads} heads; the cache has {rec.heads}")

        def call(target, *args, li=li):
            n = g.call_function(target, args)
            n.meta[meta.CREATED_BY] = who
            n.meta[meta.REGION] = f"layer {li}"
            return n
        with g.inserting_before(out_node):
            m = slot_mass(call, sm, att.heads, att.queries, rec.tokens_per_frame)
        m.meta[MASS_LAYER] = li
        masses.append(m)
    with g.inserting_before(out_node):
        stacked = g.call_function(aten.stack.default, (masses, 0))
        stacked.meta[meta.CREATED_BY] = who
    outs = out_node.args[0]
    outs = list(outs) if isinstance(outs, (tuple, list)) else [outs]
    out_node.args = (tuple(outs + [stacked]),)
    g.lint()
    gm.recompile()
    ref = f"{rec.step}.{MASS}"
    plan = program.plan.replace_calls(rec.step, lambda c: dataclasses.replace(c, outputs=c.outputs + (ref,)))
    graphs = {**program.graphs, rec.step: step.with_module(gm, output_names=step.output_names + (MASS,))}
    rec = dataclasses.replace(rec, mass=ref)
    return program.replace(graphs=graphs, plan=plan).with_record(rec), rec


def drop_mass(program: Program, rec: KVStream) -> tuple[Program, KVStream]:
    """`program` without the step's kv_mass output (and what only it needed)."""
    if not rec.mass:
        return program, rec
    step = program.graphs[rec.step]
    i = step.output_names.index(MASS)
    gm = step.copy_module()
    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outs = list(out_node.args[0])
    del outs[i]
    out_node.args = (tuple(outs),)
    eliminate_dead_code(gm)
    gm.recompile()
    names = step.output_names[:i] + step.output_names[i + 1:]
    plan = program.plan.replace_calls(
        rec.step, lambda c: dataclasses.replace(c, outputs=tuple(o for o in c.outputs if o != rec.mass)))
    graphs = {**program.graphs, rec.step: step.with_module(gm, output_names=names)}
    rec = dataclasses.replace(rec, mass=None)
    return program.replace(graphs=graphs, plan=plan).with_record(rec), rec
