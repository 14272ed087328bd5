"""Tuned TVM against untuned TVM and ONNX Runtime on the three reference workloads of issue 18:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/tvm_tuned.py [--repeats 7] [--threads 2]
        [--workloads dit_mnist minilm vla_metaworld] [--target tvm-cpu]

Each workload goes through `pared bench --workload W --target T` (pared.workloads.bench): its
model lowered with no passes three ways in one process, timed on the workload's task in
alternating rounds (median of repeats, threads fixed for every arm):
  backend_plain  TVM, replaying the tuning database shipped beside the workload
                 (examples/W/tvm_tuning/T, written by benchmarks/tvm_tune.py)
  tvm_untuned    the same build with `databases: false` (pared's default schedules only)
  ort            the same graph on ONNX Runtime (target cpu)
plus eager PyTorch. The tasks: dit_mnist one 5-step DDIM request (batch 10 with CFG: 5 step
calls of 20 rows, the shape its database was tuned at; fidelity on 20 samples); MiniLM the
213-sentence corpus in batches of 32; the VLA its diffusion-head policy calls (fidelity: one
closed-loop episode of reach-v3).
Writes benchmarks/results/tvm_tuned.json.

With --profile N every artifact arm's task is then profiled kernel by kernel over N rounds
(pared.backends.profile: ONNX Runtime's profiler, TVM's VM instrument): time per task by kind of
kernel (matmul, softmax, norm, elementwise, data movement, the VM's runtime builtins), the
costliest kernels, and TVM's time by kind over ORT's (`kinds_tuned_vs_ort`, each kind's share of
the gap between the kernels' sums; and the time outside kernels, the unprofiled task less the
kernels): where the gap is.

With --int8 each workload runs its INT8 pipeline instead (dit_mnist: dit_int8.yaml, timestep-aware
static INT8; MiniLM: minilm_int8.yaml; the VLA: vla_int8.yaml): `optimized` is TVM's integer build
(uint8 x int8 -> int32 matmuls; on tvm-native, where the host has AVX-512 VNNI, tensorized to its
vpdpbusd dot products) and `ort_optimized` the same pipeline on ONNX Runtime, timed in the same
rounds as the float arms. Writes benchmarks/results/tvm_int8.json unless --out says otherwise:
    benchmarks/tvm_tuned.py --int8 --repeats 5                                  -> tvm_int8.json
    benchmarks/tvm_tuned.py --int8 --repeats 5 --target tvm-native --fast-math \
        --out benchmarks/results/tvm_int8_native.json
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))

#: per workload: size options that keep the fidelity run short; the timed graph keeps the shape
#: the database was tuned for (the workload's example inputs)
OPTIONS = {"dit_mnist": {"samples": 20, "steps": 5},
           "minilm": {},
           "vla_metaworld": {"episodes": 1, "tasks": "reach-v3"}}
INT8 = {"dit_mnist": "dit_int8.yaml", "minilm": "minilm_int8.yaml", "vla_metaworld": "vla_int8.yaml"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=list(OPTIONS))
    p.add_argument("--target", default="tvm-cpu")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--fast-math", action="store_true", help="TVM arms built with the backend option fast_math")
    p.add_argument("--int8", action="store_true", help="each workload's INT8 pipeline, on TVM and on ORT")
    p.add_argument("--profile", type=int, default=0, metavar="ROUNDS",
                   help="profile each artifact arm kernel by kernel over ROUNDS rounds after the timing")
    p.add_argument("--out", help="default: benchmarks/results/tvm_tuned.json (tvm_int8.json with --int8)")
    a = p.parse_args()
    a.out = a.out or os.path.join(HERE, "results", "tvm_int8.json" if a.int8 else "tvm_tuned.json")

    from pared.bench import write_results
    from pared.workloads.bench import bench_workload

    runs = {}
    for w in a.workloads:
        pipeline = os.path.join(os.path.dirname(HERE), "examples", "pipelines", INT8[w]) if a.int8 else None
        try:
            r = bench_workload(w, pipeline=pipeline, target=a.target, threads=a.threads, repeats=a.repeats,
                               workload_options=OPTIONS.get(w, {}),
                               progress=lambda m, w=w: print(f"[{w}] {m}", flush=True),
                               backend_options={"fast_math": True} if a.fast_math else None, profile=a.profile)
        except Exception as e:          # one workload that does not build is a figure too: say why, go on
            runs[w] = {"failed": f"{type(e).__name__}: {str(e).splitlines()[0][:500] if str(e) else ''}"}
            print(f"[{w}] failed: {runs[w]['failed']}", flush=True)
            continue
        t = r["timings_ms"]
        runs[w] = {"summary": r["summary"], "calls_per_task": r["calls_per_task"],
                   "ms_per_task": {k: round(v["median"], 2) for k, v in t.items()},
                   "ms_range": {k: [round(v["min"], 2), round(v["max"], 2)] for k, v in t.items()},
                   **{k: round(v, 3) for k, v in r["tvm"].items() if k != "schedules"},
                   "schedules": r["tvm"]["schedules"], "fidelity_vs_eager": r["fidelity"],
                   **({"pipeline": INT8[w], "passes": r["passes"]} if a.int8 else {})}
        if r.get("kernels"):
            runs[w]["kernels"] = r["kernels"]
            runs[w]["kinds_tuned_vs_ort"] = kinds_ratio(r["kernels"], "backend_plain", "ort")
            print(f"[{w}] tuned TVM over ORT by kind: " + ", ".join(
                f"{k} {v['tvm_ms']:.1f}/{v['ort_ms']:.1f} ms" for k, v in runs[w]["kinds_tuned_vs_ort"].items()),
                flush=True)
        print(f"[{w}] " + ", ".join(f"{k} {v['median']:.1f} ms" for k, v in t.items())
              + f"; tuned/ORT {r['tvm']['tuned_vs_ort']:.2f}x, untuned/ORT {r['tvm']['untuned_vs_ort']:.2f}x",
              flush=True)
    import sys
    write_results(a.out, {"command": " ".join(["benchmarks/tvm_tuned.py"] + sys.argv[1:]), "target": a.target,
                          "fast_math": a.fast_math, "int8": a.int8, "threads": a.threads, "repeats": a.repeats,
                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "profile_rounds": a.profile,
                          "workloads": runs})


def kinds_ratio(kernels: dict, tvm: str, ort: str) -> dict:
    """Per kind of kernel: TVM's and ORT's ms per task and that kind's share of the gap between the
    kernels' sums; then the time outside the kernels (unprofiled task less the kernels), TVM's and
    ORT's (no share: its gap is another sum's)."""
    t, o = kernels[tvm], kernels[ort]
    gap = t["kernel_ms"] - o["kernel_ms"]
    out = {k: {"tvm_ms": t["categories"][k], "ort_ms": o["categories"][k],
               "share_of_gap": round((t["categories"][k] - o["categories"][k]) / gap, 3) if gap else None}
           for k in t["categories"] if t["categories"][k] or o["categories"][k]}
    out["outside kernels"] = {"tvm_ms": t["outside_kernels_ms"], "ort_ms": o["outside_kernels_ms"], "share_of_gap": None}
    return out


if __name__ == "__main__":
    main()
