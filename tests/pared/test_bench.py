"""The side-by-side benchmark harness runs end to end on a tiny configuration and
writes every field the JSON promises. (Timing figures are not asserted here.)"""
import json
import os

import pytest

from pared.cli import EXIT_ERROR, EXIT_OK, EXIT_USAGE, main

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

FIELDS = {"workload", "pipeline", "target", "torch_threads", "ort_threads", "timings_ms", "speedup",
          "ideal_speedup", "fidelity", "weight_bytes"}


@pytest.mark.heavy     # ~1 min: in make test-heavy (make test's budget)
def test_bench_dit_workload_writes_the_json(tmp_path, capsys):
    out = tmp_path / "res" / "dit.json"
    rc = main(["bench", "--workload", "dit_mnist", "--samples", "2", "--batch", "2", "--steps", "2",
               "--repeats", "2", "--json", str(out), "-q"])
    assert rc == EXIT_OK
    r = json.loads(out.read_text())
    assert FIELDS <= set(r)
    assert r["workload"] == "dit_mnist" and r["target"] == "cpu" and r["torch_threads"] == 1
    assert r["pipeline"].endswith("examples/pipelines/dit_mnist.yaml")
    assert r["passes"] == ["constant_folding", "softmax_guard_elimination", "dead_code_elimination"]
    for k in ("eager", "backend_plain", "optimized"):
        t = r["timings_ms"][k]
        assert 0 < t["min"] <= t["median"] <= t["max"]
    assert set(r["speedup"]) >= {"vs_eager", "vs_backend_plain"}
    assert r["ideal_speedup"] >= 1.0
    assert r["flops_per_task"]["reference"] > 0
    f = r["fidelity"]
    assert f["psnr_db"] >= 60 and f["samples"] == 2       # the generic passes lower losslessly
    assert {"judge_acc_reference", "judge_acc_optimized"} <= set(f)
    assert r["weight_bytes"]["reference"] > 1e6 and r["weight_bytes"]["optimized"] > 1e6
    assert "speedup vs eager" in capsys.readouterr().out


@pytest.mark.heavy
def test_bench_without_passes_on_minilm(tmp_path):
    from pared.workloads.bench import bench_workload
    r = bench_workload("minilm", pipeline=None, repeats=1, workload_options={"sentences": 40, "batch": 16})
    assert r["pipeline"] is None and r["passes"] == []
    assert r["fidelity"]["sentences"] == 40
    assert r["fidelity"]["cosine_min"] > 0.9999 and r["fidelity"]["rank_agreement"] == 1.0
    assert r["ideal_speedup"] == pytest.approx(1.0)
    assert r["weight_bytes"]["reference"] == r["weight_bytes"]["optimized"]


def test_bench_usage_errors(capsys):
    assert main(["bench"]) == EXIT_USAGE
    assert main(["bench", "somewhere", "--workload", "dit_mnist"]) == EXIT_USAGE
    assert main(["bench", "somewhere", "--steps", "3"]) == EXIT_USAGE
    assert "needs --workload" in capsys.readouterr().err
    assert main(["bench", "--workload", "vit_mnst"]) == EXIT_ERROR
    assert "did you mean 'vit_mnist'" in capsys.readouterr().err
    assert main(["bench", "somewhere", "--head", "tokens"]) == EXIT_USAGE
    assert "--head needs --workload" in capsys.readouterr().err
    assert main(["bench", "--workload", "dit_mnist", "--episodes", "3"]) == EXIT_ERROR
    assert "does not take option(s) ['episodes']" in capsys.readouterr().err


def test_results_files_record_the_cpu_and_its_isa(tmp_path):
    import json

    from pared.bench import write_results
    from pared.ir.isa import host_cpu
    path = write_results(str(tmp_path / "r.json"), {"x": 1, "machine": {"threads": 1}})
    data = json.load(open(path))
    assert data["x"] == 1 and data["machine"]["threads"] == 1      # the benchmark's own keys are kept
    assert data["machine"]["cpu"] == host_cpu().to_json() and data["machine"]["cpu"]["model"] is not None
    assert not [p for p in tmp_path.iterdir() if p.name != "r.json"]    # written atomically, no leftovers


@pytest.mark.heavy
def test_bench_on_a_tvm_target_times_shipped_tuning_default_schedules_ort_and_the_pipeline_on_both(tmp_path):
    """`pared bench --workload dit_mnist --target tvm-cpu --pipeline P --profile 1`: the plain TVM
    build replays the tuning database shipped beside the workload (the shape it was tuned at: the
    example batch), and is timed in the same rounds as the build with default schedules only and as
    ONNX Runtime; the pipeline's TVM build is timed against the same pipeline on ONNX Runtime
    (ort_optimized; benchmarks/tvm_tuned.py --int8 runs the INT8 pipelines this way; a one-pass
    pipeline keeps the test short); every artifact arm is profiled kernel by kernel."""
    from pared.workloads.bench import bench_workload
    pipe = tmp_path / "p.yaml"
    pipe.write_text("version: 1\npasses:\n  - constant_folding: {}\n")
    r = bench_workload("dit_mnist", pipeline=str(pipe), target="tvm-cpu", repeats=1,
                       workload_options={"samples": 10, "steps": 2}, profile=1)
    assert set(r["timings_ms"]) == {"eager", "backend_plain", "optimized", "tvm_untuned", "ort", "ort_optimized"}
    assert set(r["kernels"]) == {"backend_plain", "optimized", "tvm_untuned", "ort", "ort_optimized"}
    for k, prof in r["kernels"].items():
        assert prof["categories"]["matmul"] > 0 and prof["kernel_ms"] <= prof["task_ms"] * 1.05, k
    assert r["kernels"]["backend_plain"]["categories"]["runtime"] > 0            # the VM's builtins
    assert any(t["name"].startswith("fused_") for t in r["kernels"]["backend_plain"]["top"])
    assert r["kernels"]["backend_plain"]["instrument_floor_us"] and not r["kernels"]["ort"]["instrument_floor_us"]
    (s,) = r["tvm"]["schedules"].values()
    assert s["tuned_functions"] >= 10 and "examples/dit_mnist/tvm_tuning/tvm-cpu" in s["databases"]
    med = {k: v["median"] for k, v in r["timings_ms"].items()}
    # (the medians in timings_ms are rounded to the microsecond)
    assert r["tvm"]["tuned_vs_ort"] == pytest.approx(med["backend_plain"] / med["ort"], rel=1e-3)
    assert r["tvm"]["untuned_vs_tuned"] == pytest.approx(med["tvm_untuned"] / med["backend_plain"], rel=1e-3)
    assert r["tvm"]["optimized_vs_ort_optimized"] == pytest.approx(med["optimized"] / med["ort_optimized"], rel=1e-3)
    assert r["fidelity"]["psnr_db"] > 40 and r["passes"] == ["constant_folding"]   # computes what eager does


@pytest.mark.heavy
def test_bench_video_ar_streams_the_head_aware_cache_and_reports_per_frame_curves(tmp_path, capsys):
    out = tmp_path / "video_ar.json"
    rc = main(["bench", "--workload", "video_ar", "--frames", "12", "--steps", "1", "--batch", "2", "--samples", "2",
               "--repeats", "1", "--json", str(out)])
    assert rc == EXIT_OK
    r = json.loads(out.read_text())
    assert r["passes"] == ["softmax_guard_elimination", "head_types", "kv_policy", "kv_drop"]
    assert r["pipeline"].endswith("examples/pipelines/video_ar.yaml")
    # the pipeline keeps a 16-frame pyramid and drops half the heads' history: fewer FLOPs per rollout
    # of 12 frames only through kv_drop (the full cache of 12 frames is within the budget)
    assert r["ideal_speedup"] > 1.05
    # the KV state at the end of a rollout: the pyramid's 16 frames per head, but rows only for the
    # half of the heads that keep any (kv_drop's compact state), against every head's 12 frames
    assert 0 < r["state_bytes"]["optimized"] < r["state_bytes"]["reference"], r["state_bytes"]
    f = r["fidelity"]
    assert len(f["per_frame"]["reference"]["identity"]) == 12 and set(f["per_frame"]["optimized"]) == {
        "identity", "velocity_error", "psnr_db"}
    assert "per frame (reference -> optimized)" in capsys.readouterr().out
