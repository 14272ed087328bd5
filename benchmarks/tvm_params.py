"""TVM graphs with weights as parameters vs. weights as constants in the library:
does lifting the weights out (one tvm.weights file per artifact) cost speed?

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/tvm_params.py [--repeats 30] [--threads 2]

The trained dit_mnist (batch of its example inputs) is captured once and built
twice for tvm-cpu, untuned: with its weights as constants inside the shared
library (how pared built TVM graphs before), and as pared builds them now (lifted
into parameters read from a weights file). Both are run by
the Relax VM in this process, alternating, median of repeats, threads fixed.
Writes benchmarks/results/tvm_params.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))

import numpy as np  # noqa: E402

from pared.bench import write_results  # noqa: E402
from pared.workloads import get_workload  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "tvm_params.json"))
    a = ap.parse_args()

    import torch
    import tvm
    from tvm import relax

    from pared.backends.common import to_numpy
    from pared.backends.tvm import runtime as tvm_runtime
    from pared.backends.tvm.lower import _lift_weights, to_relax
    from pared.backends.tvm.weights import WeightStore
    from pared.ir.capture import capture
    from pared.targets import get_target

    torch.set_num_threads(a.threads)
    tvm_runtime._set_threads(a.threads)
    wl = get_workload("dit_mnist")
    model = wl.build()
    example = wl.example_inputs()
    graph = capture(model, example).graphs["main"]
    target = tvm.target.Target(dict(get_target("tvm-cpu").to_json()["tvm_target"]))
    dev = tvm.cpu(0)
    arrays = [tvm.runtime.tensor(np.ascontiguousarray(v), dev) for v in to_numpy(graph.example_inputs)]
    with tempfile.TemporaryDirectory() as tmp:
        arms, sizes = {}, {}
        const_ex = tvm.compile(to_relax(graph, "main"), target=target)
        const_ex.export_library(os.path.join(tmp, "const.so"))
        vm = relax.VirtualMachine(tvm.runtime.load_module(os.path.join(tmp, "const.so")), dev)
        arms["constants"] = (vm["main"], [])
        sizes["constants"] = {"so": os.path.getsize(os.path.join(tmp, "const.so")), "weights": 0}
        mod, lifted = _lift_weights(to_relax(graph, "main"), tmp, "main.weights")
        tvm.compile(mod, target=target).export_library(os.path.join(tmp, "params.so"))
        vm2 = relax.VirtualMachine(tvm.runtime.load_module(os.path.join(tmp, "params.so")), dev)
        params = WeightStore(os.path.join(tmp, "main.weights"), dev).tensors(lifted["params"], "bench")
        arms["parameters"] = (vm2["main"], params)
        sizes["parameters"] = {"so": os.path.getsize(os.path.join(tmp, "params.so")),
                               "weights": os.path.getsize(os.path.join(tmp, "main.weights")),
                               "params": len(params)}

        def run(arm):
            fn, ps = arms[arm]
            out = fn(*arrays, *ps)
            return out[0].numpy() if not hasattr(out, "numpy") else out.numpy()

        ref = run("constants")
        got = run("parameters")
        rel = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        times = {k: [] for k in arms}
        for _ in range(3):
            for k in arms:
                run(k)
        for i in range(a.repeats):
            for k in (list(arms) if i % 2 == 0 else list(arms)[::-1]):
                t0 = time.perf_counter()
                run(k)
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    out = {"what": "dit_mnist on tvm-cpu (untuned): weights as constants in the .so vs as parameters "
                   "from a weights file; alternating, median of repeats",
           "batch": int(example[0].shape[0]), "repeats": a.repeats, "threads": a.threads,
           "median_ms": {k: round(v, 3) for k, v in med.items()},
           "min_ms": {k: round(min(v) * 1e3, 3) for k, v in times.items()},
           "parameters_over_constants": round(med["parameters"] / med["constants"], 4),
           "rel_l2_parameters_vs_constants": rel, "bytes": sizes}
    print(out)
    write_results(a.json, out)


if __name__ == "__main__":
    main()
