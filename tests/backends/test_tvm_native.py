"""Target `tvm-native`: TVM built with the build host's SIMD extensions (`mattr` listed by
Target.resolve from /proc/cpuinfo), computing what eager does, and refused by pared.load on a CPU
that lacks one of them (its code would stop on an illegal instruction) before any library loads."""
import dataclasses
import functools
import json
import os
import re

import pytest
import torch

import pared
from pared.backends import executor as ex_mod
from pared.ir import isa
from pared.ir.errors import ArtifactError, TargetError
from pared.targets import get_target
from pared.testing import assert_close_to_eager, hidden_isa_env, run_python, tiny_transformer

XEON_AVX2 = """processor\t: 0
model name\t: Some x86 CPU
flags\t\t: fpu sse sse2 pni ssse3 fma sse4_1 sse4_2 popcnt avx f16c bmi1 avx2 bmi2 abm movbe cpuid_fault
"""


def test_native_mattr_lists_the_extensions_the_cpu_has():
    cpu = isa.parse_cpuinfo(XEON_AVX2, "x86_64")
    assert isa.native_mattr(cpu) == ("+avx", "+avx2", "+bmi", "+bmi2", "+f16c", "+fma", "+lzcnt", "+movbe", "+popcnt",
                                     "+sse3", "+sse4.1", "+sse4.2", "+ssse3")
    assert isa.missing_mattr(["+avx2", "+avx512f", "+avx512vnni", "+fast-lzcnt", "-sse4a"], cpu) == \
        ("avx512f", "avx512vnni")               # a feature pared cannot read (fast-lzcnt) is not judged
    arm = isa.parse_cpuinfo("processor\t: 0\nFeatures\t: fp asimd asimddp\nCPU part\t: 0xd0c\n", "aarch64")
    assert isa.native_mattr(arm) == ("+dotprod", "+neon")
    assert isa.missing_mattr(["+neon", "+i8mm"], arm) == ("i8mm",)
    # an aarch64 process under qemu-user reads the x86 host's /proc/cpuinfo: nothing to judge by
    emulated = isa.parse_cpuinfo(XEON_AVX2, "aarch64")
    assert emulated.flags == () and isa.missing_mattr(["+neon", "+dotprod"], emulated) == ()


def test_resolve_fills_mattr_from_this_host_and_llvm_reads_it():
    t = get_target("tvm-native")
    assert t.tvm_target["mattr"] == "host"
    r = t.resolve()
    assert tuple(r.tvm_target["mattr"]) == isa.native_mattr(isa.host_cpu())
    import tvm
    from pared.backends.tvm.schedule import simd_bits
    flags = set(isa.host_cpu().flags)
    want = 512 if "avx512f" in flags else 256 if "avx" in flags else 128
    assert simd_bits(tvm.target.Target(dict(r.tvm_target))) == want
    assert simd_bits(tvm.target.Target(dict(get_target("tvm-cpu").tvm_target))) == 128   # the SSE2 baseline


def test_a_cross_target_cannot_take_this_hosts_features():
    t = dataclasses.replace(get_target("tvm-aarch64"), name="arm-host",
                            tvm_target={"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": "host"})
    with pytest.raises(TargetError, match="cannot use; list its features"):
        t.resolve()


@functools.cache
def _artifacts(root: str) -> dict:
    m, (x,) = tiny_transformer()
    out = {}
    for name in ("tvm-native", "tvm-cpu"):
        opt = pared.optimize(m, (x,), target=name, bench_repeats=0)
        out[name] = opt.save(os.path.join(root, name))
    return out


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    return _artifacts(str(tmp_path_factory.mktemp("native")))


def test_native_artifact_computes_what_eager_does(artifacts):
    m, _ = tiny_transformer()
    ex = pared.load(artifacts["tvm-native"])
    with open(os.path.join(artifacts["tvm-native"], "manifest.json")) as f:
        assert json.load(f)["target"]["tvm_target"]["mattr"] == list(isa.native_mattr(isa.host_cpu()))
    torch.manual_seed(3)
    ids = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        want = m(ids)
    assert_close_to_eager(want, ex(ids.numpy()), rel_l2=1e-4)


def _without_avx(monkeypatch):
    host = isa.host_cpu()
    older = isa.Cpu(host.arch, "an older CPU", tuple(f for f in host.features if not f.startswith("avx")), (),
                    tuple(f for f in host.flags if not f.startswith("avx")))
    monkeypatch.setattr(isa, "host_cpu", lambda: older)

    def no_runtime(*a, **k):
        raise AssertionError("the TVM runtime was constructed for an artifact that should have been refused")
    monkeypatch.setattr("pared.backends.tvm.runtime.TvmGraph.__init__", no_runtime)


def test_refused_on_a_cpu_without_its_extensions(artifacts, monkeypatch):
    if "avx" not in isa.host_cpu().flags:
        pytest.skip("this host has no AVX to take away")
    _without_avx(monkeypatch)       # every AVX extension gone: on any AVX host, the build used some
    with pytest.raises(ArtifactError, match=r"graph 'main' was built by TVM for a CPU with .*lacks avx") as e:
        pared.load(artifacts["tvm-native"])
    assert "illegal instruction" in str(e.value) and "tvm-cpu" in str(e.value)
    # the baseline build is not refused there, even on a CPU with nothing past SSE2
    arch = isa.host_cpu().arch
    monkeypatch.setattr(isa, "host_cpu", lambda: isa.Cpu(arch, "old", (), (), ("sse", "sse2")))
    with open(os.path.join(artifacts["tvm-cpu"], "manifest.json")) as f:
        ex_mod.check_tvm_features(artifacts["tvm-cpu"], "main", json.load(f)["target"])


def test_refused_where_cpuid_hides_avx512(artifacts):
    """The same, on this CPU with AVX-512 hidden from CPUID (tests/support/hide_isa.c), in a child process."""
    if not any(f.startswith("avx512") for f in isa.host_cpu().flags):
        pytest.skip("this host has no AVX-512 to hide")
    env, note = hidden_isa_env(("avx512f",))
    if env is None:
        pytest.skip(note)
    out = run_python(f"""
import pared
from pared.ir.errors import ArtifactError
try:
    pared.load({artifacts['tvm-native']!r})
    print("LOADED")
except ArtifactError as e:
    print("REFUSED", e)
pared.load({artifacts['tvm-cpu']!r})
print("BASELINE OK")
""", env=env)
    assert "REFUSED" in out and "BASELINE OK" in out, out
    lacks = re.search(r"lacks ([a-z0-9., ]+), and the code", out)
    assert lacks and "avx512f" in lacks.group(1).split(", "), out    # the list is sorted: not always first


def test_unknown_target_names_it():
    with pytest.raises(TargetError, match="tvm-native"):
        get_target("tvm-nativ")
