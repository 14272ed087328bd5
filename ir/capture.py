"""Capture a PyTorch model as a Program via torch.export (non-strict).

The exported program is decomposed to core ATen ops (so both backends see the
same op set), unlifted (parameters become `get_attr` nodes) and flattened: the
graph takes the model's tensor inputs in order and returns a flat tuple; the
nesting of the outputs (a dict, a ModelOutput, a tuple) is kept as a JSON
structure on the Program.
"""
from __future__ import annotations

import copy
import logging
import os
import re
import traceback
from typing import Any, Mapping

import torch
import torch.fx as fx
import torch.utils._pytree as pytree

from . import structure as _structure
from .errors import CaptureError
from .program import Graph, Program

log = logging.getLogger("pared.capture")

_TORCH_DIR = os.path.dirname(torch.__file__)
_PARED_DIR = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))


def normalize_inputs(example_inputs: Any) -> tuple:
    """A tensor, or a tuple/list of args, as an args tuple."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise CaptureError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


def capture(model: torch.nn.Module, example_inputs: Any, *, kwargs: Mapping[str, Any] | None = None,
            dynamic_shapes: Any = None, name: str = "main") -> Program:
    """Capture `model` called as `model(*example_inputs, **kwargs)`.

    Args:
        model: the module; it is not modified (no parameter, buffer or mode changes).
        example_inputs: a tensor or a tuple of positional args.
        kwargs: keyword args; non-tensor values are baked into the graph.
        dynamic_shapes: passed to torch.export (e.g. ``({0: Dim("batch")},)``).
        name: the graph's name in the Program.
    Returns:
        A Program with one graph and the trivial plan; for a `pared.ir.decode.Decoder` or a
        `pared.ir.denoise.Denoiser`, the Program of its parts with the decoding or denoising
        loop in the Plan (ir/decode.py, ir/denoise.py); for a `pared.ir.stream.Streamer`, its
        step with the KV cache as state of the Plan (ir/stream.py).
    Raises:
        CaptureError: naming the failing op or data-dependent expression, the
            user's source line, and what to try.
    """
    if not isinstance(model, torch.nn.Module):
        raise CaptureError(f"pared captures torch.nn.Module objects; got {type(model).__name__} "
                           "(wrap a function in an nn.Module whose forward calls it)")
    args = normalize_inputs(example_inputs)
    kwargs = dict(kwargs or {})
    from .decode import Decoder, capture_decoder   # decode and denoise import this module
    from .denoise import Denoiser, capture_denoiser
    from .stream import Streamer, capture_streamer
    if isinstance(model, Streamer):
        return capture_streamer(model, args, kwargs, dynamic_shapes)
    if isinstance(model, Decoder):
        return capture_decoder(model, args, kwargs, dynamic_shapes)
    if isinstance(model, Denoiser):
        return capture_denoiser(model, args, kwargs, dynamic_shapes)
    for i, a in enumerate([*args, *kwargs.values()]):
        if isinstance(a, torch.Tensor) and a.requires_grad:
            args = tuple(x.detach() if isinstance(x, torch.Tensor) else x for x in args)
            kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            break
    try:
        with torch.no_grad():
            ep = torch.export.export(model, args, kwargs, dynamic_shapes=dynamic_shapes, strict=False)
            ep = ep.run_decompositions()
    except Exception as e:  # torch raises many unrelated types here
        raise capture_error(e, model) from e
    return _flatten(ep, args, kwargs, name)


def _flatten(ep: "torch.export.ExportedProgram", args: tuple, kwargs: dict, name: str) -> Program:
    unlifted = ep.module()
    graph = copy.deepcopy(unlifted.graph)
    flat_values = pytree.tree_leaves((args, kwargs))
    for node in list(graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("_guards"):
            graph.erase_node(node)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(flat_values):
        raise CaptureError(f"internal: {len(placeholders)} graph inputs for {len(flat_values)} flat example values")
    input_names: list[str] = []
    example: list[torch.Tensor] = []
    dyn: list[tuple] = []
    for node, value in zip(placeholders, flat_values):
        if isinstance(value, torch.Tensor):
            input_names.append(node.name)
            example.append(value.detach().clone())
            val = node.meta.get("val")
            dims = ()
            if val is not None and hasattr(val, "shape"):
                dims = tuple((i, str(s)) for i, s in enumerate(val.shape) if not isinstance(s, int))
            dyn.append(dims)
        else:
            if node.users:
                raise CaptureError(f"non-tensor input {node.name}={value!r} is used in the graph; "
                                   "pass it as a tensor or bind it in a wrapper module")
            graph.erase_node(node)
    out_node = next(n for n in graph.nodes if n.op == "output")
    all_leaves = pytree.tree_leaves(out_node.args[0])
    for leaf in all_leaves:
        if leaf is not None and not isinstance(leaf, fx.Node):
            raise CaptureError(f"the model returns a non-tensor value {leaf!r}; pared graphs return tensors only")
    # a None output (a loss or a cache the call did not compute) is no graph output; the structure keeps it
    leaves = [leaf for leaf in all_leaves if leaf is not None]
    out_node.args = (tuple(leaves),)
    graph._codegen = fx.graph.CodeGen()
    graph.eliminate_dead_code()
    graph.lint()
    gm = fx.GraphModule(unlifted, graph, "CapturedGraph")
    structure = spec_to_structure(ep.call_spec.out_spec)
    if _structure.count_leaves(structure) == len(all_leaves):
        structure = _structure.mark_none(structure, [leaf is None for leaf in all_leaves])
    if _structure.count_leaves(structure) != len(leaves):
        structure = {"kind": "tuple", "items": [dict(_structure.TENSOR) for _ in leaves]}
    g = Graph(gm, tuple(input_names), tuple(_structure.output_names(structure)), tuple(example), tuple(dyn))
    log.info("captured %s: %d inputs, %d outputs, %d ops", name, len(input_names), len(leaves),
             sum(1 for n in graph.nodes if n.op == "call_function"))
    return Program.single(g, structure, name)


def spec_to_structure(spec: Any) -> dict:
    """torch pytree TreeSpec -> the JSON structure of ir.structure."""
    if spec is None:
        return dict(_structure.TENSOR)
    if spec.is_leaf():
        return dict(_structure.TENSOR)
    children = [spec.child(i) for i in range(spec.num_children)]
    items = [spec_to_structure(c) for c in children]
    typ = spec.type
    if typ is type(None):
        return {"kind": "none"}
    if typ is list:
        return {"kind": "list", "items": items}
    ctx = spec.context
    if isinstance(ctx, (list, tuple)) and len(ctx) == len(items) and all(isinstance(k, str) for k in ctx):
        return {"kind": "dict", "keys": list(ctx), "items": items}
    return {"kind": "tuple", "items": items}


_HINTS = [
    (re.compile(r"data.dependent|GuardOnDataDependent|Could not guard|Could not extract specialized integer", re.I),
     "the graph branches or sizes on a tensor's value; use torch.where/torch.cond, torch._check, "
     "or make that value a constant input"),
    (re.compile(r"\.item\(\)|aten\._local_scalar_dense", re.I),
     "a tensor is turned into a Python number; keep it a tensor or pass the number as a constant"),
    (re.compile(r"Cannot view a tensor with shape", re.I),
     "a .view() of a non-contiguous tensor (torch.export meets this in transformers' GPT-2 with SDPA attention); "
     "load the model with attn_implementation='eager', or use .reshape() in that line"),
    (re.compile(r"nonzero|masked_select|unique", re.I),
     "an op with a data-dependent output shape; replace it with a static form (top-k, a mask)"),
    (re.compile(r"numpy|__array__", re.I),
     "the forward leaves torch (numpy); express that computation with torch ops"),
    (re.compile(r"Constraints violated|dynamic_shapes", re.I),
     "a dimension marked dynamic was specialized; check dynamic_shapes against the model's code"),
]


def capture_error(e: BaseException, model: torch.nn.Module) -> CaptureError:
    """One-line CaptureError from a torch.export failure: op/expression, user line, hint."""
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    what = lines[0] if lines else type(e).__name__
    expr = re.search(r"data-dependent expression ([^\s(]+(?:\([^)]*\))?)", str(e))
    if expr:
        what = f"data-dependent expression {expr.group(1)}"
    what = what[:300]
    where = _user_frame(e)
    hint = "simplify the forward or capture a submodule"
    for pattern, h in _HINTS:
        if pattern.search(str(e)) or pattern.search(type(e).__name__):
            hint = h
            break
    loc = f" at {where}" if where else ""
    return CaptureError(f"cannot capture {type(model).__name__}: {type(e).__name__}: {what}{loc}; try: {hint}")


def _user_frame(e: BaseException) -> str | None:
    """The innermost traceback frame in the user's code (not torch, not pared)."""
    best = None
    seen = set()
    exc: BaseException | None = e
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        for fr in traceback.extract_tb(exc.__traceback__):
            f = os.path.realpath(fr.filename)     # pared/ir is a link to ir/
            if f.startswith(_TORCH_DIR) or "site-packages/torch" in f or f.startswith(os.path.join(_PARED_DIR, "ir")):
                continue
            if "<frozen" in f or "/contextlib.py" in f:
                continue
            best = f"{fr.filename}:{fr.lineno} ({fr.line})" if fr.line else f"{fr.filename}:{fr.lineno}"
        exc = exc.__cause__ or exc.__context__
    if best is None:
        m = re.search(r'File "([^"]+)", line (\d+)', str(e))
        if m:
            best = f"{m.group(1)}:{m.group(2)}"
    return best
