"""Compute each routed expert only on the tokens routed to it, in a static form:
capacity-based dispatch for mixture-of-experts layers written with dense stacked
experts (every expert on every token, then the top-k outputs picked).

Before:  y = act(x @ W1 (+b1)) @ W2 (+b2)        [E, T, d]: every expert on every token
         picked = y.reshape(E*T, d)[idx * T + t]  [T*k, d]: the k routed outputs per token
After:   per expert e a buffer of C_e slots (static: shapes do not depend on the routing).
         The router's pairs (token t, choice j) are numbered p = t*k + j; each takes the
         next free slot of its expert, in token order:
             pos_p  = (number of earlier pairs routed to the same expert)
             slot_p = offset_e + pos_p  if pos_p < C_e, else S (the drop slot; S = sum C_e)
         x is gathered into the slots ([S, d]; an empty slot reads a zero row), each expert
         runs on its own C_e rows (act(x_e @ W1[e] (+b1[e])) @ W2[e] (+b2[e]), E static
         matmuls) and picked = cat(outputs, zero row)[slot] ([T*k, d]). A pair over its
         expert's capacity contributes zero (Switch Transformer's token dropping); below
         capacity the result is the dense one, element for element up to float rounding.
Capacities: `capacity: calibrated` (the default) takes, per layer and expert, the most
pairs routed to it in any call of the calibration run, times `margin`, rounded up to a
multiple of `multiple` (at most T): no pair of the calibration run is dropped, and the
experts that are routed to more get more slots (routing is not balanced: on
dit_moe_mnist the busiest expert of a layer gets 2.3-3.2x the mean). A number f gives
every expert ceil(f * T * k / E) slots (the capacity factor of GShard / Switch).

The expert FLOPs fall from E*T rows to S = sum C_e rows per layer; the dispatch itself
is a cumsum over a [T*k, E] one-hot and three gathers. expert_cache runs on the result
with frozen routing (each token's experts as chosen at the last full step), and
expert_quant's dequantized weights are found as the dense ones are: run expert_quant first.

Reads: calibration (with `capacity: calibrated`). Writes: an MoEDispatchPlan record (per
layer: the capacities, the most pairs seen per expert, the share of the calibration's
pairs dropped, the rows computed against the dense E*T) and, per graph, the buffers
`_moed_<i>_cap` / `_moed_<i>_off` (capacities and slot offsets, int64 [E]).
Invariant: capacities of T on every expert compute the dense layer's numbers (no pair
dropped); a graph without dense stacked experts is returned unchanged (stat moe_layers 0),
so a second run finds nothing.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx

from pared.analysis.metrics import compare_outputs
from pared.analysis.recorder import record, replay, tapped
from pared.ir.errors import OptionError, PassError
from pared.ir.program import Program
from pared.ir.rewrite import add_constant, eliminate_dead_code, examples_of, splice
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, Record, RewritePass, check_range, register_pass
from pared.passes.cache.expert_cache import ExpertStack, find_expert_stacks

NAME = "moe_dispatch"
PREFIX = "_moed_"
_aten = torch.ops.aten
_VIEWS = {_aten.view.default, _aten.reshape.default, _aten._unsafe_view.default, _aten.clone.default,
          _aten.contiguous.default}


@dataclass(frozen=True)
class DispatchLayer:
    """One MoE layer's dispatch."""
    graph: str
    region: str
    tokens: int                          # T
    top_k: int                           # k
    capacities: tuple[int, ...]          # C_e per expert
    most_seen: tuple[int, ...]           # the most pairs routed to each expert in one calibration call
    #                                      (-1: no calibration run)
    dropped: float                       # share of the calibration run's pairs (routed as by the program before
    #                                      the pass) over capacity (-1: no calibration run)

    @property
    def rows(self) -> int:
        """Rows the experts compute per call (S), against E * T dense."""
        return sum(self.capacities)


@dataclass(frozen=True)
class MoEDispatchPlan(Record):
    """What moe_dispatch decided."""
    capacity: str                        # "calibrated" or the factor as text
    margin: float
    calls: int                           # calibration calls observed (0: not calibrated)
    layers: tuple[DispatchLayer, ...]
    measured: tuple[tuple[str, float], ...] = ()   # the whole program against the dense one on the calibration run

    @property
    def expert_rows(self) -> tuple[int, int]:
        """(rows computed, dense rows E*T) summed over the layers."""
        return (sum(x.rows for x in self.layers),
                sum(len(x.capacities) * x.tokens for x in self.layers))


def picked_node(gm: fx.GraphModule, s: ExpertStack) -> fx.Node:
    """The [T*k, d] gather of the routed experts' outputs that reads stack `s`'s [E, T, d] output."""
    n = next(m for m in gm.graph.nodes if m.name == s.output)
    while True:
        users = list(n.users)
        sel = [u for u in users if u.op == "call_function" and u.target is _aten.index_select.default
               and u.args[0] is n and u.args[1] == 0]
        if len(users) == 1 and sel:
            return sel[0]
        if len(users) == 1 and users[0].op == "call_function" and users[0].target in _VIEWS:
            n = users[0]
            continue
        raise PassError(f"pass '{NAME}': the experts' output {s.output!r} in region {s.region!r} is not picked by "
                        "one index_select of its flattened rows (y.reshape(E*T, d).index_select(0, rows)); "
                        "this layer combines its experts in a form the pass does not know")


def _check_rows(gm: fx.GraphModule, example_inputs: tuple, s: ExpertStack, picked: fx.Node) -> None:
    """Check on the example inputs that `picked` reads row idx[t, j] * T + t for pair t*k + j."""
    want = {s.indices, picked.args[2].name}
    seen: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        tapped(gm, want, seen.__setitem__)(*example_inputs)
    idx, rows = seen[s.indices], seen[picked.args[2].name]
    t = idx.shape[0]
    expect = (idx * t + torch.arange(t).unsqueeze(-1)).reshape(-1)
    if rows.shape != expect.shape or not torch.equal(rows.to(torch.int64), expect):
        raise PassError(f"pass '{NAME}': region {s.region!r}: the rows picked from the experts' output are not "
                        "idx[t, j] * T + t in token order; the pass cannot tell which expert each pick reads")


def dispatch_fn(s: ExpertStack, nodes: dict, caps: tuple[int, ...]):
    """The capacity-dispatched experts of one layer as a torch function (traced into the graph)."""
    acts = [nodes[a] for a in s.act]
    has_b1, has_b2 = s.b1 is not None, s.b2 is not None
    offsets = [0] + list(np.cumsum(caps))
    total = int(offsets[-1])

    def dispatched(x, idx, cap, off, w1, w2, *biases):
        bl = list(biases)
        b1 = bl.pop(0) if has_b1 else None
        b2 = bl.pop(0) if has_b2 else None
        t, d = x.shape
        k = idx.shape[1]
        e = cap.shape[0]
        a = idx.reshape(-1)                                                      # [P] expert of pair t*k + j
        onehot = (a.unsqueeze(1) == torch.arange(e)).to(torch.int64)             # [P, E]
        pos = (onehot.cumsum(0) * onehot).sum(1) - 1                             # earlier pairs of that expert
        keep = pos < cap.index_select(0, a)
        slot = torch.where(keep, off.index_select(0, a) + pos, torch.full_like(pos, total))
        pair_token = torch.arange(t * k) // k
        token_of = torch.full((total + 1,), t, dtype=torch.int64).scatter(0, slot, pair_token)
        xp = torch.cat([x, x.new_zeros(1, d)])
        xd = xp.index_select(0, token_of[:total])                                # [S, d]
        outs = []
        for i in range(e):
            if caps[i] == 0:
                continue
            h = torch.matmul(xd[offsets[i]:offsets[i + 1]], w1[i])
            if b1 is not None:
                h = h + b1[i]
            for m in acts:
                h = m.target(h, *m.args[1:], **m.kwargs)
            y = torch.matmul(h, w2[i])
            if b2 is not None:
                y = y + b2[i]
            outs.append(y)
        outs.append(x.new_zeros(1, outs[0].shape[-1] if outs else d))
        return torch.cat(outs).index_select(0, slot)                             # [P, d]
    return dispatched


@register_pass(NAME)
class DispatchExperts(RewritePass):
    """Capacity-based static dispatch of dense stacked experts (see module docstring)."""

    @dataclass(frozen=True, kw_only=True)
    class Options:
        capacity: str | float = "calibrated"   # "calibrated": per expert, the most pairs of a calibration call
        #                                       x margin; a number f: every expert ceil(f * T * k / E) slots
        margin: float = 1.1                    # calibrated: head-room over the most pairs seen
        multiple: int = 8                      # capacities rounded up to a multiple of this (at most T)
        measure: bool = True                   # replay the calibration run and record the result against the dense

        def __post_init__(self):
            if isinstance(self.capacity, str):
                if self.capacity != "calibrated":
                    raise OptionError(f"pass '{NAME}': option 'capacity' must be 'calibrated' or a capacity "
                                      f"factor (a number > 0), got {self.capacity!r}")
            elif isinstance(self.capacity, bool) or not isinstance(self.capacity, (int, float)):
                raise OptionError(f"pass '{NAME}': option 'capacity' must be 'calibrated' or a capacity "
                                  f"factor (a number > 0), got {self.capacity!r}")
            else:
                check_range(NAME, "capacity", self.capacity, lo=0, lo_open=True)
            check_range(NAME, "margin", self.margin, lo=1)
            check_range(NAME, "multiple", self.multiple, lo=1)

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        o = self.options
        found = {}
        for name in program.called_graphs() or list(program.graphs):
            g = program.graphs[name]
            stacks = find_expert_stacks(g.module, computed=True)
            if stacks and any(g.dynamic_dims):
                raise PassError(f"pass '{NAME}' needs graph {name!r} captured with static shapes (capacities are "
                                "counts of a fixed number of tokens); capture without dynamic_shapes")
            if stacks:
                found[name] = stacks
        if not found:
            ctx.log.info("%s: no mixture-of-experts layer with dense stacked experts; nothing to do", NAME)
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"moe_layers": 0})
        shapes = {}
        for name, stacks in found.items():
            gm = program.graphs[name].module
            nodes = {n.name: n for n in gm.graph.nodes}
            for s in stacks:
                e, t, _ = nodes[s.output].meta["val"].shape
                k = nodes[s.indices].meta["val"].shape[1]
                shapes[(name, s.region)] = (int(e), int(t), int(k))
                _check_rows(gm, program.graphs[name].example_inputs, s, picked_node(gm, s))

        most: dict[tuple[str, str], np.ndarray] = {}
        pairs: dict[tuple[str, str], list[np.ndarray]] = {key: [] for key in shapes}
        calls = 0
        if (o.capacity == "calibrated" or o.measure) and ctx.calibration is None:
            raise PassError(f"pass '{NAME}' needs a calibration run (capacity: calibrated counts the pairs "
                            "routed to each expert; measure: true replays it): pass calibration=, or give "
                            "capacity as a factor and measure: false")
        if ctx.calibration is not None:      # counted whenever there is a run: the record's drop shares
            where = {(name, s.indices): (name, s.region) for name, ls in found.items() for s in ls}

            def on_value(tap, v):
                key = where[(tap.graph, tap.node)]
                pairs[key].append(np.bincount(v.reshape(-1).numpy(), minlength=shapes[key][0]))
            calls = len(record(program, ctx.calibration, {n: [s.indices for s in ls] for n, ls in found.items()},
                               on_value))
            most = {key: np.max(v, axis=0) for key, v in pairs.items() if v}
        layers = []
        caps_of = {}
        for (name, region), (e, t, k) in shapes.items():
            if o.capacity == "calibrated":
                if (name, region) not in most:
                    raise PassError(f"pass '{NAME}': graph {name!r} (layer {region!r}) never ran in the calibration "
                                    "run, so its capacities cannot be counted; give capacity as a factor")
                caps = [min(t, o.multiple * math.ceil(c * o.margin / o.multiple)) for c in most[(name, region)]]
            else:
                c = min(t, o.multiple * math.ceil(float(o.capacity) * t * k / e / o.multiple))
                caps = [c] * e
            caps_of[(name, region)] = tuple(int(c) for c in caps)
            seen = pairs.get((name, region)) or []
            dropped = (float(sum(np.maximum(0, p - np.array(caps)).sum() for p in seen)) / (len(seen) * t * k)
                       if seen else -1.0)
            layers.append(DispatchLayer(name, region, t, k, caps_of[(name, region)],
                                        tuple(int(x) for x in most[(name, region)]) if (name, region) in most
                                        else (-1,) * e, round(dropped, 6)))

        graphs = dict(program.graphs)
        for name, stacks in found.items():
            graphs[name] = self._rewrite(program.graphs[name], stacks, {s.region: caps_of[(name, s.region)]
                                                                         for s in stacks})
        plan = MoEDispatchPlan("calibrated" if o.capacity == "calibrated" else f"{float(o.capacity):g}",
                               o.margin, calls, tuple(layers))
        new = program.replace(graphs=graphs)
        if o.measure:
            m = compare_outputs(replay(program, ctx.calibration), replay(new, ctx.calibration))
            plan = MoEDispatchPlan(plan.capacity, plan.margin, plan.calls, plan.layers,
                                   tuple((key, round(float(m[key]), 6)) for key in ("rel_l2", "psnr_db") if key in m))
        new = new.replace(records={**new.records, "MoEDispatchPlan": plan})
        rows, dense = plan.expert_rows
        ctx.log.info("%s: %d MoE layers, experts compute %d of %d dense rows (%.2f)%s", NAME, len(layers), rows,
                     dense, rows / dense, "".join(f", {k} {v:.4g}" for k, v in plan.measured))
        dropped = [x.dropped for x in layers if x.dropped >= 0]
        return PassResult(new, modified=True, preserved=(), stats={
            "moe_layers": len(layers), "expert_rows": rows, "dense_rows": dense,
            **({"dropped": max(dropped)} if dropped else {})})

    def _rewrite(self, src, stacks: list[ExpertStack], caps: dict[str, tuple[int, ...]]):
        gm = src.copy_module()
        nodes = {n.name: n for n in gm.graph.nodes}
        first = next(n for n in gm.graph.nodes if n.op != "placeholder")
        for i, s in enumerate(stacks):
            c = caps[s.region]
            cap = add_constant(gm, f"{PREFIX}{i}_cap", torch.tensor(c, dtype=torch.int64), self.name, before=first)
            off = add_constant(gm, f"{PREFIX}{i}_off", torch.tensor([0] + list(np.cumsum(c)[:-1]), dtype=torch.int64),
                               self.name, before=first)
            picked = picked_node(gm, s)
            args = [nodes[s.tokens], nodes[s.indices], cap, off, nodes[s.w1], nodes[s.w2]] + \
                [nodes[b] for b in (s.b1, s.b2) if b]
            (new,) = splice(gm, dispatch_fn(s, nodes, c), args, examples_of(args), self.name, region=s.region)
            picked.replace_all_uses_with(new)
        eliminate_dead_code(gm)
        gm.graph.lint()
        gm.recompile()
        return src.with_module(gm)

