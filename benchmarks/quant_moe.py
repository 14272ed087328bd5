"""Expert-level precision (`expert_quant`, MoQa-style) on the DiT-MoE MNIST
workload, side by side with torch eager fp32, pared's plain ORT fp32 lowering and
uniform 8-bit / 4-bit experts (the same pass offered one width), in one process.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/quant_moe.py \
        [--samples 40] [--repeats 3] [--calib-steps 8] [--budgets 0.22 0.27] \
        [--unweighted-budgets 0.27] [--float-budgets ...]

Target (issue 5, item expert_quant): fewer expert weight bytes than uniform INT8
experts at equal or better PSNR of the samples vs the fp32 (eager) samples.
Only the routed experts' stacked weights are quantized (weight-only, symmetric,
block 32 along the input dim, float32 scales); everything else stays float.

Fidelity: the workload's (DDIM-50, CFG 1.5, `samples` digits): PSNR vs eager
fp32 samples and the judge's accuracy. Calibration: a held-apart DDIM request
(the workload's calibration loop, `calib-steps` steps, batch 10 + CFG), never the
scored samples. Weight bytes: the Program's (pared.bench.param_bytes: whole
model, and the experts alone from the plan) and the ONNX file's initializers
on disk (whole model and the experts' `_moeq_*` / `.ff.w1` / `.ff.w2` ones).
Speed: one DDIM request per call, alternating rounds (median), 1 thread, ORT
not spinning. Writes benchmarks/results/quant_moe.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import json
import os
import platform
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("OMP_NUM_THREADS", "1")
HERE = os.path.dirname(os.path.abspath(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import pared  # noqa: E402
from pared.backends.executor import Executor  # noqa: E402
from pared.bench import param_bytes  # noqa: E402
from pared.fidelity import side_by_side  # noqa: E402
from pared.targets import get_target  # noqa: E402
from pared.workloads import get_workload, torch_callable  # noqa: E402
from pared.bench import write_results  # noqa: E402


def onnx_bytes(path: str) -> dict:
    """Initializer bytes of the artifact's ONNX files: total, the experts', by dtype; and file sizes."""
    import onnx
    from onnx import numpy_helper
    total, experts, by_dtype, files = 0, 0, {}, 0
    for f in glob.glob(os.path.join(path, "*.onnx")):
        files += os.path.getsize(f) + (os.path.getsize(f + ".data") if os.path.exists(f + ".data") else 0)
        for init in onnx.load(f).graph.initializer:
            a = numpy_helper.to_array(init)
            total += a.nbytes
            by_dtype[str(a.dtype)] = by_dtype.get(str(a.dtype), 0) + a.nbytes
            if "_moeq_" in init.name or init.name.endswith((".ff.w1", ".ff.w2", "ff_w1", "ff_w2")):
                experts += a.nbytes
    return {"initializers": total, "expert_initializers": experts, "by_dtype": by_dtype, "files_on_disk": files}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--calib-steps", type=int, default=8)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.22, 0.27])
    ap.add_argument("--float-budgets", type=float, nargs="*", default=[],
                    help="budgets for expert_quant offered {4, 8, fp32}")
    ap.add_argument("--unweighted-budgets", type=float, nargs="*", default=[0.27],
                    help="budgets for expert_quant with weighting none (sensitivity alone)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quant_moe.json"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)

    wl = get_workload("dit_moe_mnist", samples=a.samples)
    model = wl.build()
    example = wl.example_inputs()
    calibration = get_workload("dit_moe_mnist", steps=a.calib_steps, samples=10).calibration()
    tgt = dataclasses.replace(get_target("cpu"), threads=a.threads)
    variants = {"backend_plain": None,
                "uniform_int8_experts": [{"expert_quant": {"bits": [8], "weight_bytes": 1.0}}],
                "uniform_int4_experts": [{"expert_quant": {"bits": [4], "weight_bytes": 1.0}}]}
    for b in a.budgets:
        variants[f"expert_quant_{b:g}"] = [{"expert_quant": {"bits": [4, 8], "weight_bytes": b}}]
    for b in a.unweighted_budgets:
        variants[f"expert_quant_unweighted_{b:g}"] = [{"expert_quant": {"bits": [4, 8], "weight_bytes": b,
                                                                        "weighting": "none"}}]
    for b in a.float_budgets:
        variants[f"expert_quant_fp32ok_{b:g}"] = [{"expert_quant": {"bits": [4, 8, 32], "weight_bytes": b}}]
    work = tempfile.mkdtemp(prefix="pared-quant-moe-")
    built, runners = {}, {"eager": torch_callable(model)}
    for name, pipe in variants.items():
        print(f"building {name}", flush=True)
        t0 = time.perf_counter()
        opt = pared.optimize(model, example, target=tgt, pipeline=pipe, calibration=calibration,
                             allow_fidelity_loss=True, bench_repeats=0)
        path = opt.save(os.path.join(work, name))
        plan = opt.program.records.get("ExpertQuantPlan")
        built[name] = {"build_s": round(time.perf_counter() - t0, 1), "param_bytes": param_bytes(opt.program),
                       "onnx": onnx_bytes(path), "plan": plan}
        runners[name] = Executor(path, threads=a.threads)
    fp32_experts = next(v["plan"].fp32_bytes for v in built.values() if v["plan"] is not None)

    def task(label):
        if label == "eager":
            return lambda: wl.task(runners["eager"])
        ex = runners[label]
        return lambda: wl.task(ex, ex.reset)

    print("timing", flush=True)
    timing = side_by_side({k: task(k) for k in runners}, repeats=a.repeats, warmup=1)
    print("fidelity: eager", flush=True)
    ref = wl.run(runners["eager"])
    results = {}
    for name, info in built.items():
        print(f"fidelity: {name}", flush=True)
        ex = runners[name]
        fid = wl.fidelity(ref, wl.run(ex, ex.reset))
        plan = info["plan"]
        row = {"fidelity": fid, "timing_ms_median": round(timing["median_s"][name] * 1e3, 1),
               "speedup_vs_eager": timing["median_s"]["eager"] / timing["median_s"][name],
               "speedup_vs_backend_plain": timing["median_s"]["backend_plain"] / timing["median_s"][name],
               "param_bytes_model": info["param_bytes"], "onnx": info["onnx"], "build_s": info["build_s"]}
        if plan is None:
            row["expert_bytes"] = fp32_experts
        else:
            row.update(expert_bytes=plan.bytes, expert_fraction_of_fp32=plan.bytes / plan.fp32_bytes,
                       budget=plan.budget, bits_count={str(k): v for k, v in plan.bits_count.items()},
                       calibration_measured=dict(plan.measured), objective=plan.objective,
                       bits_per_layer={lay.region: [e.bits for e in lay.experts] for lay in plan.layers},
                       frequency_per_layer={lay.region: [round(e.frequency, 4) for e in lay.experts]
                                            for lay in plan.layers},
                       sensitivity_per_layer={lay.region: [{str(b): s for b, s in e.sensitivity} for e in lay.experts]
                                              for lay in plan.layers})
        results[name] = row
        print(f"  {name}: psnr {fid['psnr_db']:.2f} dB, judge {fid['judge_acc_optimized']:.3f}, "
              f"experts {row['expert_bytes'] / 1e6:.3f} MB, onnx {info['onnx']['initializers'] / 1e6:.3f} MB, "
              f"{row['timing_ms_median']} ms", flush=True)
    i8 = results["uniform_int8_experts"]
    target = {name: {"fewer_expert_bytes_than_int8": r["expert_bytes"] < i8["expert_bytes"],
                     "psnr_at_least_int8": r["fidelity"]["psnr_db"] >= i8["fidelity"]["psnr_db"]}
              for name, r in results.items() if name.startswith("expert_quant_")}
    out = {"workload": wl.summary, "samples": a.samples, "threads": a.threads, "repeats": timing["repeats"],
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
           "calibration": f"held-apart DDIM-{a.calib_steps} request, batch 10 + CFG (the workload's calibration loop)",
           "quantization": "weight-only symmetric, block 32 along the input dim, float32 scales; 4-bit codes packed "
                           "two per byte; routed experts only",
           "expert_fp32_bytes": fp32_experts, "eager_ms_median": round(timing["median_s"]["eager"] * 1e3, 1),
           "results": results, "target_met": target,
           "host": {"machine": platform.machine(), "cpu_count": os.cpu_count(), "torch": torch.__version__}}
    write_results(a.out, out, indent=1, default=float)
    print(json.dumps(target, indent=1))


if __name__ == "__main__":
    main()
