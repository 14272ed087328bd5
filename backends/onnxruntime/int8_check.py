"""Check that ONNX Runtime really runs a quantized graph with integer kernels.

A QDQ graph (QuantizeLinear / DequantizeLinear around float ops) is only fast
when ORT's QDQ fusion (extended optimization level) turns each node unit into
an integer kernel. When it does not (a float bias that MatMulAddFusion merges
into a Gemm first, a Transpose between the DequantizeLinear and the matmul, a
missing zero point) the model runs as float fake-quant, slower than fp32, and
nothing else says so. This module builds the session the target would build,
saves ORT's optimized model, and reads it back:

A dynamic-activation graph (DynamicQuantizeLinear -> MatMulInteger, which ORT
fuses into DynamicQuantizeMatMul / MatMulIntegerToFloat) is checked the same way:
each DynamicQuantizeLinear left in the optimized model must feed an integer kernel.

    integer_kernel_report(path, target)   op counts of the optimized model
    check_integer_kernels(path, target)   the report, or BackendError naming the
                                          DequantizeLinear that still feeds a float matmul
"""
from __future__ import annotations

import collections
import os
import tempfile
from typing import Any, Mapping

from pared.ir.errors import BackendError

#: ORT's integer matmul kernels (contrib ops included)
INTEGER_OPS = ("QGemm", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearMatMul",
               "QAttention", "MatMulNBits")
#: float ops a DequantizeLinear must not feed: the matmul would run in float
FLOAT_MATMULS = ("Gemm", "MatMul", "FusedGemm", "FusedMatMul")
#: ops that only move or reshape data: a DequantizeLinear seen through them still feeds what follows
_PASS_THROUGH = ("Reshape", "Transpose", "Squeeze", "Unsqueeze", "Identity", "Flatten", "Expand")
#: QDQ fusion happens at these levels only; below them a QDQ model runs as fake-quant
_FUSING_LEVELS = ("extended", "all")


def integer_kernel_report(path: str, target: Mapping[str, Any] | None = None) -> dict:
    """Optimize `path` the way the target's session does and describe the result.

    Returns:
        {"level": str, "integer_ops": {op: count}, "float_matmuls": int,
         "dequantize_linear": int, "quantize_linear": int,
         "dq_into_float_matmul": [[dequantize node, consumer node, consumer op], ...],
         "dynamic_quantize_linear": int,
         "dynamic_into_float": [[DynamicQuantizeLinear node, consumer node, consumer op], ...]}
    Raises:
        BackendError: when the target's ORT optimization level is below extended
            (no QDQ fusion happens there).
    """
    import onnx
    import onnxruntime as ort

    from pared.backends.onnxruntime.runtime import _LEVELS, disabled_optimizers

    target = dict(target or {})
    level = target.get("ort_opt_level", "extended")
    if level not in _FUSING_LEVELS:
        raise BackendError(f"target '{target.get('name')}': ort_opt_level '{level}' does not fuse quantized "
                           "(QDQ) graphs into integer kernels, so the int8 model would run slower than fp32; "
                           "use ort_opt_level 'extended' or 'all'")
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, _LEVELS[level])
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    with tempfile.TemporaryDirectory(prefix="pared-int8-") as tmp:
        out = os.path.join(tmp, "optimized.onnx")
        opts.optimized_model_filepath = out
        provider = target.get("provider") or "CPUExecutionProvider"
        providers = [provider] + (["CPUExecutionProvider"] if provider != "CPUExecutionProvider" else [])
        ort.InferenceSession(path, sess_options=opts, providers=providers,
                             disabled_optimizers=disabled_optimizers(target))
        model = onnx.load(out)
    return _describe(model.graph, level)


def _describe(graph: Any, level: str) -> dict:
    ops = collections.Counter(n.op_type for n in graph.node)
    consumers: dict[str, list] = collections.defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)

    def float_matmuls_fed_by(value: str, seen: set) -> list:
        found = []
        for c in consumers.get(value, []):
            if c.name in seen:
                continue
            seen.add(c.name)
            if c.op_type in FLOAT_MATMULS:
                found.append(c)
            elif c.op_type in _PASS_THROUGH:
                for o in c.output:
                    found += float_matmuls_fed_by(o, seen)
        return found

    offenders = []
    for n in graph.node:
        if n.op_type == "DequantizeLinear":
            for c in float_matmuls_fed_by(n.output[0], set()):
                offenders.append([n.name or n.output[0], c.name or c.output[0], c.op_type])
    # a run-time quantized activation must reach an integer kernel, not be dequantized back to float
    dynamic_offenders = []
    for n in graph.node:
        if n.op_type == "DynamicQuantizeLinear":
            for c in consumers.get(n.output[0], []):
                if c.op_type not in INTEGER_OPS:
                    dynamic_offenders.append([n.name or n.output[0], c.name or c.output[0], c.op_type])
    return {"level": level,
            "integer_ops": {op: ops[op] for op in INTEGER_OPS if ops.get(op)},
            "float_matmuls": sum(ops.get(op, 0) for op in FLOAT_MATMULS),
            "dequantize_linear": ops.get("DequantizeLinear", 0),
            "quantize_linear": ops.get("QuantizeLinear", 0),
            "dq_into_float_matmul": offenders,
            "dynamic_quantize_linear": ops.get("DynamicQuantizeLinear", 0),
            "dynamic_into_float": dynamic_offenders}


def check_integer_kernels(path: str, target: Mapping[str, Any] | None = None, graph_name: str = "main") -> dict:
    """`integer_kernel_report`, refusing a graph whose int8 layers would run in float.

    Raises:
        BackendError: naming the graph, the DequantizeLinear and the float op it
            still feeds after ORT's optimizations (or that no integer kernel was
            formed at all), and what to try.
    """
    rep = integer_kernel_report(path, target)
    bad = rep["dq_into_float_matmul"]
    if bad:
        dq, consumer, op = bad[0]
        raise BackendError(f"graph '{graph_name}': after ONNX Runtime's optimizations DequantizeLinear '{dq}' still "
                           f"feeds the float {op} '{consumer}' ({len(bad)} such edges): the quantized layer runs as "
                           "float fake-quant, slower than fp32. The QDQ fusion needs DequantizeLinear -> Gemm/MatMul "
                           "with constant int8 weights, explicit zero points and an int32 bias; exclude the layer "
                           "from quantization or fix the pattern that produced it")
    bad = rep["dynamic_into_float"]
    if bad:
        dq, consumer, op = bad[0]
        raise BackendError(f"graph '{graph_name}': after ONNX Runtime's optimizations DynamicQuantizeLinear '{dq}' "
                           f"feeds the {op} '{consumer}' ({len(bad)} such edges), not an integer kernel: the "
                           "activation is quantized per call and then used in float. Dynamic layers need "
                           "DynamicQuantizeLinear -> MatMulInteger (-> Cast -> Mul) with constant int8 weights")
    if not rep["integer_ops"]:
        raise BackendError(f"graph '{graph_name}': a quantized graph produced no integer kernel in ONNX Runtime "
                           f"(optimized ops: {rep['dequantize_linear']} DequantizeLinear, "
                           f"{rep['float_matmuls']} float matmuls); the quantizers only cost time here")
    return rep


def check_int4_kernels(report: dict, layers: int, graph_name: str = "main") -> dict:
    """Given `integer_kernel_report`'s result for a graph with `layers` weight-only layers
    (int4, and mixed_precision's weight-only int8; see matmul_nbits), check that ORT runs
    each as a MatMulNBits (a DequantizeLinear feeding a float matmul is already refused
    by check_integer_kernels).

    Returns:
        {"layers": int, "matmul_nbits": int}
    Raises:
        BackendError: naming the graph, when fewer MatMulNBits than int4 layers remain.
    """
    found = report["integer_ops"].get("MatMulNBits", 0)
    if found < layers:
        raise BackendError(f"graph '{graph_name}': {layers} int4 layers but {found} MatMulNBits in ONNX Runtime's "
                           "optimized model; the others run as float matmuls on dequantized weights")
    return {"layers": layers, "matmul_nbits": found}
