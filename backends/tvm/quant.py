"""Quantized graphs in TVM: converters for the fx importer that turn pared's
quantizers into Relax ops and each quantized linear layer into an integer matmul.

What the quantization passes leave in the fx graph, and what Relax gets:

    static (quantize_linears, mode static):
      xq = quantize_per_tensor(x, s_x, z_x, 0, 255, uint8)
      y  = addmm(dequantize_per_channel(bq int32, s_x*s_w), dequantize_per_tensor(xq, ...),
                 dequantize_per_channel(Wq [K, N] int8, s_w, 0, axis=1))
    ->  xq  = relax.quantize(x, s_x, z_x, uint8)                (the quantizer's own grid)
        acc = relax.matmul(xq, Wq, out_dtype=int32)             uint8 x int8 -> int32
        y   = float32(acc - z_x * colsum(Wq) + bq) * (s_x * s_w)

    dynamic (quantize_linears, mode dynamic): pared_quant.dynamic_linear(x, Wq, s_w, [b])
    ->  s_x, z_x from the range of x at run time (ONNX DynamicQuantizeLinear's rule),
        then the same integer matmul with the run-time scale.

    weight-only (quantize_weights_int4; mixed_precision's w4 and w8), float activations:
      y = addmm(b, x, t(view(dequantize_per_channel(codes [N*K/bs, bs] uint8, s, z, axis 0), [N, K])))
    ->  the same ops in Relax; the codes, scales and zero points are constants, so
        FoldConstant dequantizes them at build time and the shared library holds the
        float32 weight: a float matmul, as fast as fp32 and as large. TVM has no
        block-wise int4 kernel to keep the codes for (ORT's MatMulNBits is one), and a
        run-time dequantize would be a separate kernel writing the float weight at
        every call. `weight_only_int4_matmul` / `weight_only_int8_matmul` count them.

The activations stay uint8 and the weights int8, the operand types of AVX-512 VNNI's
vpdpbusd (u8 x s8 dot products into int32, without saturation), which the default matmul
schedule tensorizes on targets that have it (schedule._schedule_vnni); elsewhere both are
widened to int32. The zero point folds into a per-column correction, as in ORT's integer
kernels. A quantizer pair that is not
part of such a layer lowers to relax.quantize / relax.dequantize (float fake-quant).
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np

#: the fx ops this module converts (names as TVM's importer spells them)
QUANT_OPS = ("quantize_per_tensor.default", "dequantize_per_tensor.default", "dequantize_per_channel.default",
             "dynamic_linear.default")


def _is(node: Any, name: str) -> bool:
    return getattr(node, "op", None) == "call_function" and str(node.target).endswith(name)


def convert_map(ep: Any, stats: dict) -> dict[str, Callable]:
    """The custom_convert_map for `from_exported_program(ep)`; `stats` counts what was
    lowered how ({"int8_matmul": n, "fake_quant_matmul": n, "dynamic_int8_matmul": n})."""
    from tvm import relax

    sig = ep.graph_signature
    lifted = {**sig.inputs_to_parameters, **sig.inputs_to_buffers,
              **getattr(sig, "inputs_to_lifted_tensor_constants", {})}
    tensors = {**ep.state_dict, **ep.constants}

    def value(node: Any) -> np.ndarray | None:
        """The constant behind a lifted placeholder, or None for a run-time tensor."""
        if getattr(node, "op", None) != "placeholder" or node.name not in lifted:
            return None
        t = tensors.get(lifted[node.name])
        return None if t is None else t.detach().cpu().numpy()

    def emit(imp, expr):
        return imp.block_builder.emit(expr)

    def dtype_of(torch_dtype) -> str:
        return str(torch_dtype).replace("torch.", "")

    def quantize(node, imp):
        x, scale, zp, _qmin, _qmax, dtype = node.args[:6]
        return emit(imp, relax.op.quantize(imp.env[x], relax.const(float(scale), "float32"),
                                           relax.const(int(zp), "int32"), axis=-1, out_dtype=dtype_of(dtype)))

    def dequantize(node, imp):
        q, scale, zp = node.args[:3]
        return emit(imp, relax.op.dequantize(imp.env[q], relax.const(float(scale), "float32"),
                                             relax.const(int(zp), "int32"), axis=-1, out_dtype="float32"))

    def dequantize_per_channel(node, imp):
        q, scale, zp, axis = node.args[:4]
        qv = imp.env[q]
        s, z = imp.env[scale], imp.env[zp]
        if dtype_of(node.args[6]) == "int32":
            # relax.dequantize takes 8-bit data; an int32 bias dequantizes as (q - z) * s
            diff = emit(imp, relax.op.subtract(qv, relax.op.astype(z, "int32")))
            return emit(imp, relax.op.multiply(relax.op.astype(diff, "float32"), s))
        return emit(imp, relax.op.dequantize(qv, s, relax.op.astype(z, "int32"), axis=int(axis),
                                             out_dtype="float32"))

    def int8_layer(imp, x_u8, zp, s_x, w_node, ws_node, bias, out_scale_bias: bool):
        """float32 y of one integer layer: x_u8 [M, K] uint8 (zero point zp, a relax int32
        expr), Wq [K, N] int8 with scales s_w; s_x a relax float32 scalar expr."""
        wq = imp.env[w_node]
        acc = emit(imp, relax.op.matmul(x_u8, wq, out_dtype="int32"))
        colsum = relax.op.sum(relax.op.astype(wq, "int32"), axis=[0])
        acc = emit(imp, relax.op.subtract(acc, relax.op.multiply(zp, colsum)))
        scale = relax.op.multiply(s_x, imp.env[ws_node])
        if out_scale_bias:
            # int32 bias on the s_x * s_w grid: added to the accumulator, as QGemm does
            acc = emit(imp, relax.op.add(acc, bias))
            bias = None
        y = emit(imp, relax.op.multiply(relax.op.astype(acc, "float32"), scale))
        return y if bias is None else emit(imp, relax.op.add(y, bias))

    def static_layer(node, imp, bias_node, xd, wd):
        """The integer form of addmm / mm over quantize_linears' quantizers, or None."""
        if not (_is(xd, "dequantize_per_tensor.default") and _is(wd, "dequantize_per_channel.default")):
            return None
        xq = xd.args[0]
        if not _is(xq, "quantize_per_tensor.default"):
            return None
        s_x, z_x, lo, hi, dt = xd.args[1:6]
        if tuple(xq.args[1:6]) != (s_x, z_x, lo, hi, dt) or (lo, hi, dtype_of(dt)) != (0, 255, "uint8"):
            return None
        w, ws, wz, axis, wlo, whi, wdt = wd.args[:7]
        wz_v, w_v = value(wz), value(w)
        if w_v is None or wz_v is None or np.any(wz_v != 0) or int(axis) != 1 or dtype_of(wdt) != "int8" \
                or w_v.ndim != 2 or int(wlo) < -128:
            return None
        bias, int_bias = None, False
        if bias_node is not None:
            int_bias = _is(bias_node, "dequantize_per_channel.default") and dtype_of(bias_node.args[6]) == "int32"
            if int_bias:
                bz, bs = value(bias_node.args[2]), value(bias_node.args[1])
                ws_v = value(ws)
                want = np.float32(s_x) * ws_v if ws_v is not None else None
                int_bias = (bz is not None and not np.any(bz != 0) and bs is not None and want is not None
                            and np.allclose(bs, want, rtol=1e-6, atol=0))
            bias = imp.env[bias_node.args[0]] if int_bias else imp.env[bias_node]
        x_u8 = emit(imp, relax.op.quantize(imp.env[xq.args[0]], relax.const(float(s_x), "float32"),
                                           relax.const(int(z_x), "int32"), axis=-1, out_dtype="uint8"))
        stats["int8_matmul"] = stats.get("int8_matmul", 0) + 1
        return int8_layer(imp, x_u8, relax.const(int(z_x), "int32"), relax.const(float(s_x), "float32"), w, ws,
                          bias, int_bias)

    def weight_only_bits(w) -> int | None:
        """4 or 8 when `w` is t(view(dequantize_per_channel(constant uint8 codes, axis 0))),
        the weight of a weight-only layer; None otherwise. (The importer's decompositions
        spell t as permute [1, 0].)"""
        if not (_is(w, "t.default") or (_is(w, "permute.default") and list(w.args[1]) == [1, 0])):
            return None
        v = w.args[0]
        if not (_is(v, "view.default") or _is(v, "reshape.default")):
            return None
        d = v.args[0]
        if not _is(d, "dequantize_per_channel.default") or dtype_of(d.args[6]) != "uint8" or int(d.args[3]) != 0:
            return None
        if value(d.args[0]) is None or value(d.args[1]) is None or value(d.args[2]) is None:
            return None
        return {15: 4, 255: 8}.get(int(d.args[5]))

    def _count_fake(node):
        bits = weight_only_bits(node.args[-1])
        if bits is not None:
            key = f"weight_only_int{bits}_matmul"
            stats[key] = stats.get(key, 0) + 1
            return
        if any(_is(a, "dequantize_per_tensor.default") or _is(a, "dequantize_per_channel.default")
               for a in node.args):
            stats["fake_quant_matmul"] = stats.get("fake_quant_matmul", 0) + 1

    def addmm(node, imp):
        got = None
        if not node.kwargs or (node.kwargs.get("alpha", 1) == 1 and node.kwargs.get("beta", 1) == 1):
            got = static_layer(node, imp, node.args[0], node.args[1], node.args[2])
        if got is None:
            _count_fake(node)
            got = imp._addmm(node)
        return got

    def mm(node, imp):
        got = static_layer(node, imp, None, node.args[0], node.args[1])
        if got is None:
            _count_fake(node)
            got = emit(imp, relax.op.matmul(imp.env[node.args[0]], imp.env[node.args[1]]))
        return got

    def dynamic_linear(node, imp):
        x, w, ws = node.args[:3]
        bias = node.args[3] if len(node.args) > 3 else None
        xv = imp.env[x]
        # ONNX DynamicQuantizeLinear: the range of x widened to hold 0, uint8 grid
        lo = relax.op.minimum(relax.op.min(xv), relax.const(0.0, "float32"))
        hi = relax.op.maximum(relax.op.max(xv), relax.const(0.0, "float32"))
        s_x = emit(imp, relax.op.divide(relax.op.subtract(hi, lo), relax.const(255.0, "float32")))
        s_x = emit(imp, relax.op.where(relax.op.greater(s_x, relax.const(0.0, "float32")), s_x,
                                       relax.const(1.0, "float32")))
        zp = emit(imp, relax.op.clip(relax.op.round(relax.op.negative(relax.op.divide(lo, s_x))), 0, 255))
        q = relax.op.add(relax.op.round(relax.op.divide(xv, s_x)), zp)
        x_u8 = emit(imp, relax.op.astype(relax.op.clip(q, 0, 255), "uint8"))
        stats["dynamic_int8_matmul"] = stats.get("dynamic_int8_matmul", 0) + 1
        return int8_layer(imp, x_u8, emit(imp, relax.op.astype(zp, "int32")), s_x, w, ws,
                          None if bias is None else imp.env[bias], False)

    return {"quantize_per_tensor.default": quantize, "dequantize_per_tensor.default": dequantize,
            "dequantize_per_channel.default": dequantize_per_channel, "addmm.default": addmm,
            "mm.default": mm, "dynamic_linear.default": dynamic_linear}


def has_quantizers(ep: Any) -> bool:
    return any(n.op == "call_function" and str(n.target).startswith(("quantized_decomposed.", "pared_quant."))
               for n in ep.graph.nodes)


def quantizes_activations(graph_module: Any) -> bool:
    """Whether the graph rounds activations to a grid (static or dynamic quantizers):
    only then may TVM differ from the fx graph by more than summation order."""
    return any(n.op == "call_function" and str(n.target).startswith(
        ("quantized_decomposed.quantize_per_tensor", "pared_quant.dynamic_linear"))
        for n in graph_module.graph.nodes)
