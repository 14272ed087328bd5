"""The Program: named fx graphs plus the Plan that says how they run.

A plain model is one graph, `main`, and `Plan.single`. Caching adds variants of
a graph (`full`, `reuse`, `probe`) and a schedule; partitioning adds an `edge`
and a `cloud` graph connected through the plan's references. Each graph is a
flat `GraphModule`: tensor inputs in, a tuple of tensors out, parameters as
`get_attr` nodes. Programs are values: rewrites build a new one with
`replace()` and share parameters with the old one.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Iterable, Mapping, Sequence

import torch
import torch.fx as fx

from . import structure as _structure
from .plan import Plan, PlanRunner
from .regions import Region, build_regions, select


@dataclass(frozen=True)
class Graph:
    """One flat graph of a Program.

    Attributes:
        module: tensors in, a tuple of tensors out.
        input_names / output_names: one per placeholder / output, in order.
        example_inputs: inputs it was captured (or derived) with; lowering
            re-traces the graph with them.
        dynamic_dims: per input, a tuple of (dim index, symbol name) pairs that
            may vary at run time; empty when the shape is static.
    """

    module: fx.GraphModule
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    example_inputs: tuple[torch.Tensor, ...]
    dynamic_dims: tuple[tuple[tuple[int, str], ...], ...] = ()

    def __post_init__(self):
        n_ph = sum(1 for n in self.module.graph.nodes if n.op == "placeholder")
        if n_ph != len(self.input_names) or n_ph != len(self.example_inputs):
            raise ValueError(f"graph has {n_ph} placeholders but {len(self.input_names)} input names "
                             f"and {len(self.example_inputs)} example inputs")
        if not self.dynamic_dims:
            object.__setattr__(self, "dynamic_dims", tuple(() for _ in self.input_names))

    def copy_module(self) -> fx.GraphModule:
        """A new GraphModule with a copied graph that shares parameters with this one."""
        return fx.GraphModule(self.module, copy.deepcopy(self.module.graph), self.module.__class__.__name__)

    def with_module(self, module: fx.GraphModule, **changes: Any) -> "Graph":
        fields = dict(module=module, input_names=self.input_names, output_names=self.output_names,
                      example_inputs=self.example_inputs, dynamic_dims=self.dynamic_dims)
        fields.update(changes)
        return Graph(**fields)

    def run(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        with torch.no_grad():
            out = self.module(*inputs)
        return tuple(out)

    def op_counts(self) -> dict[str, int]:
        """call_function targets by name ("aten.mm.default") -> count."""
        counts: dict[str, int] = {}
        for n in self.module.graph.nodes:
            if n.op == "call_function":
                k = str(n.target)
                counts[k] = counts.get(k, 0) + 1
        return counts


@dataclass(frozen=True)
class Program:
    """Named graphs, the Plan that runs them, and what the front door needs.

    Attributes:
        graphs: name -> Graph (read-only mapping).
        plan: how the graphs run per call.
        output_structure: nested structure of the model's outputs (see ir.structure).
        records: analysis and plan records the Plan needs at run time (they go
            into the manifest), by record type name.
    """

    graphs: Mapping[str, Graph]
    plan: Plan
    output_structure: dict = field(default_factory=lambda: dict(_structure.TENSOR))
    records: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        object.__setattr__(self, "graphs", MappingProxyType(dict(self.graphs)))
        object.__setattr__(self, "records", MappingProxyType(dict(self.records)))
        self.plan.validate({n: (len(g.input_names), len(g.output_names)) for n, g in self.graphs.items()})

    # -- construction -------------------------------------------------------
    @staticmethod
    def single(graph: Graph, output_structure: dict | None = None, name: str = "main") -> "Program":
        return Program({name: graph}, Plan.single(name, graph.input_names, graph.output_names),
                       output_structure or dict(_structure.TENSOR))

    def replace(self, *, graphs: Mapping[str, Graph] | None = None, plan: Plan | None = None,
                records: Mapping[str, Any] | None = None, output_structure: dict | None = None) -> "Program":
        """A new Program with some parts replaced (the rest shared)."""
        return Program(
            graphs=self.graphs if graphs is None else graphs,
            plan=self.plan if plan is None else plan,
            output_structure=self.output_structure if output_structure is None else output_structure,
            records=self.records if records is None else records,
        )

    def with_graph(self, name: str, graph: Graph) -> "Program":
        g = dict(self.graphs)
        g[name] = graph
        return self.replace(graphs=g)

    # -- views --------------------------------------------------------------
    @property
    def main(self) -> Graph:
        """The first graph (the only one for a plain model)."""
        return next(iter(self.graphs.values()))

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.plan.inputs

    def regions(self, graph: str | None = None) -> dict[str, Region]:
        """Module-path regions of one graph (default: the first), outer before inner."""
        g = self.graphs[graph] if graph else self.main
        return build_regions(g.module)

    def select_regions(self, pattern: str, graph: str | None = None) -> list[Region]:
        return select(self.regions(graph), pattern)

    def parameters(self) -> dict[str, torch.Tensor]:
        """Distinct parameter and buffer tensors referenced by any graph, by target."""
        out: dict[str, torch.Tensor] = {}
        for g in self.graphs.values():
            for n in g.module.graph.nodes:
                if n.op == "get_attr":
                    out.setdefault(str(n.target), _get_attr(g.module, str(n.target)))
        return out

    # -- running on the torch side -----------------------------------------
    def runner(self) -> PlanRunner:
        """A stateful runner for one request (use `.reset()` between requests)."""
        def run_graph(name: str, args: list) -> list:
            return list(self.graphs[name].run(*args))
        return PlanRunner(self.plan, run_graph, to_numpy=lambda t: t.detach().float().cpu().numpy(),
                          scalar=lambda v: torch.tensor([v], dtype=torch.float32))

    def __call__(self, *inputs: torch.Tensor) -> Any:
        """Run one call with a fresh runner and return outputs in the model's structure."""
        flat = self.runner()(list(inputs))
        return _structure.unflatten(self.output_structure, flat)


def _get_attr(module: torch.nn.Module, target: str) -> torch.Tensor:
    obj: Any = module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def get_attr(module: torch.nn.Module, target: str) -> torch.Tensor:
    """The tensor a get_attr node's target names."""
    return _get_attr(module, target)


def iter_call_nodes(gm: fx.GraphModule) -> Iterable[fx.Node]:
    return (n for n in gm.graph.nodes if n.op == "call_function")


def flat_inputs(args: Sequence[Any]) -> tuple[torch.Tensor, ...]:
    return tuple(a for a in args if isinstance(a, torch.Tensor))
