"""ONNX translations for ops the dynamo exporter has none for, or whose translation ONNX Runtime
refuses, met in the models people have (torch.onnx.export's `custom_translation_table`: torch op
-> onnxscript function).

    prims.view_of                   an alias (PixArt-α's attention, after decomposition) -> Identity
    aten.empty_permuted             an allocation with a physical layout (Wan 2.1's rotary
                                    embedding) -> zeros of the size (its contents are written
                                    before they are read; ONNX has no uninitialized tensor)
    aten._is_all_true               an all-true reduction behind a runtime assertion (LLaVA's
                                    check that the image tokens match the image features) ->
                                    ReduceMin over the values as int32, as a bool scalar
    transformers.grouped_mm_fallback
                                    transformers' grouped matmul of rows sorted by expert
                                    (Mixtral, Qwen3-MoE: input [S, K], weight [E, K, N], offs
                                    [E] the cumulative row counts) -> per expert, its rows as a
                                    Slice between two offsets, one MatMul, then one Concat; rows
                                    past the last offset are zeros, as in transformers' loop
    aten.copy                       replaces the exporter's own, which casts `src` to self's
                                    dtype but does not broadcast it to self's shape: a scalar
                                    written into a slice (HunyuanVideo's prompt mask,
                                    `mask[:, :, :, 0] = True`) came out of rank 0 and ORT refused
                                    the file -> CastLike, then Expand to self's shape
    aten.where.self                 replaces the exporter's own on bool values (the same mask),
                                    which ORT's CPU Where has no kernel for (nor int16, bfloat16)
                                    -> Or(And(c, x), And(Not(c), y)) for bool; int16 and bfloat16
                                    through int32 and float32; any other type a plain Where

Each is exact: lower_graph's check compares the exported file with the fx graph as for any
other op. `gap_translations()` lists those whose op is registered in this process (the
transformers op exists once transformers' MoE module is imported).
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def _view_of(a):
    from onnxscript import opset18 as op
    return op.Identity(a)


def _is_all_true(a):
    from onnxscript import opset18 as op
    return op.Cast(op.ReduceMin(op.Cast(a, to=6), keepdims=0), to=9)     # 6: INT32, 9: BOOL


def _copy(self, src, non_blocking: bool = False):
    from onnxscript import opset18 as op
    return op.Expand(op.CastLike(src, self), op.Shape(self))


def _where(condition, self, other):
    import onnx_ir as ir
    from onnxscript import opset18 as op
    dtype = getattr(self, "dtype", None)
    if dtype != getattr(other, "dtype", None):           # mixed or unknown: the exporter's own
        return op.Where(condition, self, other)
    if dtype == ir.DataType.BOOL:
        return op.Or(op.And(condition, self), op.And(op.Not(condition), other))
    wider = {ir.DataType.INT16: ir.DataType.INT32, ir.DataType.BFLOAT16: ir.DataType.FLOAT}.get(dtype)
    if wider is not None:
        out = op.Where(condition, op.Cast(self, to=wider.value), op.Cast(other, to=wider.value))
        return op.Cast(out, to=dtype.value)
    return op.Where(condition, self, other)


def _shape_tensor(size: Any):
    """A 1-D int64 shape from a list of ints and symbolic sizes (scalar int64 values)."""
    from onnxscript import opset18 as op
    if all(isinstance(s, int) for s in size):
        return op.Constant(value_ints=[int(s) for s in size])
    parts = [op.Constant(value_ints=[int(s)]) if isinstance(s, int) else op.Reshape(s, op.Constant(value_ints=[1]))
             for s in size]
    return op.Concat(*parts, axis=0)


def _empty_permuted(size, physical_layout, dtype: int = 1, layout=None, device=None, pin_memory=None):
    import onnx_ir as ir
    from onnxscript import opset18 as op
    dtype = 1 if dtype in (None, -1) else int(dtype)     # 1: FLOAT, torch's default dtype
    zero = op.Constant(value=ir.tensor(0, dtype=ir.DataType(dtype)))
    return op.Expand(zero, _shape_tensor(size))


def _grouped_mm(mat_a, mat_b, offs):
    from onnxscript import opset18 as op
    experts = mat_b.shape[0]
    if not isinstance(experts, int):
        raise ValueError("transformers.grouped_mm_fallback: the number of experts (weight.shape[0]) must be static")
    axis0 = op.Constant(value_ints=[0])
    ends = op.Cast(offs, to=7)                                   # 7: INT64
    start = op.Constant(value_ints=[0])
    pieces = []
    for e in range(experts):
        end = op.Slice(ends, op.Constant(value_ints=[e]), op.Constant(value_ints=[e + 1]), axis0)
        rows = op.Slice(mat_a, start, end, axis0)                # [n_e, K]
        weight = op.Gather(mat_b, op.Constant(value_int=e), axis=0)   # [K, N]
        pieces.append(op.MatMul(rows, weight))
        start = end
    # rows after the last offset stay zero (transformers' loop leaves them as allocated)
    rows_left = op.Sub(op.Shape(mat_a, start=0, end=1), start)
    n_out = op.Shape(mat_b, start=2, end=3)
    zeros = op.Expand(op.CastLike(op.Constant(value_float=0.0), mat_a), op.Concat(rows_left, n_out, axis=0))
    return op.Concat(*pieces, zeros, axis=0)


def gap_translations() -> dict[Any, Callable]:
    """torch op -> onnxscript function, for the ops above that this process has."""
    table: dict[Any, Callable] = {}
    candidates = (("prims", "view_of", _view_of), ("aten", "empty_permuted", _empty_permuted),
                  ("aten", "_is_all_true", _is_all_true),
                  ("transformers", "grouped_mm_fallback", _grouped_mm), ("aten", "copy", _copy))
    for ns, name, fn in candidates:
        packet = getattr(getattr(torch.ops, ns, None), name, None) if hasattr(torch.ops, ns) else None
        if packet is not None and hasattr(packet, "default"):
            table[packet.default] = fn
    table[torch.ops.aten.where.self] = _where
    return table
