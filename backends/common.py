"""Helpers shared by the backends' lowering code (torch side)."""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np
import torch

from pared.ir.program import Graph

log = logging.getLogger("pared.backends")


def dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def io_spec(graph: Graph) -> tuple[list[dict], list[dict]]:
    """Manifest entries for a graph's inputs and outputs: name, dtype, shape (a str for a dynamic dim)."""
    inputs = []
    for name, ex, dims in zip(graph.input_names, graph.example_inputs, graph.dynamic_dims):
        dyn = dict(dims)
        inputs.append({"name": name, "dtype": dtype_name(ex),
                       "shape": [dyn.get(i, int(s)) for i, s in enumerate(ex.shape)],
                       "example_shape": [int(s) for s in ex.shape]})
    outs = graph.run(*graph.example_inputs)
    outputs = [{"name": n, "dtype": dtype_name(o), "shape": [int(s) for s in o.shape]}
               for n, o in zip(graph.output_names, outs)]
    return inputs, outputs


def dynamic_shapes_for(graph: Graph) -> tuple | None:
    """torch.export dynamic_shapes for re-tracing a captured graph, or None if static."""
    if not any(graph.dynamic_dims):
        return None
    dims: dict[str, Any] = {}
    spec = []
    for d in graph.dynamic_dims:
        spec.append({i: dims.setdefault(sym, torch.export.Dim.AUTO) for i, sym in d} or None)
    return tuple(spec)


def retrace(graph: Graph) -> "torch.export.ExportedProgram":
    """The graph as an ExportedProgram (what both exporters take)."""
    with torch.no_grad():
        return torch.export.export(graph.module, tuple(graph.example_inputs),
                                   dynamic_shapes=dynamic_shapes_for(graph), strict=False)


def compare(expected: Sequence[np.ndarray], got: Sequence[np.ndarray]) -> dict:
    """Worst max-abs and relative-L2 error over outputs."""
    worst_abs = 0.0
    worst_rel = 0.0
    for e, g in zip(expected, got):
        e = np.asarray(e, dtype=np.float64)
        g = np.asarray(g, dtype=np.float64)
        if e.shape != g.shape:
            return {"max_abs": float("inf"), "rel_l2": float("inf"), "shape_mismatch": [list(e.shape), list(g.shape)]}
        if e.size == 0:
            continue
        worst_abs = max(worst_abs, float(np.max(np.abs(e - g))))
        denom = float(np.linalg.norm(e))
        err = float(np.linalg.norm(e - g))
        worst_rel = max(worst_rel, err / denom if denom > 0 else err)
    return {"max_abs": worst_abs, "rel_l2": worst_rel}


def to_numpy(ts: Sequence[torch.Tensor]) -> list[np.ndarray]:
    return [t.detach().cpu().numpy() for t in ts]
