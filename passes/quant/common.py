"""What the quantization passes share: the QuantPlan record, SmoothQuant's
factors and the weight-only buffer names (calibration runs through analysis.recorder).

The numerics (scale math, weight codes, fake quantizers, RangeObserver) live in
pared.ir.quant, where the analyses that measure the passes' formats read them too;
they are re-exported here, so `from pared.passes.quant.common import ...` keeps
working for every name it held.
"""
from __future__ import annotations

from dataclasses import dataclass
import torch

from pared.ir.quant import (INT4_SYMMETRIC_ZERO_POINT, INT32_MAX, INT32_MIN, QMAX_S8, QMAX_U4,  # noqa: F401
                            QMAX_U8, QMIN_U4, QMIN_U8, RangeObserver, activation_qparams,
                            dequantize_weight_blocks, dequantize_weight_int4, entropy_threshold,
                            fake_quant_activation, fake_quant_weight_int8, int8_weight_qmax, quantize_bias,
                            quantize_weight, quantize_weight_blocks, quantize_weight_int4,
                            quantized_weight_bytes, weight_only_bytes)
from pared.ir.transform import Record


@dataclass(frozen=True)
class LayerQuant:
    """One quantized linear layer."""
    node: str                          # the matmul node (addmm / mm) in the source graph
    region: str                        # innermost module path ("bert.encoder.layer.0.attention.self.query")
    weight: str                        # get_attr target of the float weight it replaces
    in_features: int
    out_features: int
    activation_range: tuple[float, float]  # calibrated (lo, hi) of the input, 0 included
    activation_scale: float            # uint8 scale s_x
    activation_zero_point: int         # uint8 zero point z_x
    weight_scale_range: tuple[float, float]  # min and max of the per-channel int8 scales s_w
    bias: bool                         # an int32 bias (scale s_x * s_w) was emitted
    smooth_range: tuple[float, float] | None = None  # min and max of the SmoothQuant factors (None: off)
    weight_bits: int = 8
    activation_bits: int = 8
    outlier_channels: tuple[int, ...] = ()  # input channels run in float beside the int8 matmul (option `outliers`)
    weight_storage: str = "int8"       # int8 codes, or uint8 around 128 (keep_8bit: ORT's exact U8U8 kernels)


@dataclass(frozen=True)
class QuantPlan(Record):
    """What a quantization pass decided, per layer."""
    method: str                        # quantize_linears
    mode: str                          # static | dynamic
    calibration: str                   # minmax | percentile | entropy | "none (run time)" (dynamic mode)
    percentile: float | None           # the percentile used (percentile calibration)
    activations: str                   # "uint8 asymmetric per-tensor"
    weights: str                       # "int8 symmetric per-channel"
    layers: tuple[LayerQuant, ...]
    excluded: tuple[str, ...] = ()     # regions of linear layers left in float (option `exclude`)
    smooth: float | None = None        # SmoothQuant migration strength alpha (None: off)
    calls: int = 0                     # calibration calls observed
    weight_qmax: int = QMAX_S8         # int8 weight codes lie in [-weight_qmax, weight_qmax] (63: 7-bit range)


def weight_format(qmax: int) -> str:
    """How QuantPlan records describe int8 weights of this range."""
    return "int8 symmetric per-channel" + ("" if qmax == QMAX_S8 else f", 7-bit range [-{qmax}, {qmax}]")


def smooth_factors(x_absmax: torch.Tensor, w_absmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """SmoothQuant's per-input-channel factors s_j = max|x_j|^a / max|W_j|^(1-a): the
    activation is divided by s and the weight rows multiplied by it, moving outlier
    channels' range from the activation (one scale per tensor) into the weights (one
    scale per output channel). Channels with no range get 1."""
    a = x_absmax.to(torch.float64)
    w = w_absmax.to(torch.float64)
    s = a.pow(alpha) / w.pow(1.0 - alpha)
    ok = (a > 0) & (w > 0) & torch.isfinite(s)
    s = torch.where(ok, s, torch.ones_like(s)).clamp(min=1e-5, max=1e5)
    return s.to(torch.float32)


#: buffer names of a weight-only layer's constants, by bits: `<prefix><i>_w` (codes
#: [N * K / bs, bs] uint8), `<prefix><i>_s` (scales [N * K / bs]), `<prefix><i>_z` (zero
#: points [N * K / bs] int32). The ONNX Runtime backend finds the layers it lowers to
#: MatMulNBits by these names.
WEIGHT_ONLY_PREFIX = {4: "_int4_", 8: "_int8w_"}
INT4_PREFIX = WEIGHT_ONLY_PREFIX[4]


