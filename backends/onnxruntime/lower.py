"""Lower one graph to ONNX with torch.onnx.export(dynamo=True), then check it.

The exported file is run with ONNX Runtime on the graph's example inputs and
compared with the fx graph; on a mismatch the export is retried without the
exporter's optimizer (it once silently collapsed two chained index_add ops into
an Identity here), and a graph that still differs is refused. No graph is
shipped unchecked.

A graph holding quantizers (`quantized_decomposed` ops, from the quantization
passes) is also checked for integer kernels: ORT's optimized model must hold
QGemm / MatMulInteger-family ops and no DequantizeLinear feeding a float matmul
(see int8_check); the op counts go into the manifest entry as `int8`.

pared's own quantized ops (`pared_quant.*`, from quantize_linears' dynamic mode)
are exported through a custom translation table: `dynamic_linear` becomes
DynamicQuantizeLinear -> MatMulInteger -> Cast -> Mul -> (Add), the pattern ORT
fuses into DynamicQuantizeMatMul.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
from typing import Any, Mapping

import torch

from pared.backends.common import compare, io_spec, retrace, to_numpy
from pared.ir.errors import BackendError
from pared.ir.program import Graph

log = logging.getLogger("pared.backends.onnxruntime")

#: graphs whose weights exceed this are saved with external data (protobuf caps a file at 2 GB)
EXTERNAL_DATA_BYTES = 1 << 30
#: relative L2 error between ORT and the fx graph above which a lowering is refused
CHECK_REL_L2 = 1e-4
#: the same bound for a graph holding quantizers. ORT rounds x / s where torch's
#: quantize op rounds x * (1 / s), and sums in another order; a value on a rounding
#: boundary then lands one quantization step away, and deeper layers amplify those
#: steps (measured on all-MiniLM-L6-v2, 36 int8 layers: 4e-5 after one block,
#: 0.02-0.04 after six depending on the calibration, while ORT and the fx graph were
#: equally close to the float model). A broken export still shows as an error of order 1.
CHECK_REL_L2_QUANT = 0.1
#: options this backend takes (none yet)
OPTIONS: tuple[str, ...] = ()


def _quiet_exporter() -> None:
    for name in ("torch.onnx", "torch.onnx._internal.exporter._registration", "torch._export", "onnxscript"):
        logging.getLogger(name).setLevel(logging.ERROR)


def _dynamic_linear_onnx(x, wq, w_scale, bias=None):
    """pared_quant.dynamic_linear in standard ONNX ops (what ORT's quantize_dynamic writes)."""
    from onnxscript import opset18 as op

    xq, x_scale, x_zero_point = op.DynamicQuantizeLinear(x)
    acc = op.MatMulInteger(xq, wq, x_zero_point)
    y = op.Mul(op.Cast(acc, to=1), op.Mul(x_scale, w_scale))     # to=1: FLOAT
    return y if bias is None else op.Add(y, bias)


def custom_translations() -> dict:
    """Translations for pared's own ops that may appear in a graph (torch op -> onnxscript function)."""
    table = {}
    ns = getattr(torch.ops, "pared_quant", None)
    if ns is not None and hasattr(ns, "dynamic_linear"):
        table[ns.dynamic_linear.default] = _dynamic_linear_onnx
    return table


def export_onnx(graph: Graph, path: str, *, optimize: bool = True) -> None:
    """Write `graph` as an ONNX model at `path` (+ `path.data` when large)."""
    import onnx

    _quiet_exporter()
    ep = retrace(graph)
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), torch.no_grad():
        onnx_program = torch.onnx.export(ep, (), dynamo=True, input_names=list(graph.input_names),
                                         output_names=list(graph.output_names), optimize=optimize,
                                         verbose=False, report=False,
                                         custom_translation_table=custom_translations() or None)
    weight_bytes = sum(t.numel() * t.element_size() for t in ep.state_dict.values())
    external = weight_bytes > EXTERNAL_DATA_BYTES
    onnx_program.save(path, external_data=external)
    onnx.checker.check_model(path if external else onnx.load(path), full_check=False)


def _has_quantizers(graph: Graph) -> bool:
    return any(n.op == "call_function" and str(n.target).startswith(("quantized_decomposed.", "pared_quant."))
               for n in graph.module.graph.nodes)


def lower_graph(graph: Graph, name: str, target: Mapping[str, Any], outdir: str) -> dict:
    """Export, check against the fx graph, and return the manifest entry.

    Raises:
        BackendError: naming the graph, when export fails or ORT disagrees with
            eager after the retry without the exporter's optimizer.
    """
    from pared.backends.onnxruntime.runtime import OrtGraph

    fname = f"{name}.onnx"
    path = os.path.join(outdir, fname)
    inputs, outputs = io_spec(graph)
    expected = to_numpy(graph.run(*graph.example_inputs))
    feed = to_numpy(graph.example_inputs)
    last_err: dict | str = ""
    quantized = _has_quantizers(graph)
    from pared.backends.onnxruntime.matmul_nbits import int4_layers, lower_matmul_nbits
    int4 = int4_layers(graph) if quantized else {}
    limit = CHECK_REL_L2_QUANT if quantized else CHECK_REL_L2
    for optimize in (True, False):
        for f in (path, path + ".data"):
            if os.path.exists(f):
                os.remove(f)
        try:
            export_onnx(graph, path, optimize=optimize)
            if int4:
                lower_matmul_nbits(path, int4, name)
        except BackendError:
            raise
        except Exception as e:  # exporter and checker raise many types
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise BackendError(f"graph '{name}': ONNX export failed: {type(e).__name__}: {first[:400]}; "
                               "try target 'tvm-cpu', or simplify the op named above") from e
        entry = {"backend": "onnxruntime", "file": fname, "inputs": inputs, "outputs": outputs,
                 "files": [fname] + ([fname + ".data"] if os.path.exists(path + ".data") else []),
                 "exporter_optimized": optimize}
        # the check always runs on the CPU provider: the build machine may lack the target's device
        check_target = dict(target, provider="CPUExecutionProvider")
        got = OrtGraph(outdir, entry, check_target)(feed)
        err = compare(expected, got)
        if err["rel_l2"] <= limit:
            entry["check"] = err
            if quantized:
                from pared.backends.onnxruntime.int8_check import check_integer_kernels
                entry["int8"] = check_integer_kernels(path, check_target, name)
                if int4:
                    from pared.backends.onnxruntime.int8_check import check_int4_kernels
                    entry["int4"] = check_int4_kernels(entry["int8"], len(int4), name)
            if not optimize:
                log.warning("graph '%s': the ONNX exporter's optimizer changed results; exported without it", name)
            return entry
        last_err = err
    raise BackendError(f"graph '{name}': ONNX Runtime output differs from eager after export "
                       f"(max abs {last_err['max_abs']:.3g}, rel L2 {last_err['rel_l2']:.3g}, limit {limit}), "
                       "with and without the exporter's optimizer; try target 'tvm-cpu'")


def finish_program(entries: Mapping[str, dict], outdir: str) -> dict:
    """After every graph is lowered: store the initializers several graph files
    hold (the weights graph variants share) once, in `shared.weights` (see shared)."""
    from pared.backends.onnxruntime.shared import share_initializers
    return share_initializers(entries, outdir)
