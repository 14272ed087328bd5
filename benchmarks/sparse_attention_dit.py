"""Entropy-guided attention sparsity (`sparse_attention`, ToProVAR's local heads) composed with
whole-stack caching on dit_mnist, side by side in one process: is caching + sparse attention faster
than caching alone, at what fidelity?

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/sparse_attention_dit.py [--repeats 5]
    (smoke: --steps 10 --samples 10 --repeats 1 --arms window_h0.8)

Builds, for the CPU target, with one thread each: eager, plain (no passes), cache
(examples/pipelines/dit_cache.yaml: TaylorSeer over the block stack, a full step every 4th) and,
per arm, cache followed by sparse_attention in every variant that holds attention: the heads whose
normalized entropy (attention_entropy on the calibration request, through the cached program) is
below a threshold attend to 4 x 4 windows of the 8 x 8 token grid (mode window: block-local, the
attention work shrinks) or keep their 16 largest scores (mode topk: masks-only); with a goal, the
most local heads whose samples still meet it on the calibration request. Times the workload's task
(one DDIM batch, CFG) alternating, median over rounds, and scores the whole fidelity set against
the eager model's samples (PSNR, judge accuracy). The issue's bar for composition with caching:
faster than `cache` at >= 32 dB PSNR, judge accuracy within 2 points.
Writes benchmarks/results/sparse_attention_dit.json.
"""
from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from pared.bench import timing_stats, write_results  # noqa: E402
from pared.registry import get_pass  # noqa: E402
from pared.workloads import get_workload  # noqa: E402
from token_merge_dit import _passes, compare_on_dit, target_met  # noqa: E402

ARMS = {
    "window_h0.8": {"max_normalized": 0.8, "window": [4, 4]},
    "window_all": {"max_normalized": 1.0, "window": [4, 4]},
    "window_goal32": {"target": {"psnr_db": 32}, "window": [4, 4]},
    "topk16_h0.9": {"max_normalized": 0.9, "mode": "topk", "k": 16},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--steps", type=int, default=50, help="DDIM steps (the workload's default 50)")
    ap.add_argument("--samples", type=int, default=200, help="samples in the fidelity set (the workload's 200)")
    ap.add_argument("--arms", nargs="*", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--json", default=os.path.join(HERE, "results", "sparse_attention_dit.json"))
    a = ap.parse_args()
    wl = get_workload("dit_mnist", steps=a.steps, samples=a.samples)
    cache = _passes("dit_cache.yaml")
    builds = {"plain": [], "cache": cache}
    builds.update({f"cache_{n}": cache + [get_pass("sparse_attention")(**ARMS[n])] for n in a.arms})
    rows, timing = compare_on_dit(wl, builds, a.repeats, {"AttentionSparsityDecisions": "attention_flops_ratio"})
    for n in a.arms:
        rows[f"cache_{n}"]["options"] = ARMS[n]
    target = target_met(rows, "cache_")
    out = {"what": f"dit_mnist: sparse_attention (local heads by attention entropy) on top of taylor_cache N=4 vs "
                   f"caching alone; one DDIM-{a.steps} batch of {wl.batch} (CFG {wl.cfg_scale}) per timed call, "
                   f"alternating, 1 thread; fidelity vs the eager (uncached) samples over {a.samples} samples",
           "repeats": a.repeats, "heads": 32, "eager_ms": timing_stats(timing, "eager"), "contenders": rows,
           "target_met": target, "timing": timing}
    write_results(a.json, out)
    print(f"wrote {a.json}", flush=True)


if __name__ == "__main__":
    main()
