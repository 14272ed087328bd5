"""Remove nodes whose results nobody uses (and the parameters only they read).

Before:  t = aten.mul(x, 2); u = aten.exp(w)   # u unused
         return (t,)
After:   t = aten.mul(x, 2)
         return (t,)
Reads: nothing. Writes: nothing on nodes.
Invariant: outputs are unchanged bit for bit; ops with side effects (asserts,
in-place ops) are kept, except torch.export's dtype/device checks
(`_assert_tensor_metadata`), which only restate node metadata and would keep
dead values alive (ir.rewrite.eliminate_dead_code).
"""
from __future__ import annotations

from pared.ir.program import Program
from pared.ir.rewrite import METADATA_ASSERTS, eliminate_dead_code
from pared.ir.transform import PRESERVE_ALL, PassContext, PassResult, RewritePass, register_pass


@register_pass("dead_code_elimination")
class EliminateDeadCode(RewritePass):
    """Drop unused pure nodes and unused get_attr nodes from every graph."""

    def __call__(self, program: Program, ctx: PassContext) -> PassResult:
        new_graphs = {}
        removed = 0
        for name, g in program.graphs.items():
            before = sum(1 for n in g.module.graph.nodes if n.op != "placeholder")
            dead = [n for n in g.module.graph.nodes
                    if (n.op in ("call_function", "get_attr") and not n.users and not n.is_impure())
                    or n.target in METADATA_ASSERTS]
            if not dead:
                new_graphs[name] = g
                continue
            gm = g.copy_module()
            eliminate_dead_code(gm)
            after = sum(1 for n in gm.graph.nodes if n.op != "placeholder")
            removed += before - after
            gm.recompile()
            new_graphs[name] = g.with_module(gm)
        if removed == 0:
            return PassResult(program, modified=False, preserved=PRESERVE_ALL, stats={"removed": 0})
        return PassResult(program.replace(graphs=new_graphs), modified=True, stats={"removed": removed})
