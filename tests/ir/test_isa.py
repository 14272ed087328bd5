"""The CPU feature reader (ir.isa) and what a Target makes of it (int8 weight range)."""
from __future__ import annotations

import pytest

from pared.ir import isa
from pared.ir.errors import TargetError
from pared.targets import Target, get_target

# first processor blocks of /proc/cpuinfo as three real machines print them (flags shortened)
EPYC_ZEN2 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B12
flags\t\t: fpu vme sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand avx2 bmi2 sha_ni

processor\t: 1
flags\t\t: fpu avx512f avx512_vnni
"""
SAPPHIRE_RAPIDS = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512bw avx512vl avx512_vnni avx_vnni amx_tile amx_int8 amx_bf16
"""
SKYLAKE_X = """processor\t: 0
model name\t: Intel(R) Xeon(R) Gold 6148 CPU @ 2.40GHz
flags\t\t: fpu sse2 avx avx2 avx512f avx512dq avx512cd avx512bw avx512vl
"""
NEOVERSE_V1 = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm asimddp i8mm bf16
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""


def test_parse_x86_avx2_only_reads_the_first_processor():
    cpu = isa.parse_cpuinfo(EPYC_ZEN2, "x86_64")
    assert cpu.features == ("avx2",) and cpu.model == "AMD EPYC 7B12"
    assert isa.u8s8_saturates(cpu.arch, cpu.features)
    assert isa.missing_for_exact_u8s8(cpu.arch, cpu.features) == isa.X86_EXACT_U8S8


def test_parse_x86_with_vnni_and_amx():
    cpu = isa.parse_cpuinfo(SAPPHIRE_RAPIDS)           # arch guessed from the `flags` line
    assert cpu.arch == "x86_64"
    assert cpu.features == ("amx_int8", "avx2", "avx512_vnni", "avx512bw", "avx512f", "avx_vnni")
    assert not isa.u8s8_saturates(cpu.arch, cpu.features)


def test_avx512_without_vnni_still_saturates():
    # AVX-512BW's u8s8 kernel uses vpmaddubsw too: only VNNI or AMX sum in 32 bits
    cpu = isa.parse_cpuinfo(SKYLAKE_X, "x86_64")
    assert "avx512f" in cpu.features and isa.u8s8_saturates(cpu.arch, cpu.features)
    assert isa.saturation_risk(cpu, 127) is not None and "avx512_vnni" in isa.saturation_risk(cpu, 127)
    assert isa.saturation_risk(cpu, 63) is None


def test_parse_arm_features():
    cpu = isa.parse_cpuinfo(NEOVERSE_V1, "aarch64")
    assert cpu.features == ("dotprod", "i8mm") and "0xd40" in cpu.model
    assert not isa.u8s8_saturates(cpu.arch, cpu.features)


def test_host_cpu_matches_proc_cpuinfo():
    cpu = isa.host_cpu()
    with open("/proc/cpuinfo") as f:
        words = set(f.read().split())
    assert set(cpu.features) <= set(isa.FEATURES)
    if cpu.is_x86 and not cpu.hidden:
        assert set(cpu.features) == {f for f in isa.X86_FEATURES if f in words}


def _profile(**kw) -> Target:
    return Target.from_json(dict({"name": "box", "backend": "onnxruntime", "provider": "CPUExecutionProvider",
                                  "arch": "x86_64"}, **kw))


def test_target_int8_range_follows_the_isa():
    assert _profile(isa=["avx2"]).int8_weight_range == "7bit"
    assert _profile(isa=["avx2"]).int8_weight_qmax == 63
    assert _profile(isa=["avx2", "avx512f", "avx512bw"]).int8_weight_range == "7bit"
    assert _profile(isa=["avx2", "avx_vnni"]).int8_weight_qmax == 127
    assert _profile(isa=["avx2", "amx_int8"]).int8_weight_range == "full"
    assert _profile(arch="aarch64", isa=["dotprod"]).int8_weight_range == "full"
    # forced either way
    assert _profile(isa=["avx2"], int8_weights="full").int8_weight_qmax == 127
    assert _profile(isa=["avx512_vnni"], int8_weights="7bit").int8_weight_qmax == 63
    # TVM's integer kernels and GPUs sum in 32 bits
    assert get_target("tvm-cpu").int8_weight_range == "full"
    assert get_target("tvm-aarch64").int8_weight_range == "full"
    assert get_target("cuda").int8_weight_range == "full"


def test_cpu_target_resolves_this_host():
    t = get_target("cpu").resolve()
    host = isa.host_cpu()
    assert (t.arch, t.isa) == (host.arch, host.features)
    assert t.int8_weight_range == ("7bit" if isa.u8s8_saturates(host.arch, host.features) else "full")
    assert Target.from_json(t.to_json()) == t           # the manifest form loads back
    # a stated profile is not overwritten by the host
    stated = _profile(isa=["avx2"])
    assert stated.resolve() is stated
    # a cross target states its own
    assert get_target("tvm-aarch64").resolve().arch == "aarch64"


def test_bad_isa_and_int8_weights_are_named():
    with pytest.raises(TargetError, match="unknown CPU feature 'avx512vnni'.*did you mean 'avx512_vnni'"):
        _profile(isa=["avx2", "avx512vnni"])
    with pytest.raises(TargetError, match="isa must be a list"):
        _profile(isa="avx2")
    with pytest.raises(TargetError, match="int8_weights must be one of"):
        _profile(int8_weights="8bit")


def test_shipped_device_profiles_state_their_isa():
    import os
    here = os.path.dirname(os.path.abspath(__file__))
    profiles = os.path.join(here, "..", "..", "examples", "targets")
    avx2 = get_target(os.path.join(profiles, "avx2_server.yaml"))
    vnni = get_target(os.path.join(profiles, "vnni_server.yaml"))
    assert avx2.isa == ("avx2",) and avx2.int8_weight_qmax == 63
    assert "avx512_vnni" in vnni.isa and vnni.int8_weight_qmax == 127
    assert avx2.resolve() is avx2                      # stated, not read from the build host
