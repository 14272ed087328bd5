"""The contract, multi-graph: a graph pass given a program whose one graph has become two
variants (a Select alternating them per call, as a cache or bucket pass leaves it) rewrites
both exactly as it rewrites the graph alone — same ops, same numbers — and keeps the plan.
Runs every graph pass of the contract table (tests/passes/test_contract.py's CASES)."""
import dataclasses
import importlib.util
import os
import sys

import pytest
import torch

from pared.ir.plan import Select, Table
from pared.registry import get_pass

_spec = importlib.util.spec_from_file_location(
    "_pared_contract_cases", os.path.join(os.path.dirname(__file__), "test_contract.py"))
_contract = sys.modules.setdefault(_spec.name, importlib.util.module_from_spec(_spec))
if not hasattr(_contract, "CASES"):
    _spec.loader.exec_module(_contract)

#: passes that change the graph set or the plan (program passes), and one that refuses a
#: multi-graph program by meaning (it allocates from one graph's measured sensitivity)
PROGRAM_PASSES = {"interval_cache", "taylor_cache", "magnitude_cache", "residual_cache", "delta_cache",
                  "expert_cache", "cfg_skip", "timestep_quant", "mixed_precision", "speculative_decode",
                  "action_cache", "fuse_calls", "dynamic_precision", "token_reuse", "partition", "kv_policy", "kv_drop"}
#: graph passes whose decisions are calibrated per graph on the calls that graph ran: variants
#: alternated per call each see their own half of the calibration run, so their thresholds differ
#: from the single graph's by meaning (sparsify_activations: TEAL's per-layer |x| quantiles; a
#: cache's full and reuse variants run at different steps, whose inputs differ)
PER_GRAPH_CALIBRATION = {"sparsify_activations"}
GRAPH_PASSES = [n for n in _contract.REWRITES if n not in PROGRAM_PASSES | PER_GRAPH_CALIBRATION]


def _two_variants(program):
    """`program` with graph main replaced by variants main.a / main.b, alternated per call."""
    g = program.graphs["main"]

    def node(call, graph_of):
        return Select(Table(("a", "b"), default="a"),
                      (("a", dataclasses.replace(call, graph=graph_of("a"))),
                       ("b", dataclasses.replace(call, graph=graph_of("b")))))
    return program.expand("main", {"a": g, "b": g}, node, by="contract_variants")


def test_the_graph_passes_are_the_rewrites_no_program_pass_owns():
    assert set(GRAPH_PASSES) >= {"constant_folding", "dead_code_elimination", "softmax_guard_elimination",
                                 "quantize_linears", "quantize_weights_int4", "expert_quant"}
    assert not PROGRAM_PASSES - set(_contract.REWRITES), "a program pass listed here is no longer registered"


@pytest.mark.parametrize("name", GRAPH_PASSES)
def test_a_graph_pass_rewrites_two_variants_as_it_rewrites_one_graph(name):
    c = _contract._case(name)
    fx_ = c.fixture()
    one = get_pass(name)(**c.options)(fx_.program, c.ctx(fx_, fx_.program))
    assert one.modified
    two_in = _two_variants(fx_.program)
    two = get_pass(name)(**c.options)(two_in, c.ctx(fx_, two_in))
    assert two.modified and set(two.program.graphs) == {"main.a", "main.b"}
    assert two.program.plan == two_in.plan
    want_ops = one.program.graphs["main"].op_counts()
    with torch.no_grad():
        want = one.program.graphs["main"].run(*fx_.inputs)
        for g in ("main.a", "main.b"):
            graph = two.program.graphs[g]
            assert graph.op_counts() == want_ops, g
            got = graph.run(*fx_.inputs)
            for w, o in zip(want if isinstance(want, (tuple, list)) else [want],
                            got if isinstance(got, (tuple, list)) else [got]):
                torch.testing.assert_close(o, w, rtol=1e-6, atol=1e-6)
