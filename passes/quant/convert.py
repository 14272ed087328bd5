"""Decide, then do: the one converter of pared's quantization passes (annotate ->
validate -> convert, as torch.ao's pt2e quantization does).

A policy decides per layer and writes its decision on the node it decides for, as an
`ir.formats.LinearSpec` (a linear layer's output node) or `ir.formats.ExpertsSpec` (a
stacked expert weight's get_attr), under `ir.meta.QUANT_SPEC`: `annotate` returns a
copy of the graph so annotated. `validate` checks every pending decision against the
target (format known, its precision runnable there, int8 weight codes within the range
the target's kernels compute exactly, block sizes dividing the input dim, smoothing
factors and outlier channels fitting the layer) and raises a PassError naming the pass,
the node and its region. `convert` rewrites every pending decision of a graph with the
converter registered for its kind, in one order (weight-only, static w8a8, dynamic w8a8,
expert stacks), and leaves the decision on the node that now computes the layer's
output (meta.QUANT_CONVERTED), so the rewritten graph still shows what was decided.

The policies: quantize_linears (static and dynamic), timestep_quant (per step bucket),
mixed_precision (w4 / w8 / w8a8 per layer), quantize_weights_int4 and expert_quant
(widths per expert). The converters (`register_converter`) live beside the numerics they
write: w8a8 in quantize_linears, weight-only in quantize_weights_int4, expert stacks in
expert_quant. A decision is pending while its node is still what was decided on: a
linear spec on a float linear layer's output node (ir.patterns.find_sites), an experts
spec on a get_attr; a spec anywhere else is an error.

A policy of one's own needs only the first step: annotate the layers (e.g. w8a8 for the
layers whose input dim is at least 256), validate, convert.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import torch.fx as fx

from pared.ir import meta
from pared.ir.errors import PassError
from pared.ir.formats import ExpertsSpec, LinearSpec
from pared.ir.patterns import Site, find_sites
from pared.ir.program import Graph, get_attr
from pared.ir.quant import QMAX_S8, int8_weight_qmax

Spec = LinearSpec | ExpertsSpec
#: kind -> converter(graph, [(node name, spec, site or None)], by) -> (graph, per-layer records)
_CONVERTERS: dict[str, Callable] = {}
#: the order kinds are converted in (a layer reading another's output reads its replacement)
ORDER = ("weight_only", "w8a8", "w8a8_dynamic", "experts")


def register_converter(kind: str) -> Callable:
    """Register the rewrite of the decisions of `kind` (LinearSpec.kind, or "experts")."""
    if kind not in ORDER:
        raise ValueError(f"unknown quantization kind {kind!r}; known: {', '.join(ORDER)}")

    def deco(fn: Callable) -> Callable:
        _CONVERTERS[kind] = fn
        return fn
    return deco


def annotate(src: Graph, specs: Mapping[str, Spec], by: str = "annotate") -> Graph:
    """A copy of `src` with each spec written on the node it names (src is not touched).

    Raises:
        PassError: a node name the graph does not have.
    """
    gm = src.copy_module()
    nodes = {n.name: n for n in gm.graph.nodes}
    for name, spec in specs.items():
        if name not in nodes:
            raise PassError(f"pass '{by}': cannot annotate node '{name}': the graph has no such node")
        if not isinstance(spec, (LinearSpec, ExpertsSpec)):
            raise PassError(f"pass '{by}': node '{name}': a decision is a LinearSpec or ExpertsSpec, got "
                            f"{type(spec).__name__}")
        nodes[name].meta[meta.QUANT_SPEC] = spec
    return src.with_module(gm)


def pending(graph: Graph) -> list[tuple[str, Spec, Site | None]]:
    """The decisions of `graph` still to convert, in graph order: (node, spec, the layer's Site
    for a linear spec). A converted decision is under meta.QUANT_CONVERTED, not here.

    Raises:
        PassError: a linear spec on a node that is not a float linear layer's output, or an
            experts spec on a node that is not a weight (get_attr).
    """
    gm = graph.module
    annotated = [n for n in gm.graph.nodes if meta.QUANT_SPEC in n.meta]
    if not annotated:
        return []
    sites = {s.out: s for s in find_sites(gm, batched=not any(graph.dynamic_dims))}
    out = []
    for n in annotated:
        spec = n.meta[meta.QUANT_SPEC]
        if isinstance(spec, ExpertsSpec) and n.op == "get_attr":
            out.append((n.name, spec, None))
        elif isinstance(spec, LinearSpec) and n.name in sites:
            out.append((n.name, spec, sites[n.name]))
        else:
            what = "a stacked weight (get_attr)" if isinstance(spec, ExpertsSpec) else "a float linear layer's output"
            raise PassError(f"pass '{spec.by}': node '{n.name}' is annotated "
                            f"{spec.to_json().get('format')} but is not {what} ({n.format_node()})")
    return out


def validate(graph: Graph, target, by: str) -> int:
    """Check every pending decision of `graph` against `target` (a Target, its JSON or None for
    the host's `cpu`). Returns how many were checked.

    Raises:
        PassError: the first decision that cannot run as decided, naming the pass, node and region.
    """
    todo = pending(graph)
    limit = int8_weight_qmax(target)
    gm = graph.module
    for name, spec, site in todo:
        if isinstance(spec, ExpertsSpec):
            w = get_attr(gm, str(_node(gm, name).target))
            problems = spec.problems(int(w.shape[0]), int(w.shape[1]))
        else:
            w = get_attr(gm, site.weight)
            k, n = (int(w.shape[1]), int(w.shape[0])) if site.transposed else (int(w.shape[0]), int(w.shape[1]))
            problems = spec.problems(k, n, weight_qmax_limit=limit)
        if problems:
            where = f" ({spec.region})" if spec.region else ""
            raise PassError(f"pass '{by}': node '{name}'{where}: decided {spec.to_json().get('format')} by "
                            f"'{spec.by}', which cannot run as decided: {'; '.join(problems)}")
    return len(todo)


def convert(src: Graph, by: str) -> tuple[Graph, list]:
    """Rewrite every pending decision of `src` (src is not touched): (the new graph, the
    converters' per-layer records in conversion order)."""
    todo = pending(src)
    graph, records = src, []
    for kind in ORDER:
        items = [(name, spec, site) for name, spec, site in todo if spec.kind == kind]
        if not items:
            continue
        if kind not in _CONVERTERS:
            raise PassError(f"pass '{by}': no converter registered for {kind} decisions "
                            f"(import pared.passes.quant)")
        graph, done = _CONVERTERS[kind](graph, items, by)
        records += done
    return graph, records


def apply(src: Graph, specs: Mapping[str, Spec], target, by: str) -> tuple[Graph, list]:
    """annotate, validate, convert: what a policy does once it has decided. A w8a8 decision without
    `weight_qmax` gets the target's exact int8 weight range (127, or 63 where ORT's u8s8 kernels
    would saturate)."""
    limit = None
    resolved = {}
    for name, spec in specs.items():
        if isinstance(spec, LinearSpec) and spec.weight_qmax is None and spec.kind != "weight_only":
            limit = int8_weight_qmax(target) if limit is None else limit
            spec = dataclasses.replace(spec, weight_qmax=QMAX_S8 if spec.u8_weights else limit)
        resolved[name] = spec
    annotated = annotate(src, resolved, by)
    validate(annotated, target, by)
    return convert(annotated, by)


def keep_decision(node: fx.Node, spec: Spec) -> None:
    """Record `spec`, converted, on the node that now computes the layer's output (the converters
    call it; the decided node itself goes with the rewrite)."""
    node.meta.pop(meta.QUANT_SPEC, None)
    node.meta[meta.QUANT_CONVERTED] = spec


def _node(gm: fx.GraphModule, name: str) -> fx.Node:
    return next(n for n in gm.graph.nodes if n.name == name)
