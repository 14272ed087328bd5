"""What the quantization passes share: the QuantPlan record, the scale math and
the calibration observer.

Scale math (the conventions ONNX QuantizeLinear / DequantizeLinear use):
    activations: asymmetric uint8 per tensor, q = clamp(round(x / s) + z, 0, 255),
                 the range always holds 0 so that zero (padding) is exact
    weights:     symmetric int8 per output channel, q = clamp(round(w / s), -127, 127)
                 (-128 unused: symmetric, and no int16 saturation in u8s8 dot products)
    bias:        int32 with scale s_x * s_w per output channel, zero point 0, so an
                 integer kernel adds it straight to its int32 accumulator
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.fx as fx

from pared.analysis.redundancy import observe_values
from pared.ir.errors import PassError
from pared.ir.transform import Record

QMIN_U8, QMAX_U8 = 0, 255
QMAX_S8 = 127
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


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


@dataclass(frozen=True)
class QuantPlan(Record):
    """What a quantization pass decided, per layer."""
    method: str                        # quantize_linears
    mode: str                          # static | dynamic
    calibration: str                   # minmax | percentile
    percentile: float | None           # the percentile used (percentile calibration)
    activations: str                   # "uint8 asymmetric per-tensor"
    weights: str                       # "int8 symmetric per-channel"
    layers: tuple[LayerQuant, ...]
    excluded: tuple[str, ...] = ()     # regions of linear layers left in float (option `exclude`)
    smooth: float | None = None        # SmoothQuant migration strength alpha (None: off)
    calls: int = 0                     # calibration calls observed


def activation_qparams(lo: float, hi: float) -> tuple[float, int]:
    """uint8 scale and zero point for the range [lo, hi] widened to hold 0."""
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo <= 0.0:
        return 1.0, 0
    scale = float(np.float32((hi - lo) / (QMAX_U8 - QMIN_U8)))
    zp = int(np.clip(round(QMIN_U8 - lo / scale), QMIN_U8, QMAX_U8))
    return scale, zp


def quantize_weight(w_kn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel of a [K, N] weight: (int8 [K, N], float32 scales [N])."""
    w = w_kn.detach().to(torch.float32)
    amax = w.abs().amax(dim=0)
    scale = torch.where(amax > 0, amax / QMAX_S8, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale), -QMAX_S8, QMAX_S8).to(torch.int8)
    return q.contiguous(), scale.to(torch.float32).contiguous()


def quantize_bias(bias: torch.Tensor, act_scale: float, w_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int32 bias with scale s_x * s_w per channel: (int32 [N], float32 scales [N])."""
    scale = (torch.tensor(act_scale, dtype=torch.float32) * w_scale).to(torch.float32)
    q = torch.round(bias.detach().to(torch.float64) / scale.to(torch.float64))
    return torch.clamp(q, INT32_MIN, INT32_MAX).to(torch.int32).contiguous(), scale.contiguous()


class RangeObserver:
    """Running input range of one layer over the calibration calls.

    minmax: the extremes over every call. percentile: per call the (100 - p)th and
    p-th percentiles, averaged over the calls (outliers of one call do not set the
    scale for all of them).
    """

    def __init__(self, method: str, percentile: float, channels: bool = False):
        self.method = method
        self.percentile = percentile
        self.channels = channels
        self.lo: list[float] = []
        self.hi: list[float] = []
        self.ch_lo: torch.Tensor | None = None
        self.ch_hi: torch.Tensor | None = None

    def observe(self, value: torch.Tensor) -> None:
        if value.numel() == 0:
            return
        if self.channels:
            flat = value.detach().to(torch.float32).reshape(-1, value.shape[-1])
            lo, hi = flat.amin(0), flat.amax(0)
            self.ch_lo = lo if self.ch_lo is None else torch.minimum(self.ch_lo, lo)
            self.ch_hi = hi if self.ch_hi is None else torch.maximum(self.ch_hi, hi)
        if self.method == "minmax":
            self.lo.append(float(value.min()))
            self.hi.append(float(value.max()))
        else:
            a = value.detach().to(torch.float32).reshape(-1).numpy()
            lo, hi = np.percentile(a, [100.0 - self.percentile, self.percentile])
            self.lo.append(float(lo))
            self.hi.append(float(hi))

    def range(self) -> tuple[float, float] | None:
        if not self.lo:
            return None
        if self.method == "minmax":
            return min(self.lo), max(self.hi)
        return float(np.mean(self.lo)), float(np.mean(self.hi))

    def channel_range(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per last-dim channel (min, max) over every call (when built with channels=True)."""
        return None if self.ch_lo is None else (self.ch_lo, self.ch_hi)


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


def observe_ranges(gm: fx.GraphModule, nodes: Sequence[fx.Node], calibration: Any, method: str,
                   percentile: float, by: str, channels: bool = False) -> tuple[int, dict[str, RangeObserver]]:
    """Run `gm` through the calibration run and return (calls, node name -> its
    RangeObserver) for each of `nodes`, reduced on the fly (nothing but the ranges
    is kept; per-channel ranges too when `channels`).

    Raises:
        PassError: naming the pass `by`, when there is no calibration run.
    """
    if calibration is None:
        raise PassError(f"pass '{by}' needs a calibration run to set activation scales: pass calibration= a "
                        "list of input tuples (a few representative batches) or a loop callable")
    watch = {n.name: RangeObserver(method, percentile, channels) for n in nodes}
    calls = observe_values(gm, nodes, calibration, lambda name, v: watch[name].observe(v))
    return calls, watch
