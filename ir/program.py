"""The Program: named fx graphs plus the Plan that says how they run.

A plain model is one graph, `main`, and `Plan.single`. A program pass replaces a
graph G by its variants `G.<label>` (`main.full`, `main.reuse`, `main.bucket2`)
and each call of G in the Plan by a select over them (`Program.expand`); each
variant records its lineage. Partitioning will add an `edge` and a `cloud` graph
connected through the plan's references. Each graph is a
flat `GraphModule`: tensor inputs in, a tuple of tensors out, parameters as
`get_attr` nodes. Programs are values: rewrites build a new one with
`replace()` and share parameters with the old one. What passes decide and
measure travels with the Program in `records` (a RecordStore, ir/records.py)
and goes into the artifact's manifest.
"""
from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.fx as fx

from . import structure as _structure
from .errors import PlanError
from .plan import Call, Node, Plan, PlanRunner, StateBuffer
from .records import Record, RecordStore, as_store
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
        lineage: how this graph came from a captured one: (pass, variant label,
            numeric) per program pass that made it a variant, oldest first.
            `numeric` variants compute the same function at another precision
            (timestep buckets); the others compute something else (a cached
            span, half a batch). See `origin`.
    """

    module: fx.GraphModule
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    example_inputs: tuple[torch.Tensor, ...]
    dynamic_dims: tuple[tuple[tuple[int, str], ...], ...] = ()
    lineage: tuple[tuple[str, str, bool], ...] = ()

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
                      example_inputs=self.example_inputs, dynamic_dims=self.dynamic_dims, lineage=self.lineage)
        fields.update(changes)
        return Graph(**fields)

    def variant(self, by: str, label: str, numeric: bool = False) -> "Graph":
        """This graph marked as variant `label` made by pass `by`."""
        return dataclasses.replace(self, lineage=self.lineage + ((by, label, numeric),))

    def made_by(self, pass_name: str) -> bool:
        """Whether pass `pass_name` made this graph (or one it derives from) a variant."""
        return any(p == pass_name for p, _, _ in self.lineage)

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
        records: what passes decided and measured (plans, decisions, profiles), one
            RecordStore (ir/records.py) keyed by (record type, graph): graph None for a
            program-wide record. As a mapping its keys are strings, "QuantPlan" for a
            program-wide record and "CostProfile@main" for one about graph main, so
            `records["QuantPlan"]` and `{**records, "QuantPlan": plan}` work as for a dict;
            `records.of(CostProfile, "main")` reads by the pair. Any mapping given is
            converted. The records go into the manifest and load back
            (`Executor.records`, `Record.from_json`).
    """

    graphs: Mapping[str, Graph]
    plan: Plan
    output_structure: dict = field(default_factory=lambda: dict(_structure.TENSOR))
    records: RecordStore = field(default_factory=RecordStore)

    def __post_init__(self):
        object.__setattr__(self, "graphs", MappingProxyType(dict(self.graphs)))
        object.__setattr__(self, "records", as_store(self.records))
        self.plan.validate({n: (len(g.input_names), len(g.output_names)) for n, g in self.graphs.items()})

    # -- construction -------------------------------------------------------
    @staticmethod
    def single(graph: Graph, output_structure: dict | None = None, name: str = "main") -> "Program":
        return Program({name: graph}, Plan.single(name, graph.input_names, graph.output_names),
                       output_structure or dict(_structure.TENSOR))

    def replace(self, *, graphs: Mapping[str, Graph] | None = None, plan: Plan | None = None,
                records: Mapping[str, Any] | None = None, output_structure: dict | None = None) -> "Program":
        """A new Program with some parts replaced (the rest shared); `records` is any mapping
        a RecordStore takes (see `records`)."""
        return Program(
            graphs=self.graphs if graphs is None else graphs,
            plan=self.plan if plan is None else plan,
            output_structure=self.output_structure if output_structure is None else output_structure,
            records=self.records if records is None else records,
        )

    def expand(self, name: str, variants: Mapping[str, Graph], node: Callable[[Call, Callable[[str], str]], Node], *,
               by: str, numeric: bool = False, state: Sequence[StateBuffer] = (),
               step_values: Sequence[tuple[str, Sequence[float]]] = ()) -> "Program":
        """Replace graph `name` by its variants, and each Call of it in the Plan by
        `node(call, graph_of)` (a Select over the variants, bound to the call's
        references): what a program pass does to one graph.

        Args:
            variants: label -> the variant graph; it becomes graph `name.label`.
            node: builds the replacement of one Call; `graph_of(label)` names a variant.
            by: the pass (recorded in each variant's lineage).
            numeric: the variants compute the same function at other precisions.
            state, step_values: what the replacement reads (see Plan.replace_calls).
        Raises:
            PlanError: when a variant's name is taken by another graph.
        """
        graph_of = lambda label: f"{name}.{label}"   # noqa: E731
        graphs = {k: v for k, v in self.graphs.items() if k != name}
        for label, g in variants.items():
            if graph_of(label) in graphs:
                raise PlanError(f"pass '{by}': graph name {graph_of(label)!r} is taken")
            graphs[graph_of(label)] = g.variant(by, label, numeric)
        plan = self.plan.replace_calls(name, lambda c: node(c, graph_of), state=state, step_values=step_values)
        return self.replace(graphs=graphs, plan=plan)

    def with_record(self, record: Record, graph: str | None = None) -> "Program":
        """A new Program with `record` in its records under (its type, `graph`; None:
        program-wide), replacing any there."""
        return self.replace(records=self.records.with_record(record, graph))

    def with_graph(self, name: str, graph: Graph) -> "Program":
        g = dict(self.graphs)
        g[name] = graph
        return self.replace(graphs=g)

    def origin(self, name: str) -> str:
        """The name of graph `name` with its numeric variant steps left out: graphs
        with the same origin compute the same function (variants of one model at
        other precisions), so a cache pass lets them share carried state."""
        g = self.graphs[name]
        parts = name.split(".")
        keep = parts[:len(parts) - len(g.lineage)] if len(parts) > len(g.lineage) else parts[:1]
        for (_, label, numeric), part in zip(g.lineage, parts[len(keep):]):
            if not numeric:
                keep.append(part)
        return ".".join(keep)

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
    def variant_makers(self) -> list[str]:
        """The passes that made this program's graphs variants (from their lineage), sorted."""
        return sorted({p for g in self.graphs.values() for p, _, _ in g.lineage})

    def weight_groups(self) -> list[list[str]]:
        """The graphs the Plan calls, grouped by the weight tensors they share (variants
        of one captured graph land in one group; a draft model and its target in two).
        A graph pass decides once per group, so a layer gets one decision in every variant."""
        names = self.called_graphs()
        parent = {n: n for n in names}

        def find(n: str) -> str:
            while parent[n] != n:
                parent[n] = parent[parent[n]]
                n = parent[n]
            return n
        owner: dict[int, str] = {}
        for n in names:
            gm = self.graphs[n].module
            for node in gm.graph.nodes:
                if node.op != "get_attr":
                    continue
                t = _get_attr(gm, str(node.target))
                if not isinstance(t, torch.Tensor):
                    continue
                first = owner.setdefault(id(t), n)
                parent[find(n)] = find(first)
        groups: dict[str, list[str]] = {}
        for n in names:
            groups.setdefault(find(n), []).append(n)
        return list(groups.values())

    def called_graphs(self) -> list[str]:
        """The graphs the Plan calls, in order of first appearance."""
        return list(self.plan.graph_names)

    def pinned_by_state(self, name: str) -> Graph:
        """Graph `name` with static extents for the dynamic dimensions the Plan's state
        declarations fix: where every call of it reads an input from a declared state buffer
        whose shape gives an integer at that dimension, and the dimension's symbol comes from
        no other input, the symbol takes that size (the example inputs reshaped to it, zeros
        where they change). For backends that compile static shapes better (TVM's schedules
        cannot split a symbolic token count: a streamed step's cache capacity, ir/stream.py)."""
        g = self.graphs[name]
        calls = [c for c in self.plan.calls() if c.graph == name]
        if not calls or not any(g.dynamic_dims):
            return g
        decls = {s.name: s for s in self.plan.state}
        sizes: dict[str, set] = {}
        for c in calls:
            for i, ref in enumerate(c.inputs):
                sb = decls.get(ref.split(":", 1)[1]) if ref.startswith("state:") else None
                for d, sym in g.dynamic_dims[i]:
                    size = sb.shape[d] if sb is not None and sb.shape is not None and d < len(sb.shape) else None
                    sizes.setdefault(sym, set()).add(size if isinstance(size, int) else None)
        pin = {sym: next(iter(v)) for sym, v in sizes.items() if len(v) == 1 and None not in v}
        if not pin:
            return g
        examples, dyn = [], []
        for ex, dims in zip(g.example_inputs, g.dynamic_dims):
            fixed = {d: pin[sym] for d, sym in dims if sym in pin}
            if fixed:
                shape = [fixed.get(d, n) for d, n in enumerate(ex.shape)]
                ex = torch.zeros(shape, dtype=ex.dtype)
            examples.append(ex)
            dyn.append(tuple((d, sym) for d, sym in dims if sym not in pin))
        return g.with_module(g.module, example_inputs=tuple(examples), dynamic_dims=tuple(dyn))

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




def param_bytes(program: "Program") -> int:
    """Bytes of the distinct parameters and constants the Program's graphs hold (a tensor several
    graphs or nodes read counts once)."""
    seen: dict[tuple, int] = {}
    for g in program.graphs.values():
        for n in g.module.graph.nodes:
            if n.op == "get_attr":
                t = get_attr(g.module, str(n.target))
                if isinstance(t, torch.Tensor):
                    key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
                    seen[key] = t.numel() * t.element_size()
    return sum(seen.values())
