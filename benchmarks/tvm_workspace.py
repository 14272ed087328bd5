"""TVM builds with and without the workspace: `main`'s planned intermediates allocated once at load
(the tvm backend option `workspace`, default true; backends/tvm/schedule.hoist_workspace) against
TVM's default, one `vm.builtin.alloc_tensor` per intermediate at every call.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/tvm_workspace.py [--repeats 7] [--threads 2]
        [--workloads dit_mnist vla_metaworld minilm] [--target tvm-native] [--no-fast-math]

Per workload, four artifacts of its model on the same target, each built by `pared.optimize`:
the plain graph (no passes) and the workload's INT8 pipeline (benchmarks/tvm_tuned.py's INT8
files), each with `workspace: true` and `workspace: false`; nothing else differs. They are timed
on the workload's task (the tasks of benchmarks/tvm_tuned.py) in alternating rounds (median of
repeats, threads fixed), and each pair's outputs on the example inputs are compared (the same
kernels in the same order: they should be equal bit for bit). The count of per-call tensor
allocations each build leaves in `main` is read from its VM instrument over one call.
Writes benchmarks/results/tvm_workspace.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from tvm_tuned import INT8, OPTIONS  # noqa: E402  (the same tasks and pipelines)


def _allocations(ex, example) -> int:
    """`vm.builtin.alloc_tensor` calls in one call of the executor, over all its graphs (the kernel
    profiler's counts: pared.backends.profile)."""
    from pared.backends.profile import profile_kernels

    def task():
        ex.reset()
        ex.run_flat(*example)
    rows = profile_kernels(ex, task, rounds=1, warmup=0, top=10 ** 9)["top"]
    return round(sum(r["calls"] for r in rows if r["name"] == "vm.builtin.alloc_tensor"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["dit_mnist", "vla_metaworld", "minilm"])
    p.add_argument("--target", default="tvm-native")
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--no-fast-math", dest="fast_math", action="store_false")
    p.add_argument("--out", default=os.path.join(HERE, "results", "tvm_workspace.json"))
    a = p.parse_args()

    import numpy as np
    import torch

    import pared
    from pared.bench import write_results
    from pared.fidelity import side_by_side
    from pared.pipeline import build_passes, load_pipeline
    from pared.workloads import get_workload
    from pared.workloads.bench import _own_executor

    torch.set_num_threads(a.threads)
    runs = {}
    work = tempfile.mkdtemp(prefix="pared-workspace-")
    for w in a.workloads:
        wl = get_workload(w, **OPTIONS.get(w, {}))
        model, example, calib = wl.build(), wl.example_inputs(), wl.calibration()
        passes = build_passes(load_pipeline(os.path.join(os.path.dirname(HERE), "examples", "pipelines", INT8[w])))
        arms, info = {}, {}
        for kind, plist in (("fp32", []), ("int8", passes)):
            for ws in (True, False):
                label = f"{kind}_{'workspace' if ws else 'per_call'}"
                print(f"[{w}] building {label}", flush=True)
                opt = pared.optimize(model, example, target=a.target, pipeline=plist, calibration=calib,
                                     bench_repeats=0, allow_fidelity_loss=True, progress=lambda m: None, holdout=[],
                                     backend_options={"fast_math": a.fast_math, "workspace": ws})
                ex = _own_executor(opt.save(os.path.join(work, w, label)), a.threads)
                arms[label] = ex
                info[label] = {"allocations_per_call": _allocations(ex, [t.numpy() for t in example]),
                               "workspace_views": sum(len(getattr(g, "workspace", [])) for g in ex.graphs.values())}
        same = {}
        arrays = [t.numpy() if isinstance(t, torch.Tensor) else np.asarray(t) for t in example]
        for kind in ("fp32", "int8"):
            outs = []
            for ws in ("workspace", "per_call"):
                ex = arms[f"{kind}_{ws}"]
                ex.reset()
                outs.append([np.asarray(v) for v in ex.run_flat(*arrays)])
            same[kind] = all(np.array_equal(x, y) for x, y in zip(*outs))
        print(f"[{w}] timing {' / '.join(arms)}, {a.repeats} alternating rounds", flush=True)
        timing = side_by_side({k: (lambda ex=ex: wl.task(ex, ex.reset)) for k, ex in arms.items()},
                              repeats=a.repeats, warmup=1)
        med = {k: round(v * 1e3, 2) for k, v in timing["median_s"].items()}
        runs[w] = {"summary": wl.summary, "int8_pipeline": INT8[w], "ms_per_task": med,
                   "ms_range": {k: [round(timing["min_s"][k] * 1e3, 2), round(timing["max_s"][k] * 1e3, 2)]
                                for k in arms},
                   "per_call_over_workspace": {kind: round(med[f"{kind}_per_call"] / med[f"{kind}_workspace"], 3)
                                               for kind in ("fp32", "int8")},
                   "outputs_equal": same, "builds": info}
        print(f"[{w}] " + ", ".join(f"{k} {v:.1f} ms" for k, v in med.items())
              + f"; per-call / workspace {runs[w]['per_call_over_workspace']}; outputs equal {same}; "
              f"allocations per call {({k: v['allocations_per_call'] for k, v in info.items()})}", flush=True)
    write_results(a.out, {"command": " ".join(["benchmarks/tvm_workspace.py"] + sys.argv[1:]), "target": a.target,
                          "fast_math": a.fast_math, "threads": a.threads, "repeats": a.repeats,
                          "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "workloads": runs})


if __name__ == "__main__":
    main()
