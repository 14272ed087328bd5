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
        # op counts only: the weights (in shared.weights for a graph of several, which ORT's copy
        # still names but which is not beside it) are not read
        model = onnx.load(out, load_external_data=False)
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


# -- exactness: each integer kernel against exact integer math ------------------------------
#
# ORT's x86 u8 x s8 kernels sum pairs of products in 16 bits where the CPU has no VNNI or AMX
# (ir.isa), so a graph can hold every integer kernel the fusion should form and still be wrong.
# Each integer node unit of the exported file is cut out as a probe model with the same nodes
# (the activation's codes, or its float values for a dynamic layer, become the probe's input),
# run in a session built as the target's, on codes that reach the top of the uint8 range (where
# 16-bit pair sums overflow), and compared with the same product computed exactly in int64.

#: relative L2 between an integer kernel and exact integer math above which it is refused: the
#: float32 scaling of an exact int32 sum differs ~1e-7; a saturating kernel ~0.1 (issue 22)
EXACT_REL_L2 = 1e-5
#: rows of activation codes a probe feeds (its other dims come from the exported file)
PROBE_ROWS = 64


def _constants(model: Any) -> dict:
    """Initializers and Constant node values of `model`, by name, as numpy arrays."""
    from onnx import numpy_helper
    out = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            out[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    return out


def _shapes(model: Any) -> dict:
    """Static shapes of the file's values (value_info, inputs, outputs); a symbolic dim is None."""
    out = {}
    for v in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        dims = v.type.tensor_type.shape.dim
        out[v.name] = [d.dim_value if d.HasField("dim_value") else None for d in dims]
    return out


def _codes(rng: Any, dtype: Any, shape: list, lo: int | None = None, hi: int | None = None) -> Any:
    """Adversarial activation codes in [lo, hi] (default: the dtype's range): half at the top
    (255 for uint8: where 16-bit pair sums overflow), the rest uniform."""
    import numpy as np
    info = np.iinfo(dtype)
    lo = int(info.min) if lo is None else lo
    hi = int(info.max) if hi is None else hi
    c = rng.integers(lo, hi + 1, size=shape)
    c = np.where(rng.random(shape) < 0.5, hi, c)
    return c.astype(dtype)


def _code_bounds(q: Any, producers: dict, consts: dict, dtype: Any) -> tuple[int | None, int | None]:
    """The codes QuantizeLinear `q` can produce: its dtype's range, narrowed by a Clip with constant
    bounds right before it (quantize_linears' 7-bit int8 activations)."""
    import numpy as np
    clip = producers.get(q.input[0]) if q is not None else None
    if clip is None or clip.op_type != "Clip" or len(clip.input) < 3 or \
            not all(i in consts for i in clip.input[1:3]) or q.input[1] not in consts:
        return None, None
    scale = float(consts[q.input[1]])
    zero = int(consts[q.input[2]]) if len(q.input) > 2 and q.input[2] in consts else 0
    info = np.iinfo(dtype)
    lo, hi = (int(np.clip(np.rint(float(consts[i]) / scale) + zero, info.min, info.max)) for i in clip.input[1:3])
    return lo, hi


def _static_units(model: Any, consts: dict) -> list:
    """(matmul node, [DequantizeLinear per operand], bias DequantizeLinear or None) for every
    MatMul / Gemm whose two operands are DequantizeLinear outputs (a QDQ node unit)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    units = []
    for n in model.graph.node:
        if n.op_type not in ("MatMul", "Gemm"):
            continue
        dqs = [producers.get(i) for i in n.input[:2]]
        if not all(d is not None and d.op_type == "DequantizeLinear" for d in dqs):
            continue
        bias = None
        if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2]:
            bias = producers.get(n.input[2])
            if bias is None or bias.op_type != "DequantizeLinear" or bias.input[0] not in consts:
                continue
        if not all(all(i in consts for i in d.input[1:]) for d in dqs):
            continue
        units.append((n, dqs, bias))
    return units


def _dynamic_units(model: Any, consts: dict) -> list:
    """(DynamicQuantizeLinear, MatMulInteger, Cast, scale Mul, output Mul) for every dynamic
    layer in the form backends/onnxruntime/lower.py writes."""
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict = collections.defaultdict(list)
    for n in model.graph.node:
        for i in n.input:
            consumers[i].append(n)
    units = []
    for mmi in model.graph.node:
        if mmi.op_type != "MatMulInteger" or mmi.input[1] not in consts:
            continue
        dql = producers.get(mmi.input[0])
        cast = consumers.get(mmi.output[0], [None])[0]
        if dql is None or dql.op_type != "DynamicQuantizeLinear" or cast is None or cast.op_type != "Cast":
            continue
        out = consumers.get(cast.output[0], [None])[0]
        if out is None or out.op_type != "Mul":
            continue
        other = [i for i in out.input if i != cast.output[0]]
        smul = producers.get(other[0]) if other else None
        if smul is None or smul.op_type != "Mul" or dql.output[1] not in smul.input or \
                not any(i in consts for i in smul.input):
            continue
        units.append((dql, mmi, cast, smul, out))
    return units


def _probe_model(nodes: list, inputs: list, output: str, consts: dict, opset: Any) -> bytes:
    """A model of `nodes` with graph inputs `inputs` [(name, elem_type, shape)], the constants
    the nodes read as initializers, and one output."""
    import onnx
    from onnx import helper, numpy_helper
    names = {i for n in nodes for i in n.input if i}
    inits = [numpy_helper.from_array(consts[k], k) for k in sorted(names) if k in consts]
    g = helper.make_graph(list(nodes), "probe", [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs],
                          [helper.make_tensor_value_info(output, onnx.TensorProto.FLOAT, None)], inits)
    return helper.make_model(g, opset_imports=list(opset)).SerializeToString()


def _dq(codes: Any, scale: Any, zero: Any, axis: int, ndim: int) -> tuple:
    """(codes - zero) as int64 and the scale, both broadcastable along `axis` of an ndim tensor."""
    import numpy as np
    shape = [1] * ndim
    if np.ndim(scale):
        shape[axis % ndim] = -1
    return codes.astype(np.int64) - np.asarray(zero, dtype=np.int64).reshape(shape), \
        np.asarray(scale, dtype=np.float64).reshape(shape)


def _exact_static(node: Any, operands: list, dqs: list, bias: Any, consts: dict) -> Any:
    """A node unit's output in exact integer math, scaled in float64."""
    import numpy as np
    ints, scales = [], []
    for codes, dq in zip(operands, dqs):
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        zero = consts[dq.input[2]] if len(dq.input) > 2 and dq.input[2] else 0
        q, s = _dq(codes, consts[dq.input[1]], zero, axis, codes.ndim)
        ints.append(q)
        scales.append(s)
    attrs = {a.name: a for a in node.attribute}
    a, b = ints
    sa, sb = scales
    if node.op_type == "Gemm":
        if "transA" in attrs and attrs["transA"].i:
            a, sa = a.T, sa.T
        if "transB" in attrs and attrs["transB"].i:
            b, sb = b.T, sb.T
    # the scales are per tensor on the activation and per output column (or tensor) on the weight
    # (DequantizeLinear's per-axis scales along the matmul's reduced dim are not a QDQ matmul unit)
    if np.size(sa) != 1 or (sb.ndim >= 2 and sb.shape[-2] != 1):
        raise ValueError("per-axis scales along the reduced dimension")
    y = np.matmul(a, b).astype(np.float64) * sa.reshape(()) * sb
    if node.op_type == "Gemm":
        alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
        beta = attrs["beta"].f if "beta" in attrs else 1.0
        y = alpha * y
        if bias is not None:
            axis = next((x.i for x in bias.attribute if x.name == "axis"), 1)
            bc = consts[bias.input[0]]
            zero = consts[bias.input[2]] if len(bias.input) > 2 and bias.input[2] else 0
            q, s = _dq(bc, consts[bias.input[1]], zero, axis if bc.ndim > 1 else 0, bc.ndim)
            y = y + beta * q * s
    return y


def _dynamic_quantize(x: Any) -> tuple:
    """ONNX DynamicQuantizeLinear in float32 as ORT computes it: (codes uint8, scale, zero point)."""
    import numpy as np
    lo = np.float32(min(float(x.min()), 0.0))
    hi = np.float32(max(float(x.max()), 0.0))
    scale = np.float32((hi - lo) / np.float32(255.0))
    if scale == 0:
        return np.zeros(x.shape, np.uint8), np.float32(0.0), 0
    zp = int(np.clip(np.rint(np.float32(0.0) - lo / scale), 0, 255))
    q = np.clip(np.rint(x / scale) + zp, 0, 255).astype(np.uint8)
    return q, scale, zp


def _rel_l2(got: Any, ref: Any) -> float:
    import numpy as np
    denom = float(np.linalg.norm(ref)) or 1.0
    return float(np.linalg.norm(np.asarray(got, np.float64) - ref) / denom)


def check_integer_exactness(path: str, target: Mapping[str, Any] | None = None, graph_name: str = "main",
                            layer_names: Mapping[str, str] | None = None, seed: int = 0) -> dict:
    """Run every integer node unit of the ONNX file at `path` as a probe, with the target's
    session options on this host's kernels, against exact integer math.

    Args:
        path: the exported (not yet ORT-optimized) ONNX file.
        target: the target's JSON (its ORT level and disabled optimizers shape the fusion).
        graph_name: for messages.
        layer_names: weight initializer name -> the layer's region (for messages and the report).
    Returns:
        {"units": int, "fused": int (probes ORT ran as an integer kernel), "worst_rel_l2": float,
         "max_weight_code": int (largest |q| of the int8 weights probed, or of an int8 activation
         operand's codes), "host": ir.isa.Cpu json}
    Raises:
        BackendError: naming the graph, the layer, this CPU and its missing features, when an
            integer kernel differs from exact integer math by more than EXACT_REL_L2.
    """
    import numpy as np
    import onnx
    import onnxruntime as ort

    from pared.backends.onnxruntime.runtime import _LEVELS, disabled_optimizers
    from pared.ir import isa

    target = dict(target or {})
    model = onnx.load(path)
    consts = _constants(model)
    shapes = _shapes(model)
    rng = np.random.default_rng(seed)
    layer_names = dict(layer_names or {})
    opts = ort.SessionOptions()
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel,
                                            _LEVELS[target.get("ort_opt_level", "extended")])
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    report = {"units": 0, "fused": 0, "worst_rel_l2": 0.0, "max_weight_code": 0, "host": isa.host_cpu().to_json()}

    def session(data: bytes):
        with tempfile.TemporaryDirectory(prefix="pared-probe-") as tmp:
            opts.optimized_model_filepath = os.path.join(tmp, "probe.onnx")
            s = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"],
                                     disabled_optimizers=disabled_optimizers(target))
            fused = any(n.op_type in INTEGER_OPS for n in onnx.load(opts.optimized_model_filepath).graph.node)
        return s, fused

    def concrete(name: str, rows: bool) -> list | None:
        """A probe shape for the value `name`: symbolic batch dims 1; with `rows`, the row dim
        (second to last) at most PROBE_ROWS; None when a reduced or column dim is symbolic."""
        dims = shapes.get(name)
        if not dims or any(d is None for d in dims[-2:]) and not (rows and dims[-1] is not None):
            return None
        out = [1 if d is None else int(d) for d in dims]
        if rows and len(out) >= 2:
            out[-2] = PROBE_ROWS if dims[-2] is None else min(out[-2], PROBE_ROWS)
        return out

    def judge(err: float, weight: str, what: str, wmax: int) -> None:
        report["units"] += 1
        report["worst_rel_l2"] = max(report["worst_rel_l2"], err)
        if err <= EXACT_REL_L2:
            return
        cpu = isa.host_cpu()
        layer = layer_names.get(weight, weight)
        why = isa.saturation_risk(cpu, wmax) or \
            f"this CPU ({cpu.model or cpu.arch}; features: {', '.join(cpu.features) or 'none known'})"
        kind = "weights" if weight in consts else "node"
        raise BackendError(f"graph '{graph_name}': the integer kernel of layer '{layer}' ({what}, {kind} "
                           f"'{weight}') differs from exact integer math (rel L2 {err:.3g} > {EXACT_REL_L2}): "
                           f"{why}. Rebuild for this CPU (target 'cpu' reads it; or set int8_weights: 7bit in the "
                           f"target), or build on a CPU with the features the target states")

    producers = {o: n for n in model.graph.node for o in n.output}
    for node, dqs, bias in _static_units(model, consts):
        operands, inputs, weight, wmax = [], [], "", 0
        for side, dq in enumerate(dqs):
            src = dq.input[0]
            if src in consts:
                operands.append(consts[src])
                if consts[src].dtype == np.int8:
                    weight, wmax = src, max(wmax, int(np.abs(consts[src].astype(np.int32)).max(initial=0)))
                continue
            shape = concrete(src, rows=side == 0)
            dtype = {onnx.TensorProto.UINT8: np.uint8, onnx.TensorProto.INT8: np.int8}.get(
                next((v.type.tensor_type.elem_type for v in model.graph.value_info if v.name == src), 0))
            if shape is None or dtype is None:
                break
            lo, hi = _code_bounds(producers.get(src), producers, consts, dtype)
            operands.append(_codes(rng, dtype, shape, lo, hi))
            if dtype is np.int8:      # the s8 side of an activation x activation matmul
                wmax = max(wmax, 127 if lo is None else max(abs(lo), abs(hi)))
            inputs.append((src, onnx.TensorProto.UINT8 if dtype is np.uint8 else onnx.TensorProto.INT8, shape))
        else:
            if len(inputs) == 2:     # an activation x activation matmul: the b side's dims must chain
                if operands[0].shape[-1] != operands[1].shape[-2]:
                    continue
            try:
                ref = _exact_static(node, operands, dqs, bias, consts)
            except ValueError:
                continue
            nodes = list(dqs) + ([bias] if bias is not None else []) + [node]
            sess, fused = session(_probe_model(nodes, inputs, node.output[0], consts, model.opset_import))
            got = sess.run(None, {n: a for (n, _, _), a in zip(inputs, [o for o, d in zip(operands, dqs)
                                                                           if d.input[0] not in consts])})[0]
            report["fused"] += int(fused)
            report["max_weight_code"] = max(report["max_weight_code"], wmax)
            judge(_rel_l2(got, ref), weight or node.name, node.op_type, wmax)

    for dql, mmi, cast, smul, out in _dynamic_units(model, consts):
        shape = concrete(dql.input[0], rows=True)
        if shape is None:
            continue
        w = consts[mmi.input[1]]
        wmax = int(np.abs(w.astype(np.int32)).max(initial=0)) if w.dtype == np.int8 else 0
        # float values whose per-call codes reach 0 and 255 (min and max of the tensor)
        codes = _codes(rng, np.uint8, shape).astype(np.float32)
        codes.reshape(-1)[0] = 0.0
        x = ((codes - np.float32(100.0)) * np.float32(0.05)).astype(np.float32)
        q, scale, zp = _dynamic_quantize(x)
        wz = consts[mmi.input[3]] if len(mmi.input) > 3 and mmi.input[3] else 0
        acc = np.matmul(q.astype(np.int64) - zp, w.astype(np.int64) - np.asarray(wz, np.int64))
        ws = next(consts[i] for i in smul.input if i in consts)
        ref = acc.astype(np.float64) * float(scale) * np.asarray(ws, np.float64)
        data = _probe_model([dql, mmi, cast, smul, out], [(dql.input[0], onnx.TensorProto.FLOAT, shape)],
                            out.output[0], consts, model.opset_import)
        sess, fused = session(data)
        got = sess.run(None, {dql.input[0]: x})[0]
        report["fused"] += int(fused)
        report["max_weight_code"] = max(report["max_weight_code"], wmax)
        judge(_rel_l2(got, ref), mmi.input[1], "dynamic", wmax)
    if report["fused"] < report["units"]:
        # such a probe ran ORT's float path, which cannot tell a saturating kernel apart
        import logging
        logging.getLogger("pared.backends.onnxruntime").warning(
            "graph '%s': %d of %d integer node units did not fuse when probed alone; their kernels were not "
            "checked against exact integer math", graph_name, report["units"] - report["fused"], report["units"])
    return report


# -- checking a GPU target's INT8 graph on a CPU whose u8s8 kernels saturate -----------------
#
# A cuda artifact keeps full-range int8 weights (its kernels sum in 32 bits), and the build host
# checks it on its CPU provider. Where that CPU's u8s8 kernels saturate, the check runs a copy
# whose int8 weights are shifted to uint8 around zero point 128: the same integers, run by ORT's
# U8U8 kernels, which are exact on every CPU.

def int8_weight_inputs(model: Any) -> list[tuple[Any, int]]:
    """(node, input index) of every int8 weight an integer kernel reads: DequantizeLinear's data and
    MatMulInteger's B, when they are initializers."""
    import onnx
    inits = {i.name: i for i in model.graph.initializer}
    out = []
    for n in model.graph.node:
        idx = 0 if n.op_type == "DequantizeLinear" else 1 if n.op_type == "MatMulInteger" else None
        if idx is not None and len(n.input) > idx and n.input[idx] in inits and \
                inits[n.input[idx]].data_type == onnx.TensorProto.INT8:
            out.append((n, idx))
    return out


def max_int8_weight_code(path: str) -> int:
    """The largest |q| of the int8 weights the file's integer kernels read (0 without any)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    model = onnx.load(path)
    inits = {i.name: i for i in model.graph.initializer}
    codes = [int(np.abs(numpy_helper.to_array(inits[n.input[i]]).astype(np.int32)).max(initial=0))
             for n, i in int8_weight_inputs(model)]
    return max(codes, default=0)


def as_u8_weights(path: str, out: str) -> int:
    """Write a copy of the ONNX file at `path` to `out` whose int8 weights are uint8 codes around
    zero point 128 (q + 128, zero point + 128): the same integers, run by ORT's U8U8 kernels.
    Returns how many weights were shifted."""
    import numpy as np
    import onnx
    from onnx import numpy_helper
    model = onnx.load(path)
    inits = {i.name: i for i in model.graph.initializer}
    done: dict[str, str] = {}
    sites = int8_weight_inputs(model)
    for n, idx in sites:
        name = n.input[idx]
        if name not in done:
            q = numpy_helper.to_array(inits[name]).astype(np.int16) + 128
            model.graph.initializer.append(numpy_helper.from_array(q.astype(np.uint8), f"{name}__u8"))
            done[name] = f"{name}__u8"
        n.input[idx] = done[name]
        zi = 2 if n.op_type == "DequantizeLinear" else 3    # x_zero_point / b_zero_point
        zero = numpy_helper.to_array(inits[n.input[zi]]).astype(np.int16) \
            if len(n.input) > zi and n.input[zi] in inits else np.zeros((), np.int16)
        zname = f"{n.name or name}__zp_u8_{zi}"
        model.graph.initializer.append(numpy_helper.from_array((zero + 128).astype(np.uint8), zname))
        while len(n.input) <= zi:
            n.input.append("")
        n.input[zi] = zname
    onnx.save(model, out)
    return len(done)
