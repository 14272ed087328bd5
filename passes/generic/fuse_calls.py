"""Fuse consecutive calls of the Plan into one graph, so a runtime runs one session where it ran two.

A captured loop (a Decoder's head and pick, a Denoiser's head and update) runs two small graphs
per iteration; on a CPU runtime each call costs a fixed overhead (binding, allocation, the
plan's bookkeeping) that small graphs do not amortize. This pass merges them:

Before:  Seq[ Call A (a_in) -> (r, s);  Call B (r, b_in) -> (t,) ]
After:   Call A+B (a_in, b_in) -> (s, t)          r dropped: only B read it
And a call after a select is moved into each case first (it runs after whichever case ran):
Before:  Seq[ Select(table)[ full: Call A.full,  reuse: Call A.reuse ];  Call B ]
After:   Select(table)[ full: Call A.full+B,  reuse: Call A.reuse+B ]

Fused: two Calls in a Seq on the same device, and a Call that follows a Select whose cases are
single Calls (a selector that reads a case's outputs after it ran is left alone). Loops and
selects are not crossed otherwise. An output of the first graph stays an output unless every
read of it anywhere in the plan is the second call's (state and the plan's outputs always stay).
Run it last: the fused graphs hold two models' regions, which graph passes do not expect.

Reads: nothing. Writes: graphs `A+B` (the fused ones replace A and B where no other call uses
them). Invariant: the plan computes the same values (each fused graph runs A's nodes then B's).
"""
from __future__ import annotations

import dataclasses
from collections import Counter
import torch
import torch.fx as fx

from pared.ir.plan import Call, Loop, Node, Select, Seq, Transfer, iter_nodes
from pared.ir.program import Graph, Program
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, RewritePass, register_pass


def plan_reads(program: Program, body: Node) -> Counter:
    """How often each reference is read: call inputs, selectors, loop conditions, transfers,
    the plan's outputs."""
    reads: Counter = Counter(program.plan.outputs)
    for n in iter_nodes(body):
        if isinstance(n, Call):
            reads.update(n.inputs)
        elif isinstance(n, Select):
            reads.update(n.selector.reads())
            reads.update(r for _, r in n.selector.reads_after())
        elif isinstance(n, Loop) and n.until is not None:
            reads[n.until] += 1
        elif isinstance(n, Transfer):
            reads[n.ref] += 1
    return reads


def _unique(name: str, taken: set[str]) -> str:
    out, k = name, 1
    while out in taken:
        out, k = f"{name}_{k}", k + 1
    taken.add(out)
    return out


def fuse_graphs(a: Graph, a_call: Call, b: Graph, b_call: Call, keep: set[str]) -> tuple[Graph, Call]:
    """One graph running `a` then `b`, and its Call.

    Args:
        keep: references of `a`'s outputs that must stay outputs (read elsewhere).
    """
    root = torch.nn.Module()
    root.add_module("a", a.module)
    root.add_module("b", b.module)
    g = fx.Graph()
    env: dict[str, fx.Node] = {}          # reference -> node in the fused graph
    inputs: list[str] = []
    names: set[str] = set()
    in_names, examples, dyn = [], [], []

    def placeholder(ref: str, graph: Graph, i: int) -> fx.Node:
        if ref not in env:
            ph = g.placeholder(_unique(graph.input_names[i].replace(".", "_"), names))
            src = [n for n in graph.module.graph.nodes if n.op == "placeholder"][i]
            ph.meta = dict(src.meta)
            env[ref] = ph
            inputs.append(ref)
            in_names.append(ph.name if graph.input_names[i] in in_names else graph.input_names[i])
            examples.append(graph.example_inputs[i])
            dyn.append(graph.dynamic_dims[i] if i < len(graph.dynamic_dims) else ())
        return env[ref]

    def copy(graph: Graph, call: Call, prefix: str) -> list[fx.Node]:
        local: dict[fx.Node, fx.Node] = {}
        phs = [n for n in graph.module.graph.nodes if n.op == "placeholder"]
        for i, (ph, ref) in enumerate(zip(phs, call.inputs)):
            local[ph] = placeholder(ref, graph, i)
        outs: list[fx.Node] = []
        for n in graph.module.graph.nodes:
            if n.op == "placeholder":
                continue
            if n.op == "output":
                res = n.args[0]
                res = list(res) if isinstance(res, (tuple, list)) else [res]
                outs = [local[r] for r in res]
                continue
            if n.op == "get_attr":
                new = g.get_attr(f"{prefix}.{n.target}")
                new.meta = dict(n.meta)
            else:
                new = g.node_copy(n, lambda x: local[x])
            local[n] = new
        return outs

    a_outs = copy(a, a_call, "a")
    for ref, node in zip(a_call.outputs, a_outs):
        env[ref] = node
    b_outs = copy(b, b_call, "b")
    out_refs, out_nodes, out_names = [], [], []
    taken: set[str] = set()
    for ref, node, name in zip(a_call.outputs, a_outs, a.output_names):
        if ref in b_call.outputs or ref not in keep:
            continue
        out_refs.append(ref), out_nodes.append(node), out_names.append(_unique(name, taken))
    for ref, node, name in zip(b_call.outputs, b_outs, b.output_names):
        out_refs.append(ref), out_nodes.append(node), out_names.append(_unique(name, taken))
    g.output(tuple(out_nodes))
    gm = fx.GraphModule(root, g, "Fused")
    gm.graph.lint()
    fused = Graph(gm, tuple(in_names), tuple(out_names), tuple(examples), tuple(dyn),
                  lineage=a.lineage)
    return fused, Call("", tuple(inputs), tuple(out_refs), a_call.device)


@register_pass("fuse_calls")
class FuseCalls(RewritePass):
    """Merge consecutive plan calls into one graph each (see module docstring)."""

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        self._graphs = dict(program.graphs)
        self._program = program
        self._fused = 0
        body = program.plan.body
        while True:                                   # one fusion at a time, reads recounted each time
            self._done = False
            body = self._walk(body, body)
            if not self._done:
                break
        if not self._fused:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"fused": 0})
        plan = dataclasses.replace(program.plan, body=body)
        used = {c.graph for c in iter_nodes(body) if isinstance(c, Call)}
        graphs = {k: v for k, v in self._graphs.items() if k in used}
        new = program.replace(graphs=graphs, plan=plan)
        ctx.log.info("fuse_calls: %d fusions; %d graphs -> %d", self._fused, len(program.graphs), len(graphs))
        return PassResult(new, modified=True, stats={"fused": self._fused, "graphs": len(graphs)})

    def _fuse(self, a: Call, b: Call, root: Node) -> Call:
        reads = plan_reads(self._program, root)
        b_reads = Counter(b.inputs)
        # an output of a stays when something but this b reads it (b may sit in several cases: one object)
        b_count = sum(1 for n in iter_nodes(root) if n is b)
        keep = {r for r in a.outputs if r.startswith("state:") or reads[r] > b_reads[r] * max(b_count, 1)}
        name = f"{a.graph}+{b.graph}"
        fused, call = fuse_graphs(self._graphs[a.graph], a, self._graphs[b.graph], b, keep)
        self._graphs[name] = fused
        self._fused += 1
        self._done = True
        return dataclasses.replace(call, graph=name)

    def _walk(self, node: Node, root: Node) -> Node:
        if self._done:
            return node
        if isinstance(node, Seq):
            nodes = list(node.nodes)
            for i in range(len(nodes) - 1):
                a, b = nodes[i], nodes[i + 1]
                if isinstance(a, Call) and isinstance(b, Call) and a.device == b.device:
                    nodes[i:i + 2] = [self._fuse(a, b, root)]
                    return nodes[0] if len(nodes) == 1 else Seq(tuple(nodes))
                if (isinstance(a, Select) and isinstance(b, Call) and not a.selector.reads_after()
                        and all(isinstance(c, Call) and c.device == b.device for _, c in a.cases)):
                    sunk = Select(a.selector, tuple((lab, Seq((c, b))) for lab, c in a.cases), a.key)
                    nodes[i:i + 2] = [sunk]
                    self._done = True
                    return nodes[0] if len(nodes) == 1 else Seq(tuple(nodes))
            for i, n in enumerate(nodes):
                new = self._walk(n, root)
                if self._done:
                    nodes[i] = new
                    return Seq(tuple(nodes))
            return node
        if isinstance(node, Select):
            cases = list(node.cases)
            for i, (lab, n) in enumerate(cases):
                new = self._walk(n, root)
                if self._done:
                    cases[i] = (lab, new)
                    return Select(node.selector, tuple(cases), node.key)
            return node
        if isinstance(node, Loop):
            new = self._walk(node.body, root)
            return dataclasses.replace(node, body=new) if self._done else node
        return node

