"""Score a DiT workload's shipped weights: DDIM-50 samples of every class,
judged by the judge CNN, and a grid PNG (one row per class).

    python examples/dit_mnist/evaluate.py                      # dit_mnist, 200 samples, CFG 1.5
    python examples/dit_mnist/evaluate.py --workload dit_moe_mnist --cfg 1.0

Writes <workload>/samples.png and <workload>/eval.json (accuracy, confidence,
sampler settings, seconds).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch


def grid(images: np.ndarray, labels: np.ndarray, per_class: int, scale: int = 3) -> np.ndarray:
    """[N,1,H,W] in [0,1] -> one row per class, `per_class` columns, upscaled, 1-px gaps."""
    h = images.shape[-1] * scale
    out = np.ones((10 * (h + 1) + 1, per_class * (h + 1) + 1), np.float32)
    for c in range(10):
        for k, i in enumerate(np.flatnonzero(labels == c)[:per_class]):
            out[1 + c * (h + 1):1 + c * (h + 1) + h, 1 + k * (h + 1):1 + k * (h + 1) + h] = \
                np.kron(images[i, 0], np.ones((scale, scale)))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default="dit_mnist", choices=["dit_mnist", "dit_moe_mnist"])
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true", help="print the scores only")
    a = p.parse_args()
    from pared.workloads import EXAMPLES, DiTWorkload, torch_callable
    torch.set_num_threads(a.threads)
    wl = DiTWorkload(a.workload, batch=10, samples=a.samples, steps=a.steps, cfg_scale=a.cfg)
    t0 = time.time()
    imgs = wl.run(torch_callable(wl.build()))
    s = wl.judge(imgs)
    res = {"workload": a.workload, "samples": a.samples, "sampler": f"DDIM-{a.steps}", "cfg_scale": a.cfg,
           "judge_accuracy": s["accuracy"], "judge_confidence": s["confidence"],
           "seconds": round(time.time() - t0, 1), "threads": a.threads}
    print(json.dumps(res))
    if not a.no_write:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        folder = os.path.join(EXAMPLES, a.workload)
        plt.imsave(os.path.join(folder, "samples.png"),
                   grid(wl.to_pixels(imgs), wl.all_labels(), per_class=min(10, a.samples // 10)),
                   cmap="gray", vmin=0, vmax=1)
        with open(os.path.join(folder, "eval.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
