"""Quantization passes: insert quantizers so the lowered artifact runs integer kernels.

Each pass is a policy: it decides per layer (from the calibration run, a sensitivity
profile, a budget) and writes its decisions as node annotations (`ir.formats.LinearSpec`
/ `ExpertsSpec` under `ir.meta.QUANT_SPEC`); `convert.validate` checks them against
the target and `convert.convert`, the one converter, rewrites them (annotate -> validate
-> convert, convert.py) with `torch.ops.quantized_decomposed` quantize / dequantize ops
and pared's own `pared_quant` ops, which the ONNX exporter emits as QuantizeLinear /
DequantizeLinear (and pared's translations) for ONNX Runtime's QDQ fusion to turn into
integer kernels. Each pass also writes a record of what it did (QuantPlan, ...).
"""
from pared.passes.quant import convert  # noqa: F401
from pared.passes.quant import quantize_linears  # noqa: F401
from pared.passes.quant import timestep_quant  # noqa: F401
from pared.passes.quant import quantize_weights_int4  # noqa: F401
from pared.passes.quant import mixed_precision  # noqa: F401
from pared.passes.quant import expert_quant  # noqa: F401
from pared.passes.quant import dynamic_precision  # noqa: F401
