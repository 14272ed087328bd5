"""timestep_quant when the request's step count differs from the calibration's:
variants picked by the timestep's value (`select: timestep`) vs by call index
(`select: call`), on dit_mnist, in one process.

    OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/quant_dit_steps.py \
        [--samples 40] [--steps 20] [--buckets 4]

Calibration: the workload's DDIM-50 calibration request. Task: DDIM-`steps`
sampling (CFG 1.5, batch 10) of `--samples` samples from each artifact, PSNR
against eager fp32 at the same step count and the judge's accuracy; which
variant ran how often in one request. Writes benchmarks/results/quant_dit_steps.json.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import platform
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))

import torch  # noqa: E402

import pared  # noqa: E402
from pared.targets import get_target  # noqa: E402
from pared.workloads import get_workload, torch_callable  # noqa: E402
from pared.bench import write_results  # noqa: E402

#: the adaLN modulation linears stay float, as in examples/pipelines/dit_int8.yaml
ADA = ["dit.transformer_blocks.*.norm1.linear", "dit.proj_out_1"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--samples", type=int, default=40)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--buckets", type=int, default=4)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "quant_dit_steps.json"))
    a = ap.parse_args()
    torch.set_num_threads(1)
    t_start = time.time()
    calib_wl = get_workload("dit_mnist", samples=a.samples)
    wl = get_workload("dit_mnist", samples=a.samples, steps=a.steps)
    model = calib_wl.build()
    target = dataclasses.replace(get_target("cpu"), threads=1)
    ref = wl.run(torch_callable(model), None)
    results = {}
    for select in ("timestep", "call"):
        print(f"select: {select}", flush=True)
        opt = pared.optimize(model, calib_wl.example_inputs(), target=target, calibration=calib_wl.calibration(),
                             pipeline=[{"timestep_quant": {"buckets": a.buckets, "exclude": ADA, "select": select}}],
                             allow_fidelity_loss=True, bench_repeats=0)
        ex = opt.executor
        got = wl.run(ex, ex.reset)
        ex.reset()
        wl.task(ex, ex.reset)
        rec = opt.program.records["TimestepQuantPlan"]
        results[select] = {"fidelity": wl.fidelity(ref, got),
                           "variants_in_one_request": dict(collections.Counter(ex.trace)),
                           "bucket_t_ranges": [list(r) for r in rec.t_ranges], "edges": list(rec.edges)}
        print(f"  {results[select]['fidelity']}", flush=True)
    out = {
        "what": f"dit_mnist timestep_quant ({a.buckets} buckets) calibrated on DDIM-{calib_wl.steps}, sampled "
                f"with DDIM-{a.steps}: variants by t vs by call index",
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "task": wl.summary, "calibration": calib_wl.summary,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": 1},
        "results": results, "total_s": round(time.time() - t_start, 1),
    }
    write_results(a.out, out, indent=1)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
