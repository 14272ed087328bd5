"""Quantization numerics shared by the quantization passes and the analyses that
measure them (quant_sensitivity, latency): the scale math, the weight codes, the
fake quantizers that compute what the rewritten graphs compute, and the
calibration range observer. passes/quant/common.py re-exports all of it.

Scale math (the conventions ONNX QuantizeLinear / DequantizeLinear use):
    activations: asymmetric uint8 per tensor, q = clamp(round(x / s) + z, 0, 255),
                 the range always holds 0 so that zero (padding) is exact
    weights:     symmetric int8 per output channel, q = clamp(round(w / s), -qmax, qmax):
                 qmax 127 (full range; -128 unused) where the target's integer kernels sum
                 in 32 bits, 63 (7 bits, ORT's reduce_range) where ORT's x86 u8s8 kernels
                 sum pairs of products in 16 bits (no VNNI / AMX) and would saturate
                 (int8_weight_qmax; the rule is the target's, ir.target / ir.isa)
    bias:        int32 with scale s_x * s_w per output channel, zero point 0, so an
                 integer kernel adds it straight to its int32 accumulator
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from pared.ir import isa
from pared.ir.formats import FORMATS, QuantFormat, get_format, quantized_weight_bytes, weight_only_bytes  # noqa: F401

QMIN_U8, QMAX_U8 = 0, 255
QMAX_S8 = 127
INT32_MIN, INT32_MAX = -(2 ** 31), 2 ** 31 - 1


def activation_qparams(lo: float, hi: float, bits: int = 8) -> tuple[float, int]:
    """uint8 scale and zero point for the range [lo, hi] widened to hold 0, on a grid of
    2^bits levels (codes 0 .. 2^bits - 1; 8: the full uint8 range)."""
    top = (1 << int(bits)) - 1
    lo, hi = min(float(lo), 0.0), max(float(hi), 0.0)
    if hi - lo <= 0.0:
        return 1.0, 0
    scale = float(np.float32((hi - lo) / (top - QMIN_U8)))
    zp = int(np.clip(round(QMIN_U8 - lo / scale), QMIN_U8, top))
    return scale, zp


def int8_weight_qmax(target: Any) -> int:
    """The largest |q| of int8 weight codes for `target` (a pared Target or its JSON; None:
    the default `cpu` target on this host): 127, or 63 where ORT's u8s8 kernels would
    saturate (ir.isa.int8_weight_range)."""
    if target is not None and not isinstance(target, Mapping):
        target = target.to_json()
    return isa.INT8_WEIGHT_QMAX[isa.int8_weight_range(target)]


def quantize_weight(w_kn: torch.Tensor, qmax: int = QMAX_S8) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output channel of a [K, N] weight, codes in [-qmax, qmax]:
    (int8 [K, N], float32 scales [N])."""
    w = w_kn.detach().to(torch.float32)
    amax = w.abs().amax(dim=0)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale), -qmax, qmax).to(torch.int8)
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
    scale for all of them). entropy: a histogram of |x| over every call, and the
    clipping threshold T whose quantized distribution is closest to it in KL
    divergence (TensorRT's calibration, "8-bit Inference with TensorRT", Migacz,
    GTC 2017); the range is the extremes clipped to [-T, T].
    """

    #: histogram bins of |x| for entropy calibration (TensorRT uses 2048)
    BINS = 2048

    def __init__(self, method: str, percentile: float, channels: bool = False):
        self.method = method
        self.percentile = percentile
        self.channels = channels
        self.lo: list[float] = []
        self.hi: list[float] = []
        self.ch_lo: torch.Tensor | None = None
        self.ch_hi: torch.Tensor | None = None
        self.hist: np.ndarray | None = None     # entropy: counts of |x| over [0, hist_max]
        self.hist_max = 0.0

    def observe(self, value: torch.Tensor) -> None:
        if value.numel() == 0:
            return
        if self.channels:
            flat = value.detach().to(torch.float32).reshape(-1, value.shape[-1])
            lo, hi = flat.amin(0), flat.amax(0)
            self.ch_lo = lo if self.ch_lo is None else torch.minimum(self.ch_lo, lo)
            self.ch_hi = hi if self.ch_hi is None else torch.maximum(self.ch_hi, hi)
        if self.method in ("minmax", "entropy"):
            self.lo.append(float(value.min()))
            self.hi.append(float(value.max()))
            if self.method == "entropy":
                self._accumulate(value.detach().to(torch.float32).abs().reshape(-1).numpy())
        else:
            a = value.detach().to(torch.float32).reshape(-1).numpy()
            lo, hi = np.percentile(a, [100.0 - self.percentile, self.percentile])
            self.lo.append(float(lo))
            self.hi.append(float(hi))

    def _accumulate(self, a: np.ndarray) -> None:
        """Add |x| to the histogram; a call past its edge widens it, re-binning the old
        counts by their bin centres (the bins only ever grow)."""
        top = float(a.max())
        if self.hist is None or top > self.hist_max:
            new_max = top if top > 0 else 1.0
            new = np.zeros(self.BINS, dtype=np.float64)
            if self.hist is not None:
                centres = (np.arange(self.BINS) + 0.5) * (self.hist_max / self.BINS)
                new += np.histogram(centres, bins=self.BINS, range=(0.0, new_max), weights=self.hist)[0]
            self.hist, self.hist_max = new, new_max
        self.hist += np.histogram(a, bins=self.BINS, range=(0.0, self.hist_max))[0]

    def range(self) -> tuple[float, float] | None:
        if not self.lo:
            return None
        if self.method == "minmax":
            return min(self.lo), max(self.hi)
        if self.method == "entropy":
            lo, hi = min(self.lo), max(self.hi)
            # the grid's levels on the larger side of 0 (uint8: 255 in all, split by the range's sign balance)
            big, small = max(hi, -lo), min(max(hi, 0.0), max(-lo, 0.0))
            levels = int(round(255 * big / (big + small))) if big > 0 else 255
            t = entropy_threshold(self.hist, self.hist_max, max(levels, 16))
            return max(lo, -t), min(hi, t)
        return float(np.mean(self.lo)), float(np.mean(self.hi))

    def channel_range(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Per last-dim channel (min, max) over every call (when built with channels=True)."""
        return None if self.ch_lo is None else (self.ch_lo, self.ch_hi)


def entropy_threshold(hist: np.ndarray, hist_max: float, levels: int) -> float:
    """The |x| threshold T that minimizes KL(P || Q): P is the histogram cut at T with
    the clipped tail added to its last bin, Q the same bins quantized to `levels`
    levels (each level's count spread evenly over the bins it merges that were not
    empty). Candidates are every bin edge from `levels` bins up; the full range when
    the histogram has fewer bins than levels."""
    n = len(hist)
    if n <= levels or hist.sum() == 0:
        return float(hist_max)
    width = hist_max / n
    cumulative_tail = np.cumsum(hist[::-1])[::-1]           # counts at or beyond each bin
    best_i, best_kl = n, np.inf
    for i in range(levels, n + 1):
        p = hist[:i].astype(np.float64).copy()
        if i < n:
            p[-1] += cumulative_tail[i]
        # merge i bins into `levels` chunks, spread each chunk's mass over its non-empty bins
        chunk = np.floor(np.arange(i) * levels / i).astype(np.int64)
        nonzero = (hist[:i] > 0).astype(np.float64)
        mass = np.bincount(chunk, weights=hist[:i], minlength=levels)
        support = np.bincount(chunk, weights=nonzero, minlength=levels)
        q = np.where(nonzero > 0, mass[chunk] / np.maximum(support[chunk], 1.0), 0.0)
        ps, qs = p.sum(), q.sum()
        if ps <= 0 or qs <= 0:
            continue
        p /= ps
        q /= qs
        ok = p > 0
        # a bin P holds and Q does not (the clipped tail's last bin): a tiny q, as TensorRT smooths
        kl = float(np.sum(p[ok] * np.log(p[ok] / np.maximum(q[ok], 1e-12))))
        if kl < best_kl:
            best_i, best_kl = i, kl
    return float(best_i * width)


# -- weight-only, block-wise: INT4 (quantize_weights_int4, mixed_precision) and
#    INT8 (mixed_precision's "w8") --------------------------------------------
#
#   weights [N, K] in blocks of `block_size` along K (the input dim), one float32
#   scale per block; values are unsigned b-bit codes q in [0, 2^b - 1] held one per
#   uint8 on the torch side, w = (q - z) * s:
#     symmetric:  s = max|w| / (2^(b-1) - 1), z = 2^(b-1)       (int4: codes 1..15, z 8)
#     asymmetric: range [min(w, 0), max(w, 0)],  s = range / (2^b - 1), z = round(-lo / s)
#   ONNX Runtime's MatMulNBits stores the same codes (4-bit: two per byte, low nibble
#   first) and the same scales, in the same order (output channel major, then block).

QMIN_U4, QMAX_U4 = 0, 15
INT4_SYMMETRIC_ZERO_POINT = 8

def quantize_weight_blocks(w_nk: torch.Tensor, block_size: int, symmetric: bool = True,
                           bits: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block-wise `bits`-bit codes (4 or 8) of a [N, K] weight (K divisible by block_size).

    Returns:
        (codes uint8 [N * K / bs, bs] in [0, 2^bits - 1], scales float32 [N * K / bs],
         zero points int32 [N * K / bs]), rows ordered output channel, then block.
    """
    w = w_nk.detach().to(torch.float32)
    n, k = w.shape
    if k % block_size:
        raise ValueError(f"input dim {k} is not a multiple of block_size {block_size}")
    qmax = 2 ** bits - 1
    blocks = w.reshape(n * (k // block_size), block_size)
    if symmetric:
        amax = blocks.abs().amax(dim=1)
        scale = torch.where(amax > 0, amax / (2 ** (bits - 1) - 1), torch.ones_like(amax)).to(torch.float32)
        zp = torch.full_like(scale, 2 ** (bits - 1))
    else:
        lo = blocks.amin(dim=1).clamp(max=0.0)
        hi = blocks.amax(dim=1).clamp(min=0.0)
        scale = torch.where(hi > lo, (hi - lo) / qmax, torch.ones_like(hi)).to(torch.float32)
        zp = torch.clamp(torch.round(-lo / scale), 0, qmax)
    q = torch.clamp(torch.round(blocks / scale[:, None]) + zp[:, None], 0, qmax)
    # int32 zero points: quantized_decomposed subtracts them from the codes in their common
    # dtype, and uint8 - uint8 would wrap around below zero
    return q.to(torch.uint8).contiguous(), scale.contiguous(), zp.to(torch.int32).contiguous()


def quantize_weight_int4(w_nk: torch.Tensor, block_size: int,
                         symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Block-wise 4-bit codes of a [N, K] weight (quantize_weight_blocks with bits=4)."""
    return quantize_weight_blocks(w_nk, block_size, symmetric, 4)


def dequantize_weight_blocks(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor, shape: tuple[int, int],
                             bits: int = 4) -> torch.Tensor:
    """The float [N, K] weight block-wise codes stand for, computed as the graph computes it."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401  (registers torch.ops.quantized_decomposed)
    wd = torch.ops.quantized_decomposed.dequantize_per_channel.default(q, scale, zp, 0, 0, 2 ** bits - 1,
                                                                        torch.uint8)
    return wd.reshape(shape)


def dequantize_weight_int4(q: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
                           shape: tuple[int, int]) -> torch.Tensor:
    """The float [N, K] weight int4 codes stand for (dequantize_weight_blocks with bits=4)."""
    return dequantize_weight_blocks(q, scale, zp, shape, 4)


def fake_quant_weight_int8(w_kn: torch.Tensor, qmax: int = QMAX_S8) -> torch.Tensor:
    """The float [K, N] weight quantize_linears' int8 per-channel codes (in [-qmax, qmax]) stand for."""
    q, s = quantize_weight(w_kn, qmax)
    return q.to(torch.float32) * s


def fake_quant_activation(x: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """x through quantize_linears' uint8 per-tensor quantize / dequantize for the range [lo, hi]."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401
    qd = torch.ops.quantized_decomposed
    scale, zp = activation_qparams(lo, hi)
    xq = qd.quantize_per_tensor.default(x, scale, zp, QMIN_U8, QMAX_U8, torch.uint8)
    return qd.dequantize_per_tensor.default(xq, scale, zp, QMIN_U8, QMAX_U8, torch.uint8)

