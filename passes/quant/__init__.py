"""Quantization passes: insert quantizers so the lowered artifact runs integer kernels.

Each pass decides a QuantPlan (per layer: scales, bits) from the calibration run,
then rewrites the graph with `torch.ops.quantized_decomposed` quantize /
dequantize ops, which the ONNX exporter emits as QuantizeLinear /
DequantizeLinear for ONNX Runtime's QDQ fusion to turn into integer kernels.
"""
from pared.passes.quant import quantize_linears  # noqa: F401
from pared.passes.quant import timestep_quant  # noqa: F401
from pared.passes.quant import quantize_weights_int4  # noqa: F401
from pared.passes.quant import mixed_precision  # noqa: F401
from pared.passes.quant import expert_quant  # noqa: F401
