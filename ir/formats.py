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
