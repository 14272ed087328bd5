"""The quantization formats a linear layer can take, one registry (torch-free).

Each format owns its bits, its byte cost and the kernels each backend must show
for a layer in it; the analyses (quant_sensitivity, latency), mixed_precision and
the Profiler's LinearFormat read this table instead of keeping their own.
The numerics (scales, codes, fake quantizers) are in ir/quant.py.
"""
from __future__ import annotations

from dataclasses import dataclass


def weight_only_bytes(in_features: int, out_features: int, bits: int, block_size: int,
                      symmetric: bool = True) -> int:
    """Bytes of a block-wise weight-only layer: codes (4-bit packed two per byte), a float32
    scale per block and, asymmetric, zero points (4-bit: packed two per byte)."""
    k, n = int(in_features), int(out_features)
    blocks = -(-k // block_size)
    codes = n * blocks * (block_size * bits // 8)
    zps = 0 if symmetric else n * (-(-blocks * bits // 8))
    return codes + 4 * n * blocks + zps


def quantized_weight_bytes(in_features: int, out_features: int, bits: int, block_size: int = 32,
                           symmetric: bool = True) -> int:
    """Bytes a linear layer's weight takes at `bits` (32: float; 8: quantize_linears' int8
    codes and a float32 scale per output channel; 4: block-wise int4, see
    weight_only_bytes). The bias is not counted (float or int32: 4 bytes either way)."""
    k, n = int(in_features), int(out_features)
    if bits == 32:
        return 4 * k * n
    if bits == 8:
        return k * n + 4 * n
    if bits == 4:
        return weight_only_bytes(k, n, 4, block_size, symmetric)
    raise ValueError(f"no weight format for {bits} bits (4, 8 or 32)")


# -- the format registry ------------------------------------------------------
@dataclass(frozen=True)
class QuantFormat:
    """One format a linear layer can take: its bits, what it costs in bytes, and the
    kernels each backend must show for a layer in it (the lowering checks count them)."""

    name: str
    weight_bits: int
    activation_bits: int | None         # None: float activations (weight-only) or float
    block_wise: bool                    # scales per block of input channels (else per output channel)
    description: str
    ort_kernels: tuple[str, ...]        # ONNX Runtime kernels a layer in this format may run as
    tvm_lowering: str                   # what backends/tvm/quant.py makes of it

    @property
    def weight_only(self) -> bool:
        return self.weight_bits < 32 and self.activation_bits is None

    def weight_bytes(self, in_features: int, out_features: int, block_size: int = 32,
                     symmetric: bool = True) -> int:
        """Bytes of a layer's weight in this format (bias not counted; see weight_only_bytes
        and quantized_weight_bytes)."""
        if self.block_wise:
            return weight_only_bytes(in_features, out_features, self.weight_bits, block_size, symmetric)
        return quantized_weight_bytes(in_features, out_features, self.weight_bits)


#: the formats pared's passes emit, by name (the tables of quant_sensitivity, latency,
#: mixed_precision and the Profiler's LinearFormat all read this one)
FORMATS: dict[str, QuantFormat] = {f.name: f for f in (
    QuantFormat("fp32", 32, None, False, "float32 weights and activations", ("MatMul", "Gemm"), "float matmul"),
    QuantFormat("w8a8", 8, 8, False, "int8 weights per output channel, uint8 activations per tensor "
                "(quantize_linears)", ("QGemm", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeMatMul"),
                "int8 x int8 -> int32 matmul"),
    QuantFormat("w4", 4, None, True, "block-wise int4 weights, float activations (quantize_weights_int4)",
                ("MatMulNBits",), "float matmul on weights dequantized at build"),
    QuantFormat("w8", 8, None, True, "block-wise int8 weights, float activations", ("MatMulNBits",),
                "float matmul on weights dequantized at build"),
)}


def get_format(name: str, where: str = "") -> QuantFormat:
    """The registered format `name`.

    Raises:
        ValueError: an unknown name, with the known ones (prefixed by `where`).
    """
    try:
        return FORMATS[name]
    except (KeyError, TypeError):
        raise ValueError(f"{where + ': ' if where else ''}unknown format {name!r}; known: "
                         f"{', '.join(FORMATS)}") from None


# -- decisions (annotate -> validate -> convert) -------------------------------
#
#   A quantization policy writes one of these on the node it decides for (ir.meta.QUANT_SPEC);
#   passes/quant/convert.py checks every one against the target and rewrites the graph from them.
#   Values only (tuples, not tensors): fx copies node.meta shallowly, and they go to JSON as they are.

def block_size_problem(block_size: int) -> str | None:
    """Why `block_size` is not a weight-only block size, a power of two >= 16 as MatMulNBits
    takes (None: it is one). The one rule: options (ir.transform.check_block_size) and
    decisions (LinearSpec.problems) both ask it."""
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 16 or \
            block_size & (block_size - 1):
        return f"block_size {block_size!r} is not a power of two >= 16 (MatMulNBits' block sizes)"
    return None


@dataclass(frozen=True)
class LinearSpec:
    """How one linear layer is quantized: its format and the numbers the converter needs.

    format: a FORMATS name other than fp32. w8a8 (quantize_linears' integer kernels) takes
    `act_range` (static: the calibrated uint8 range of x) or `dynamic` (the range per call),
    weight codes in [-weight_qmax, weight_qmax] (None: the range the target's kernels compute
    exactly; stored uint8 around 128 with `u8_weights`),
    SmoothQuant factors `smooth` (one per input channel, shared by the layers of `smooth_group`,
    the activation they read) and `outliers` (input channels run as a float matmul). w4 / w8
    (weight-only) take `block_size` and `symmetric`.
    """

    format: str
    by: str                                        # the pass that decided
    region: str = ""
    dynamic: bool = False
    act_range: tuple[float, float] | None = None
    weight_qmax: int | None = None       # None: the target's exact range (convert.apply fills it in)
    u8_weights: bool = False
    smooth: tuple[float, ...] | None = None
    smooth_group: str | None = None
    outliers: tuple[int, ...] | None = None
    block_size: int | None = None
    symmetric: bool = True
    act_bits: int = 8                    # w8a8 static: activation codes on 2^act_bits levels (2..8; below 8
    #                                      a clamp to the calibrated range keeps them there: DyQ-VLA's grids)

    @property
    def kind(self) -> str:
        """The converter that rewrites it: `w8a8`, `w8a8_dynamic` or `weight_only`."""
        fmt = FORMATS.get(self.format)
        if fmt is not None and fmt.weight_only:
            return "weight_only"
        return "w8a8_dynamic" if self.dynamic else "w8a8"

    def problems(self, in_features: int, out_features: int, *, weight_qmax_limit: int) -> list[str]:
        """What is wrong with this decision for a [K=in_features, N=out_features] layer on a target
        whose integer kernels are exact for int8 weight codes in [-weight_qmax_limit,
        weight_qmax_limit]. Empty: it can be converted. (A target's `precisions` say which are
        fast, not which run: every backend runs w8a8, so they are the cost model's business.)"""
        import math
        fmt = FORMATS.get(self.format)
        if fmt is None or fmt.name == "fp32":
            return [f"format {self.format!r} is not a quantized format (known: "
                    f"{', '.join(n for n in FORMATS if n != 'fp32')})"]
        out = []
        if fmt.weight_only:
            why = block_size_problem(self.block_size)
            if why:
                out.append(why)
            elif in_features % self.block_size:
                out.append(f"input dim {in_features} is not a multiple of block_size {self.block_size}")
            if self.act_range is not None or self.dynamic or self.smooth is not None or self.outliers is not None:
                out.append(f"{self.format} is weight-only: it takes no activation range, smoothing or outliers")
            return out
        if self.dynamic == (self.act_range is not None):
            out.append("give exactly one of act_range (static) and dynamic")
        if isinstance(self.act_bits, bool) or not isinstance(self.act_bits, int) or not 2 <= self.act_bits <= 8:
            out.append(f"act_bits {self.act_bits!r} is not an activation width in 2..8")
        elif self.act_bits < 8 and self.dynamic:
            out.append("dynamic layers quantize activations to 8 bits; act_bits below 8 needs a static act_range")
        if self.act_range is not None:
            lo, hi = self.act_range
            if not (math.isfinite(lo) and math.isfinite(hi)) or lo > hi:
                out.append(f"activation range {self.act_range} is not a finite [lo, hi]")
        if self.weight_qmax is None:
            out.append("weight_qmax is not set (convert.apply sets it from the target)")
        elif not 1 <= self.weight_qmax <= 127:
            out.append(f"weight_qmax {self.weight_qmax} is outside [1, 127]")
        elif self.u8_weights:
            if self.weight_qmax != 127:
                out.append("u8_weights stores full-range codes: weight_qmax must be 127")
        elif self.weight_qmax > weight_qmax_limit:
            out.append(f"int8 weight codes up to {self.weight_qmax} saturate this target's u8s8 kernels "
                       f"(exact up to {weight_qmax_limit}); quantize with weight_qmax {weight_qmax_limit} or "
                       f"u8_weights (keep_8bit)")
        if self.smooth is not None:
            if len(self.smooth) != in_features:
                out.append(f"{len(self.smooth)} smoothing factors for {in_features} input channels")
            elif not all(math.isfinite(f) and f > 0 for f in self.smooth):
                out.append("smoothing factors must be finite and positive")
            if self.smooth_group is None:
                out.append("smoothing factors need the smooth_group (the activation node the layers share)")
        if self.outliers is not None:
            if len(set(self.outliers)) != len(self.outliers) or \
                    not all(0 <= i < in_features for i in self.outliers):
                out.append(f"outlier channels must be distinct indices in [0, {in_features})")
            elif len(self.outliers) >= in_features:
                out.append(f"{len(self.outliers)} outlier channels leave none of {in_features} to the int8 matmul")
        if self.dynamic and (self.smooth is not None or self.outliers is not None or self.u8_weights):
            out.append("dynamic layers take no smoothing, outliers or u8_weights")
        return out

    def to_json(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items()
                if v is not None and not (k == "act_bits" and v == 8)}


#: expert_quant's widths: bits per expert weight, 32 for float
EXPERT_BITS = (2, 4, 8, 32)


@dataclass(frozen=True)
class ExpertsSpec:
    """How one stacked expert weight [E, K, N] is quantized (expert_quant): bits per expert (32:
    float), block-wise along K with `block_size`; `name` prefixes its constants."""

    bits: tuple[int, ...]
    block_size: int
    name: str
    by: str
    region: str = ""

    kind = "experts"

    def problems(self, experts: int, in_features: int) -> list[str]:
        out = []
        if len(self.bits) != experts:
            out.append(f"{len(self.bits)} widths for {experts} experts")
        bad = sorted({b for b in self.bits if b not in EXPERT_BITS})
        if bad:
            out.append(f"widths {bad} are not expert widths {list(EXPERT_BITS)}")
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 0 or \
                self.block_size % 2:
            out.append(f"block_size {self.block_size!r} is not an even int >= 0 (0: one scale per output channel)")
        elif 0 < self.block_size < in_features and in_features % self.block_size:
            out.append(f"input dim {in_features} is not a multiple of block_size {self.block_size}")
        return out

    def to_json(self) -> dict:
        return {"format": "experts", "bits": list(self.bits), "block_size": self.block_size, "name": self.name,
                "by": self.by, "region": self.region}
