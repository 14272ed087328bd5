"""The trained dit_mnist in diffusers' DiTPipeline, eager against the same pipeline after
pared.integrations.diffusers.optimize_pipeline (calibrated by the pipeline's own loop), side by
side in one run: the judge's accuracy on the generated digits, PSNR against the eager pipeline's
images (same generator seeds), and the wall time of one generation (the whole pipeline call:
DDIM-50 with classifier-free guidance, 10 digits), arms alternating, median of --repeats.

    .venv/bin/python benchmarks/dit_pipeline.py [--generations 10] [--repeats 5] [--threads 1]

Arms: eager (the DiT in PyTorch), plain (the empty pipeline: the artifact on ONNX Runtime) and
taylor (taylor_cache, interval 3). Writes benchmarks/results/dit_pipeline.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

HERE = os.path.dirname(os.path.abspath(__file__))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pared.bench import write_results  # noqa: E402
from pared.workloads import example_module  # noqa: E402

LABELS = list(range(10))
STEPS, CFG = 50, 1.5
ARMS = {"plain": [], "taylor": [{"taylor_cache": {"steps": STEPS, "interval": 3}}]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generations", type=int, default=10, help="pipeline calls (10 digits each) judged per arm")
    ap.add_argument("--repeats", type=int, default=5, help="timed rounds, arms alternating")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=os.path.join(HERE, "results", "dit_pipeline.json"))
    a = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    torch.set_num_threads(a.threads)
    from pared.analysis.metrics import psnr_db
    from pared.integrations import diffusers as pd
    pl, judge = example_module("dit_mnist", "pipeline.py"), example_module("judge")
    call = {"class_labels": LABELS, "num_inference_steps": STEPS, "guidance_scale": CFG}
    t_start = time.perf_counter()

    def generate(pipe, seed: int) -> np.ndarray:
        with torch.no_grad():
            img = pipe(**call, generator=torch.Generator().manual_seed(seed), output_type="np").images
        return img.transpose(0, 3, 1, 2)

    pipes = {"eager": pl.dit_pipeline()}
    for name, pipeline in ARMS.items():
        pipe = pl.dit_pipeline()
        from pared.targets import get_target
        target = get_target("cpu").to_json() | {"threads": a.threads}
        opt = pd.optimize_pipeline(pipe, calibration=[{**call, "seed": 0}], pipeline=pipeline, target=target,
                                   allow_fidelity_loss=True, bench_repeats=1)
        pipes[name] = pipe
        print(f"optimized {name}", flush=True)
    seeds = [100 + i for i in range(a.generations)]           # held out: calibration ran seed 0
    images = {k: np.concatenate([generate(p, s) for s in seeds]) for k, p in pipes.items()}
    labels = np.tile(LABELS, len(seeds))
    quality = {k: {**judge.score(v, labels), "psnr_db_vs_eager": round(psnr_db(images["eager"], v), 2)}
               for k, v in images.items()}
    for k, q in quality.items():
        print(k, q, flush=True)
    times = {k: [] for k in pipes}
    for k, p in pipes.items():        # warm-up
        generate(p, 1)
    for r in range(a.repeats):
        for k, p in pipes.items():
            t0 = time.perf_counter()
            generate(p, 1 + r)
            times[k].append(time.perf_counter() - t0)
    med = {k: round(statistics.median(v) * 1e3, 1) for k, v in times.items()}
    result = {
        "benchmark": "dit_pipeline", "pipeline": "diffusers DiTPipeline (examples/dit_mnist/pipeline.py)",
        "call": {**call, "digits_per_call": len(LABELS)}, "generations": a.generations, "seeds": seeds,
        "threads": a.threads, "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "repeats": a.repeats,
        "arms": {k: {"pared_pipeline": ARMS.get(k, "eager PyTorch")} for k in pipes},
        "quality": quality,
        "ms_per_generation": med, "speedup_vs_eager": {k: round(med["eager"] / v, 3) for k, v in med.items()},
        "speedup_vs_plain": {k: round(med["plain"] / v, 3) for k, v in med.items()},
        "seconds": round(time.perf_counter() - t_start, 1),
    }
    write_results(a.json, result)
    print(f"ms per generation {med}; wrote {a.json}", flush=True)


if __name__ == "__main__":
    main()
