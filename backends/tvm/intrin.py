"""Tensor intrinsics pared tensorizes its integer matmuls with (TVMScript: this module must be
a file on disk, TVM parses the functions' source).

`VNNI_U8S8`: 16 int32 accumulators += 16 dot products of 4 uint8 activations (one group of k,
broadcast) with 4 int8 weights each, one AVX-512 VNNI `vpdpbusd`: C[i] += sum_k A[k] * B[i, k].
Both halves are written here rather than taken from tvm.s_tir.tensor_intrin.x86: importing that
package registers every target's intrinsics (CUDA, ROCm, Hexagon, ...: 26 s here), and its VNNI
implementation calls the LLVM intrinsic with <16 x i32> operands, which LLVM 20 and later declare
as <64 x i8> (the wheel's LLVM 22 refuses the call). `vpdpbusd` does not saturate
(its `s` variant does): the sums are exact int32, unlike the u8s8 `vpmaddubsw` pairs of CPUs
without VNNI.
"""
from __future__ import annotations

from tvm.s_tir import TensorIntrin
from tvm.script import tirx as T

VNNI_U8S8 = "pared_dot_16x4_u8s8_vnni"


@T.prim_func(s_tir=True)
def _dot_16x4_u8s8(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    # what the intrinsic computes: 16 columns, each += a 4-long dot product (the block tensorize matches)
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        for col, kk in T.grid(16, 4):
            with T.sblock("update"):
                vc, vk = T.axis.remap("SR", [col, kk])
                C[vc] = C[vc] + T.cast(A[vk], "int32") * T.cast(B[vc, vk], "int32")


@T.prim_func(s_tir=True)
def _dot_16x4_u8s8_vnni(
    A: T.Buffer((4,), "uint8", offset_factor=1),
    B: T.Buffer((16, 4), "int8", offset_factor=1),
    C: T.Buffer((16,), "int32", offset_factor=1),
) -> None:
    with T.sblock("root"):
        T.reads(C[0:16], A[0:4], B[0:16, 0:4])
        T.writes(C[0:16])
        a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
        C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
            T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
            C.vload([0], dtype="int32x16"),
            T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64"),
            B.vload([0, 0], dtype="int8x64"),
            dtype="int32x16",
        )


TensorIntrin.register(VNNI_U8S8, _dot_16x4_u8s8, _dot_16x4_u8s8_vnni, override=True)
