"""CPU instruction sets: what a CPU target may assume, read from the host. Torch-free.

Why pared cares: ONNX Runtime's integer matmul on x86 (MLAS, u8 activations x s8
weights) multiplies and adds pairs of products in 16 bits (`vpmaddubsw`) wherever
the CPU has no VNNI or AMX; 255 * 127 * 2 does not fit, so with weights over the
full int8 range the sums saturate and the layer's output is silently wrong (rel L2
~0.1 on a 32x256 @ 256x64 matmul). With VNNI (`vpdpbusd`, AVX512-VNNI or AVX-VNNI)
or AMX the products are summed in 32 bits and the kernel is exact; with 7-bit
weights (|w| <= 63, ORT's `reduce_range`) 255 * 63 * 2 fits and the 16-bit kernel
is exact too. ARM's kernels (sdot/udot, or widening multiplies) are exact, and so
are TVM's integer kernels (LLVM computes the int32 sums the program states).

    Cpu                  arch, model name, the features pared knows (FEATURES)
    parse_cpuinfo(text)  a Cpu from /proc/cpuinfo's text (x86 `flags`, ARM `Features`)
    host_cpu()           this host's Cpu (the features hidden by tests/support/hide_isa.c
                         are left out while that emulation is active, as CPUID shows them)
    u8s8_saturates(cpu)  whether ORT's u8s8 kernels sum pairs of products in 16 bits there
    missing_for_exact_u8s8(cpu)  the features whose absence makes them saturate
    native_mattr(cpu)    the LLVM features (`+avx2`, ...) of this CPU's SIMD and bit-manipulation
                         extensions: what target `tvm-native` builds for
    missing_mattr(mattr, cpu)  the ones of a build's `mattr` a CPU lacks (code built for them
                         would stop on an illegal instruction there)
"""
from __future__ import annotations

import functools
import os
import platform
from dataclasses import dataclass, field
from typing import Any, Mapping

#: x86 features pared reads (names as /proc/cpuinfo spells them)
X86_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")
#: ARM features pared reads, by pared's name -> the /proc/cpuinfo `Features` word
ARM_FEATURES = {"dotprod": "asimddp", "i8mm": "i8mm"}
FEATURES = X86_FEATURES + tuple(ARM_FEATURES)
#: any one of these makes ORT's x86 u8s8 kernels accumulate in 32 bits (exact)
X86_EXACT_U8S8 = ("avx512_vnni", "avx_vnni", "amx_int8")
X86_ARCHES = ("x86_64", "amd64", "i686", "i386")
#: ONNX Runtime execution providers whose integer kernels run on the host CPU (MLAS, oneDNN)
CPU_EXECUTION_PROVIDERS = ("CPUExecutionProvider", "OpenVINOExecutionProvider")
#: LLVM's x86 feature -> the /proc/cpuinfo flag of a CPU that has it: the SIMD and bit-manipulation
#: extensions LLVM's code generation uses (`tvm-native` builds with those of the build host)
LLVM_X86_FLAGS = {
    "sse3": "pni", "ssse3": "ssse3", "sse4.1": "sse4_1", "sse4.2": "sse4_2", "popcnt": "popcnt", "avx": "avx",
    "avx2": "avx2", "fma": "fma", "f16c": "f16c", "bmi": "bmi1", "bmi2": "bmi2", "lzcnt": "abm", "movbe": "movbe",
    "avx512f": "avx512f", "avx512dq": "avx512dq", "avx512cd": "avx512cd", "avx512bw": "avx512bw",
    "avx512vl": "avx512vl", "avx512vnni": "avx512_vnni", "avx512bf16": "avx512_bf16", "avx512ifma": "avx512ifma",
    "avx512vbmi": "avx512vbmi", "avx512vbmi2": "avx512_vbmi2", "avx512bitalg": "avx512_bitalg",
    "avx512vpopcntdq": "avx512_vpopcntdq", "avx512fp16": "avx512_fp16", "avxvnni": "avx_vnni", "gfni": "gfni",
    "vaes": "vaes", "vpclmulqdq": "vpclmulqdq"}
#: the same for 64-bit ARM (`Features` words)
LLVM_ARM_FLAGS = {"neon": "asimd", "dotprod": "asimddp", "i8mm": "i8mm", "fullfp16": "fphp", "sve": "sve"}
#: the largest |q| of int8 weights that 16-bit pair sums of u8 x s8 products hold (255 * 63 * 2 < 2^15)
QMAX_NO_SATURATION = 63
#: the environment variable tests/support/hide_isa.c reads, and the one it sets when active
HIDE_ENV, HIDE_STATUS_ENV = "PARED_HIDE_ISA", "PARED_HIDE_ISA_STATUS"


@dataclass(frozen=True)
class Cpu:
    """One CPU as pared sees it."""
    arch: str                                   # platform.machine() spelling: x86_64, aarch64
    model: str = ""                             # "Intel(R) Xeon(R) ..." (x86 `model name`)
    features: tuple[str, ...] = field(default_factory=tuple)  # of FEATURES, sorted
    hidden: tuple[str, ...] = ()                # features hide_isa.c hides from CPUID in this process
    flags: tuple[str, ...] = ()                 # every word of /proc/cpuinfo's x86 `flags` / ARM `Features`

    @property
    def is_x86(self) -> bool:
        return self.arch.lower() in X86_ARCHES

    def to_json(self) -> dict:
        d = {"arch": self.arch, "model": self.model, "features": list(self.features)}
        if self.hidden:
            d["hidden_by_emulation"] = list(self.hidden)
        return d


def parse_cpuinfo(text: str, arch: str | None = None) -> Cpu:
    """The Cpu /proc/cpuinfo's `text` describes (its first processor).

    Args:
        text: the file's content.
        arch: platform.machine() of the host it came from (None: guessed from the text:
            an x86 `flags` line or an ARM `Features` line).
    """
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break                           # the first processor's block is enough
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip().lower(), value.strip())
    if arch is None:
        arch = "x86_64" if "flags" in fields else "aarch64" if "features" in fields else platform.machine()
    # x86 lists `flags`, ARM `Features`; a file of the other kind (a process under qemu-user reads the
    # host's) tells nothing about this CPU
    words = set((fields.get("flags") if arch.lower() in X86_ARCHES else fields.get("features") or "").split())
    if arch.lower() in X86_ARCHES:
        found = [f for f in X86_FEATURES if f in words]
        model = fields.get("model name", "")
    else:
        found = [name for name, word in ARM_FEATURES.items() if word in words]
        model = fields.get("model name") or _arm_model(fields)
    return Cpu(arch, model, tuple(sorted(found)), flags=tuple(sorted(words)))


def _arm_model(fields: dict[str, str]) -> str:
    imp, part = fields.get("cpu implementer"), fields.get("cpu part")
    return f"ARM implementer {imp} part {part}" if imp and part else ""


def _hidden(spec: str, among: "tuple[str, ...] | list[str]" = X86_FEATURES) -> tuple[str, ...]:
    """The features of `among` a PARED_HIDE_ISA value hides (avx512f takes every AVX-512 part with it, as in
    hide_isa.c)."""
    words = {w for w in spec.replace(",", " ").split() if w}
    out = set()
    for f in among:
        if f in words or ("avx512f" in words and f.startswith("avx512")) or \
                (f.startswith("amx") and any(w.startswith("amx") for w in words)):
            out.add(f)
    return tuple(sorted(out))


@functools.lru_cache(maxsize=1)
def host_cpu() -> Cpu:
    """This host's CPU, from /proc/cpuinfo (without it: the architecture and no features).

    While tests/support/hide_isa.c is active in this process (it sets PARED_HIDE_ISA_STATUS),
    the features it hides from CPUID are left out: ONNX Runtime and LLVM, which read CPUID,
    see the same CPU as pared.
    """
    arch = platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = parse_cpuinfo(f.read(), arch)
    except OSError:
        cpu = Cpu(arch)
    if os.environ.get(HIDE_STATUS_ENV) == "active" and os.environ.get(HIDE_ENV):
        hidden = tuple(f for f in _hidden(os.environ[HIDE_ENV]) if f in cpu.features)
        gone = set(_hidden(os.environ[HIDE_ENV], cpu.flags))
        cpu = Cpu(cpu.arch, cpu.model, tuple(f for f in cpu.features if f not in hidden), hidden,
                  tuple(f for f in cpu.flags if f not in gone))
    return cpu


def _llvm_flags(arch: str) -> dict[str, str]:
    return LLVM_X86_FLAGS if arch.lower() in X86_ARCHES else LLVM_ARM_FLAGS if arch.lower() in ("aarch64", "arm64") \
        else {}


def native_mattr(cpu: Cpu) -> tuple[str, ...]:
    """LLVM `mattr` entries (`+avx2`, ...) for the extensions `cpu` has among those code generation
    uses (LLVM_X86_FLAGS / LLVM_ARM_FLAGS), sorted."""
    have = set(cpu.flags)
    return tuple(sorted(f"+{f}" for f, flag in _llvm_flags(cpu.arch).items() if flag in have))


def missing_mattr(mattr: "tuple[str, ...] | list[str]", cpu: Cpu) -> tuple[str, ...]:
    """The features a build's `mattr` turns on (`+name`) that `cpu` lacks, by LLVM name. Features
    pared cannot read from /proc/cpuinfo (outside LLVM_X86_FLAGS / LLVM_ARM_FLAGS) are not judged,
    nor any where /proc/cpuinfo listed none for this architecture (unreadable, or the host's under
    qemu-user emulation)."""
    table, have = _llvm_flags(cpu.arch), set(cpu.flags)
    if not have:
        return ()
    wanted = [str(m)[1:] for m in mattr if str(m).startswith("+")]
    return tuple(f for f in wanted if f in table and table[f] not in have)


def u8s8_saturates(arch: str, features: "tuple[str, ...] | list[str]") -> bool:
    """Whether ONNX Runtime's CPU u8 x s8 kernels sum pairs of products in 16 bits on this
    CPU (x86 without VNNI or AMX), so that full-range int8 weights saturate."""
    return arch.lower() in X86_ARCHES and not any(f in features for f in X86_EXACT_U8S8)


def saturation_risk(cpu: Cpu, max_weight_code: int) -> str | None:
    """Why ORT's CPU integer kernels would be wrong on `cpu` for int8 weights reaching
    |q| = max_weight_code, or None when they are exact there."""
    if max_weight_code <= QMAX_NO_SATURATION or not u8s8_saturates(cpu.arch, cpu.features):
        return None
    return (f"this CPU ({cpu.model or cpu.arch}; features: {', '.join(cpu.features) or 'none known'}) has none "
            f"of {', '.join(X86_EXACT_U8S8)}, so ONNX Runtime's u8 x s8 kernels sum pairs of products in 16 "
            f"bits, and int8 weights reaching |q| = {max_weight_code} saturate them (|q| <= "
            f"{QMAX_NO_SATURATION} cannot)")


#: largest |q| of an int8 weight code, by weight range
INT8_WEIGHT_QMAX = {"full": 127, "7bit": QMAX_NO_SATURATION}


def int8_weight_range(target: Mapping[str, Any] | None) -> str:
    """`full` or `7bit`: the int8 weight range a target's integer kernels compute exactly.

    `int8_weights` when the target forces one; otherwise full range wherever the kernels
    sum in 32 bits (TVM's, a GPU provider's, ORT's CPU kernels with VNNI or AMX, ARM), and
    7 bits where ORT's CPU u8s8 kernels would saturate. A CPU target without `arch` / `isa`
    is the build host's (as Target.resolve reads it). `target` is a target's JSON (None: `cpu`).
    """
    t = dict(target or {"backend": "onnxruntime", "provider": "CPUExecutionProvider"})
    forced = t.get("int8_weights") or "auto"
    if forced != "auto":
        return forced
    if t.get("backend") != "onnxruntime" or t.get("provider") not in CPU_EXECUTION_PROVIDERS:
        return "full"
    arch, features = t.get("arch"), t.get("isa")
    if arch is None or features is None:
        cpu = host_cpu()
        arch = cpu.arch if arch is None else arch
        features = cpu.features if features is None else features
    return "7bit" if u8s8_saturates(arch, features) else "full"


def missing_for_exact_u8s8(arch: str, features: "tuple[str, ...] | list[str]") -> tuple[str, ...]:
    """The features any one of which would make the u8s8 kernels exact here (empty: they are)."""
    return X86_EXACT_U8S8 if u8s8_saturates(arch, features) else ()
