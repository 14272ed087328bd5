"""backends/profile.py: kernel-by-kernel profiles of an artifact on ONNX Runtime and on TVM."""
import numpy as np
import pytest

from pared.backends.artifact import write_artifact
from pared.backends.executor import Executor
from pared.backends.lower import lower_program
from pared.backends.profile import CATEGORIES, category, profile_kernels
from pared.ir.capture import capture
from pared.targets import get_target
from pared.testing import tiny_transformer, two_graph_program


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    m, inputs = tiny_transformer()
    program = capture(m, inputs)
    arts = {}
    for name in ("cpu", "tvm-cpu"):
        target = get_target(name).to_json()

        def build(tmp, target=target):
            return {"graphs": lower_program(program, target, tmp), "plan": program.plan.to_json(),
                    "target": target, "output_structure": program.output_structure}
        arts[name] = write_artifact(str(tmp_path_factory.mktemp(name) / "a"), build)
    return inputs[0].numpy(), arts


def _executor(path):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Executor(path, threads=1)


def _check_sums(prof):
    assert set(prof["categories"]) == set(CATEGORIES)
    assert sum(prof["categories"].values()) == pytest.approx(prof["kernel_ms"], abs=0.01)
    assert 0 < prof["kernel_ms"] <= prof["task_ms"] * 1.05 + 0.05
    assert prof["kernel_ms"] <= prof["kernel_ms_raw"] + 1e-3 and prof["task_ms_unprofiled"] > 0
    assert prof["outside_kernels_ms"] == pytest.approx(prof["task_ms_unprofiled"] - prof["kernel_ms"], abs=2e-3)
    shares = [t["share"] for t in prof["top"]]
    assert shares == sorted(shares, reverse=True) and sum(shares) <= 1 + 5e-5 * len(shares)   # each rounded to 1e-4


def test_ort_profile_counts_each_node_once_per_call_and_skips_the_warmup(built):
    ids, arts = built
    ex = _executor(arts["cpu"])
    session = ex.graphs["main"].session
    ref = ex(ids)["logits"]
    prof = profile_kernels(ex, lambda: ex(ids), rounds=2, warmup=3, top=1000)
    _check_sums(prof)
    assert prof["instrument_floor_us"] == {} and prof["kernel_ms"] == prof["kernel_ms_raw"]   # ORT: as reported
    ops = {t["name"].split(":")[0] for t in prof["top"]}
    assert {"LayerNormalization", "Softmax"} <= ops and ops & {"MatMul", "Gemm", "FusedMatMul"}
    # one task = one session run: every node ran once per task (the 3 warmup runs left out)
    assert {t["calls"] for t in prof["top"]} == {1.0}
    assert prof["kernels"] == len(prof["top"])
    assert sum(t["kind"] == "softmax" for t in prof["top"]) == 2          # the tiny model's two layers
    # the executor is as it was: its own session back, the same outputs
    assert ex.graphs["main"].session is session
    np.testing.assert_array_equal(ex(ids)["logits"], ref)


def test_tvm_profile_times_the_compiled_kernels_and_the_vm_builtins(built):
    ids, arts = built
    ex = _executor(arts["tvm-cpu"])
    ref = ex(ids)["logits"]
    prof = profile_kernels(ex, lambda: ex(ids), rounds=3, warmup=2, top=1000)
    _check_sums(prof)
    by = {t["name"]: t for t in prof["top"]}
    assert by["softmax"]["calls"] == 2.0 and by["softmax"]["kind"] == "softmax"
    assert any(t["kind"] == "matmul" for t in prof["top"]) and prof["categories"]["runtime"] > 0
    assert all(t["kind"] == "runtime" for t in prof["top"] if t["name"].startswith("vm.builtin."))
    # the instrument's floor (the cheapest single call) is taken off every call: what is left is
    # never negative, and the kernels' sum drops by exactly calls x floor
    floor = prof["instrument_floor_us"]["main"]
    assert 0 < floor < 1e3 and all(t["ms"] >= 0 for t in prof["top"])
    calls = sum(t["calls"] for t in prof["top"])
    assert prof["kernel_ms_raw"] - prof["kernel_ms"] == pytest.approx(calls * floor / 1e3, rel=1e-3, abs=2e-3)
    # profiling again on the same executor counts only that profile's rounds, and leaves no
    # instrument on the VM (set_instrument(None): no Python callback on later calls)
    vm, seen = ex.graphs["main"].vm, []
    real = vm.set_instrument
    vm.set_instrument = lambda f: (seen.append(f), real(f))[1]
    again = profile_kernels(ex, lambda: ex(ids), rounds=1, warmup=0, top=1000)
    assert {t["name"]: t["calls"] for t in again["top"]}["softmax"] == 2.0
    assert len(seen) == 2 and callable(seen[0]) and seen[-1] is None
    np.testing.assert_array_equal(ex(ids)["logits"], ref)


def test_each_graph_of_a_plan_is_profiled_and_a_failed_open_puts_every_session_back(tmp_path, monkeypatch):
    _, program = two_graph_program()            # a 3-call request: full once, reuse twice
    target = get_target("cpu").to_json()

    def build(tmp):
        return {"graphs": lower_program(program, target, tmp), "plan": program.plan.to_json(), "target": target,
                "output_structure": program.output_structure}
    ex = _executor(write_artifact(str(tmp_path / "a"), build))
    x = np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)

    def task():
        ex.reset()
        for _ in range(3):
            ex(x)
    prof = profile_kernels(ex, task, rounds=2, top=1000)
    calls = {g: {t["calls"] for t in prof["top"] if t["graph"] == g} for g in ("full", "reuse")}
    assert calls == {"full": {1.0}, "reuse": {2.0}}
    # the second session fails to reopen with the profiler on: the first is put back too
    import pared.backends.onnxruntime.runtime as rt
    sessions = {name: g.session for name, g in ex.graphs.items()}
    real, opened = rt.make_session, []

    def flaky(*a, **k):
        opened.append(1)
        if len(opened) == 2:
            raise RuntimeError("no profiler here")
        return real(*a, **k)
    monkeypatch.setattr(rt, "make_session", flaky)
    with pytest.raises(RuntimeError, match="no profiler"):
        profile_kernels(ex, task)
    assert len(opened) == 2 and all(ex.graphs[n].session is s for n, s in sessions.items())


def test_kernel_kinds_from_names():
    assert category("fused_matmul4_add4") == "matmul"
    assert category("FusedMatMul") == category("Gemm") == category("MatMulNBits") == "matmul"
    assert category("fused_strided_slice_squeeze_transpose1_reshape6") == "data movement"
    assert category("Transpose") == category("take") == "data movement"
    assert category("fused_reshape11_gelu_reshape12") == "elementwise"       # a reshape around compute
    assert category("SkipLayerNormalization") == category("layer_norm") == "norm"
    assert category("softmax") == category("Softmax") == "softmax"
    assert category("MultiHeadAttention") == "attention"
    assert category("vm.builtin.alloc_tensor") == "runtime"


def test_rounds_must_be_positive(built):
    ids, arts = built
    ex = _executor(arts["cpu"])
    with pytest.raises(ValueError, match="rounds"):
        profile_kernels(ex, lambda: ex(ids), rounds=0)
