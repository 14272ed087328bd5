"""pared's default TVM schedules (backends/tvm/schedule.py) against TVM's unscheduled
default pipeline and ONNX Runtime, on the same graph and thread count:

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/tvm_schedule.py [--repeats 7] [--threads 2 1]

Graphs: the TinyDiT step (pared.testing.TinyDiT, dim 256, 6 blocks, 64 tokens, batch 2,
as benchmarks/quant_tvm.py), dit_mnist (its workload's example batch), and a 4-layer
d=256 nn.TransformerEncoder (4 heads, ffn 1024) on a 4 x 64 batch (the issue's newcomer case).
Arms, each built from the same captured graph with weights lifted into parameters:
  tvm_naive   tvm.compile's default relax pipeline (what pared shipped before)
  tvm_sched   pared's pipeline: the same passes plus the default schedules
  tvm_sched_host  the same with the target's mcpu set to this host's CPU (LLVM's name):
              tvm-cpu's target carries no mcpu, so LLVM builds for the x86-64 baseline (SSE2)
  tvm_native  the same for target `tvm-native` as pared ships it: no mcpu, mattr = this host's
              SIMD and bit-manipulation extensions as /proc/cpuinfo lists them (ir.isa.native_mattr)
  tvm_sched_fast, tvm_native_fast  tvm_sched / tvm_native with the backend option fast_math
              (erf, tanh, exp, GELU and softmax as TVM's polynomial approximations)
  ort         pared's ONNX Runtime artifact (target cpu) run by the Executor
Timing: per thread count, the arms called in one process, alternating (order reversed every
other round), median of repeats in ms. `profile` lists the scheduled build's heaviest
PrimFuncs (Relax VM profiler, one call). Writes benchmarks/results/tvm_schedule.json.
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
import torch  # noqa: E402
from torch import nn  # noqa: E402


def graphs() -> dict:
    from pared.testing import TinyDiT
    from pared.workloads import get_workload

    torch.manual_seed(0)
    dit = TinyDiT(dim=256, layers=6).eval()
    with torch.no_grad():
        for b in dit.blocks:
            b.ada.weight.mul_(0.2)
    wl = get_workload("dit_mnist")
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(256, 4, 1024, dropout=0.0, batch_first=True)
    enc = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False).eval()
    return {"tiny_dit": (dit, (torch.randn(2, 64, 4), torch.full((2,), 900.0))),
            "dit_mnist": (wl.build().eval(), tuple(wl.example_inputs())),
            "encoder": (enc, (torch.randn(4, 64, 256),))}


def _profile(mod, target, dev, top: int = 6) -> list:
    """The heaviest PrimFuncs of one call of the scheduled build: [name, calls, ms per call
    of main, share]. (The Relax VM of this TVM has no profiler: each PrimFunc is built on
    its own and timed on random inputs of its parameters' shapes, times its call count.)"""
    import re

    import tvm
    from tvm import relax

    from pared.backends.tvm import schedule

    with target:
        # the build's passes up to the schedules (schedule.pipeline)
        seq = tvm.transform.Sequential([schedule.unbroadcast_matmul_weights(), relax.transform.DeadCodeElimination()]
                                       + _legalize(target) + [schedule.default_schedule()])
        lowered = seq(mod)
    text = lowered["main"].script()
    rows = []
    rng = np.random.default_rng(0)
    for gv, f in lowered.functions_items():
        if not isinstance(f, tvm.tirx.PrimFunc):
            continue
        calls = len(re.findall(r"call_tir\((?:cls\.)?%s\b" % re.escape(gv.name_hint), text))
        if not calls:
            continue
        fn = tvm.tirx.build(tvm.IRModule({"main": f.with_attr("global_symbol", "main")}), target=target)
        args = []
        for p in f.params:
            shape = [int(x) for x in p.shape]
            dtype = str(p.dtype)
            v = rng.standard_normal(shape).astype(dtype) if "float" in dtype else np.zeros(shape, dtype)
            args.append(tvm.runtime.tensor(v, dev))
        fn(*args)
        n = 5
        t0 = time.perf_counter()
        for _ in range(n):
            fn(*args)
        rows.append([gv.name_hint, calls, (time.perf_counter() - t0) / n * 1e3 * calls])
    total = sum(r[2] for r in rows) or 1.0
    rows.sort(key=lambda r: -r[2])
    return [[r[0], r[1], round(r[2], 3), round(r[2] / total, 3)] for r in rows[:top]]


def _legalize(target):
    from tvm.relax.backend.cpu_generic import pipeline as cpu
    return cpu.library_dispatch_passes(target) + cpu.legalize_passes(target)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, nargs="*", default=[2, 1])
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--no-naive", action="store_true", help="skip the unscheduled arm (slow)")
    ap.add_argument("--json", default=os.path.join(HERE, "results", "tvm_schedule.json"))
    a = ap.parse_args()

    import tvm
    from tvm import relax
    from tvm.target import codegen

    from pared.backends.common import to_numpy
    from pared.backends.executor import Executor
    from pared.backends.tvm import runtime as tvm_runtime
    from pared.backends.tvm import schedule
    from pared.backends.tvm.lower import _lift_weights, to_relax
    from pared.backends.tvm.weights import WeightStore
    from pared.bench import write_results
    from pared.ir.capture import capture
    from pared.targets import get_target
    from pared.testing import save_program

    base = dict(get_target("tvm-cpu").to_json()["tvm_target"])
    targets = {"tvm_sched": tvm.target.Target(base),
               "tvm_sched_host": tvm.target.Target(dict(base, mcpu=codegen.llvm_get_system_cpu())),
               "tvm_native": tvm.target.Target(dict(get_target("tvm-native").resolve().to_json()["tvm_target"]))}
    dev = tvm.cpu(0)
    out = {"what": __doc__.split("\n\n")[0], "repeats": a.repeats, "omp_wait_policy": "PASSIVE",
           "host_mcpu": codegen.llvm_get_system_cpu(),
           "native_mattr": list(get_target("tvm-native").resolve().to_json()["tvm_target"]["mattr"]),
           "simd_bits": {k: schedule.simd_bits(t) for k, t in targets.items()},
           "cpu_count": os.cpu_count(), "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
           "graphs": {}}
    root = tempfile.mkdtemp(prefix="tvm_schedule_")
    for name, (model, example) in graphs().items():
        if a.only and name not in a.only:
            continue
        program = capture(model, example)
        graph = program.graphs["main"]
        ref = to_numpy(graph.run(*graph.example_inputs))[0]
        d = os.path.join(root, name)
        os.makedirs(d)
        mod, lifted = _lift_weights(to_relax(graph, "main"), d, "main.weights")
        params = WeightStore(os.path.join(d, "main.weights"), dev).tensors(lifted["params"], "bench")
        arrays = [tvm.runtime.tensor(np.ascontiguousarray(v), dev) for v in to_numpy(graph.example_inputs)]
        vms, build_s = {}, {}
        builds = ({} if a.no_naive else {"tvm_naive": lambda: tvm.compile(mod, target=targets["tvm_sched"])})
        builds.update({k: (lambda t=t: tvm.compile(mod, target=t, relax_pipeline=schedule.pipeline(t)))
                       for k, t in targets.items()})
        # backend option fast_math: erf / tanh / exp / GELU / softmax as polynomial arithmetic
        builds.update({f"{k}_fast": (lambda t=targets[k]: tvm.compile(
            mod, target=t, relax_pipeline=schedule.pipeline(t, fast_math=True))) for k in ("tvm_sched", "tvm_native")})
        for arm, build in builds.items():
            t0 = time.perf_counter()
            ex = build()
            build_s[arm] = round(time.perf_counter() - t0, 2)
            ex.export_library(os.path.join(d, arm + ".so"))
            vms[arm] = relax.VirtualMachine(tvm.runtime.load_module(os.path.join(d, arm + ".so")), dev)
        res = {"inputs": [list(x.shape) for x in example], "build_s": build_s, "rel_l2_vs_eager": {},
               "median_ms": {}, "vs_ort": {}}

        def call(arm):
            o = vms[arm]["main"](*arrays, *params)
            return o[0].numpy() if not hasattr(o, "numpy") else o.numpy()

        for arm in vms:
            got = call(arm)
            res["rel_l2_vs_eager"][arm] = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
        if "tvm_naive" in vms:
            res["sched_equals_naive"] = bool(np.array_equal(call("tvm_naive"), call("tvm_sched")))
        for threads in a.threads:
            tvm_runtime._set_threads(threads)
            torch.set_num_threads(threads)
            art = save_program(program, os.path.join(d, f"ort{threads}"), dict(get_target("cpu").to_json(),
                                                                              threads=threads))
            ort = Executor(art, threads=threads)
            np_in = to_numpy(graph.example_inputs)
            fns = {arm: (lambda arm=arm: call(arm)) for arm in vms}
            fns["ort"] = lambda: ort(*np_in)
            for f in fns.values():
                f()
            times = {k: [] for k in fns}
            for i in range(a.repeats):
                order = list(fns) if i % 2 == 0 else list(fns)[::-1]
                for k in order:
                    t0 = time.perf_counter()
                    fns[k]()
                    times[k].append((time.perf_counter() - t0) * 1e3)
            med = {k: round(statistics.median(v), 3) for k, v in times.items()}
            res["median_ms"][f"threads_{threads}"] = med
            res["vs_ort"][f"threads_{threads}"] = {k: round(v / med["ort"], 2) for k, v in med.items() if k != "ort"}
            if threads == a.threads[0]:
                res["profile_tvm_sched_host"] = {"threads": threads,
                                                 "top": _profile(mod, targets["tvm_sched_host"], dev)}
            print(name, threads, med, res["vs_ort"][f"threads_{threads}"], flush=True)
        out["graphs"][name] = res
    out["load_average_at_end"] = [round(v, 2) for v in os.getloadavg()]
    print(out)
    write_results(a.json, out)


if __name__ == "__main__":
    main()
