"""Side-by-side speed of the spine's lowering: eager PyTorch vs. ONNX Runtime vs.
untuned TVM, for the spine's reference models, in one process.

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/spine.py [--models tiny,dit,vit,minilm] [--repeats 20]
        [--threads 1]

Each round calls every runner once, in rotating order; the median per runner is
reported with its ratio to eager and to ORT. Every runner has the same intra-op
thread count (torch, the ONNX Runtime session, TVM's pool), recorded in the result.
Writes benchmarks/results/spine.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "e2e"))

import torch  # noqa: E402

import pared  # noqa: E402
from pared.fidelity import side_by_side  # noqa: E402
from pared.bench import write_results  # noqa: E402
from pared.targets import get_target  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="tiny_transformer,dit,vit,minilm")
    ap.add_argument("--targets", default="cpu,tvm-cpu")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="intra-op threads for every runner")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "spine.json"))
    a = ap.parse_args()
    from test_models import MODELS  # the e2e tests' model factories

    torch.set_num_threads(a.threads)
    results = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                           "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
                           "threads": a.threads, "torch_threads": torch.get_num_threads()},
               "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "models": {}}
    for name in a.models.split(","):
        model, args, kwargs, _ = MODELS[name]()
        runners = {}
        feed = None
        row = {}
        for target in a.targets.split(","):
            t0 = time.perf_counter()
            pinned = dataclasses.replace(get_target(target), threads=a.threads)
            opt = pared.optimize(model, args, kwargs=kwargs, target=pinned, bench_repeats=0)
            row[f"{target}_build_s"] = round(time.perf_counter() - t0, 2)
            row[f"{target}_rel_l2"] = opt.report["fidelity"]["rel_l2_max"]
            ex = opt.executor
            row[f"{target}_threads"] = int(ex.target["threads"])
            feed = [t.numpy() for t in args]
            runners[target] = (lambda ex=ex, feed=feed: ex.run_flat(*feed))

        def eager() -> None:
            with torch.no_grad():
                model(*args, **kwargs)

        sp = side_by_side({"eager": eager, **runners}, repeats=a.repeats, warmup=2)
        row.update({f"{k}_ms": round(v * 1e3, 3) for k, v in sp["median_s"].items()})
        row.update({f"{k}_speedup_vs_eager": round(v, 3) for k, v in sp["speedup"].items() if k != "eager"})
        if "cpu" in runners and "tvm-cpu" in runners:
            row["tvm_vs_ort"] = round(sp["median_s"]["cpu"] / sp["median_s"]["tvm-cpu"], 3)
        results["models"][name] = row
        print(name, json.dumps(row), flush=True)
    write_results(a.out, results, indent=1)
    print("wrote", a.out)


if __name__ == "__main__":
    main()
